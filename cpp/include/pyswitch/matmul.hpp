/// @file matmul.hpp
/// A plain matrix product on the core's GEMM library (oneDNN), using the whole thread pool.
/// For applications and for measuring the machine's GEMM limit; the layers use their own
/// blocked, thread-count-independent GEMMs.
#pragma once

#include <cstdint>

#include "pyswitch/tensor.hpp"

namespace pyswitch {

/// C (M, N) float32 = A (M, K) @ B (K, N), row-major and contiguous. A and B are both float32,
/// or both bfloat16 (float32 accumulation). The caller owns all three buffers. Results may
/// differ in the last bits between thread counts. Throws Error if oneDNN fails.
void matmul(DType dtype, int64_t M, int64_t N, int64_t K, const void* A, const void* B, float* C);

}  // namespace pyswitch
