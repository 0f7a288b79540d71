/// @file moe/router.hpp
/// Token-choice routing (Switch top-1, GShard top-k): softmax in float32, top-k with
/// lowest-index tie-break, capacity per group, position or batch-prioritized priority, the
/// load-balancing and z losses, and their gradient. Semantics: SPEC.md section 1.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "pyswitch/table_buffer.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch {
struct BackendOps;  // backend.hpp (which includes this header)
}  // namespace pyswitch

namespace pyswitch::moe {

enum class Priority { position, batch_prioritized };
enum class CapacityRounding { floor, ceil };

/// Parses "position" / "batch_prioritized"; InvalidArgument otherwise.
Priority parse_priority(const std::string& name);
/// Parses "floor" / "ceil"; InvalidArgument otherwise.
CapacityRounding parse_capacity_rounding(const std::string& name);

struct RouteOptions {
  int64_t k = 1;                                 ///< experts per token, 1 <= k <= E
  std::optional<double> capacity_factor = 1.25;  ///< nullopt = dropless
  int64_t min_capacity = 4;                      ///< >= 0
  int64_t group_size = 0;                        ///< tokens per group; 0 = all tokens, one group
  Priority priority = Priority::position;
  CapacityRounding capacity_rounding = CapacityRounding::floor;
  bool normalize_gates = false;  ///< k > 1 only
};

/// Capacity per expert per group: min(S, max(min_capacity, round(cf * k * S / E))) with round =
/// floor or ceil. Safe for huge factors (clamped to S before any integer conversion).
int64_t expert_capacity(int64_t group_size, int64_t num_experts, int64_t k, double capacity_factor,
                        int64_t min_capacity, CapacityRounding rounding);

/// The result of routing T tokens over E experts. Owns its arrays (row-major).
struct RoutingPlan {
  int64_t num_tokens = 0;   ///< T
  int64_t num_experts = 0;  ///< E
  int64_t k = 0;
  int64_t group_size = 0;  ///< S
  int64_t num_groups = 0;  ///< G = T / S
  int64_t capacity = 0;    ///< C, rows per expert per group; dropless: the largest count
  int64_t dropped = 0;     ///< assignments past capacity
  double aux_loss = 0;     ///< unscaled load-balancing loss: aux_sum / loss_groups
  double z_loss = 0;       ///< unscaled router z-loss: z_sum / loss_tokens
  /// The sums behind the losses: aux_sum adds the groups' E * sum_i f_i P_i in group order,
  /// z_sum adds each group's sum of lse^2 in group order. Expert parallelism adds the ranks'
  /// sums in rank order, which is the same sequence of additions as one rank routing all the
  /// groups, and sets loss_groups / loss_tokens to the global counts (route_backward divides by
  /// them), so global losses and their gradients are bit-identical to the one-rank layer.
  double aux_sum = 0;
  double z_sum = 0;
  int64_t loss_groups = 0;  ///< groups the aux loss averages over (G on one rank)
  int64_t loss_tokens = 0;  ///< tokens the z-loss averages over (T on one rank)
  bool normalize_gates = false;
  std::vector<int32_t> expert_index;        ///< (T, k), descending probability
  std::vector<float> gate;                  ///< (T, k), exactly 0 where dropped
  std::vector<int32_t> slot;                ///< (T, k), -1 = dropped; group g starts at g*C
  std::vector<int64_t> tokens_per_expert;   ///< (E,), all groups, before capacity
  std::vector<int64_t> group_expert_count;  ///< (G, E), before capacity: the f_i of the aux loss
};

/// Routes T tokens given their router logits.
/// @param logits (T, E) float32, row-major; read only, not retained.
/// @throws InvalidArgument for T < 1, E < 1, k outside [1, E], a group size that does not
///   divide T, a capacity factor that is not finite and positive, min_capacity < 0,
///   normalize_gates with k == 1, or a non-finite logit (the message names the first bad row).
/// Thread-safe (no shared state); multi-threaded inside; results do not depend on the thread
/// count or the CPU ISA. Extra memory: O(T*k + E*G) besides the plan.
RoutingPlan route(const float* logits, int64_t num_tokens, int64_t num_experts,
                  const RouteOptions& options);

/// Gradient of  sum(d_gate * plan.gate) + aux_coef * aux_loss + z_coef * z_loss  with respect
/// to the logits. Dropped gates are constants (0); the counts f_i of the aux loss carry no
/// gradient; with normalize_gates the gradient flows through the normalisation.
/// @param logits the (T, E) float32 logits the plan was made from.
/// @param d_gate (T, k) float32.
/// @param d_logits (T, E) float32, written (not accumulated).
void route_backward(const float* logits, const RoutingPlan& plan, const float* d_gate,
                    double aux_coef, double z_coef, float* d_logits);

/// Row-wise float32 softmax with the same numerics as route() (so a backward pass sees the
/// probabilities the forward used). probs: (T, E) written.
void softmax_rows(const float* logits, int64_t num_tokens, int64_t num_experts, float* probs);

/// Expert-choice routing (Zhou et al. 2022): in each group of S tokens, each expert takes the
/// C = min(S, max(1, floor(cf * S / E))) tokens with the highest probability for it, ties to
/// the lower token index. A token may be taken by 0..E experts. NOT causal: a token's routing
/// depends on later tokens of its group, so it must not be used in autoregressive decoders.
struct ExpertChoicePlan {
  int64_t num_tokens = 0, num_experts = 0, group_size = 0, num_groups = 0, capacity = 0;
  double z_loss = 0;
  std::vector<int32_t> token_index;        ///< (E, G*C): row g*C+c of expert e's buffer
  std::vector<float> gate;                 ///< (E, G*C): probs[token, e]
  std::vector<int32_t> experts_per_token;  ///< (T,)
};

/// @param logits (T, E) float32. Throws InvalidArgument as route() does (capacity_factor must be
///   finite and > 0). Extra memory: O(S * E) per thread for the group's probabilities.
ExpertChoicePlan route_expert_choice(const float* logits, int64_t num_tokens, int64_t num_experts,
                                     double capacity_factor, int64_t group_size);

/// Checks logits for route()/route_expert_choice(): finite everywhere. Throws InvalidArgument
/// naming the first non-finite row.
void check_logits_finite(const char* where, const float* logits, int64_t num_tokens,
                         int64_t num_experts);

/// The router layer: logits = float32(x * jitter) @ W with W (d_model, E) float32 ("selective
/// precision": the cast happens before the matmul even for bfloat16 x), then route().
struct RouterOptions {
  RouteOptions route;  ///< capacity_factor here is the training one
  std::optional<double> eval_capacity_factor = 2.0;
  double jitter_eps = 1e-2;  ///< multiplicative U(1-eps, 1+eps), training only; 0 = off
  double init_scale = 0.1;   ///< truncated normal, std = sqrt(init_scale / d_model)
  uint64_t seed = 0;
};

class Router {
 public:
  /// Throws InvalidArgument for d_model < 1, E < 1, bad routing options, jitter_eps outside
  /// [0, 1), init_scale <= 0.
  /// The weights, logits and saved inputs live in `ops`'s memory (null: the CPU table); x, dx
  /// and d_gate of forward and backward must then be in that memory too.
  Router(int64_t d_model, int64_t num_experts, const RouterOptions& options,
         const BackendOps* ops = nullptr);

  int64_t d_model() const { return d_model_; }
  int64_t num_experts() const { return num_experts_; }
  const RouterOptions& options() const { return options_; }

  /// (d_model, E) float32, live: writes change the router. Owned by the router.
  float* weight() { return weight_.as<float>(); }
  /// (d_model, E) float32 gradient of the last backward (zeros before).
  float* weight_grad() { return weight_grad_.as<float>(); }

  /// x: (T, d_model), float32 or bfloat16, C-contiguous. Returns the plan, owned by the router
  /// and valid until the next forward. Throws InvalidArgument for T < 1 or an integer dtype.
  const RoutingPlan& forward(const void* x, DType dtype, int64_t num_tokens, bool training);

  /// Expert parallelism: this rank's share of a global batch. first_token is the global index
  /// of x's first row; the jitter draws are indexed by global element, so they equal the draws
  /// of a one-rank router over the whole batch. num_tokens may be 0 (a rank with no tokens still
  /// takes part): the plan is then empty. Throws InvalidArgument for negative sizes or an
  /// integer dtype.
  const RoutingPlan& forward_shard(const void* x, DType dtype, int64_t num_tokens, bool training,
                                   int64_t first_token);

  /// Makes the last plan's losses the global ones of an expert-parallel layer: aux_loss =
  /// aux_sum / groups and z_loss = z_sum / tokens, where the sums are the ranks' plan sums added
  /// in rank order; backward() then differentiates the global losses.
  void set_global_losses(int64_t groups, int64_t tokens, double aux_sum, double z_sum);

  /// d_gate: (T, k) float32. dx: (T, d_model) in the dtype of the forward's x, written.
  /// Writes weight_grad(). Throws Error when no forward preceded it.
  void backward(const float* d_gate, double aux_coef, double z_coef, void* dx);

  /// The logits of the last forward, (T, E) float32, in the router's memory.
  const TableBuffer& last_logits() const { return logits_; }
  bool has_forward() const { return has_forward_; }
  /// The plan of the last forward (valid while has_forward()).
  const RoutingPlan& forward_plan() const { return plan_; }
  /// The dtype of the last forward's x, which is also the dtype backward writes dx in.
  DType forward_dtype() const { return x_dtype_; }
  /// Jitter draws so far (training forwards with jitter): the random state a checkpoint saves,
  /// so that a resumed run draws the same noise.
  uint64_t training_steps() const { return training_steps_; }
  void set_training_steps(uint64_t steps) { training_steps_ = steps; }

 private:
  int64_t d_model_, num_experts_;
  RouterOptions options_;
  // Every kernel and buffer goes through this table; the jitter is drawn on the host (the same
  // numbers on every device) and copied over.
  const BackendOps* ops_;
  TableBuffer weight_, weight_grad_;
  TableBuffer x_used_;          // (T, d_model): the float32 router input after jitter
  TableBuffer jitter_;          // (T, d_model): the last training forward's noise
  bool jitter_active_ = false;  // whether the last forward applied jitter_
  TableBuffer logits_;
  TableBuffer d_logits_, dx_f32_;  // backward scratch
  RoutingPlan plan_;
  DType x_dtype_ = DType::float32;
  uint64_t training_steps_ = 0;
  bool has_forward_ = false;
};

}  // namespace pyswitch::moe
