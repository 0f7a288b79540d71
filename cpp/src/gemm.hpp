// Internal: float32 GEMM through oneDNN, split into fixed row blocks so that the result does
// not depend on the thread count (each block is one single-threaded oneDNN call).
#pragma once

#include <cstdint>

namespace pyswitch::detail {

// C (M, N) = alpha * op(A) @ op(B) + beta * C, row-major. op(A) is (M, K): A is (M, K) with
// leading dimension lda, or (K, M) when trans_a. op(B) is (K, N): B is (K, N), or (N, K) when
// trans_b. Throws pyswitch::Error if oneDNN reports a failure.
void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace pyswitch::detail
