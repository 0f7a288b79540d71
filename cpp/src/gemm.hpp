// Internal: the core's GEMMs, on pyswitch's own kernel (cpu/gemm_tile.inl). Every element of C
// is one fixed float32 FMA chain over k, so a row's result depends only on its own data: never
// on M, on the row's place in the call, on the thread count or on the CPU tier (see
// docs/determinism.md). oneDNN is kept only as the comparison baseline.
#pragma once

#include <cstdint>
#include <string>

#include "pyswitch/bf16.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch::detail {

// C (M, N) float32 = alpha * op(A) @ op(B) + beta * C, row-major. op(A) is (M, K): A is (M, K)
// with leading dimension lda, or (K, M) when trans_a. op(B) is (K, N): B is (K, N), or (N, K)
// when trans_b. A and B are float32 or bfloat16 (both `dtype`); bfloat16 values are widened
// exactly and accumulate in float32. beta must be 0 or 1 (InvalidArgument otherwise). Element
// (m, n): acc = +0; acc = fma(a[m,k], b[k,n], acc) for k = 0..K-1; c = alpha == 1 ? acc :
// alpha * acc; c += c_old when beta == 1. Tiles of C run on the pool.
void gemm(DType dtype, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
          int64_t ldc);

// The same, bit for bit, on the calling thread only (for callers that are already parallel).
void gemm_serial(DType dtype, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                 float alpha, const void* A, int64_t lda, const void* B, int64_t ldb, float beta,
                 float* C, int64_t ldc);

// float32 shorthand of gemm().
inline void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                  int64_t ldc) {
  gemm(DType::float32, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// Which path a GEMM of this dtype takes on the active ISA, in words (for build_info).
std::string gemm_path(DType dtype);

// Plain (M, K) @ (K, N) with oneDNN's own threading over the whole pool: the comparison for
// the benchmarks. Its results may depend on the thread count and on the CPU's oneDNN kernels;
// bfloat16 throws Error where oneDNN has no bf16 matmul (below AVX-512).
void gemm_onednn_threaded(DType dtype, int64_t M, int64_t N, int64_t K, const void* A,
                          const void* B, float* C);

}  // namespace pyswitch::detail
