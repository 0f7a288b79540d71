// Internal: the view checks every backend table runs on its arguments (one place for the
// messages): device, rank, shape (-1 matches any extent), dtype, contiguity, data.
#pragma once

#include <initializer_list>
#include <string>

#include "pyswitch/error.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch::detail {

inline std::string view_shape_text(const TensorView& v) {
  std::string out = "(";
  for (int i = 0; i < v.ndim && i < kMaxTensorDims; ++i) {
    if (i) out += ", ";
    out += std::to_string(v.shape[i]);
  }
  return out + (v.ndim == 1 ? ",)" : ")");
}

inline void require_view(Device device, const char* op, const char* arg, const TensorView& v,
                         std::initializer_list<DType> dtypes,
                         std::initializer_list<int64_t> shape) {
  PYSWITCH_CHECK_ARG(v.device == device, op, ": ", arg, " must be on the ", device_name(device),
                     ", got ", device_name(v.device));
  PYSWITCH_CHECK_ARG(v.is_valid() && v.ndim == static_cast<int>(shape.size()), op, ": ", arg,
                     " must be ", shape.size(), "-D, got ", v.ndim, "-D");
  int i = 0;
  for (int64_t extent : shape) {
    PYSWITCH_CHECK_ARG(v.shape[i] >= 0 && (extent < 0 || v.shape[i] == extent), op, ": ", arg,
                       " has shape ", view_shape_text(v), "; dimension ", i, " must be ", extent);
    ++i;
  }
  bool dtype_ok = false;
  for (DType d : dtypes) dtype_ok = dtype_ok || v.dtype == d;
  PYSWITCH_CHECK_ARG(dtype_ok, op, ": ", arg, " has an unsupported dtype ", dtype_name(v.dtype));
  PYSWITCH_CHECK_ARG(v.is_contiguous(), op, ": ", arg, " must be C-contiguous");
  PYSWITCH_CHECK_ARG(v.data != nullptr || v.numel() == 0, op, ": ", arg, " has no data");
}

// A flat operand: only its element count matters (elementwise ops and optimizer updates take
// any shape).
inline void require_flat_view(Device device, const char* op, const char* arg, const TensorView& v,
                              std::initializer_list<DType> dtypes, int64_t numel) {
  TensorView flat = v;
  flat.ndim = 1;
  flat.shape[0] = v.numel();
  flat.strides[0] = 1;
  PYSWITCH_CHECK_ARG(v.is_valid() && v.is_contiguous(), op, ": ", arg,
                     " must be C-contiguous with at most ", kMaxTensorDims, " dimensions");
  require_view(device, op, arg, flat, dtypes, {numel});
}

inline void require_same_dtype(const char* op, const char* a_name, const TensorView& a,
                               const char* b_name, const TensorView& b) {
  PYSWITCH_CHECK_ARG(a.dtype == b.dtype, op, ": ", a_name, " and ", b_name,
                     " must share a dtype, got ", dtype_name(a.dtype), " and ",
                     dtype_name(b.dtype));
}

struct GemmDims {
  int64_t M, N, K;
};

// The gemm op's argument checks, shared by every table: a and b float32 or both bfloat16, op(a)
// (M, K) and op(b) (K, N) agreeing on K, c (M, N) float32, beta 0 or 1.
inline GemmDims require_gemm(Device device, const TensorView& a, bool trans_a, const TensorView& b,
                             bool trans_b, const TensorView& c, float beta) {
  const std::initializer_list<DType> compute = {DType::float32, DType::bfloat16};
  require_view(device, "gemm", "a", a, compute, {-1, -1});
  require_view(device, "gemm", "b", b, compute, {-1, -1});
  require_same_dtype("gemm", "a", a, "b", b);
  const int64_t M = trans_a ? a.shape[1] : a.shape[0];
  const int64_t K = trans_a ? a.shape[0] : a.shape[1];
  const int64_t N = trans_b ? b.shape[0] : b.shape[1];
  PYSWITCH_CHECK_ARG((trans_b ? b.shape[1] : b.shape[0]) == K, "gemm: op(a) is (", M, ", ", K,
                     ") but op(b) has ", trans_b ? b.shape[1] : b.shape[0], " rows");
  require_view(device, "gemm", "c", c, {DType::float32}, {M, N});
  PYSWITCH_CHECK_ARG(beta == 0.0f || beta == 1.0f, "gemm: beta must be 0 or 1, got ", beta);
  return {M, N, K};
}

constexpr std::initializer_list<DType> kFloat32Only = {DType::float32};
constexpr std::initializer_list<DType> kComputeTypes = {DType::float32, DType::bfloat16};

}  // namespace pyswitch::detail
