// The CUDA elementwise ops: dtype conversion, add, multiply, scale and the sum of squares. Each
// element goes through the same float32 operations as the CPU reference, and the sum of squares
// keeps the CPU's blocked summation order, so every result is bit-identical to the CPU table.
#include <vector>

#include "cuda/common.cuh"
#include "cuda/kernel_utils.cuh"
#include "cuda/ops.hpp"
#include "pyswitch/bf16.hpp"

namespace pyswitch::cuda::ops {
namespace {

using namespace detail;  // kernel_utils.cuh and common.cuh

template <class Src, class Dst>
__global__ void convert_kernel(const Src* src, Dst* dst, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    store_from_float(dst, i, load_as_float(src, i));
  }
}

// out may alias a or b: each element is read before it is written, by the same thread.
template <class A, class B, class Out>
__global__ void add_kernel(const A* a, const B* b, Out* out, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    store_from_float(out, i, load_as_float(a, i) + load_as_float(b, i));
  }
}

__global__ void multiply_kernel(float* x, const float* factor, int64_t n) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) x[i] = x[i] * factor[i];
}

__global__ void scale_kernel(float* x, int64_t n, float factor) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) x[i] = x[i] * factor;
}

// optim.cpp's blocked_sum: chunks of kSumChunk elements, each summed in kSumLanes interleaved
// double lanes (lane l takes the chunk's elements l, l + 8, ...) that are then added in lane
// order. The chunk partials are added on the host in chunk order, exactly as the CPU does.
constexpr int64_t kSumChunk = int64_t{1} << 14;
constexpr int kSumLanes = 8;

// One thread per (chunk, lane); a chunk's lanes are 8 consecutive threads of one warp. The
// loop bound is uniform over the block, so every warp reaches the shuffles whole.
__global__ void sum_of_squares_chunks(const float* x, int64_t n, int64_t chunks, double* partials) {
  for (int64_t block_first = static_cast<int64_t>(blockIdx.x) * blockDim.x;
       block_first < chunks * kSumLanes; block_first += grid_stride()) {
    const int64_t thread = block_first + threadIdx.x;
    const int64_t chunk = thread / kSumLanes;
    const int lane = static_cast<int>(thread % kSumLanes);
    double lane_sum = 0;
    if (chunk < chunks) {
      const int64_t end = min(n, (chunk + 1) * kSumChunk);
      for (int64_t i = chunk * kSumChunk + lane; i < end; i += kSumLanes) {
        lane_sum += static_cast<double>(x[i]) * x[i];
      }
    }
    const int first_lane_of_chunk = static_cast<int>(threadIdx.x % 32) - lane;
    double chunk_sum = 0;
    for (int l = 0; l < kSumLanes; ++l) {
      chunk_sum += __shfl_sync(0xffffffffu, lane_sum, first_lane_of_chunk + l);
    }
    if (lane == 0 && chunk < chunks) partials[chunk] = chunk_sum;
  }
}

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<float>) or f(Tag<bf16>) for a compute dtype (the views are checked before).
template <class F>
void with_compute_type(DType dtype, F&& f) {
  if (dtype == DType::float32) {
    f(Tag<float>{});
  } else {
    f(Tag<bf16>{});
  }
}

}  // namespace

void convert(const TensorView& src, const TensorView& dst) {
  pyswitch::detail::check_convert(Device::cuda, src, dst);
  const int64_t n = src.numel();
  if (n == 0) return;
  if (src.dtype == dst.dtype) {
    if (src.data != dst.data) {
      check_cuda(cudaMemcpyAsync(dst.data, src.data, static_cast<size_t>(src.nbytes()),
                                 cudaMemcpyDeviceToDevice, stream()),
                 "convert");
    }
    return;
  }
  if (src.dtype == DType::float32) {
    convert_kernel<<<blocks_for(n), kThreads, 0, stream()>>>(src.as<const float>(), dst.as<bf16>(),
                                                             n);
  } else {
    convert_kernel<<<blocks_for(n), kThreads, 0, stream()>>>(src.as<const bf16>(), dst.as<float>(),
                                                             n);
  }
  check_launch("convert");
}

void add(const TensorView& a, const TensorView& b, const TensorView& out) {
  const int64_t n = pyswitch::detail::check_add(Device::cuda, a, b, out);
  if (n == 0) return;
  with_compute_type(a.dtype, [&](auto a_tag) {
    with_compute_type(b.dtype, [&](auto b_tag) {
      with_compute_type(out.dtype, [&](auto out_tag) {
        using A = typename decltype(a_tag)::type;
        using B = typename decltype(b_tag)::type;
        using Out = typename decltype(out_tag)::type;
        add_kernel<<<blocks_for(n), kThreads, 0, stream()>>>(a.as<const A>(), b.as<const B>(),
                                                             out.as<Out>(), n);
      });
    });
  });
  check_launch("add");
}

void multiply(const TensorView& x, const TensorView& factor) {
  const int64_t n = pyswitch::detail::check_multiply(Device::cuda, x, factor);
  if (n == 0) return;
  multiply_kernel<<<blocks_for(n), kThreads, 0, stream()>>>(x.as<float>(), factor.as<const float>(),
                                                            n);
  check_launch("multiply");
}

double sum_of_squares(const TensorView& x) {
  pyswitch::detail::check_float32_tensor(Device::cuda, "sum_of_squares", x);
  const int64_t n = x.numel();
  if (n == 0) return 0.0;
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  DeviceArray<double> partials(chunks, "sum_of_squares");
  sum_of_squares_chunks<<<blocks_for(chunks * kSumLanes), kThreads, 0, stream()>>>(
      x.as<const float>(), n, chunks, partials.data());
  check_launch("sum_of_squares");
  double total = 0;
  for (double partial : partials.download("sum_of_squares")) total += partial;
  return total;
}

void scale(const TensorView& x, float factor) {
  pyswitch::detail::check_float32_tensor(Device::cuda, "scale", x);
  const int64_t n = x.numel();
  if (n == 0) return;
  scale_kernel<<<blocks_for(n), kThreads, 0, stream()>>>(x.as<float>(), n, factor);
  check_launch("scale");
}

}  // namespace pyswitch::cuda::ops
