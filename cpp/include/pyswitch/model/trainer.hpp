/// @file model/trainer.hpp
/// One training step of a SwitchLM in a single call: forward and backward, the gradient
/// reduction over the model's communicator, global-norm clipping, the learning-rate schedule,
/// the optimizer update (AdamW or Adafactor) and the routing statistics of the global batch.
/// `pyswitch train` calls Trainer::step once per step; a C++ program can train the same way and
/// gets the same bits (cpp/examples/embed).
///
/// Parallel rules (the model's communicator, if any, carries both kinds):
///   - expert tensors (ParamRef::expert) are sharded over the ranks and never reduced;
///   - every other gradient is summed over the ranks (rank order, bit-identical on every rank),
///     in one all_reduce over a flat buffer;
///   - each rank passes its own rows of the global batch and loss_tokens = the global batch's
///     target count, so the summed gradients are those of the global mean loss;
///   - the norm, the CE and the routing statistics are the global batch's.
///
/// Not thread-safe: one call at a time per Trainer, and none on its model meanwhile.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "pyswitch/model/switch_lm.hpp"
#include "pyswitch/moe/switch_layer.hpp"
#include "pyswitch/optim/optim.hpp"

namespace pyswitch::model {

struct TrainerOptions {
  std::string optimizer = "adamw";  ///< "adamw" or "adafactor"
  double peak_lr = 2e-3;            ///< the schedule's peak (> 0, finite)
  int64_t warmup_steps = 100;       ///< >= 0
  std::string decay = "cosine";     ///< see optim::learning_rate
  double final_fraction = 0.1;
  double clip = 1.0;  ///< global-norm clip threshold (> 0)
  /// Decoupled weight decay on the model's decay parameters (matrices), for either optimizer.
  double weight_decay = 0.1;
  optim::AdamWOptions adamw;          ///< its weight_decay is ignored (weight_decay above rules)
  optim::AdafactorOptions adafactor;  ///< likewise
};

/// What one step did, over the global batch.
struct StepStats {
  double ce = 0, aux = 0, z = 0;  ///< ce: global mean; aux, z: this rank's
  double grad_norm = 0;           ///< before clipping; not finite: no update was made
  double lr = 0;                  ///< the schedule's rate at this step
  bool updated = false;           ///< false when grad_norm was not finite
  /// Per Switch layer: tokens_per_expert summed over ranks, drop_fraction averaged over ranks,
  /// router_entropy this rank's.
  std::vector<moe::SwitchStats> switch_stats;
};

/// One tensor of optimizer state. AdamW: "<param>.m" and "<param>.v", shaped like the param.
/// Adafactor: "<param>.row", "<param>.col" and "<param>.full", flat (see optim::AdafactorShape;
/// an unused one has size 0). `expert`: sharded with its parameter.
struct StateRef {
  std::string name;
  float* data = nullptr;
  std::vector<int64_t> shape;
  bool expert = false;
};

class Trainer {
 public:
  /// `model` (not owned) must outlive the trainer; the trainer uses the model's communicator.
  /// Throws InvalidArgument for an unknown optimizer or decay, a non-positive clip or peak_lr,
  /// or negative warmup_steps.
  Trainer(SwitchLM& model, const TrainerOptions& options);
  ~Trainer();

  const TrainerOptions& options() const { return options_; }

  /// tokens (rows, S + 1) int32: this rank's rows. `step` (0-based) and `total_steps` drive the
  /// schedule; loss_tokens: target tokens of the global batch (rows * S on one rank). Collective
  /// under a communicator: every rank calls it with the same step. Throws what SwitchLM::step
  /// and the communicator throw.
  StepStats step(const int32_t* tokens, int64_t rows, int64_t S, int64_t step, int64_t total_steps,
                 int64_t loss_tokens);

  /// Live optimizer state, in parameter order (what a checkpoint saves).
  std::vector<StateRef> state();
  /// Updates made so far (the bias-correction and decay count); saved with checkpoints.
  int64_t optimizer_steps() const { return optimizer_steps_; }
  void set_optimizer_steps(int64_t steps);

 private:
  struct Slot;  // one parameter and its state
  void reduce_replicated_gradients();
  void update(double lr);
  std::vector<moe::SwitchStats> global_stats();

  SwitchLM& model_;
  TrainerOptions options_;
  const BackendOps* ops_;  // the norm, clip and optimizer updates run through this table
  bool adafactor_ = false;
  int64_t optimizer_steps_ = 0;
  std::vector<Slot> slots_;
  std::vector<float> flat_;  // replicated gradients, packed for one all_reduce
};

}  // namespace pyswitch::model
