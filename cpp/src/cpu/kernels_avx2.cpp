// AVX2 + FMA CPU kernels (compiled with -mavx2 -mfma only in this file). A 16-lane vector is
// two __m256; lane order and operation order match the scalar reference exactly.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/kernels.hpp"

namespace pyswitch::cpu::avx2 {
namespace {

struct V {
  __m256 lo, hi;
};
struct DV {
  __m256d a, b, c, d;
};

inline __m256i tail_mask(int64_t n) {  // n in [0, 8]
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
}
inline V load(const float* p) {
  return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
inline V load_tail(const float* p, int64_t n, float fill) {
  const int64_t n_lo = n < 8 ? n : 8, n_hi = n > 8 ? n - 8 : 0;
  const __m256 f = _mm256_set1_ps(fill);
  const __m256i m_lo = tail_mask(n_lo), m_hi = tail_mask(n_hi);
  const __m256 lo = _mm256_blendv_ps(f, _mm256_maskload_ps(p, m_lo), _mm256_castsi256_ps(m_lo));
  const __m256 hi = _mm256_blendv_ps(f, _mm256_maskload_ps(p + 8, m_hi), _mm256_castsi256_ps(m_hi));
  return {lo, hi};
}
inline void store(float* p, V a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline void store_tail(float* p, V a, int64_t n) {
  const int64_t n_lo = n < 8 ? n : 8, n_hi = n > 8 ? n - 8 : 0;
  _mm256_maskstore_ps(p, tail_mask(n_lo), a.lo);
  _mm256_maskstore_ps(p + 8, tail_mask(n_hi), a.hi);
}
inline V set1(float x) {
  return {_mm256_set1_ps(x), _mm256_set1_ps(x)};
}
inline V add(V a, V b) {
  return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
inline V sub(V a, V b) {
  return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)};
}
inline V mul(V a, V b) {
  return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
inline V max(V a, V b) {
  return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)};
}
inline V fma(V a, V b, V c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline V round_even(V a) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kMode), _mm256_round_ps(a.hi, kMode)};
}
inline __m256 ldexp8(__m256 p, __m256 n) {
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
inline V ldexp_int(V p, V n) {
  return {ldexp8(p.lo, n.lo), ldexp8(p.hi, n.hi)};
}
inline V select_lt(V x, V t, V if_less, V otherwise) {
  const __m256 m_lo = _mm256_cmp_ps(x.lo, t.lo, _CMP_LT_OQ);
  const __m256 m_hi = _mm256_cmp_ps(x.hi, t.hi, _CMP_LT_OQ);
  return {_mm256_blendv_ps(otherwise.lo, if_less.lo, m_lo),
          _mm256_blendv_ps(otherwise.hi, if_less.hi, m_hi)};
}
inline bool any_nonfinite(V a, int64_t) {
  // x - x is NaN exactly for NaN and +-inf; padding lanes hold finite fill values.
  const __m256 d_lo = _mm256_sub_ps(a.lo, a.lo), d_hi = _mm256_sub_ps(a.hi, a.hi);
  const __m256 bad = _mm256_or_ps(_mm256_cmp_ps(d_lo, d_lo, _CMP_UNORD_Q),
                                  _mm256_cmp_ps(d_hi, d_hi, _CMP_UNORD_Q));
  return _mm256_movemask_ps(bad) != 0;
}
inline float reduce_max(V a) {
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, a.lo);
  _mm256_store_ps(lanes + 8, a.hi);
  float m = lanes[0];
  for (int i = 1; i < 16; ++i) m = lanes[i] > m ? lanes[i] : m;
  return m;
}
inline int first_equal(V a, float value, int64_t n) {
  const __m256 v = _mm256_set1_ps(value);
  const unsigned bits =
      static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, v, _CMP_EQ_OQ))) |
      (static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a.hi, v, _CMP_EQ_OQ))) << 8);
  const unsigned valid = bits & ((n >= 16) ? 0xffffu : ((1u << n) - 1u));
  return valid ? __builtin_ctz(valid) : -1;
}
inline DV dzero() {
  const __m256d z = _mm256_setzero_pd();
  return {z, z, z, z};
}
inline void dacc(DV& acc, V x) {
  acc.a = _mm256_add_pd(acc.a, _mm256_cvtps_pd(_mm256_castps256_ps128(x.lo)));
  acc.b = _mm256_add_pd(acc.b, _mm256_cvtps_pd(_mm256_extractf128_ps(x.lo, 1)));
  acc.c = _mm256_add_pd(acc.c, _mm256_cvtps_pd(_mm256_castps256_ps128(x.hi)));
  acc.d = _mm256_add_pd(acc.d, _mm256_cvtps_pd(_mm256_extractf128_ps(x.hi, 1)));
}
inline void dstore(double* out, DV x) {
  _mm256_storeu_pd(out, x.a);
  _mm256_storeu_pd(out + 4, x.b);
  _mm256_storeu_pd(out + 8, x.c);
  _mm256_storeu_pd(out + 12, x.d);
}
inline void daccumulate_scaled(double* dst, V x, double s, int64_t n) {
  if (n < 16) {
    alignas(32) float lanes[16];
    _mm256_store_ps(lanes, x.lo);
    _mm256_store_ps(lanes + 8, x.hi);
    for (int64_t i = 0; i < n; ++i) dst[i] += static_cast<double>(lanes[i]) * s;
    return;
  }
  const __m256d scale = _mm256_set1_pd(s);
  const __m128 quarters[4] = {_mm256_castps256_ps128(x.lo), _mm256_extractf128_ps(x.lo, 1),
                              _mm256_castps256_ps128(x.hi), _mm256_extractf128_ps(x.hi, 1)};
  for (int q = 0; q < 4; ++q) {
    const __m256d product = _mm256_mul_pd(_mm256_cvtps_pd(quarters[q]), scale);
    _mm256_storeu_pd(dst + 4 * q, _mm256_add_pd(_mm256_loadu_pd(dst + 4 * q), product));
  }
}

}  // namespace

#include "cpu/route_rows.inl"
#include "cpu/transpose8_avx.inl"  // before gemm_tile.inl, which uses it

namespace {
// GEMM register block: 6 rows x 16 columns = 12 ymm accumulators, 2 for B, 1 broadcast.
constexpr int kGemmRows = 6;
constexpr int kGemmVectors = 1;
}  // namespace

#include "cpu/gemm_tile.inl"

namespace {

// Integer round-to-nearest-even with NaN canonicalisation, 8 lanes: exact for subnormals,
// unlike any hardware conversion instruction.
inline __m128i f32x8_to_bf16(__m256i bits) {
  const __m256i abs = _mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff));
  const __m256i is_nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan =
      _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x8000)),
                      _mm256_set1_epi32(0x7fc0));
  const __m256i result = _mm256_blendv_epi8(rounded, nan, is_nan);
  // packus works within 128-bit halves; every value fits 16 bits, so no saturation happens.
  const __m256i packed = _mm256_packus_epi32(result, result);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), f32x8_to_bf16(bits));
  }
  if (i < n) scalar::table.f32_to_bf16(src + i, dst + i, n - i);
}

void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i half = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m256i wide = _mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), wide);
  }
  if (i < n) scalar::table.bf16_to_f32(src + i, dst + i, n - i);
}

using VI = __m256i;
inline VI vload_u32(const uint32_t* p) {
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(p));
}
inline VI vset1_u32(uint32_t x) {
  return _mm256_set1_epi32(static_cast<int>(x));
}
inline VI vxor(VI a, VI b) {
  return _mm256_xor_si256(a, b);
}
// 32 x 32 -> 64-bit products of all 8 lanes, split into high and low words.
inline void mulhilo(VI a, VI b, VI* hi, VI* lo) {
  const __m256i even = _mm256_mul_epu32(a, b);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(b, 32));
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}
inline __m256 to_uniform(VI w, float lo, float width) {
  const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)),
                                 _mm256_set1_ps(1.0f / 16777216.0f));
  return _mm256_add_ps(_mm256_set1_ps(lo), _mm256_mul_ps(_mm256_set1_ps(width), u));
}
inline void vstore_f32(float* p, __m256 v) {
  _mm256_store_ps(p, v);
}

constexpr int kPhiloxLanes = 8;

}  // namespace

#include "cpu/philox_uniform.inl"

const KernelTable table = PYSWITCH_KERNEL_TABLE(CpuIsa::avx2);

}  // namespace pyswitch::cpu::avx2
