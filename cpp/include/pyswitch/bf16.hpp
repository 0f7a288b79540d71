/// @file bf16.hpp
/// The bfloat16 storage type and float32 <-> bfloat16 conversion, bit-identical to
/// ml_dtypes.bfloat16: round-to-nearest-even, overflow to +-inf, subnormals rounded (never
/// flushed), every NaN to the canonical quiet NaN 0x7fc0 / 0xffc0 with its sign.
#pragma once

#include <cstdint>
#include <cstring>

#include "pyswitch/detail/host_device.hpp"

namespace pyswitch {

/// bfloat16 as 16 raw bits: the top half of a float32. Trivially copyable, 2 bytes, no
/// arithmetic on purpose: compute in float32 and convert.
struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2, "bf16 must be 2 bytes");

/// float32 -> bfloat16, round to nearest even. Thread-safe scalar reference, also the device
/// conversion of the CUDA backend (PYSWITCH_HD).
PYSWITCH_HD inline bf16 float_to_bf16(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    return bf16{static_cast<uint16_t>(((bits >> 16) & 0x8000u) | 0x7fc0u)};
  }
  // Adding 0x7fff plus the lowest kept bit rounds half to even; a carry out of the mantissa
  // bumps the exponent, which is what makes the largest finite values round up to infinity.
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return bf16{static_cast<uint16_t>((bits + rounding) >> 16)};
}

/// bfloat16 -> float32, exact.
PYSWITCH_HD inline float bf16_to_float(bf16 value) {
  const uint32_t bits = static_cast<uint32_t>(value.bits) << 16;
  float out;
  memcpy(&out, &bits, sizeof out);
  return out;
}

/// Converts n float32 values to bfloat16 with the fastest kernel the active ISA has
/// (see cpu_isa.hpp); multi-threaded for large n. `src` and `dst` must not overlap.
/// Results are bit-identical on every ISA and thread count.
void convert_f32_to_bf16(const float* src, bf16* dst, int64_t n);

/// Converts n bfloat16 values to float32 (exact). `src` and `dst` must not overlap.
void convert_bf16_to_f32(const bf16* src, float* dst, int64_t n);

}  // namespace pyswitch
