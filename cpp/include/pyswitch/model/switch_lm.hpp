/// @file model/switch_lm.hpp
/// A decoder-only byte-level Switch Transformer language model: token embedding tied with the
/// output head, rotary positions, pre-norm RMSNorm blocks of causal multi-head self-attention
/// and an FFN that is a SwitchFFN every `expert_every` layers (the paper's "every other FFN")
/// and a DenseFFN otherwise, a final RMSNorm and a float32 softmax cross-entropy. With
/// num_experts = 0 every FFN is dense: the FLOP-matched baseline of a top-1 Switch model.
///
/// Loss = CE + sum over Switch layers of (aux_loss_coef * aux + z_loss_coef * z). Forward and
/// backward run in C++; parameters are float32 masters owned by the model (see parameters()).
/// In bfloat16 mode the projections and expert FFNs take bf16 operands with float32
/// accumulation; the residual stream, norms, attention softmax, router and loss stay float32.
/// Not thread-safe: one call at a time per model.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pyswitch/backend.hpp"
#include "pyswitch/comm/communicator.hpp"
#include "pyswitch/moe/switch_layer.hpp"
#include "pyswitch/nn/ops.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch::model {

struct SwitchLMConfig {
  int64_t vocab_size = 256;
  int64_t d_model = 256;
  int64_t num_layers = 4;
  int64_t num_heads = 4;
  int64_t d_ff = 1024;
  int64_t num_experts = 8;  ///< 0: every FFN dense
  int64_t k = 1;
  std::optional<double> capacity_factor = 1.25;
  std::optional<double> eval_capacity_factor = 2.0;
  int64_t expert_every = 2;  ///< layer l is a Switch layer when (l + 1) % expert_every == 0
  DType dtype = DType::float32;
  double aux_loss_coef = 1e-2;
  double z_loss_coef = 1e-3;
  double jitter_eps = 1e-2;
  double init_scale = 0.1;
  double rope_base = 10000.0;
  double norm_eps = 1e-6;
  uint64_t seed = 0;
  Device device = Device::cpu;  ///< where the model runs (cuda: DeviceError in this version)
};

/// The parts of the loss of one forward (the CE is the mean over `loss_tokens`).
struct LossParts {
  double ce = 0;     ///< cross-entropy, nats per token
  double aux = 0;    ///< sum of the Switch layers' scaled load-balancing losses
  double z = 0;      ///< sum of the Switch layers' scaled z-losses
  double total = 0;  ///< ce + aux + z
  int64_t tokens = 0;
};

/// One parameter tensor: live float32 data and gradient, shape, and how training treats it.
struct ParamRef {
  std::string name;
  float* data = nullptr;
  float* grad = nullptr;
  std::vector<int64_t> shape;
  bool expert = false;  ///< sharded over ranks under expert parallelism (no DP reduction)
  bool decay = false;   ///< weight decay applies (matrices)
  /// bf16 models' FFN matrices (w_in, w_out): the ExpertWeights that owns this tensor's bf16
  /// compute copy, and that copy (same layout as data). An optimizer that updates `data` must
  /// also store float_to_bf16 of each updated element into `compute_copy` (Trainer does), or
  /// call weights->mark_params_changed(). Null otherwise.
  moe::ExpertWeights* weights = nullptr;
  bf16* compute_copy = nullptr;
};

class SwitchLM {
 public:
  /// Throws InvalidArgument for inconsistent sizes (d_model % num_heads, odd head size,
  /// expert_every < 1, num_experts % comm size, an integer dtype, ...). `comm` (not owned, must
  /// outlive the model): expert parallelism for the Switch layers; the other parameters are
  /// replicated.
  explicit SwitchLM(const SwitchLMConfig& config, comm::Communicator* comm = nullptr);
  ~SwitchLM();

  const SwitchLMConfig& config() const { return config_; }
  /// The communicator given at construction (null: one rank).
  comm::Communicator* communicator() const { return comm_; }
  bool is_switch_layer(int64_t layer) const;
  /// Every parameter, in a fixed order (the same on every rank). The data pointers are live
  /// and writable: a call marks the FFN layers' bf16 compute copies stale (see
  /// moe::ExpertWeights), so writes made before the next forward are seen. A caller who keeps
  /// them and writes after a forward must call mark_params_changed() before the next one.
  std::vector<ParamRef> parameters();
  /// Declares that parameters were written through kept pointers: the next forward re-rounds
  /// the bf16 compute copies (a no-op in float32).
  void mark_params_changed();
  /// Re-roundings of the FFN layers' bf16 compute copies so far, all layers together (for
  /// tests and benchmarks; 0 in float32).
  int64_t copy_refreshes() const;
  int64_t num_parameters() const;  ///< this rank's parameter count

  /// tokens (B, S + 1) int32: inputs are [:, :S], targets [:, 1:]. Runs forward and, when
  /// `backward`, the backward pass, writing every gradient. loss_tokens: the number of target
  /// tokens the CE is averaged over (B * S on one rank; the global count under data
  /// parallelism, so that gradients add up across ranks). Training mode uses jitter and the
  /// training capacity factor. Throws InvalidArgument for tokens outside the vocabulary.
  LossParts step(const int32_t* tokens, int64_t B, int64_t S, bool training, bool backward,
                 int64_t loss_tokens);

  /// Logits (B, S, V) float32 of the inputs tokens (B, S) (eval mode), for generation.
  void logits(const int32_t* tokens, int64_t B, int64_t S, float* out);

  /// Routing statistics of the last forward, per Switch layer (this rank's tokens).
  std::vector<moe::SwitchStats> switch_stats() const;

  /// The random state (training forwards so far): jitter and dropout draws are indexed by it.
  /// A checkpoint saves it; set it when resuming so the run continues bit for bit.
  uint64_t training_steps() const { return training_steps_; }
  void set_training_steps(uint64_t steps);

 private:
  struct Block;
  void forward(const int32_t* inputs, int64_t B, int64_t S, bool training);

  SwitchLMConfig config_;
  comm::Communicator* comm_;
  const BackendOps* ops_;  // every kernel of the model's own ops goes through this table
  std::vector<float> embed_, embed_grad_, final_norm_, final_norm_grad_;
  std::vector<std::unique_ptr<Block>> blocks_;
  // Forward state kept for the backward.
  int64_t B_ = 0, S_ = 0;
  uint64_t training_steps_ = 0;
  std::vector<int32_t> inputs_;
  std::vector<float> h0_, h_final_, z_, z_inv_rms_, logits_, d_logits_;
  // Workspaces reused from step to step.
  std::vector<float> work_projected_, work_dz_, work_dh_, work_branch_, work_norm_, work_qkv_;
};

}  // namespace pyswitch::model
