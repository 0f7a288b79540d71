/// @file matmul.hpp
/// A plain matrix product on the core's GEMM kernel (the one the layers use), over the whole
/// thread pool, and the same product on oneDNN for comparison.
#pragma once

#include <cstdint>

#include "pyswitch/tensor.hpp"

namespace pyswitch {

/// C (M, N) float32 = A (M, K) @ B (K, N), row-major and contiguous. A and B are both float32,
/// or both bfloat16 (widened exactly, float32 accumulation). The caller owns all three buffers.
/// Element (m, n) is the float32 FMA chain over k = 0..K-1 starting from +0, so row m of C
/// depends only on row m of A and on B: bit-identical for any M, thread count and CPU tier.
/// Thread-safe (buffers may not overlap C). Throws InvalidArgument for negative sizes or an
/// integer dtype.
void matmul(DType dtype, int64_t M, int64_t N, int64_t K, const void* A, const void* B, float* C);

/// The same product through oneDNN (dnnl_sgemm, or its bf16 matmul primitive) on the whole pool:
/// the GEMM library baseline for benchmarks. Its last bits may depend on the thread count and
/// the CPU. Throws InvalidArgument for an integer dtype, Error where oneDNN cannot run the dtype
/// (bf16 below AVX-512).
void matmul_onednn(DType dtype, int64_t M, int64_t N, int64_t K, const void* A, const void* B,
                   float* C);

}  // namespace pyswitch
