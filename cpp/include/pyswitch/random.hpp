/// @file random.hpp
/// Counter-based random numbers (Philox-4x32-10, Salmon et al. 2011): value i of stream s under
/// seed k is a pure function of (k, s, i), so any thread split gives the same numbers and the
/// same seed gives bitwise-identical results on every machine.
#pragma once

#include <cstdint>

#include "pyswitch/detail/host_device.hpp"

namespace pyswitch {

/// Stream tags: the high byte says what a stream is for, so that no two uses of one seed ever
/// draw the same numbers (the low bits count steps or name tensors).
constexpr uint64_t kStreamInit = uint64_t{0} << 56;     ///< + parameter number
constexpr uint64_t kStreamJitter = uint64_t{1} << 56;   ///< + training step
constexpr uint64_t kStreamDropout = uint64_t{2} << 56;  ///< + training step

/// Four 32-bit random words for counter (stream, index) under seed. Host and device (the CUDA
/// kernels draw the same dropout masks and jitter from it).
PYSWITCH_HD inline void philox4x32(uint64_t seed, uint64_t stream, uint64_t index,
                                   uint32_t out[4]) {
  uint32_t c[4] = {static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                   static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)};
  uint32_t key[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    const uint32_t next[4] = {hi1 ^ c[1] ^ key[0], lo1, hi0 ^ c[3] ^ key[1], lo0};
    for (int i = 0; i < 4; ++i) c[i] = next[i];
    key[0] += 0x9E3779B9u;
    key[1] += 0xBB67AE85u;
  }
  for (int i = 0; i < 4; ++i) out[i] = c[i];
}

/// Uniform float in [0, 1) from the top 24 bits of a word.
PYSWITCH_HD inline float uniform_from_bits(uint32_t word) {
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
