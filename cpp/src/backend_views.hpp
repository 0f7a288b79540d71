// Internal: the argument checks every backend table runs (one place for them and their
// messages): the view checks (device, rank, shape with -1 matching any extent, dtype,
// contiguity, data), then one check per op.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>

#include "pyswitch/error.hpp"
#include "pyswitch/moe/dispatch.hpp"
#include "pyswitch/moe/router.hpp"
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

// ---- per-op argument checks, shared by every table ------------------------------------------
// Each checks an op's views as backend.hpp documents them (sizes returned where the op needs
// them); a table calls it first, with its own device, then runs the op.

namespace pyswitch::detail {

inline void check_convert(Device device, const TensorView& src, const TensorView& dst) {
  require_flat_view(device, "convert", "src", src, kComputeTypes, src.numel());
  require_flat_view(device, "convert", "dst", dst, kComputeTypes, src.numel());
}

inline int64_t check_add(Device device, const TensorView& a, const TensorView& b,
                         const TensorView& out) {
  const int64_t n = out.numel();
  require_flat_view(device, "add", "a", a, kComputeTypes, n);
  require_flat_view(device, "add", "b", b, kComputeTypes, n);
  require_flat_view(device, "add", "out", out, kComputeTypes, n);
  return n;
}

inline int64_t check_multiply(Device device, const TensorView& x, const TensorView& factor) {
  const int64_t n = x.numel();
  require_flat_view(device, "multiply", "x", x, kFloat32Only, n);
  require_flat_view(device, "multiply", "factor", factor, kFloat32Only, n);
  return n;
}

/// sum_of_squares and scale: one float32 tensor of any shape.
inline void check_float32_tensor(Device device, const char* op, const TensorView& x) {
  require_flat_view(device, op, "x", x, kFloat32Only, x.numel());
}

inline void check_route_backward(Device device, const TensorView& logits,
                                 const moe::RoutingPlan& plan, const TensorView& d_gate,
                                 const TensorView& d_logits) {
  const char* op = "route_backward";
  require_view(device, op, "logits", logits, kFloat32Only, {plan.num_tokens, plan.num_experts});
  require_view(device, op, "d_gate", d_gate, kFloat32Only, {plan.num_tokens, plan.k});
  require_view(device, op, "d_logits", d_logits, kFloat32Only, {plan.num_tokens, plan.num_experts});
}

inline void check_softmax_rows(Device device, const TensorView& logits, const TensorView& probs) {
  require_view(device, "softmax_rows", "logits", logits, kFloat32Only, {-1, -1});
  require_view(device, "softmax_rows", "probs", probs, kFloat32Only,
               {logits.shape[0], logits.shape[1]});
}

/// dispatch, combine and their backward: token rows (T, d) and expert rows (total_rows, d) of
/// one compute dtype.
inline void check_layout_views(Device device, const char* op, const char* token_name,
                               const TensorView& tokens, const char* row_name,
                               const TensorView& rows, const moe::DispatchLayout& layout) {
  require_view(device, op, token_name, tokens, kComputeTypes, {layout.num_tokens, -1});
  require_view(device, op, row_name, rows, kComputeTypes, {layout.total_rows, tokens.shape[1]});
  require_same_dtype(op, token_name, tokens, row_name, rows);
}

inline void check_combine(Device device, const TensorView& expert_out,
                          const moe::DispatchLayout& layout, const TensorView& gate,
                          const TensorView& y) {
  check_layout_views(device, "combine", "y", y, "expert_out", expert_out, layout);
  require_view(device, "combine", "gate", gate, kFloat32Only, {layout.num_tokens, layout.k});
}

inline void check_combine_backward(Device device, const TensorView& dy,
                                   const TensorView& expert_out, const moe::DispatchLayout& layout,
                                   const TensorView& gate, const TensorView& d_expert_out,
                                   const TensorView& d_gate) {
  const char* op = "combine_backward";
  check_layout_views(device, op, "dy", dy, "expert_out", expert_out, layout);
  require_view(device, op, "d_expert_out", d_expert_out, {dy.dtype},
               {layout.total_rows, dy.shape[1]});
  require_view(device, op, "gate", gate, kFloat32Only, {layout.num_tokens, layout.k});
  require_view(device, op, "d_gate", d_gate, kFloat32Only, {layout.num_tokens, layout.k});
}

struct RowsAndWidth {
  int64_t rows, width;
};

inline RowsAndWidth check_rmsnorm_forward(Device device, const TensorView& x,
                                          const TensorView& weight, const TensorView& y,
                                          const TensorView& inv_rms) {
  const char* op = "rmsnorm_forward";
  require_view(device, op, "x", x, kFloat32Only, {-1, -1});
  const int64_t T = x.shape[0], d = x.shape[1];
  require_view(device, op, "weight", weight, kFloat32Only, {d});
  require_view(device, op, "y", y, kFloat32Only, {T, d});
  require_view(device, op, "inv_rms", inv_rms, kFloat32Only, {T});
  return {T, d};
}

inline RowsAndWidth check_rmsnorm_backward(Device device, const TensorView& dy, const TensorView& x,
                                           const TensorView& weight, const TensorView& inv_rms,
                                           const TensorView& dx, const TensorView& d_weight) {
  const char* op = "rmsnorm_backward";
  require_view(device, op, "x", x, kFloat32Only, {-1, -1});
  const int64_t T = x.shape[0], d = x.shape[1];
  require_view(device, op, "dy", dy, kFloat32Only, {T, d});
  require_view(device, op, "weight", weight, kFloat32Only, {d});
  require_view(device, op, "inv_rms", inv_rms, kFloat32Only, {T});
  require_view(device, op, "dx", dx, kFloat32Only, {T, d});
  require_view(device, op, "d_weight", d_weight, kFloat32Only, {d});
  return {T, d};
}

/// qkv (batch * S, 3 * heads * Dh) -> {S, Dh}, checked.
inline std::pair<int64_t, int64_t> check_attention_sizes(Device device, const char* op,
                                                         const TensorView& qkv, int64_t batch,
                                                         int64_t heads) {
  require_view(device, op, "qkv", qkv, kFloat32Only, {-1, -1});
  PYSWITCH_CHECK_ARG(
      batch >= 1 && heads >= 1 && qkv.shape[0] % batch == 0 && qkv.shape[1] % (3 * heads) == 0, op,
      ": qkv of shape ", view_shape_text(qkv), " does not split into batch ", batch,
      " and 3 * heads = ", 3 * heads);
  return {qkv.shape[0] / batch, qkv.shape[1] / (3 * heads)};
}

inline std::pair<int64_t, int64_t> check_attention_forward(Device device, const TensorView& qkv,
                                                           int64_t batch, int64_t heads,
                                                           const TensorView& out,
                                                           const TensorView& probs) {
  const char* op = "attention_forward";
  const auto [S, Dh] = check_attention_sizes(device, op, qkv, batch, heads);
  require_view(device, op, "out", out, kFloat32Only, {batch * S, heads * Dh});
  require_view(device, op, "probs", probs, kFloat32Only, {batch, heads, S, S});
  return {S, Dh};
}

inline std::pair<int64_t, int64_t> check_attention_backward(Device device, const TensorView& d_out,
                                                            const TensorView& qkv,
                                                            const TensorView& probs, int64_t batch,
                                                            int64_t heads,
                                                            const TensorView& d_qkv) {
  const char* op = "attention_backward";
  const auto [S, Dh] = check_attention_sizes(device, op, qkv, batch, heads);
  require_view(device, op, "d_out", d_out, kFloat32Only, {batch * S, heads * Dh});
  require_view(device, op, "probs", probs, kFloat32Only, {batch, heads, S, S});
  require_view(device, op, "d_qkv", d_qkv, kFloat32Only, {batch * S, 3 * heads * Dh});
  return {S, Dh};
}

inline void check_embedding_forward(Device device, const TensorView& table,
                                    const TensorView& tokens, const TensorView& out) {
  const char* op = "embedding_forward";
  require_view(device, op, "table", table, kFloat32Only, {-1, -1});
  require_view(device, op, "tokens", tokens, {DType::int32}, {-1});
  require_view(device, op, "out", out, kFloat32Only, {tokens.shape[0], table.shape[1]});
}

inline void check_embedding_backward(Device device, const TensorView& d_out,
                                     const TensorView& tokens, const TensorView& d_table) {
  const char* op = "embedding_backward";
  require_view(device, op, "d_table", d_table, kFloat32Only, {-1, -1});
  require_view(device, op, "tokens", tokens, {DType::int32}, {-1});
  require_view(device, op, "d_out", d_out, kFloat32Only, {tokens.shape[0], d_table.shape[1]});
}

/// logits (T, V), targets (T,) int32, d_logits (T, V) unless its data is null -> {T, V}.
inline RowsAndWidth check_cross_entropy(Device device, const TensorView& logits,
                                        const TensorView& targets, const TensorView& d_logits) {
  require_view(device, "cross_entropy", "logits", logits, kFloat32Only, {-1, -1});
  const int64_t T = logits.shape[0], V = logits.shape[1];
  require_view(device, "cross_entropy", "targets", targets, {DType::int32}, {T});
  if (d_logits.data != nullptr) {
    require_view(device, "cross_entropy", "d_logits", d_logits, kFloat32Only, {T, V});
  }
  return {T, V};
}

/// The optional bf16 compute copy of an optimizer update (null data: none).
inline bool check_compute_copy(Device device, const char* op, const TensorView& copy, int64_t n) {
  if (copy.data == nullptr) return false;
  require_flat_view(device, op, "compute_copy", copy, {DType::bfloat16}, n);
  return true;
}

inline int64_t check_adamw(Device device, const TensorView& param, const TensorView& grad,
                           const TensorView& m, const TensorView& v) {
  const int64_t n = param.numel();
  require_flat_view(device, "adamw_update", "param", param, kFloat32Only, n);
  require_flat_view(device, "adamw_update", "grad", grad, kFloat32Only, n);
  require_flat_view(device, "adamw_update", "m", m, kFloat32Only, n);
  require_flat_view(device, "adamw_update", "v", v, kFloat32Only, n);
  return n;
}

/// Adafactor's param and grad: n = batches * rows * cols float32 elements each.
inline void check_adafactor(Device device, const TensorView& param, const TensorView& grad,
                            int64_t n) {
  require_flat_view(device, "adafactor_update", "param", param, kFloat32Only, n);
  require_flat_view(device, "adafactor_update", "grad", grad, kFloat32Only, n);
}

/// An Adafactor state view of `expected` elements; expected 0: the state is absent (false).
inline bool check_adafactor_state(Device device, const char* name, const TensorView& view,
                                  int64_t expected) {
  if (expected == 0) return false;
  require_flat_view(device, "adafactor_update", name, view, kFloat32Only, expected);
  return true;
}

}  // namespace pyswitch::detail
