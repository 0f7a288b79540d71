// Internal: GEMMs through oneDNN. gemm() splits the rows of C into fixed blocks, each one
// single-threaded oneDNN call (gemm_serial), so the rounding never depends on the thread
// count; gemm_threaded lets oneDNN use the whole pool (for throughput measurements).
#pragma once

#include <cstdint>

#include "pyswitch/bf16.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch::detail {

// C (M, N) float32 = alpha * op(A) @ op(B) + beta * C, row-major. op(A) is (M, K): A is (M, K)
// with leading dimension lda, or (K, M) when trans_a. op(B) is (K, N): B is (K, N), or (N, K)
// when trans_b. A and B are float32 or bfloat16 (both `dtype`); bfloat16 accumulates in float32.
// beta must be 0 or 1. Throws pyswitch::Error if oneDNN fails.
void gemm(DType dtype, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
          int64_t ldc);

// The same as one single-threaded oneDNN call, for callers that split the work themselves
// (the result then depends only on the caller's blocks, never on the thread count).
void gemm_serial(DType dtype, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                 float alpha, const void* A, int64_t lda, const void* B, int64_t ldb, float beta,
                 float* C, int64_t ldc);

// float32 shorthand of gemm().
inline void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                  const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                  int64_t ldc) {
  gemm(DType::float32, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// Plain (M, K) @ (K, N) with oneDNN's own threading over the whole pool: fast, but the result
// may depend on the thread count. For pyswitch.matmul and the GEMM-limit benchmark.
void gemm_threaded(DType dtype, int64_t M, int64_t N, int64_t K, const void* A, const void* B,
                   float* C);

}  // namespace pyswitch::detail
