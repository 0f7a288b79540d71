// Internal to the CUDA backend: the small device helpers every kernel file uses: grid-stride
// indices, the 2-D (rows x columns) launch shape, and float32/bfloat16 element access widened
// to float32.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "pyswitch/bf16.hpp"

namespace pyswitch::cuda::detail {

// A 1-D grid-stride loop: for (i = first_index(); i < n; i += grid_stride()).
__device__ inline int64_t first_index() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ inline int64_t grid_stride() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// A 2-D launch over (rows, cols): a block covers a power-of-two slice of a row (at least a
// warp) and kThreads / that many rows; the grid strides over rows (first_row, row_step) and
// covers the columns (this_col).
struct RowGrid {
  dim3 grid, block;
};
inline RowGrid row_grid(int64_t rows, int64_t cols) {
  unsigned bx = 32;
  while (bx < cols && bx < static_cast<unsigned>(kThreads)) bx *= 2;
  const unsigned by = static_cast<unsigned>(kThreads) / bx;
  const int64_t gx = (cols + bx - 1) / bx;
  int64_t gy = (rows + by - 1) / by;
  if (gy > 65535) gy = 65535;
  return {dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), dim3(bx, by)};
}
__device__ inline int64_t first_row() {
  return static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
}
__device__ inline int64_t row_step() {
  return static_cast<int64_t>(gridDim.y) * blockDim.y;
}
__device__ inline int64_t this_col() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// Element i of a float32 or bfloat16 array as float32 (bf16 widened exactly), and a float32
// value stored back (bf16 rounded to nearest even, as the CPU's convert).
__device__ inline float load_as_float(const float* p, int64_t i) {
  return p[i];
}
__device__ inline float load_as_float(const bf16* p, int64_t i) {
  return bf16_to_float(p[i]);
}
__device__ inline void store_from_float(float* p, int64_t i, float value) {
  p[i] = value;
}
__device__ inline void store_from_float(bf16* p, int64_t i, float value) {
  p[i] = float_to_bf16(value);
}

}  // namespace pyswitch::cuda::detail
