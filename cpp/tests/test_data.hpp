// Deterministic test inputs shared by the C++ test files.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

// n draws of N(0, stddev^2) from a seeded std::mt19937 (the same values on every platform's
// mt19937; std::normal_distribution may differ between standard libraries, which only changes
// which inputs a test sees, never what it checks).
inline std::vector<float> normal_vector(size_t n, uint32_t seed, float stddev = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, stddev);
  std::vector<float> out(n);
  for (float& x : out) x = dist(gen);
  return out;
}
