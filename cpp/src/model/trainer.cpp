// Trainer: one SwitchLM training step (forward, backward, gradient reduction, clipping,
// schedule, optimizer update, global routing statistics) in a single C++ call.
#include "pyswitch/model/trainer.hpp"

#include <cmath>
#include <cstring>

#include "pyswitch/error.hpp"

namespace pyswitch::model {

struct Trainer::Slot {
  ParamRef param;
  int64_t size = 0;
  optim::AdafactorShape shape;              // Adafactor's view of the tensor
  std::vector<float> first, second, third;  // AdamW: m, v; Adafactor: row, col, full
};

namespace {

TensorView flat(const float* data, int64_t n) {
  return TensorView::contiguous(data, DType::float32, {n});
}
TensorView flat(const std::vector<float>& v) {
  return flat(v.data(), static_cast<int64_t>(v.size()));
}
// A parameter's bf16 compute copy, or an empty view when it has none.
TensorView copy_view(const bf16* data, int64_t n) {
  return data ? TensorView::contiguous(data, DType::bfloat16, {n}) : TensorView{};
}

int64_t element_count(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

// Matrices (and stacks of them, expert tensors (E, a, b)) are factored over their last two
// axes; vectors keep one accumulator per element.
optim::AdafactorShape adafactor_shape(const std::vector<int64_t>& shape) {
  optim::AdafactorShape out;
  if (shape.size() >= 2) {
    out.batches = 1;
    for (size_t i = 0; i + 2 < shape.size(); ++i) out.batches *= shape[i];
    out.rows = shape[shape.size() - 2];
    out.cols = shape.back();
  } else {
    out.cols = element_count(shape);
  }
  return out;
}

// Float64 values summed over the ranks in rank order, the same bits on every rank. They travel
// as int64 bit patterns: the collectives reduce float32 at most.
std::vector<double> sum_over_ranks(comm::Communicator& comm, const std::vector<double>& values) {
  const int64_t n = static_cast<int64_t>(values.size());
  std::vector<double> every(static_cast<size_t>(n * comm.size()));
  comm.all_gather(values.data(), every.data(), n, DType::int64);
  std::vector<double> total(values.size(), 0.0);
  for (int r = 0; r < comm.size(); ++r) {
    for (int64_t i = 0; i < n; ++i) total[i] += every[r * n + i];
  }
  return total;
}

}  // namespace

Trainer::Trainer(SwitchLM& model, const TrainerOptions& options)
    : model_(model), options_(options), ops_(&cpu_backend()) {
  const TrainerOptions& o = options_;
  PYSWITCH_CHECK_ARG(o.optimizer == "adamw" || o.optimizer == "adafactor",
                     "Trainer: optimizer must be 'adamw' or 'adafactor', got '", o.optimizer, "'");
  PYSWITCH_CHECK_ARG(o.peak_lr > 0 && std::isfinite(o.peak_lr),
                     "Trainer: peak_lr must be finite and > 0, got ", o.peak_lr);
  PYSWITCH_CHECK_ARG(o.clip > 0 && std::isfinite(o.clip),
                     "Trainer: clip must be finite and > 0, got ", o.clip);
  PYSWITCH_CHECK_ARG(o.warmup_steps >= 0, "Trainer: warmup_steps must be >= 0, got ",
                     o.warmup_steps);
  PYSWITCH_CHECK_ARG(std::isfinite(o.weight_decay) && o.weight_decay >= 0,
                     "Trainer: weight_decay must be finite and >= 0, got ", o.weight_decay);
  // Checks the decay name (and the fraction) once, here, rather than at the first step.
  optim::learning_rate(0, o.peak_lr, o.warmup_steps, 1, o.decay, o.final_fraction);
  adafactor_ = o.optimizer == "adafactor";
  int64_t replicated = 0;
  for (ParamRef& p : model_.parameters()) {
    Slot slot;
    slot.param = p;
    slot.size = element_count(p.shape);
    if (adafactor_) {
      slot.shape = adafactor_shape(p.shape);
      slot.first.assign(static_cast<size_t>(slot.shape.row_state()), 0.0f);
      slot.second.assign(static_cast<size_t>(slot.shape.col_state()), 0.0f);
      slot.third.assign(static_cast<size_t>(slot.shape.full_state()), 0.0f);
    } else {
      slot.first.assign(static_cast<size_t>(slot.size), 0.0f);
      slot.second.assign(static_cast<size_t>(slot.size), 0.0f);
    }
    if (!p.expert) replicated += slot.size;
    slots_.push_back(std::move(slot));
  }
  if (model_.communicator() != nullptr) flat_.resize(static_cast<size_t>(replicated));
}

Trainer::~Trainer() = default;

void Trainer::set_optimizer_steps(int64_t steps) {
  PYSWITCH_CHECK_ARG(steps >= 0, "Trainer.optimizer_steps must be >= 0, got ", steps);
  optimizer_steps_ = steps;
}

std::vector<StateRef> Trainer::state() {
  std::vector<StateRef> out;
  for (Slot& s : slots_) {
    const std::string& name = s.param.name;
    const bool expert = s.param.expert;
    if (adafactor_) {
      out.push_back({name + ".row", s.first.data(), {s.shape.row_state()}, expert});
      out.push_back({name + ".col", s.second.data(), {s.shape.col_state()}, expert});
      out.push_back({name + ".full", s.third.data(), {s.shape.full_state()}, expert});
    } else {
      out.push_back({name + ".m", s.first.data(), s.param.shape, expert});
      out.push_back({name + ".v", s.second.data(), s.param.shape, expert});
    }
  }
  return out;
}

// All replicated gradients in one collective: packed into flat_, summed in rank order, unpacked.
// Element-wise rank-order sums, so the bits are those of one all_reduce per tensor.
void Trainer::reduce_replicated_gradients() {
  comm::Communicator& comm = *model_.communicator();
  int64_t offset = 0;
  for (const Slot& s : slots_) {
    if (s.param.expert) continue;
    std::memcpy(flat_.data() + offset, s.param.grad, static_cast<size_t>(s.size) * sizeof(float));
    offset += s.size;
  }
  comm.all_reduce(flat_.data(), flat_.data(), offset, DType::float32, comm::ReduceOp::sum);
  offset = 0;
  for (const Slot& s : slots_) {
    if (s.param.expert) continue;
    std::memcpy(s.param.grad, flat_.data() + offset, static_cast<size_t>(s.size) * sizeof(float));
    offset += s.size;
  }
}

// A parameter with a bf16 compute copy (bf16 FFN matrices) has it written in the same pass as
// the master, so the next forward needs no rounding pass over the weights.
void Trainer::update(double lr) {
  ++optimizer_steps_;
  const TrainerOptions& o = options_;
  for (Slot& s : slots_) {
    const ParamRef& p = s.param;
    const double decay = p.decay ? o.weight_decay : 0.0;
    if (adafactor_) {
      optim::AdafactorOptions a = o.adafactor;
      a.weight_decay = decay;
      ops_->adafactor_update(flat(p.data, s.size), flat(p.grad, s.size), flat(s.first),
                             flat(s.second), flat(s.third), s.shape, optimizer_steps_, lr, a,
                             copy_view(p.compute_copy, s.size));
    } else {
      optim::AdamWOptions a = o.adamw;
      a.weight_decay = o.weight_decay;
      ops_->adamw_update(flat(p.data, s.size), flat(p.grad, s.size), flat(s.first), flat(s.second),
                         optimizer_steps_, lr, a, p.decay, copy_view(p.compute_copy, s.size));
    }
  }
}

std::vector<moe::SwitchStats> Trainer::global_stats() {
  std::vector<moe::SwitchStats> stats = model_.switch_stats();
  comm::Communicator* comm = model_.communicator();
  if (comm == nullptr || stats.empty()) return stats;
  // The logged load and drops are the global batch's, not this rank's share.
  std::vector<int64_t> counts;
  std::vector<double> drops;
  for (const moe::SwitchStats& s : stats) {
    counts.insert(counts.end(), s.tokens_per_expert.begin(), s.tokens_per_expert.end());
    drops.push_back(s.drop_fraction);
  }
  comm->all_reduce(counts.data(), counts.data(), static_cast<int64_t>(counts.size()), DType::int64,
                   comm::ReduceOp::sum);
  drops = sum_over_ranks(*comm, drops);
  size_t offset = 0;
  for (size_t l = 0; l < stats.size(); ++l) {
    std::vector<int64_t>& tokens = stats[l].tokens_per_expert;
    std::copy(counts.begin() + offset, counts.begin() + offset + tokens.size(), tokens.begin());
    offset += tokens.size();
    stats[l].drop_fraction = drops[l] / comm->size();
  }
  return stats;
}

StepStats Trainer::step(const int32_t* tokens, int64_t rows, int64_t S, int64_t step,
                        int64_t total_steps, int64_t loss_tokens) {
  const TrainerOptions& o = options_;
  // The schedule's arguments first: a bad step fails before anything changes.
  const double lr =
      optim::learning_rate(step, o.peak_lr, o.warmup_steps, total_steps, o.decay, o.final_fraction);
  const LossParts loss = model_.step(tokens, rows, S, true, true, loss_tokens);
  StepStats out;
  out.ce = loss.ce;
  out.aux = loss.aux;
  out.z = loss.z;
  out.lr = lr;
  double sq_replicated = 0, sq_expert = 0;
  for (const Slot& s : slots_) {
    (s.param.expert ? sq_expert : sq_replicated) +=
        ops_->sum_of_squares(flat(s.param.grad, s.size));
  }
  if (comm::Communicator* comm = model_.communicator()) {
    reduce_replicated_gradients();
    sq_replicated = 0;
    for (const Slot& s : slots_) {
      if (!s.param.expert) sq_replicated += ops_->sum_of_squares(flat(s.param.grad, s.size));
    }
    const std::vector<double> summed = sum_over_ranks(*comm, {sq_expert, out.ce});
    sq_expert = summed[0];
    out.ce = summed[1];
  }
  out.grad_norm = std::sqrt(sq_replicated + sq_expert);
  if (std::isfinite(out.grad_norm)) {
    if (out.grad_norm > o.clip) {
      const float scale = static_cast<float>(o.clip / out.grad_norm);
      for (const Slot& s : slots_) ops_->scale(flat(s.param.grad, s.size), scale);
    }
    update(lr);
    out.updated = true;
  }
  out.switch_stats = global_stats();
  return out;
}

}  // namespace pyswitch::model
