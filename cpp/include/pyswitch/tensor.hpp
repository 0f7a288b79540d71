/// @file tensor.hpp
/// The element types that cross the core's API. Arrays are plain, C-contiguous, row-major
/// buffers owned by the caller unless a function says otherwise.
#pragma once

#include <cstdint>

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

}  // namespace pyswitch
