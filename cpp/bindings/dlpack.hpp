// The DLPack borrow used by the device-array path: layers and route() read and write CUDA arrays
// of other libraries (torch, CuPy, JAX) in place, with no copy. Only the stable DLPack C ABI
// (DLTensor / DLManagedTensor, dlpack.h v0.x, the "dltensor" capsule) is read; the capsule is
// borrowed, not consumed, so the producer keeps ownership and frees its wrapper when the capsule
// dies.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "pyswitch/error.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch::bindings {

namespace dlpack_abi {
struct Device {
  int32_t device_type;  // kDLCPU = 1, kDLCUDA = 2
  int32_t device_id;
};
struct DataType {
  uint8_t code;  // kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // null: C-contiguous
  uint64_t byte_offset;
};
struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};
constexpr int32_t kCuda = 2;
}  // namespace dlpack_abi

/// A CUDA array borrowed through DLPack: its device pointer, dtype and shape. Holds the capsule
/// (and through it the producer's array) for as long as it lives.
struct BorrowedDeviceArray {
  pybind11::object capsule;
  void* data = nullptr;
  DType dtype = DType::float32;
  std::vector<int64_t> shape;
};

/// Borrows `obj` (anything with __dlpack__ that lives on a CUDA device) as a C-contiguous float32
/// or bfloat16 array. Throws TypeMismatch naming `where` and `name` for anything else.
inline BorrowedDeviceArray borrow_cuda_array(const char* where, const char* name,
                                             pybind11::handle obj) {
  namespace py = pybind11;
  const std::string type_name = py::str(py::type::handle_of(obj).attr("__name__"));
  if (!py::hasattr(obj, "__dlpack__")) {
    throw TypeMismatch(detail::concat(where, ": ", name,
                                      " must be a CUDA array with __dlpack__ (torch, CuPy, JAX), "
                                      "got ",
                                      type_name));
  }
  BorrowedDeviceArray out;
  out.capsule = obj.attr("__dlpack__")();
  PyObject* capsule = out.capsule.ptr();
  if (!PyCapsule_IsValid(capsule, "dltensor")) {
    throw TypeMismatch(detail::concat(where, ": ", name,
                                      ".__dlpack__() did not return an unconsumed 'dltensor' "
                                      "capsule"));
  }
  const auto* managed =
      static_cast<const dlpack_abi::ManagedTensor*>(PyCapsule_GetPointer(capsule, "dltensor"));
  const dlpack_abi::Tensor& t = managed->dl_tensor;
  if (t.device.device_type != dlpack_abi::kCuda) {
    throw TypeMismatch(detail::concat(where, ": ", name, " must live on a CUDA device, got a ",
                                      type_name, " on DLPack device type ", t.device.device_type));
  }
  if (t.dtype.lanes == 1 && t.dtype.bits == 32 && t.dtype.code == 2) {
    out.dtype = DType::float32;
  } else if (t.dtype.lanes == 1 && t.dtype.bits == 16 && t.dtype.code == 4) {
    out.dtype = DType::bfloat16;
  } else {
    throw TypeMismatch(detail::concat(where, ": ", name,
                                      " must be float32 or bfloat16, got DLPack type code ",
                                      int(t.dtype.code), " with ", int(t.dtype.bits), " bits"));
  }
  out.shape.assign(t.shape, t.shape + t.ndim);
  if (t.strides != nullptr) {
    int64_t expected = 1;
    for (int i = t.ndim - 1; i >= 0; --i) {
      PYSWITCH_CHECK_ARG(t.shape[i] == 1 || t.strides[i] == expected, where, ": ", name,
                         " must be C-contiguous (call .contiguous() first)");
      expected *= t.shape[i];
    }
  }
  out.data = static_cast<char*>(t.data) + t.byte_offset;
  return out;
}

}  // namespace pyswitch::bindings
