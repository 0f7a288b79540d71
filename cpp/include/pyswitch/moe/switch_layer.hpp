/// @file moe/switch_layer.hpp
/// The Switch FFN layer (router + dispatch + expert FFNs + combine, forward and backward) and
/// its FLOP-matched dense counterpart. Semantics: SPEC.md section 2.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "pyswitch/comm/communicator.hpp"
#include "pyswitch/moe/dispatch.hpp"
#include "pyswitch/moe/ep_exchange.hpp"
#include "pyswitch/moe/expert.hpp"
#include "pyswitch/moe/router.hpp"
#include "pyswitch/tensor.hpp"
#include "pyswitch/workspace.hpp"

namespace pyswitch::moe {

struct SwitchFFNOptions {
  RouterOptions router;  ///< routing, capacities, jitter, init_scale and seed (shared)
  Activation activation = Activation::relu;
  bool use_bias = false;
  double expert_dropout = 0.0;   ///< on the hidden activation, training only, in [0, 1)
  DType dtype = DType::float32;  ///< compute dtype (float32 or bfloat16); parameters stay float32
  double aux_loss_coef = 1e-2;
  double z_loss_coef = 1e-3;
  /// Where the layer runs. cuda (one rank; the CUDA module loaded): parameters, gradients and
  /// activations live in device memory, and forward/backward take device pointers.
  Device device = Device::cpu;
};

/// Routing statistics of the last forward.
struct SwitchStats {
  std::vector<int64_t> tokens_per_expert;  ///< (E,), before capacity
  double drop_fraction = 0;                ///< dropped assignments / (T * k)
  double router_entropy = 0;               ///< mean over tokens of -sum p log p (nats)
};

/// A Switch FFN layer: on one rank holding all experts, or expert-parallel over a communicator.
///
/// Parameters are float32 and owned by the layer; the accessors return live pointers:
/// router (d_model, E) and, through weights(), w_in (E_local, d_model, d_ff), w_gate (E_local,
/// d_model, d_ff; geglu only, else null), w_out (E_local, d_ff, d_model), b_in (E_local, d_ff)
/// and b_out (E_local, d_model) (use_bias only, else null). Gradients have the same layout and
/// are written by backward().
///
/// Expert parallelism (SPEC section 3), when `comm` is given: rank r of W holds experts
/// [r*E/W, (r+1)*E/W) (E_local = E/W; E % W != 0 is InvalidArgument), initialised with exactly
/// the values a one-rank layer of the same seed gives those experts; the router is replicated.
/// Each rank routes its own tokens as its own group(s), exchanges per-expert counts, sends the
/// tokens to the experts' owners (all_to_all_v, in the compute dtype), runs its experts on rows
/// laid out expert by expert and, within an expert, in rank order (the one-rank layer's order),
/// sends the outputs back and combines; backward mirrors it. The layer is then one layer over
/// the global batch: aux_loss() and z_loss() are the global losses (the same on every rank),
/// backward() differentiates sum over all ranks of sum(dy * y) + aux_loss() + z_loss(), expert
/// gradients are complete, and the router gradient is this rank's share: add the ranks' router
/// gradients (all_reduce sum) to get the gradient of the global objective. Against one rank
/// with all experts and group_size = tokens per rank, outputs, losses, input and expert
/// gradients are bit-identical in float32. Every rank must call forward and backward, with
/// matching training flags, including ranks with zero tokens (T = 0 is allowed here only).
/// A failure inside the exchange poisons the communicator (peers throw CommError). The
/// communicator is not owned and must outlive the layer.
/// Not thread-safe: one call at a time per layer (calls are multi-threaded inside).
class SwitchFFN {
 public:
  /// Throws InvalidArgument for sizes < 1, bad routing options, dropout outside [0, 1), an
  /// integer options.dtype, or num_experts not divisible by comm->size().
  SwitchFFN(int64_t d_model, int64_t d_ff, int64_t num_experts, const SwitchFFNOptions& options,
            comm::Communicator* comm = nullptr);

  int64_t d_model() const { return shape_.d_model; }
  int64_t d_ff() const { return shape_.d_ff; }
  int64_t num_experts() const { return num_experts_; }          ///< E, all ranks together
  int64_t local_experts() const { return shape_.num_experts; }  ///< E / world size
  int64_t first_expert() const { return first_expert_; }
  const SwitchFFNOptions& options() const { return options_; }
  comm::Communicator* communicator() const { return comm_; }
  /// Where the layer's state lives and its forward/backward pointers point.
  Device device() const { return ops_->device; }

  float* router_weight() { return router_.weight(); }
  float* router_weight_grad() { return router_.weight_grad(); }
  /// This rank's experts' parameters and gradients (live).
  ExpertWeights& weights() { return weights_; }

  /// x: (T, d_model) of x_dtype (float32 or bfloat16), T >= 1 (T >= 0 under expert
  /// parallelism). y: (T, d_model) of x_dtype, written. Both in the layer's memory (device
  /// pointers on cuda). Uses capacity_factor when training, else eval_capacity_factor.
  void forward(const void* x, DType x_dtype, int64_t num_tokens, bool training, void* y);

  /// dy: (T, d_model) of the forward's x dtype. dx: the same shape and dtype, written.
  /// Differentiates sum(dy * y) + aux_loss() + z_loss() and writes every gradient.
  /// Throws Error when no forward preceded it.
  void backward(const void* dy, void* dx);

  double aux_loss() const { return options_.aux_loss_coef * plan().aux_loss; }  ///< scaled
  double z_loss() const { return options_.z_loss_coef * plan().z_loss; }        ///< scaled
  bool has_forward() const { return has_forward_; }
  /// The plan of the last forward (this rank's tokens). Throws Error before the first forward.
  const RoutingPlan& plan() const;
  DType forward_dtype() const { return x_dtype_; }
  int64_t forward_tokens() const { return tokens_; }
  /// Statistics of this rank's tokens in the last forward.
  SwitchStats stats() const;
  /// The random state: training forwards drawn so far by jitter and by expert dropout (each
  /// counts only while it is enabled). Saved by checkpoints; restoring it makes a resumed run
  /// draw the same numbers.
  uint64_t training_steps() const {
    // Each counter advances only while its feature is on; both start from the value set.
    return router_.training_steps() > training_steps_ ? router_.training_steps() : training_steps_;
  }
  void set_training_steps(uint64_t steps) {
    router_.set_training_steps(steps);
    training_steps_ = steps;
  }

 private:
  // Expert parallelism: exchanges the per-expert counts (and the loss sums) and builds exchange_.
  void exchange_counts();
  // Every exchange of this layer moves rows of d_model in the compute dtype.
  void exchange(const void* send, void* recv, bool to_owners);
  void permute(const void* from, void* to, bool to_expert_major) const;
  void forward_experts(DropoutSpec dropout);
  void backward_experts();

  // Declared first: a device the layer cannot run on fails before the weights are initialised.
  const BackendOps* ops_;
  ExpertShape shape_;  // this rank's experts
  int64_t num_experts_;
  SwitchFFNOptions options_;
  comm::Communicator* comm_ = nullptr;
  int64_t first_expert_ = 0;
  Router router_;
  ExpertWeights weights_;
  EpLayout exchange_;  // expert parallelism: the exchange layout of the last forward
  // State of the last forward, kept for backward.
  DispatchLayout layout_;
  // Every kernel is reached through the backend table; the buffers live in the layer's arena,
  // kept between steps (their pages are touched once). Rows are (rows, d_model) in the compute
  // dtype unless noted.
  enum Slot {
    kTokens,        // x or dy converted to the compute dtype (when it differs)
    kBuffer,        // the packed expert buffer, this rank's rows (kept for backward)
    kExpertOut,     // the experts' outputs for this rank's rows (kept for backward)
    kCombined,      // y in the compute dtype (when x's dtype differs)
    kExpertIn,      // expert parallelism: the local experts' rows (kept for backward)
    kExpertResult,  // expert parallelism: their outputs; in backward, the permuted dy
    kWire,          // expert parallelism: rows in rank order
    kDExpertIn,     // expert parallelism: backward of kExpertIn
    kDExpertOut,
    kDBuffer,
    kDxExperts,  // (T, d_model) compute dtype
    kDxRouter,   // (T, d_model) in x's dtype
    kDGate,      // (T, k) float32
    kGate,       // (T, k) float32: the plan's gates on a device layer's device
    kSlotCount
  };
  Workspace workspace_;
  // Slot `slot` as `count` rows of d_model in the compute dtype.
  TensorView rows_of(Slot slot, int64_t count);
  // The plan's gates (T, k) float32 where the ops can read them: the plan itself on the CPU, a
  // copy in slot kGate on a device.
  TensorView gate_view(const RoutingPlan& plan);
  ExpertCache cache_;
  DType x_dtype_ = DType::float32;
  int64_t tokens_ = 0;
  uint64_t training_steps_ = 0;
  bool has_forward_ = false;
};

/// The dense FFN baseline with the same interface: act(x W_in + b_in) W_out + b_out for every
/// token. Parameters: w_in (d_model, d_ff), w_gate (d_model, d_ff; geglu), w_out (d_ff,
/// d_model), b_in (d_ff,), b_out (d_model,). Not thread-safe per instance.
struct DenseFFNOptions {
  Activation activation = Activation::relu;
  bool use_bias = false;
  double dropout = 0.0;
  DType dtype = DType::float32;  ///< float32 or bfloat16
  double init_scale = 0.1;
  uint64_t seed = 0;
  Device device = Device::cpu;  ///< as SwitchFFNOptions::device (cuda: device pointers)
};

class DenseFFN {
 public:
  /// Throws InvalidArgument for sizes < 1, dropout outside [0, 1) or an integer options.dtype.
  DenseFFN(int64_t d_model, int64_t d_ff, const DenseFFNOptions& options);
  int64_t d_model() const { return shape_.d_model; }
  int64_t d_ff() const { return shape_.d_ff; }
  /// Parameters and gradients (live), as an ExpertWeights with E = 1.
  ExpertWeights& weights() { return weights_; }
  Device device() const { return ops_->device; }

  /// As SwitchFFN::forward / backward.
  void forward(const void* x, DType x_dtype, int64_t num_tokens, bool training, void* y);
  void backward(const void* dy, void* dx);
  bool has_forward() const { return has_forward_; }
  DType forward_dtype() const { return x_dtype_; }
  int64_t forward_tokens() const { return tokens_; }
  /// Dropout draws so far (see SwitchFFN::training_steps).
  uint64_t training_steps() const { return training_steps_; }
  void set_training_steps(uint64_t steps) { training_steps_ = steps; }

 private:
  const BackendOps* ops_;  // first, as in SwitchFFN
  ExpertShape shape_;
  DenseFFNOptions options_;
  ExpertWeights weights_;
  // The layer's arena (see SwitchFFN): x, y, dy and dx in the compute dtype.
  enum Slot { kX, kY, kDy, kDx, kSlotCount };
  Workspace workspace_;
  TensorView rows_of(Slot slot, int64_t count);  // as SwitchFFN::rows_of
  ExpertCache cache_;
  DType x_dtype_ = DType::float32;
  int64_t tokens_ = 0;
  uint64_t training_steps_ = 0;
  bool has_forward_ = false;
};

/// Converts n values between float32 and bfloat16 (or copies when the dtypes match). Throws
/// InvalidArgument for an integer dtype.
void convert_activations(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n);

}  // namespace pyswitch::moe
