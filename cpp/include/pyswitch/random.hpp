/// @file random.hpp
/// Counter-based random numbers (Philox-4x32-10, Salmon et al. 2011): value i of stream s under
/// seed k is a pure function of (k, s, i), so any thread split gives the same numbers and the
/// same seed gives bitwise-identical results on every machine.
#pragma once

#include <cstdint>

namespace pyswitch {

/// Stream tags: the high byte says what a stream is for, so that no two uses of one seed ever
/// draw the same numbers (the low bits count steps or name tensors).
constexpr uint64_t kStreamInit = uint64_t{0} << 56;     ///< + parameter number
constexpr uint64_t kStreamJitter = uint64_t{1} << 56;   ///< + training step
constexpr uint64_t kStreamDropout = uint64_t{2} << 56;  ///< + training step

/// Four 32-bit random words for counter (stream, index) under seed.
void philox4x32(uint64_t seed, uint64_t stream, uint64_t index, uint32_t out[4]);

/// Uniform float in [0, 1) from the top 24 bits of a word.
inline float uniform_from_bits(uint32_t word) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
}

/// Fills n values from a normal(0, std) truncated to [-2 std, 2 std] by resampling (the
/// paper's initialiser, section 2.4). out[i] is value first_index + i of the stream, so a slice
/// of a tensor (a rank's experts) draws exactly the values of the whole tensor's init.
/// Deterministic in (seed, stream); multi-threaded.
void truncated_normal(float* out, int64_t n, double std, uint64_t seed, uint64_t stream,
                      int64_t first_index = 0);

/// Fills n values uniform in [lo, hi): out[i] is value first_index + i of the stream.
/// Deterministic in (seed, stream); multi-threaded.
void uniform(float* out, int64_t n, float lo, float hi, uint64_t seed, uint64_t stream,
             int64_t first_index = 0);

}  // namespace pyswitch
