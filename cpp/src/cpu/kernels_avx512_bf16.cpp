// AVX-512 (F, BW, DQ, VL) + AVX512_BF16 CPU kernels, compiled with those flags only in this
// file. A 16-lane vector is one __m512; lane and operation order match the scalar reference.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/kernels.hpp"

namespace pyswitch::cpu::avx512_bf16 {
namespace {

struct V {
  __m512 x;
};
struct DV {
  __m512d lo, hi;
};

inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}
inline V load(const float* p) {
  return {_mm512_loadu_ps(p)};
}
inline V load_tail(const float* p, int64_t n, float fill) {
  return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), tail_mask(n), p)};
}
inline void store(float* p, V a) {
  _mm512_storeu_ps(p, a.x);
}
inline void store_tail(float* p, V a, int64_t n) {
  _mm512_mask_storeu_ps(p, tail_mask(n), a.x);
}
inline V set1(float x) {
  return {_mm512_set1_ps(x)};
}
inline V add(V a, V b) {
  return {_mm512_add_ps(a.x, b.x)};
}
inline V sub(V a, V b) {
  return {_mm512_sub_ps(a.x, b.x)};
}
inline V mul(V a, V b) {
  return {_mm512_mul_ps(a.x, b.x)};
}
inline V max(V a, V b) {
  return {_mm512_max_ps(a.x, b.x)};
}
inline V fma(V a, V b, V c) {
  return {_mm512_fmadd_ps(a.x, b.x, c.x)};
}
inline V round_even(V a) {
  return {_mm512_roundscale_ps(a.x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline V ldexp_int(V p, V n) {
  const __m512i e =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.x), _mm512_set1_epi32(127)), 23);
  return {_mm512_mul_ps(p.x, _mm512_castsi512_ps(e))};
}
inline V select_lt(V x, V t, V if_less, V otherwise) {
  return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(x.x, t.x, _CMP_LT_OQ), otherwise.x, if_less.x)};
}
inline bool any_nonfinite(V a, int64_t) {
  const __m512 d = _mm512_sub_ps(a.x, a.x);
  return _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q) != 0;
}
inline float reduce_max(V a) {
  return _mm512_reduce_max_ps(a.x);
}
inline int first_equal(V a, float value, int64_t n) {
  const unsigned bits =
      _mm512_mask_cmp_ps_mask(tail_mask(n), a.x, _mm512_set1_ps(value), _CMP_EQ_OQ);
  return bits ? __builtin_ctz(bits) : -1;
}
inline DV dzero() {
  return {_mm512_setzero_pd(), _mm512_setzero_pd()};
}
inline void dacc(DV& acc, V a) {
  acc.lo = _mm512_add_pd(acc.lo, _mm512_cvtps_pd(_mm512_castps512_ps256(a.x)));
  acc.hi = _mm512_add_pd(
      acc.hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.x), 1))));
}
inline void dstore(double* out, DV a) {
  _mm512_storeu_pd(out, a.lo);
  _mm512_storeu_pd(out + 8, a.hi);
}
inline void daccumulate_scaled(double* dst, V a, double s, int64_t n) {
  const __m512d scale = _mm512_set1_pd(s);
  const __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(a.x));
  const __m512d hi =
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.x), 1)));
  const int64_t n_lo = n < 8 ? n : 8, n_hi = n > 8 ? n - 8 : 0;
  const __mmask8 m_lo = static_cast<__mmask8>((1u << n_lo) - 1u);
  const __mmask8 m_hi = static_cast<__mmask8>((1u << n_hi) - 1u);
  const __m512d d_lo = _mm512_maskz_loadu_pd(m_lo, dst);
  const __m512d d_hi = _mm512_maskz_loadu_pd(m_hi, dst + 8);
  _mm512_mask_storeu_pd(dst, m_lo, _mm512_add_pd(d_lo, _mm512_mul_pd(lo, scale)));
  _mm512_mask_storeu_pd(dst + 8, m_hi, _mm512_add_pd(d_hi, _mm512_mul_pd(hi, scale)));
}

}  // namespace

#include "cpu/route_rows.inl"
#include "cpu/transpose8_avx.inl"  // before gemm_tile.inl, which uses it

namespace {
// GEMM register block: 12 rows x 32 columns = 24 zmm accumulators, 2 for B, 1 broadcast.
constexpr int kGemmRows = 12;
constexpr int kGemmVectors = 2;
}  // namespace

#include "cpu/gemm_tile.inl"

namespace {

// The exact integer rounding, for the lanes the hardware instruction gets "wrong" (by the
// ml_dtypes definition): vcvtneps2bf16 flushes subnormal inputs to zero and keeps NaN payloads.
inline __m256i f32x16_to_bf16_exact(__m512i bits) {
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  const __m512i abs = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(abs, _mm512_set1_epi32(0x7f800000));
  const __m512i nan =
      _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x8000)),
                      _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(is_nan, rounded, nan));
}

inline __m256i f32x16_to_bf16(const float* src) {
  const __m512 x = _mm512_loadu_ps(src);
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i abs = _mm512_and_si512(bits, _mm512_set1_epi32(0x7fffffff));
  // Lanes needing the exact path: NaN (abs > inf) or subnormal (0 < abs < FLT_MIN).
  const __mmask16 special = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f800000)) |
                            (_mm512_cmplt_epu32_mask(abs, _mm512_set1_epi32(0x00800000)) &
                             _mm512_test_epi32_mask(abs, abs));
  const __m256i fast = (__m256i)_mm512_cvtneps_pbh(x);
  if (__builtin_expect(special == 0, 1)) return fast;
  return _mm256_mask_blend_epi16(special, fast, f32x16_to_bf16_exact(bits));
}

void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), f32x16_to_bf16(src + i));
  }
  if (i < n) scalar::table.f32_to_bf16(src + i, dst + i, n - i);
}

void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256i half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
  }
  if (i < n) scalar::table.bf16_to_f32(src + i, dst + i, n - i);
}

using VI = __m512i;
inline VI vload_u32(const uint32_t* p) {
  return _mm512_load_si512(p);
}
inline VI vset1_u32(uint32_t x) {
  return _mm512_set1_epi32(static_cast<int>(x));
}
inline VI vxor(VI a, VI b) {
  return _mm512_xor_si512(a, b);
}
// 32 x 32 -> 64-bit products of all 16 lanes, split into high and low words.
inline void mulhilo(VI a, VI b, VI* hi, VI* lo) {
  const __m512i even = _mm512_mul_epu32(a, b);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), _mm512_srli_epi64(b, 32));
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
inline __m512 to_uniform(VI w, float lo, float width) {
  const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(w, 8)),
                                 _mm512_set1_ps(1.0f / 16777216.0f));
  return _mm512_add_ps(_mm512_set1_ps(lo), _mm512_mul_ps(_mm512_set1_ps(width), u));
}
inline void vstore_f32(float* p, __m512 v) {
  _mm512_store_ps(p, v);
}

constexpr int kPhiloxLanes = 16;

}  // namespace

#include "cpu/philox_uniform.inl"

const KernelTable table = PYSWITCH_KERNEL_TABLE(CpuIsa::avx512_bf16);

}  // namespace pyswitch::cpu::avx512_bf16
