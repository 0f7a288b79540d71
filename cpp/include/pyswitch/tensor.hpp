/// @file tensor.hpp
/// The element types that cross the core's API. Arrays are plain, C-contiguous, row-major
/// buffers owned by the caller unless a function says otherwise.
#pragma once

#include <cstdint>

namespace pyswitch {

enum class DType { float32 = 0, bfloat16 = 1 };

/// "float32" or "bfloat16".
inline const char* dtype_name(DType dtype) {
  return dtype == DType::float32 ? "float32" : "bfloat16";
}

/// Bytes per element.
inline int64_t dtype_size(DType dtype) {
  return dtype == DType::float32 ? 4 : 2;
}

}  // namespace pyswitch
