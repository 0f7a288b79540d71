// Internal to the CUDA backend: error checks that turn CUDA and cuBLAS failures into DeviceError,
// the per-thread cuBLAS handle, launch sizes, stream-ordered scratch arrays and the view checks.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "backend_views.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch::cuda::detail {

[[noreturn]] void throw_cuda_error(const char* op, cudaError_t error);
[[noreturn]] void throw_cublas_error(const char* op, cublasStatus_t status);

inline void check_cuda(cudaError_t error, const char* op) {
  if (error != cudaSuccess) throw_cuda_error(op, error);
}
inline void check_cublas(cublasStatus_t status, const char* op) {
  if (status != CUBLAS_STATUS_SUCCESS) throw_cublas_error(op, status);
}
/// After a kernel launch: a bad configuration surfaces here, not at the next sync.
inline void check_launch(const char* op) {
  check_cuda(cudaGetLastError(), op);
}

/// The stream every op runs on (the legacy default stream: ordered with cudaMemcpy).
inline cudaStream_t stream() {
  return nullptr;
}

/// This thread's cuBLAS handle for the current device (created on first use, bound to stream()).
cublasHandle_t cublas_handle();

constexpr int kThreads = 256;
/// Blocks for a grid-stride loop over n items (at least 1, at most 65535 * 16).
inline unsigned blocks_for(int64_t n, int threads = kThreads) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > 1048560) blocks = 1048560;
  return static_cast<unsigned>(blocks);
}

/// A device array that lives for one op: cudaMallocAsync/cudaFreeAsync on stream(), so it costs
/// no device synchronisation. Move-only.
template <class T>
class DeviceArray {
 public:
  DeviceArray() = default;
  explicit DeviceArray(int64_t count, const char* op = "cuda") : count_(count) {
    if (count > 0) {
      check_cuda(cudaMallocAsync(reinterpret_cast<void**>(&data_),
                                 static_cast<size_t>(count) * sizeof(T), stream()),
                 op);
    }
  }
  /// Uploads a host vector (synchronously ordered on stream()).
  static DeviceArray upload(const std::vector<T>& host, const char* op = "cuda") {
    DeviceArray a(static_cast<int64_t>(host.size()), op);
    if (!host.empty()) {
      check_cuda(cudaMemcpyAsync(a.data_, host.data(), host.size() * sizeof(T),
                                 cudaMemcpyHostToDevice, stream()),
                 op);
    }
    return a;
  }
  /// Copies to a host vector (waits for the stream).
  std::vector<T> download(const char* op = "cuda") const {
    std::vector<T> host(static_cast<size_t>(count_));
    if (count_ > 0) {
      check_cuda(cudaMemcpy(host.data(), data_, host.size() * sizeof(T), cudaMemcpyDeviceToHost),
                 op);
    }
    return host;
  }
  DeviceArray(DeviceArray&& o) noexcept : data_(o.data_), count_(o.count_) {
    o.data_ = nullptr;
    o.count_ = 0;
  }
  DeviceArray& operator=(DeviceArray&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = o.data_;
      count_ = o.count_;
      o.data_ = nullptr;
      o.count_ = 0;
    }
    return *this;
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { reset(); }

  T* data() const { return data_; }
  int64_t size() const { return count_; }

 private:
  void reset() {
    if (data_) cudaFreeAsync(data_, stream());  // errors here surface at the next check
    data_ = nullptr;
  }
  T* data_ = nullptr;
  int64_t count_ = 0;
};

// The CUDA table's view checks (backend_views.hpp).
inline void require(const char* op, const char* arg, const TensorView& v,
                    std::initializer_list<DType> dtypes, std::initializer_list<int64_t> shape) {
  pyswitch::detail::require_view(Device::cuda, op, arg, v, dtypes, shape);
}
inline void require_flat(const char* op, const char* arg, const TensorView& v,
                         std::initializer_list<DType> dtypes, int64_t numel) {
  pyswitch::detail::require_flat_view(Device::cuda, op, arg, v, dtypes, numel);
}
using pyswitch::detail::kComputeTypes;
using pyswitch::detail::kFloat32Only;
using pyswitch::detail::require_same_dtype;

}  // namespace pyswitch::cuda::detail
