// Internal to the CUDA backend: the float32 GEMM with the CPU's arithmetic contract (gemm.cu),
// shared by the gemm op and the float32 expert FFNs (experts.cu).
#pragma once

#include <cstdint>

namespace pyswitch::cuda::ops {

/// C (M, N) row-major with row stride N = alpha * op(A) op(B), plus C when beta_one; op(A) is
/// (M, K) of a with leading dimension lda (transposed storage when trans_a), op(B) likewise.
/// Every element is the CPU's chain acc = fma(a[m, k], b[k, n], acc) over k = 0..K-1 from +0,
/// then alpha * acc, then c_old + that: bit-identical to the CPU GEMM for any shape. Launches on
/// stream(); K may be 0 (C = 0, or unchanged with beta_one).
void sgemm_fma_chain(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                     const float* a, int64_t lda, const float* b, int64_t ldb, bool beta_one,
                     float* c);

}  // namespace pyswitch::cuda::ops
