// The CUDA dispatch ops: dispatch, combine and their backward passes over a DispatchLayout.
// Row copies are coalesced word copies; every sum runs in one thread per output element, over
// the token's choices in j order (the CPU's order), so combine, dispatch_backward and both
// outputs of combine_backward are bit-identical to the CPU (moe/dispatch.cpp). The layout is a
// host structure: each op uploads the index arrays it reads.
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/kernel_utils.cuh"
#include "cuda/ops.hpp"
#include "pyswitch/bf16.hpp"

namespace pyswitch::cuda::ops {
namespace {

using namespace detail;  // kernel_utils.cuh and common.cuh

// buffer row r = x[row_token[r]], or zeros; rows of `words` words of type W.
template <class W>
__global__ void gather_rows_kernel(const W* x, const int32_t* row_token, int64_t rows,
                                   int64_t words, W* buffer) {
  const int64_t c = this_col();
  if (c >= words) return;
  for (int64_t r = first_row(); r < rows; r += row_step()) {
    const int32_t t = row_token[r];
    buffer[r * words + c] = t < 0 ? W{} : x[t * words + c];
  }
}

template <class W>
void gather_rows(const void* x, const int32_t* row_token, int64_t rows, int64_t row_bytes,
                 void* buffer) {
  const int64_t words = row_bytes / static_cast<int64_t>(sizeof(W));
  const RowGrid g = row_grid(rows, words);
  gather_rows_kernel<W><<<g.grid, g.block, 0, detail::stream()>>>(
      static_cast<const W*>(x), row_token, rows, words, static_cast<W*>(buffer));
  check_launch("dispatch");
}

// out[t] = sum over kept j of weight(t, j) * rows[row(t, j)], float32, j in order from +0;
// weight 1 when gate is null (the CPU's gather_weighted_sum, operation for operation).
template <class T>
__global__ void weighted_sum_kernel(const T* rows, const int64_t* assignment_row, const float* gate,
                                    int64_t tokens, int64_t k, int64_t d, T* out) {
  const int64_t c = this_col();
  if (c >= d) return;
  for (int64_t t = first_row(); t < tokens; t += row_step()) {
    float acc = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t r = assignment_row[t * k + j];
      if (r < 0) continue;
      const float weight = gate ? gate[t * k + j] : 1.0f;
      acc += weight * load_as_float(rows, r * d + c);
    }
    store_from_float(out, t * d + c, acc);
  }
}

template <class T>
void weighted_sum(const char* op, const void* rows, const int64_t* assignment_row,
                  const float* gate, int64_t tokens, int64_t k, int64_t d, void* out) {
  const RowGrid g = row_grid(tokens, d);
  weighted_sum_kernel<T><<<g.grid, g.block, 0, detail::stream()>>>(
      static_cast<const T*>(rows), assignment_row, gate, tokens, k, d, static_cast<T*>(out));
  check_launch(op);
}

// d_expert_out row r = gate of r's assignment * dy[token], or zeros for an empty row.
template <class T>
__global__ void scatter_gated_kernel(const T* dy, const int32_t* row_token,
                                     const int64_t* assignment_row, const float* gate, int64_t rows,
                                     int64_t k, int64_t d, T* d_expert_out) {
  const int64_t c = this_col();
  if (c >= d) return;
  for (int64_t r = first_row(); r < rows; r += row_step()) {
    const int32_t t = row_token[r];
    float v = 0.0f;
    if (t >= 0) {
      // The CPU's search; stopping at the last choice keeps a bad layout inside the arrays.
      int64_t j = 0;
      while (j + 1 < k && assignment_row[t * k + j] != r) ++j;
      v = load_as_float(dy, t * d + c) * gate[t * k + j];
    }
    store_from_float(d_expert_out, r * d + c, v);
  }
}

// d_gate[a] = <dy[t], expert_out[row(a)]>, float32, columns in order (the CPU's dot), for the
// assignments a = t * k + j; 0 when dropped. One thread per assignment keeps the CPU's order;
// the rows go through shared memory in column chunks so the global reads stay coalesced.
constexpr int kDotThreads = 128;
constexpr int kDotChunk = 32;

template <class T>
__global__ void gate_grad_kernel(const T* dy, const T* expert_out, const int64_t* assignment_row,
                                 int64_t assignments, int64_t k, int64_t d, float* d_gate) {
  __shared__ float up[kDotThreads][kDotChunk + 1];
  __shared__ float out[kDotThreads][kDotChunk + 1];
  __shared__ int64_t row_of[kDotThreads];  // -1: dropped, or past the last assignment
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kDotThreads;
  const int64_t mine = first + threadIdx.x;
  const int64_t my_row = mine < assignments ? assignment_row[mine] : -1;
  row_of[threadIdx.x] = my_row;
  __syncthreads();
  float dot = 0.0f;
  for (int64_t c0 = 0; c0 < d; c0 += kDotChunk) {
    for (int i = static_cast<int>(threadIdx.x); i < kDotThreads * kDotChunk; i += kDotThreads) {
      const int p = i / kDotChunk, col = i % kDotChunk;
      const int64_t r = row_of[p], c = c0 + col;
      if (r < 0 || c >= d) continue;  // a dropped choice reads nothing: its d_gate is 0
      up[p][col] = load_as_float(dy, ((first + p) / k) * d + c);
      out[p][col] = load_as_float(expert_out, r * d + c);
    }
    __syncthreads();
    if (my_row >= 0) {
      const int64_t n = d - c0 < kDotChunk ? d - c0 : kDotChunk;
      for (int64_t col = 0; col < n; ++col) dot += up[threadIdx.x][col] * out[threadIdx.x][col];
    }
    __syncthreads();
  }
  if (mine < assignments) d_gate[mine] = dot;
}

template <class T>
void combine_backward_typed(const void* dy, const void* expert_out, const int32_t* row_token,
                            const int64_t* assignment_row, const float* gate, int64_t tokens,
                            int64_t rows, int64_t k, int64_t d, void* d_expert_out, float* d_gate) {
  if (rows > 0) {
    const RowGrid g = row_grid(rows, d);
    scatter_gated_kernel<T><<<g.grid, g.block, 0, detail::stream()>>>(
        static_cast<const T*>(dy), row_token, assignment_row, gate, rows, k, d,
        static_cast<T*>(d_expert_out));
    check_launch("combine_backward");
  }
  const int64_t assignments = tokens * k;
  if (assignments > 0) {
    const auto blocks = static_cast<unsigned>((assignments + kDotThreads - 1) / kDotThreads);
    gate_grad_kernel<T><<<blocks, kDotThreads, 0, detail::stream()>>>(
        static_cast<const T*>(dy), static_cast<const T*>(expert_out), assignment_row, assignments,
        k, d, d_gate);
    check_launch("combine_backward");
  }
}

// Beyond the shared checks (backend_views.hpp): what the device kernels index by, d_model >= 1
// (moe/dispatch.cpp's check on the CPU) and the layout's own array sizes.
void require_layout_arrays(const char* op, int64_t d_model, const moe::DispatchLayout& layout) {
  PYSWITCH_CHECK_ARG(d_model >= 1, op, ": d_model must be >= 1, got ", d_model);
  PYSWITCH_CHECK_ARG(
      static_cast<int64_t>(layout.assignment_row.size()) == layout.num_tokens * layout.k &&
          static_cast<int64_t>(layout.row_token.size()) == layout.total_rows,
      op, ": the layout's index arrays do not match its num_tokens, k and total_rows");
}

}  // namespace

void dispatch(const TensorView& x, const moe::DispatchLayout& layout, const TensorView& buffer) {
  pyswitch::detail::check_layout_views(Device::cuda, "dispatch", "x", x, "buffer", buffer, layout);
  require_layout_arrays("dispatch", x.shape[1], layout);
  const int64_t rows = layout.total_rows;
  if (rows == 0) return;
  const DeviceArray<int32_t> row_token = DeviceArray<int32_t>::upload(layout.row_token, "dispatch");
  const int64_t row_bytes = x.shape[1] * dtype_size(x.dtype);
  // The widest word that divides a row and both base addresses (allocations are 256-aligned,
  // so this is 16 bytes whenever the row length allows it).
  const auto aligned = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && reinterpret_cast<uintptr_t>(x.data) % bytes == 0 &&
           reinterpret_cast<uintptr_t>(buffer.data) % bytes == 0;
  };
  if (aligned(16)) {
    gather_rows<uint4>(x.data, row_token.data(), rows, row_bytes, buffer.data);
  } else if (aligned(8)) {
    gather_rows<uint2>(x.data, row_token.data(), rows, row_bytes, buffer.data);
  } else if (aligned(4)) {
    gather_rows<uint32_t>(x.data, row_token.data(), rows, row_bytes, buffer.data);
  } else {
    gather_rows<uint16_t>(x.data, row_token.data(), rows, row_bytes, buffer.data);
  }
}

void combine(const TensorView& expert_out, const moe::DispatchLayout& layout,
             const TensorView& gate, const TensorView& y) {
  pyswitch::detail::check_combine(Device::cuda, expert_out, layout, gate, y);
  require_layout_arrays("combine", y.shape[1], layout);
  const int64_t T = layout.num_tokens, k = layout.k, d = y.shape[1];
  if (T == 0) return;
  const DeviceArray<int64_t> assignment_row =
      DeviceArray<int64_t>::upload(layout.assignment_row, "combine");
  if (y.dtype == DType::float32) {
    weighted_sum<float>("combine", expert_out.data, assignment_row.data(), gate.as<const float>(),
                        T, k, d, y.data);
  } else {
    weighted_sum<bf16>("combine", expert_out.data, assignment_row.data(), gate.as<const float>(), T,
                       k, d, y.data);
  }
}

void combine_backward(const TensorView& dy, const TensorView& expert_out,
                      const moe::DispatchLayout& layout, const TensorView& gate,
                      const TensorView& d_expert_out, const TensorView& d_gate) {
  pyswitch::detail::check_combine_backward(Device::cuda, dy, expert_out, layout, gate, d_expert_out,
                                           d_gate);
  require_layout_arrays("combine_backward", dy.shape[1], layout);
  const int64_t T = layout.num_tokens, R = layout.total_rows, k = layout.k, d = dy.shape[1];
  if (T == 0 && R == 0) return;
  const DeviceArray<int32_t> row_token =
      DeviceArray<int32_t>::upload(layout.row_token, "combine_backward");
  const DeviceArray<int64_t> assignment_row =
      DeviceArray<int64_t>::upload(layout.assignment_row, "combine_backward");
  if (dy.dtype == DType::float32) {
    combine_backward_typed<float>(dy.data, expert_out.data, row_token.data(), assignment_row.data(),
                                  gate.as<const float>(), T, R, k, d, d_expert_out.data,
                                  d_gate.as<float>());
  } else {
    combine_backward_typed<bf16>(dy.data, expert_out.data, row_token.data(), assignment_row.data(),
                                 gate.as<const float>(), T, R, k, d, d_expert_out.data,
                                 d_gate.as<float>());
  }
}

void dispatch_backward(const TensorView& d_buffer, const moe::DispatchLayout& layout,
                       const TensorView& dx) {
  pyswitch::detail::check_layout_views(Device::cuda, "dispatch_backward", "dx", dx, "d_buffer",
                                       d_buffer, layout);
  require_layout_arrays("dispatch_backward", dx.shape[1], layout);
  const int64_t T = layout.num_tokens, k = layout.k, d = dx.shape[1];
  if (T == 0) return;
  const DeviceArray<int64_t> assignment_row =
      DeviceArray<int64_t>::upload(layout.assignment_row, "dispatch_backward");
  if (dx.dtype == DType::float32) {
    weighted_sum<float>("dispatch_backward", d_buffer.data, assignment_row.data(), nullptr, T, k, d,
                        dx.data);
  } else {
    weighted_sum<bf16>("dispatch_backward", d_buffer.data, assignment_row.data(), nullptr, T, k, d,
                       dx.data);
  }
}

}  // namespace pyswitch::cuda::ops
