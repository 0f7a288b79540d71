// The Switch FFN layer and the dense FFN: orchestration of router, dispatch, experts, combine.
#include "pyswitch/moe/switch_layer.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "pyswitch/bf16.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/random.hpp"

namespace pyswitch::moe {
namespace {

void check_sizes(const char* where, int64_t d_model, int64_t d_ff, int64_t experts) {
  PYSWITCH_CHECK_ARG(d_model >= 1, where, ": d_model must be >= 1, got ", d_model);
  PYSWITCH_CHECK_ARG(d_ff >= 1, where, ": d_ff must be >= 1, got ", d_ff);
  PYSWITCH_CHECK_ARG(experts >= 1, where, ": num_experts must be >= 1, got ", experts);
  PYSWITCH_CHECK_ARG(d_model <= (int64_t{1} << 24) && d_ff <= (int64_t{1} << 24) &&
                         experts <= (int64_t{1} << 24) &&
                         static_cast<double>(d_model) * d_ff * experts <= 1.0e10,
                     where, ": d_model * d_ff * num_experts = ", d_model, " * ", d_ff, " * ",
                     experts, " is too large (at most 1e10 weights per tensor)");
}

void check_dropout(const char* where, const char* name, double rate) {
  PYSWITCH_CHECK_ARG(std::isfinite(rate) && rate >= 0.0 && rate < 1.0, where, ": ", name,
                     " must be in [0, 1), got ", rate);
}

}  // namespace

void convert_activations(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
  check_floating(src_dtype, "convert_activations", "source dtype");
  check_floating(dst_dtype, "convert_activations", "destination dtype");
  if (src_dtype == dst_dtype) {
    if (src != dst) std::memcpy(dst, src, static_cast<size_t>(n * dtype_size(src_dtype)));
  } else if (src_dtype == DType::float32) {
    convert_f32_to_bf16(static_cast<const float*>(src), static_cast<bf16*>(dst), n);
  } else {
    convert_bf16_to_f32(static_cast<const bf16*>(src), static_cast<float*>(dst), n);
  }
}

// ---------------------------------------------------------------------------------------------
// SwitchFFN

namespace {

// Validates the layer's sizes and returns the number of experts on this rank.
int64_t local_expert_count(int64_t d_model, int64_t d_ff, int64_t E, const comm::Communicator* c) {
  check_sizes("SwitchFFN", d_model, d_ff, E);
  if (!c) return E;
  const int64_t W = c->size();
  PYSWITCH_CHECK_ARG(E % W == 0, "SwitchFFN: num_experts must be divisible by the communicator's ",
                     "size (experts are sharded contiguously over ranks), got num_experts=", E,
                     " and size=", W);
  return E / W;
}

// Runs one expert-parallel step. A failure that is not the group's own (bad input on this rank,
// an allocation) poisons the communicator, so that the peers throw CommError at once instead of
// waiting for the timeout in the next exchange.
template <class Body>
void poison_on_failure(comm::Communicator* c, const char* where, Body&& body) {
  if (!c) {
    body();
    return;
  }
  try {
    body();
  } catch (const CommError&) {
    throw;
  } catch (const std::exception& e) {
    c->poison(detail::concat(where, " failed on rank ", c->rank(), ": ", e.what()));
    throw;
  }
}

// Doubles travel through the int64 collectives bit for bit.
int64_t double_bits(double value) {
  int64_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}
double bits_double(int64_t bits) {
  double value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

}  // namespace

SwitchFFN::SwitchFFN(int64_t d_model, int64_t d_ff, int64_t num_experts,
                     const SwitchFFNOptions& options, comm::Communicator* comm)
    : ops_(&layer_backend("SwitchFFN", options.device)),
      shape_{local_expert_count(d_model, d_ff, num_experts, comm), d_model, d_ff,
             options.activation},
      num_experts_(num_experts),
      options_(options),
      comm_(comm),
      first_expert_(comm ? comm->rank() * shape_.num_experts : 0),
      router_(d_model, num_experts, options.router, ops_),
      weights_(shape_, options.use_bias, options.router.init_scale, options.router.seed,
               first_expert_, *ops_),
      workspace_(*ops_, kSlotCount) {
  check_floating(options.dtype, "SwitchFFN", "options.dtype");
  check_dropout("SwitchFFN", "expert_dropout", options.expert_dropout);
  if (ops_->device != Device::cpu && comm_ != nullptr) {
    throw DeviceError(
        "SwitchFFN: expert parallelism on cuda needs a device communicator (NCCL), which this "
        "version does not have; construct the cuda layer without a communicator, or use "
        "device='cpu'");
  }
  if (options.dtype == DType::bfloat16) weights_.enable_compute_copy();
  PYSWITCH_CHECK_ARG(std::isfinite(options.aux_loss_coef) && std::isfinite(options.z_loss_coef),
                     "SwitchFFN: aux_loss_coef and z_loss_coef must be finite, got ",
                     options.aux_loss_coef, " and ", options.z_loss_coef);
}

const RoutingPlan& SwitchFFN::plan() const {
  PYSWITCH_CHECK_STATE(has_forward_, "SwitchFFN: no forward pass yet");
  return router_.forward_plan();
}

void SwitchFFN::forward(const void* x, DType x_dtype, int64_t T, bool training, void* y) {
  has_forward_ = false;
  poison_on_failure(comm_, "SwitchFFN.forward", [&] {
    PYSWITCH_CHECK_ARG(T >= (comm_ ? 0 : 1), "SwitchFFN.forward: x must have at least one token ",
                       "row, got shape (", T, ", ", shape_.d_model, ")");
    const int64_t d = shape_.d_model;
    const DType c = options_.dtype;
    const RoutingPlan* plan = nullptr;
    if (!comm_) {
      plan = &router_.forward(x, x_dtype, T, training);
    } else {
      // The jitter draws are indexed by global token, so ranks need their first token's index.
      int64_t first_token = 0;
      if (training && options_.router.jitter_eps > 0) {
        std::vector<int64_t> tokens(static_cast<size_t>(comm_->size()));
        comm_->all_gather(&T, tokens.data(), 1, DType::int64);
        for (int r = 0; r < comm_->rank(); ++r) first_token += tokens[static_cast<size_t>(r)];
      }
      plan = &router_.forward_shard(x, x_dtype, T, training, first_token);
    }
    layout_ = make_dispatch_layout(*plan, /*packed=*/true);

    // Tokens in the compute dtype, gathered into the packed expert buffer.
    const TensorView x_in = TensorView::contiguous(x, x_dtype, {T, d}, ops_->device);
    TensorView x_c = x_in;
    if (x_dtype != c) {
      x_c = rows_of(kTokens, T);
      ops_->convert(x_in, x_c);
    }
    const int64_t rows = layout_.total_rows;
    const TensorView buffer = rows_of(kBuffer, rows);
    const TensorView expert_out = rows_of(kExpertOut, rows);
    ops_->dispatch(x_c, layout_, buffer);

    DropoutSpec dropout;
    if (training && options_.expert_dropout > 0) {
      dropout = {options_.expert_dropout, options_.router.seed, kStreamDropout + training_steps_++,
                 0};
    }
    if (!comm_) {
      ops_->experts_forward(shape_, weights_.compute_params(c), layout_.expert_offset.data(),
                            buffer, expert_out, &cache_, dropout);
    } else {
      forward_experts(dropout);
    }

    const TensorView gate = gate_view(*plan);
    const TensorView y_out = TensorView::contiguous(y, x_dtype, {T, d}, ops_->device);
    if (x_dtype == c) {
      ops_->combine(expert_out, layout_, gate, y_out);
    } else {
      const TensorView y_c = rows_of(kCombined, T);
      ops_->combine(expert_out, layout_, gate, y_c);
      ops_->convert(y_c, y_out);
    }
    x_dtype_ = x_dtype;
    tokens_ = T;
  });
  has_forward_ = true;
}

void SwitchFFN::exchange_counts() {
  const int W = comm_->size();
  const int64_t E = num_experts_;
  const RoutingPlan& plan = router_.forward_plan();
  // One gather carries everything the ranks must know of each other: rows per expert, tokens,
  // groups and the loss sums.
  const int64_t width = E + 4;
  std::vector<int64_t> mine(width);
  for (int64_t e = 0; e < E; ++e) mine[e] = layout_.expert_offset[e + 1] - layout_.expert_offset[e];
  mine[E] = plan.num_tokens;
  mine[E + 1] = plan.num_groups;
  mine[E + 2] = double_bits(plan.aux_sum);
  mine[E + 3] = double_bits(plan.z_sum);
  std::vector<int64_t> all(W * width);
  comm_->all_gather(mine.data(), all.data(), width, DType::int64);

  std::vector<int64_t> counts(W * E);
  int64_t tokens = 0, groups = 0;
  double aux_sum = 0, z_sum = 0;  // added in rank order: the one-rank layer's group order
  for (int w = 0; w < W; ++w) {
    const int64_t* row = all.data() + w * width;
    std::copy_n(row, E, counts.data() + w * E);
    tokens += row[E];
    groups += row[E + 1];
    aux_sum += bits_double(row[E + 2]);
    z_sum += bits_double(row[E + 3]);
  }
  if (tokens > 0 && groups > 0) router_.set_global_losses(groups, tokens, aux_sum, z_sum);
  exchange_ = make_ep_layout(counts.data(), W, comm_->rank(), E);
}

void SwitchFFN::exchange(const void* send, void* recv, bool to_owners) {
  exchange_rows(*comm_, exchange_, shape_.d_model, options_.dtype, send, recv, to_owners);
}

void SwitchFFN::permute(const void* from, void* to, bool to_expert_major) const {
  permute_rows(exchange_, shape_.d_model * dtype_size(options_.dtype), from, to, to_expert_major);
}

TensorView SwitchFFN::rows_of(Slot slot, int64_t count) {
  return workspace_.matrix(slot, options_.dtype, count, shape_.d_model);
}

TensorView SwitchFFN::gate_view(const RoutingPlan& plan) {
  const int64_t T = plan.num_tokens, k = plan.k;
  const TensorView host = TensorView::contiguous(plan.gate.data(), DType::float32, {T, k});
  if (ops_->device == Device::cpu) return host;
  // The plan is a host structure; a device layer copies the gates over once per pass.
  const TensorView on_device = workspace_.matrix(kGate, DType::float32, T, k);
  if (T * k > 0) ops_->copy(host, on_device);
  return on_device;
}

void SwitchFFN::forward_experts(DropoutSpec dropout) {
  exchange_counts();
  const DType c = options_.dtype;
  const int64_t rows = layout_.total_rows;
  const int64_t local_rows = exchange_.local_offsets.back();
  const TensorView wire = rows_of(kWire, local_rows);
  const TensorView expert_in = rows_of(kExpertIn, local_rows);
  const TensorView expert_result = rows_of(kExpertResult, local_rows);
  exchange(rows_of(kBuffer, rows).data, wire.data, /*to_owners=*/true);
  permute(wire.data, expert_in.data, /*to_expert_major=*/true);
  dropout.first_row = exchange_.first_row;
  ops_->experts_forward(shape_, weights_.compute_params(c), exchange_.local_offsets.data(),
                        expert_in, expert_result, &cache_, dropout);
  permute(expert_result.data, wire.data, /*to_expert_major=*/false);
  exchange(wire.data, rows_of(kExpertOut, rows).data, /*to_owners=*/false);
}

void SwitchFFN::backward_experts() {
  // kDExpertOut (this rank's packed rows) -> the owners; their input gradients come back into
  // kDBuffer. kExpertResult is free after the forward, so it holds the permuted dy.
  const int64_t rows = layout_.total_rows;
  const int64_t local_rows = exchange_.local_offsets.back();
  const TensorView wire = rows_of(kWire, local_rows);
  const TensorView expert_in = rows_of(kExpertIn, local_rows);
  const TensorView d_expert_result = rows_of(kExpertResult, local_rows);
  const TensorView d_expert_in = rows_of(kDExpertIn, local_rows);
  exchange(rows_of(kDExpertOut, rows).data, wire.data, /*to_owners=*/true);
  permute(wire.data, d_expert_result.data, /*to_expert_major=*/true);
  ops_->experts_backward(shape_, weights_.params(), exchange_.local_offsets.data(), expert_in,
                         cache_, d_expert_result, d_expert_in, weights_.grads());
  permute(d_expert_in.data, wire.data, /*to_expert_major=*/false);
  exchange(wire.data, rows_of(kDBuffer, rows).data, /*to_owners=*/false);
}

void SwitchFFN::backward(const void* dy, void* dx) {
  PYSWITCH_CHECK_STATE(has_forward_,
                       "SwitchFFN.backward: no forward pass to differentiate; call forward(x) "
                       "first");
  poison_on_failure(comm_, "SwitchFFN.backward", [&] {
    const int64_t T = tokens_, d = shape_.d_model, k = router_.options().route.k;
    const DType c = options_.dtype;
    const RoutingPlan& plan = router_.forward_plan();
    const TensorView dy_in = TensorView::contiguous(dy, x_dtype_, {T, d}, ops_->device);
    TensorView dy_c = dy_in;
    if (x_dtype_ != c) {
      dy_c = rows_of(kTokens, T);
      ops_->convert(dy_in, dy_c);
    }
    const int64_t rows = layout_.total_rows;
    const TensorView buffer = rows_of(kBuffer, rows);
    const TensorView d_expert_out = rows_of(kDExpertOut, rows);
    const TensorView d_gate = workspace_.matrix(kDGate, DType::float32, T, k);
    ops_->combine_backward(dy_c, rows_of(kExpertOut, rows), layout_, gate_view(plan), d_expert_out,
                           d_gate);
    const TensorView d_buffer = rows_of(kDBuffer, rows);
    if (!comm_) {
      ops_->experts_backward(shape_, weights_.params(), layout_.expert_offset.data(), buffer,
                             cache_, d_expert_out, d_buffer, weights_.grads());
    } else {
      backward_experts();
    }
    const TensorView dx_experts = rows_of(kDxExperts, T);
    ops_->dispatch_backward(d_buffer, layout_, dx_experts);

    // The router's path: d(gate) plus the scaled losses, back to x through the logits.
    const TensorView dx_router = workspace_.matrix(kDxRouter, x_dtype_, T, d);
    router_.backward(d_gate.as<const float>(), options_.aux_loss_coef, options_.z_loss_coef,
                     dx_router.data);
    ops_->add(dx_experts, dx_router, TensorView::contiguous(dx, x_dtype_, {T, d}, ops_->device));
  });
}

SwitchStats SwitchFFN::stats() const {
  const RoutingPlan& p = plan();
  SwitchStats s;
  s.tokens_per_expert = p.tokens_per_expert;
  const int64_t T = p.num_tokens, E = p.num_experts;
  if (T == 0) return s;  // an expert-parallel rank without tokens
  s.drop_fraction = static_cast<double>(p.dropped) / static_cast<double>(p.num_tokens * p.k);
  std::vector<float> probs(static_cast<size_t>(T * E));
  const TensorView logits = router_.last_logits().view({T, E});
  if (ops_->device == Device::cpu) {
    ops_->softmax_rows(logits, TensorView::contiguous(probs.data(), DType::float32, {T, E}));
  } else {
    TableBuffer on_device(*ops_, DType::float32, T * E);
    ops_->softmax_rows(logits, on_device.view({T, E}));
    on_device.download(probs.data());
  }
  double entropy = 0;
  for (float pi : probs) {
    if (pi > 0) entropy -= static_cast<double>(pi) * std::log(static_cast<double>(pi));
  }
  s.router_entropy = entropy / static_cast<double>(T);
  return s;
}

// ---------------------------------------------------------------------------------------------
// DenseFFN

DenseFFN::DenseFFN(int64_t d_model, int64_t d_ff, const DenseFFNOptions& options)
    : ops_(&layer_backend("DenseFFN", options.device)),
      shape_{1, d_model, d_ff, options.activation},
      options_(options),
      weights_((check_sizes("DenseFFN", d_model, d_ff, 1), shape_), options.use_bias,
               options.init_scale, options.seed, 0, *ops_),
      workspace_(*ops_, kSlotCount) {
  check_floating(options.dtype, "DenseFFN", "options.dtype");
  check_dropout("DenseFFN", "dropout", options.dropout);
  if (options.dtype == DType::bfloat16) weights_.enable_compute_copy();
}

TensorView DenseFFN::rows_of(Slot slot, int64_t count) {
  return workspace_.matrix(slot, options_.dtype, count, shape_.d_model);
}

void DenseFFN::forward(const void* x, DType x_dtype, int64_t T, bool training, void* y) {
  PYSWITCH_CHECK_ARG(T >= 1, "DenseFFN.forward: x must have at least one token row, got shape (", T,
                     ", ", shape_.d_model, ")");
  has_forward_ = false;
  const int64_t d = shape_.d_model;
  const DType c = options_.dtype;
  const TensorView x_c = rows_of(kX, T);
  ops_->convert(TensorView::contiguous(x, x_dtype, {T, d}, ops_->device), x_c);
  const int64_t offsets[2] = {0, T};
  DropoutSpec dropout;
  if (training && options_.dropout > 0) {
    dropout = {options_.dropout, options_.seed, kStreamDropout + training_steps_++};
  }
  const TensorView y_c = rows_of(kY, T);
  ops_->experts_forward(shape_, weights_.compute_params(c), offsets, x_c, y_c, &cache_, dropout);
  ops_->convert(y_c, TensorView::contiguous(y, x_dtype, {T, d}, ops_->device));
  x_dtype_ = x_dtype;
  tokens_ = T;
  has_forward_ = true;
}

void DenseFFN::backward(const void* dy, void* dx) {
  PYSWITCH_CHECK_STATE(has_forward_,
                       "DenseFFN.backward: no forward pass to differentiate; call forward(x) "
                       "first");
  const int64_t T = tokens_, d = shape_.d_model;
  const TensorView dy_c = rows_of(kDy, T);
  const TensorView dx_c = rows_of(kDx, T);
  ops_->convert(TensorView::contiguous(dy, x_dtype_, {T, d}, ops_->device), dy_c);
  const int64_t offsets[2] = {0, T};
  ops_->experts_backward(shape_, weights_.params(), offsets, rows_of(kX, T), cache_, dy_c, dx_c,
                         weights_.grads());
  ops_->convert(dx_c, TensorView::contiguous(dx, x_dtype_, {T, d}, ops_->device));
}

}  // namespace pyswitch::moe
