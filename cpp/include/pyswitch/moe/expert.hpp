/// @file moe/expert.hpp
/// The expert FFNs of a Switch layer, forward and backward, over a packed expert buffer:
/// expert e owns rows [offsets[e], offsets[e+1]) and computes
/// act(x W_in[e] + b_in[e]) W_out[e] + b_out[e]  (GEGLU: gelu(x W_in[e]) * (x W_gate[e])).
/// Compute in float32, or bfloat16 operands with float32 accumulation; GEMMs on pyswitch's own
/// kernel (one FMA chain per element), so every row is bit-identical for any thread count, CPU
/// kernel set and split of the rows (docs/determinism.md).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "pyswitch/bf16.hpp"
#include "pyswitch/table_buffer.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch {
struct BackendOps;
const BackendOps& cpu_backend();
}  // namespace pyswitch

namespace pyswitch::moe {

/// relu (the paper's default), gelu (tanh approximation, as in T5 v1.1), geglu (Shazeer 2020).
enum class Activation { relu, gelu, geglu };

/// Parses "relu" / "gelu" / "geglu"; InvalidArgument otherwise.
Activation parse_activation(const std::string& name);

struct ExpertShape {
  int64_t num_experts = 0;  ///< E
  int64_t d_model = 0;
  int64_t d_ff = 0;
  Activation activation = Activation::relu;
};

/// Row-major float32 weights, owned by the caller: w_in (E, d_model, d_ff); w_gate
/// (E, d_model, d_ff), geglu only; w_out (E, d_ff, d_model); b_in (E, d_ff) and b_out
/// (E, d_model), or null for no bias.
///
/// w_in_bf16 / w_gate_bf16 / w_out_bf16 (optional, bf16 compute only): the same matrices
/// already rounded to bfloat16 (float_to_bf16 of every master element). When given, a bf16
/// forward uses them instead of rounding the masters itself; the caller guarantees that they
/// match the masters (ExpertWeights::compute_params does) and keeps them unchanged until the
/// backward of that forward has run. Ignored in float32 compute.
struct ExpertParams {
  const float* w_in = nullptr;
  const float* w_gate = nullptr;
  const float* w_out = nullptr;
  const float* b_in = nullptr;
  const float* b_out = nullptr;
  const bf16* w_in_bf16 = nullptr;
  const bf16* w_gate_bf16 = nullptr;
  const bf16* w_out_bf16 = nullptr;
};

/// Gradients in the layout of ExpertParams; written (not accumulated). Each must be non-null
/// exactly where the parameter is (w_in and w_out always); otherwise InvalidArgument.
struct ExpertGrads {
  float* w_in = nullptr;
  float* w_gate = nullptr;
  float* w_out = nullptr;
  float* b_in = nullptr;
  float* b_out = nullptr;
};

/// Owned float32 parameters of E expert FFNs (E = 1 for a dense FFN) and their gradients, in
/// the layout of ExpertParams. Initialised truncated-normal with std = sqrt(init_scale / fan_in)
/// cut at 2 std (fan_in = d_model for w_in and w_gate, d_ff for w_out); biases start at zero.
/// Accessors return live pointers (null for an absent tensor). Not thread-safe.
///
/// Under expert parallelism a rank holds experts [first_expert, first_expert + E) of a layer;
/// they are initialised with exactly the values those experts get in a one-rank layer of the
/// same seed (the init streams are indexed by global expert).
///
/// bf16 compute copy. A layer computing in bfloat16 calls enable_compute_copy(): the weights
/// then also own w_in / w_gate / w_out rounded to bfloat16, which forwards use (through
/// compute_params) instead of re-rounding every master on every step. The copy is refreshed
/// at the next compute_params whenever the masters may have changed:
/// - every non-const master accessor (w_in(), w_gate(), w_out()) marks it stale, because it
///   hands out a writable pointer. The const overloads and params() do not. A caller who keeps
///   such a pointer (or a ParamRef::data of SwitchLM::parameters()) and writes through it
///   AFTER a later forward must call mark_params_changed() before the next forward; writing
///   before the next forward needs nothing more.
/// - while any live view is registered (add_live_view, used by the Python bindings for every
///   NumPy view of a master), every forward re-rounds, since the holder may write at any time;
///   each one dropped marks the copy stale.
/// - the optimizer (Trainer) writes the copy in the same loop as the master update
///   (w_in_bf16() etc.), leaving it fresh at no extra pass.
/// Without a copy (float32 layers) all of this is a no-op and bf16 forwards round as before.
class ExpertWeights {
 public:
  /// Throws InvalidArgument for init_scale that is not finite and positive. The tensors live
  /// in `ops`'s memory (device memory for a CUDA table: the pointers below are then device
  /// pointers); the initial values are the same on every device.
  ExpertWeights(const ExpertShape& shape, bool use_bias, double init_scale, uint64_t seed,
                int64_t first_expert = 0, const BackendOps& ops = cpu_backend());
  ExpertWeights(const ExpertWeights&) = delete;
  ExpertWeights& operator=(const ExpertWeights&) = delete;

  /// Writable masters: each call marks the bf16 compute copy stale (see the class comment).
  float* w_in() {
    mark_params_changed();
    return w_in_.as<float>();
  }
  float* w_gate() {
    mark_params_changed();
    return w_gate_.as<float>();
  }
  float* w_out() {
    mark_params_changed();
    return w_out_.as<float>();
  }
  /// Read-only masters: never mark the copy stale.
  const float* w_in() const { return w_in_.as<float>(); }
  const float* w_gate() const { return w_gate_.as<float>(); }
  const float* w_out() const { return w_out_.as<float>(); }
  /// Biases stay float32 in every compute dtype (no copy to keep in step).
  float* b_in() { return b_in_.as<float>(); }
  float* b_out() { return b_out_.as<float>(); }
  const float* b_in() const { return b_in_.as<float>(); }
  const float* b_out() const { return b_out_.as<float>(); }
  float* w_in_grad() { return g_w_in_.as<float>(); }
  float* w_gate_grad() { return g_w_gate_.as<float>(); }
  float* w_out_grad() { return g_w_out_.as<float>(); }
  float* b_in_grad() { return g_b_in_.as<float>(); }
  float* b_out_grad() { return g_b_out_.as<float>(); }
  /// Where the tensors live (the table's device).
  Device device() const { return w_in_.device(); }
  /// The float32 masters (the bf16 pointers are null).
  ExpertParams params() const;
  ExpertGrads grads();

  /// Allocates the bf16 compute copy (same layouts as the masters) and marks it stale.
  /// Idempotent. Called by the layers whose compute dtype is bfloat16.
  void enable_compute_copy();
  bool has_compute_copy() const { return !w_in_bf16_.empty(); }
  /// The bf16 copy, writable, for an optimizer that updates master and copy together: it must
  /// store float_to_bf16(master) into every element it updates. Null without a copy (and for
  /// w_gate without geglu). Handing these out does not mark anything stale.
  bf16* w_in_bf16() { return w_in_bf16_.as<bf16>(); }
  bf16* w_gate_bf16() { return w_gate_bf16_.as<bf16>(); }
  bf16* w_out_bf16() { return w_out_bf16_.as<bf16>(); }

  /// Declares that the masters were (or may have been) written through a pointer kept from
  /// earlier: the next forward re-rounds the bf16 copy. Cheap; call it when in doubt.
  void mark_params_changed() { stale_.store(true, std::memory_order_relaxed); }
  /// Live-view tracking (the Python bindings): while the count is above zero every forward
  /// re-rounds; remove_live_view marks the copy stale.
  void add_live_view() { live_views_.fetch_add(1, std::memory_order_relaxed); }
  void remove_live_view() {
    mark_params_changed();
    live_views_.fetch_sub(1, std::memory_order_relaxed);
  }
  int64_t live_views() const { return live_views_.load(std::memory_order_relaxed); }
  /// Whether the next compute_params(bfloat16) would re-round (for tests and benchmarks).
  bool copy_needs_refresh() const {
    return has_compute_copy() && (stale_.load(std::memory_order_relaxed) || live_views() > 0);
  }

  /// The parameters for a forward in `dtype`: params(), plus (bf16 with a copy) the bf16 copy,
  /// first re-rounded with convert_f32_to_bf16 when copy_needs_refresh(). Counts refreshes.
  ExpertParams compute_params(DType dtype);
  /// Times compute_params re-rounded the copy (for tests and benchmarks).
  int64_t copy_refreshes() const { return refreshes_; }

 private:
  const BackendOps* ops_;
  TableBuffer w_in_, w_gate_, w_out_, b_in_, b_out_;
  TableBuffer g_w_in_, g_w_gate_, g_w_out_, g_b_in_, g_b_out_;
  TableBuffer w_in_bf16_, w_gate_bf16_, w_out_bf16_;
  std::atomic<bool> stale_{true};
  std::atomic<int64_t> live_views_{0};
  int64_t refreshes_ = 0;
};

/// Inverted dropout on the hidden activation (training only): element (row, j) is kept unless
/// the Philox draw for (seed, stream, (first_row + row) * d_ff + j) is below `rate`; kept values
/// are scaled by 1 / (1 - rate). rate 0 disables it. first_row places a rank's expert buffer
/// inside the one-rank layer's buffer, so expert parallelism draws the same masks.
struct DropoutSpec {
  double rate = 0.0;
  uint64_t seed = 0;
  uint64_t stream = 0;
  int64_t first_row = 0;
};

/// What the backward pass needs from the forward. Filled by experts_forward.
struct ExpertCache {
  DType dtype = DType::float32;
  DropoutSpec dropout;
  std::vector<float> pre, linear;  ///< (rows, d_ff) float32 pre-activations (linear: geglu)
  std::vector<float> hidden;       ///< (rows, d_ff) after activation and dropout
  std::vector<bf16> hidden_bf16;   ///< the same rounded to bf16 (bf16 compute only)
  /// bf16 weights rounded by the forward itself when the params had no bf16 copy (bf16
  /// compute only; empty when the forward used the caller's copy).
  std::vector<bf16> w_in, w_gate, w_out;
  /// The bf16 weights the forward used (the caller's copy or the vectors above), for the
  /// backward; null in float32. The cache must not be copied between forward and backward.
  const bf16* w_in_used = nullptr;
  const bf16* w_gate_used = nullptr;
  const bf16* w_out_used = nullptr;
  /// A device backend's own saved activations (opaque; released with the cache).
  std::shared_ptr<void> device_state;
  /// Backward workspace, kept between steps so that its pages are touched once, not per step.
  std::vector<float> d_pre, d_linear;
  std::vector<bf16> d_pre_bf16, d_linear_bf16;
};

/// The argument checks of experts_forward / experts_backward (every backend runs them):
/// InvalidArgument naming `where` for sizes < 1, missing w_in / w_out, w_gate present exactly
/// for geglu, offsets null, not starting at 0, or decreasing.
void validate_experts(const char* where, const ExpertShape& shape, const ExpertParams& params,
                      const int64_t* offsets);

/// x (rows, d_model) -> y (rows, d_model), both of `dtype` (float32 or bfloat16), rows =
/// offsets[E]. offsets: (E + 1,) non-decreasing from 0. cache may be null (inference; dropout is
/// then off). Throws InvalidArgument for bad shapes, offsets, dropout rate or an integer dtype.
void experts_forward(const ExpertShape& shape, const ExpertParams& params, const int64_t* offsets,
                     DType dtype, const void* x, void* y, ExpertCache* cache,
                     const DropoutSpec& dropout = {});

/// dy (rows, d_model) -> dx (rows, d_model) (both of the forward's dtype) and the float32
/// parameter gradients, given the forward's x and cache (whose workspace it reuses).
void experts_backward(const ExpertShape& shape, const ExpertParams& params, const int64_t* offsets,
                      const void* x, ExpertCache& cache, const void* dy, void* dx,
                      const ExpertGrads& grads);

}  // namespace pyswitch::moe
