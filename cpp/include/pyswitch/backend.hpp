/// @file backend.hpp
/// The device seam: the table of ops one backend implements, over TensorViews. The layers
/// (SwitchFFN, DenseFFN, SwitchLM) and the Trainer reach every kernel through a table, never by
/// calling a kernel directly, so a CUDA backend is a new table plus its kernels.
///
/// The CPU table is today's code and stays the reference: its ops pick the active ISA tier
/// (cpu_isa.hpp) inside, and every op is bit-identical on every tier by construction except
/// where a comment says otherwise (docs/determinism.md). tests: cpp/tests/test_backend_ops.cpp
/// runs every op of every registered table and tier against the CPU scalar tier.
///
/// Conventions for every op:
/// - Views are C-contiguous, on the table's device, with the dtypes and shapes each op names;
///   anything else throws InvalidArgument naming the op, the argument, what was expected and
///   what came. Ops validate views; the options structs validate themselves where they are
///   built (router.hpp, optim.hpp), and the layers validate sizes at construction.
/// - Outputs are written, not accumulated, unless the op says "accumulated".
/// - Host-side plans (RoutingPlan, DispatchLayout, expert offsets) are small index arrays kept
///   in host memory; a device table copies what it needs. Tables are immutable and thread-safe;
///   concurrency is that of the op (each is multi-threaded inside on the CPU).
#pragma once

#include <cstdint>
#include <string>

#include "pyswitch/moe/dispatch.hpp"
#include "pyswitch/moe/expert.hpp"
#include "pyswitch/moe/router.hpp"
#include "pyswitch/optim/optim.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch {

struct BackendOps {
  const char* name = nullptr;  ///< "cpu", "cuda"
  Device device = Device::cpu;

  // ---- memory -------------------------------------------------------------------------------
  /// Zero-filled, 64-byte aligned; throws Error when out of memory. release(nullptr) is a no-op.
  void* (*allocate)(int64_t bytes) = nullptr;
  void (*release)(void* data) = nullptr;
  /// dst = src, same dtype and element count; either side may be on the host (Device::cpu).
  void (*copy)(const TensorView& src, const TensorView& dst) = nullptr;

  // ---- elementwise --------------------------------------------------------------------------
  /// dst = src converted between float32 and bfloat16 (round to nearest even, NaN stays NaN),
  /// or copied when the dtypes match. Same element count.
  void (*convert)(const TensorView& src, const TensorView& dst) = nullptr;

  /// out = a + b elementwise, added in float32; each of a, b and out is float32 or bfloat16
  /// (converted exactly / rounded to nearest even). Same element count; out may alias a or b.
  void (*add)(const TensorView& a, const TensorView& b, const TensorView& out) = nullptr;
  /// x *= factor elementwise (float32, same element count): the router's jitter.
  void (*multiply)(const TensorView& x, const TensorView& factor) = nullptr;

  // ---- routing (SPEC section 1) -------------------------------------------------------------
  /// logits (T, E) float32 -> plan (host). Ties go to the lower expert index.
  void (*route)(const TensorView& logits, const moe::RouteOptions& options,
                moe::RoutingPlan& plan) = nullptr;
  /// d_logits (T, E) float32 written, from d_gate (T, k) float32 and the loss coefficients.
  void (*route_backward)(const TensorView& logits, const moe::RoutingPlan& plan,
                         const TensorView& d_gate, double aux_coef, double z_coef,
                         const TensorView& d_logits) = nullptr;
  /// probs (T, E) float32 = softmax of logits (T, E) float32, with the router's numerics.
  void (*softmax_rows)(const TensorView& logits, const TensorView& probs) = nullptr;

  // ---- dispatch / combine (moe/dispatch.hpp) ------------------------------------------------
  /// buffer (rows, d) = x (T, d) gathered by the layout; both float32 or both bfloat16.
  void (*dispatch)(const TensorView& x, const moe::DispatchLayout& layout,
                   const TensorView& buffer) = nullptr;
  /// y (T, d) = gate-weighted sum of expert_out (rows, d); gate (T, k) float32.
  void (*combine)(const TensorView& expert_out, const moe::DispatchLayout& layout,
                  const TensorView& gate, const TensorView& y) = nullptr;
  /// d_expert_out (rows, d) and d_gate (T, k) float32 written.
  void (*combine_backward)(const TensorView& dy, const TensorView& expert_out,
                           const moe::DispatchLayout& layout, const TensorView& gate,
                           const TensorView& d_expert_out, const TensorView& d_gate) = nullptr;
  /// dx (T, d) = sum over a token's kept rows of d_buffer (rows, d).
  void (*dispatch_backward)(const TensorView& d_buffer, const moe::DispatchLayout& layout,
                            const TensorView& dx) = nullptr;

  // ---- grouped expert FFN (moe/expert.hpp): the grouped expert GEMMs and activations -------
  /// x, y (offsets[E], d_model) of one dtype; offsets (E + 1,) host. cache may be null.
  void (*experts_forward)(const moe::ExpertShape& shape, const moe::ExpertParams& params,
                          const int64_t* offsets, const TensorView& x, const TensorView& y,
                          moe::ExpertCache* cache, const moe::DropoutSpec& dropout) = nullptr;
  void (*experts_backward)(const moe::ExpertShape& shape, const moe::ExpertParams& params,
                           const int64_t* offsets, const TensorView& x, moe::ExpertCache& cache,
                           const TensorView& dy, const TensorView& dx,
                           const moe::ExpertGrads& grads) = nullptr;
  /// c (M, N) float32 = alpha * op(a) op(b) + beta * c; a, b float32 or both bfloat16; op
  /// transposes when the flag is set (a is then stored (K, M)). beta is 0 or 1.
  void (*gemm)(const TensorView& a, bool trans_a, const TensorView& b, bool trans_b,
               const TensorView& c, float alpha, float beta) = nullptr;

  // ---- normalisation and the transformer ops (nn/ops.hpp), float32 --------------------------
  void (*rmsnorm_forward)(const TensorView& x, const TensorView& weight, float eps,
                          const TensorView& y, const TensorView& inv_rms) = nullptr;
  void (*rmsnorm_backward)(const TensorView& dy, const TensorView& x, const TensorView& weight,
                           const TensorView& inv_rms, const TensorView& dx,
                           const TensorView& d_weight) = nullptr;
  /// Rotary embedding in place on the q and k parts of qkv (batch * S, 3 * heads * Dh); the
  /// inverse rotation when `inverse` (the backward).
  void (*rope_apply)(const TensorView& qkv, int64_t batch, int64_t heads, double base,
                     bool inverse) = nullptr;
  /// Causal attention: out (batch * S, heads * Dh) and probs (batch, heads, S, S) written.
  void (*attention_forward)(const TensorView& qkv, int64_t batch, int64_t heads,
                            const TensorView& out, const TensorView& probs) = nullptr;
  /// d_qkv (batch * S, 3 * heads * Dh) written from d_out and the forward's qkv and probs.
  void (*attention_backward)(const TensorView& d_out, const TensorView& qkv,
                             const TensorView& probs, int64_t batch, int64_t heads,
                             const TensorView& d_qkv) = nullptr;
  /// out (T, d) = table (V, d) rows of tokens (T,) int32 (InvalidArgument outside [0, V)).
  void (*embedding_forward)(const TensorView& table, const TensorView& tokens,
                            const TensorView& out) = nullptr;
  /// d_table (V, d) accumulated with d_out (T, d) rows, in token order.
  void (*embedding_backward)(const TensorView& d_out, const TensorView& tokens,
                             const TensorView& d_table) = nullptr;
  /// Cross-entropy of logits (T, V) against targets (T,) int32; returns the summed loss and
  /// writes d_logits (T, V) scaled by grad_scale when d_logits.data is not null.
  double (*cross_entropy)(const TensorView& logits, const TensorView& targets, float grad_scale,
                          const TensorView& d_logits) = nullptr;

  // ---- optimizer updates (optim/optim.hpp), float32 -----------------------------------------
  /// One AdamW step of param (any shape) with grad, m, v of the same element count. When
  /// compute_copy.data is not null (bfloat16, the same count) it receives the updated param
  /// rounded to bf16 in the same pass: the layers' bf16 compute copy, refreshed without a
  /// separate rounding pass.
  void (*adamw_update)(const TensorView& param, const TensorView& grad, const TensorView& m,
                       const TensorView& v, int64_t step, double lr,
                       const optim::AdamWOptions& options, bool decay,
                       const TensorView& compute_copy) = nullptr;
  /// One Adafactor step; state views sized by AdafactorShape (row/col or full; absent ones
  /// may have null data). compute_copy as in adamw_update.
  void (*adafactor_update)(const TensorView& param, const TensorView& grad,
                           const TensorView& row_state, const TensorView& col_state,
                           const TensorView& full_state, const optim::AdafactorShape& shape,
                           int64_t step, double lr, const optim::AdafactorOptions& options,
                           const TensorView& compute_copy) = nullptr;
  /// Sum of squares of a float32 tensor in double, in a fixed order.
  double (*sum_of_squares)(const TensorView& x) = nullptr;
  /// x *= factor (float32).
  void (*scale)(const TensorView& x, float factor) = nullptr;
};

/// The table of a device: the CPU table is always there; Device::cuda throws DeviceError
/// unless a CUDA backend has registered itself.
const BackendOps& backend(Device device);

/// The CPU reference table.
const BackendOps& cpu_backend();

/// Installs a table for its device (the CUDA module calls this when it loads). Returns the
/// table it replaced, or null. Throws InvalidArgument for the CPU device (the reference cannot
/// be replaced) or a table with a missing op. Thread-safe.
const BackendOps* register_backend(const BackendOps& table);

/// "cpu" or "cuda" -> Device. Throws InvalidArgument "<where>: device must be 'cpu' or 'cuda',
/// got '<name>'".
Device parse_device(const std::string& where, const std::string& name);

/// The table a layer or model constructed for `device` runs on. Device::cpu: the CPU table.
/// Device::cuda: the registered CUDA table; throws DeviceError naming `where` where none is
/// loaded.
const BackendOps& layer_backend(const char* where, Device device);

/// The op names of BackendOps in declaration order, and whether `table` has each one: what
/// the backend-ops test iterates and what register_backend checks.
int backend_op_count();
const char* backend_op_name(int index);
bool backend_has_op(const BackendOps& table, int index);

}  // namespace pyswitch
