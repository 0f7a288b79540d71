// Scalar CPU kernels: the portable reference every other ISA is tested against. Plain C++
// with no ISA flags; the 16-lane "vectors" are arrays so that the lane order matches the SIMD
// kernels exactly.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/kernels.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/random.hpp"

namespace pyswitch::cpu::scalar {
namespace {

struct V {
  float v[16];
};
struct DV {
  double v[16];
};

inline V load(const float* p) {
  V r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
inline V load_tail(const float* p, int64_t n, float fill) {
  V r;
  for (int i = 0; i < 16; ++i) r.v[i] = i < n ? p[i] : fill;
  return r;
}
inline void store(float* p, V a) {
  std::memcpy(p, a.v, sizeof a.v);
}
inline void store_tail(float* p, V a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = a.v[i];
}
inline V set1(float x) {
  V r;
  for (float& lane : r.v) lane = x;
  return r;
}
#define PYSWITCH_LANEWISE(name, expr)     \
  inline V name(V a, V b) {               \
    V r;                                  \
    for (int i = 0; i < 16; ++i) {        \
      const float x = a.v[i], y = b.v[i]; \
      r.v[i] = (expr);                    \
    }                                     \
    return r;                             \
  }
PYSWITCH_LANEWISE(add, x + y)
PYSWITCH_LANEWISE(sub, x - y)
PYSWITCH_LANEWISE(mul, x* y)
PYSWITCH_LANEWISE(max, x > y ? x : y)  // the semantics of vmaxps: second operand unless x > y
#undef PYSWITCH_LANEWISE
inline V fma(V a, V b, V c) {
  V r;
  for (int i = 0; i < 16; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return r;
}
inline V round_even(V a) {
  V r;
  for (int i = 0; i < 16; ++i) r.v[i] = std::nearbyint(a.v[i]);
  return r;
}
inline V ldexp_int(V p, V n) {
  V r;
  for (int i = 0; i < 16; ++i) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    r.v[i] = p.v[i] * scale;
  }
  return r;
}
inline V select_lt(V x, V threshold, V if_less, V otherwise) {
  V r;
  for (int i = 0; i < 16; ++i) r.v[i] = x.v[i] < threshold.v[i] ? if_less.v[i] : otherwise.v[i];
  return r;
}
inline bool any_nonfinite(V a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(a.v[i])) return true;
  }
  return false;
}
inline float reduce_max(V a) {
  float m = a.v[0];
  for (int i = 1; i < 16; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}
inline int first_equal(V a, float value, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (a.v[i] == value) return static_cast<int>(i);
  }
  return -1;
}
inline DV dzero() {
  return DV{};
}
inline void dacc(DV& acc, V a) {
  for (int i = 0; i < 16; ++i) acc.v[i] += static_cast<double>(a.v[i]);
}
inline void dstore(double* out, DV a) {
  std::memcpy(out, a.v, sizeof a.v);
}
inline void daccumulate_scaled(double* dst, V a, double s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<double>(a.v[i]) * s;
}

}  // namespace

#include "cpu/route_rows.inl"

namespace {
// GEMM register block: 4 rows x 32 columns. Speed is not the reference's job; two vectors a row
// exercise the multi-vector paths that only the AVX-512 tier uses otherwise.
constexpr int kGemmRows = 4;
constexpr int kGemmVectors = 2;
}  // namespace

namespace {
// The reference's 8 x 8 transpose (the AVX tiers use cpu/transpose8_avx.inl): a plain copy.
inline void transpose8x8(const float* src, int64_t ld, float* dst, int64_t dst_ld) {
  for (int64_t i = 0; i < 8; ++i) {
    for (int64_t j = 0; j < 8; ++j) dst[i * dst_ld + j] = src[j * ld + i];
  }
}
}  // namespace

#include "cpu/gemm_tile.inl"

namespace {

void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]).bits;
}

void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(bf16{src[i]});
}

void philox_uniform(uint64_t seed, uint64_t stream, uint64_t first, int64_t counters, float lo,
                    float width, float* out) {
  for (int64_t c = 0; c < counters; ++c) {
    uint32_t words[4];
    philox4x32(seed, stream, first + static_cast<uint64_t>(c), words);
    for (int j = 0; j < 4; ++j) out[4 * c + j] = lo + width * uniform_from_bits(words[j]);
  }
}

}  // namespace

const KernelTable table = PYSWITCH_KERNEL_TABLE(CpuIsa::scalar);

}  // namespace pyswitch::cpu::scalar
