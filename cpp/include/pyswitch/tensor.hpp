/// @file tensor.hpp
/// The element types (one DType enum), devices and the non-owning TensorView that cross the
/// core's API and its backend op table. Arrays are plain, C-contiguous, row-major buffers owned
/// by the caller unless a function says otherwise.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "pyswitch/error.hpp"

namespace pyswitch {

/// One enum for every buffer: the layers compute in float32 or bfloat16; collectives also carry
/// int32 and int64 (counts, statistics). The values are fixed (checkpoints and bindings store
/// them).
enum class DType { float32 = 0, bfloat16 = 1, int32 = 2, int64 = 3 };

/// "float32", "bfloat16", "int32" or "int64".
inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return "float32";
    case DType::bfloat16:
      return "bfloat16";
    case DType::int32:
      return "int32";
    case DType::int64:
      return "int64";
  }
  return "unknown";
}

/// Bytes per element: 4, 2, 4, 8.
inline int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::float32:
    case DType::int32:
      return 4;
    case DType::bfloat16:
      return 2;
    case DType::int64:
      return 8;
  }
  return 0;
}

/// True for the types the layers, GEMM and checkpoints compute in: float32 and bfloat16.
inline bool is_floating(DType dtype) {
  return dtype == DType::float32 || dtype == DType::bfloat16;
}

/// Throws InvalidArgument "<where>: <what> must be float32 or bfloat16, got int32" for the integer
/// types, which only collectives carry.
inline void check_floating(DType dtype, const char* where, const char* what = "dtype") {
  PYSWITCH_CHECK_ARG(is_floating(dtype), where, ": ", what, " must be float32 or bfloat16, got ",
                     dtype_name(dtype));
}

/// Where a buffer lives. Only cpu is built into the core; a CUDA backend registers itself
/// (backend.hpp) and its views carry Device::cuda.
enum class Device { cpu = 0, cuda = 1 };

/// "cpu" or "cuda".
inline const char* device_name(Device device) {
  return device == Device::cpu ? "cpu" : "cuda";
}

/// The most dimensions a view carries: every op of the backend table works on at most
/// (batch, rows, cols) and a leading expert axis.
inline constexpr int kMaxTensorDims = 4;

/// A non-owning view of a strided buffer: what crosses the backend op table (backend.hpp).
/// Strides are in elements. The view never owns or frees `data`; whoever made the buffer
/// (a caller, a layer's Workspace) keeps it alive while the view is in use. Copyable, trivially
/// destructible, thread-safe to read.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::float32;
  Device device = Device::cpu;
  int ndim = 0;
  int64_t shape[kMaxTensorDims] = {};
  int64_t strides[kMaxTensorDims] = {};

  /// A C-contiguous (row-major) view. A const buffer becomes a view whose ops only read it;
  /// the op table's signatures say which arguments are written.
  static TensorView contiguous(const void* data, DType dtype, std::initializer_list<int64_t> dims,
                               Device device = Device::cpu) {
    TensorView v;
    v.data = const_cast<void*>(data);
    v.dtype = dtype;
    v.device = device;
    for (int64_t extent : dims) {
      if (v.ndim < kMaxTensorDims) v.shape[v.ndim] = extent;
      ++v.ndim;  // counted past the limit so is_valid() can reject it
    }
    int64_t stride = 1;
    for (int i = (v.ndim < kMaxTensorDims ? v.ndim : kMaxTensorDims) - 1; i >= 0; --i) {
      v.strides[i] = stride;
      stride *= v.shape[i];
    }
    return v;
  }

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim && i < kMaxTensorDims; ++i) n *= shape[i];
    return n;
  }
  int64_t nbytes() const { return numel() * dtype_size(dtype); }
  bool is_valid() const { return ndim >= 0 && ndim <= kMaxTensorDims; }
  bool is_contiguous() const {
    int64_t stride = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != stride) return false;
      stride *= shape[i];
    }
    return true;
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(data);
  }
};

}  // namespace pyswitch
