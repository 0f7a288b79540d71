// The Switch FFN layer and the dense FFN: orchestration of router, dispatch, experts, combine.
#include "pyswitch/moe/switch_layer.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "parallel.hpp"
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

// out (n,) of b_dtype = a (of a_dtype) + b, summed in float32 in blocks (no full-size temporaries).
void add_activations(const void* a, DType a_dtype, const void* b, DType b_dtype, int64_t n,
                     void* out) {
  constexpr int64_t kBlock = 4096;
  detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t blk) {
    const int64_t first = blk * kBlock, count = std::min(kBlock, n - first);
    float fa[kBlock], fb[kBlock];
    convert_activations(static_cast<const char*>(a) + first * dtype_size(a_dtype), a_dtype, fa,
                        DType::float32, count);
    convert_activations(static_cast<const char*>(b) + first * dtype_size(b_dtype), b_dtype, fb,
                        DType::float32, count);
    for (int64_t i = 0; i < count; ++i) fa[i] += fb[i];
    convert_activations(fa, DType::float32, static_cast<char*>(out) + first * dtype_size(b_dtype),
                        b_dtype, count);
  });
}

}  // namespace

void convert_activations(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
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

comm::CommDType wire_dtype(DType dtype) {
  return dtype == DType::float32 ? comm::CommDType::float32 : comm::CommDType::bfloat16;
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
    : shape_{local_expert_count(d_model, d_ff, num_experts, comm), d_model, d_ff,
             options.activation},
      num_experts_(num_experts),
      options_(options),
      comm_(comm),
      first_expert_(comm ? comm->rank() * shape_.num_experts : 0),
      router_(d_model, num_experts, options.router),
      weights_(shape_, options.use_bias, options.router.init_scale, options.router.seed,
               first_expert_) {
  check_dropout("SwitchFFN", "expert_dropout", options.expert_dropout);
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
        comm_->all_gather(&T, tokens.data(), 1, comm::CommDType::int64);
        for (int r = 0; r < comm_->rank(); ++r) first_token += tokens[static_cast<size_t>(r)];
      }
      plan = &router_.forward_shard(x, x_dtype, T, training, first_token);
    }
    layout_ = make_dispatch_layout(*plan, /*packed=*/true);

    // Tokens in the compute dtype, gathered into the packed expert buffer.
    const void* x_c = x;
    std::vector<char> converted;
    if (x_dtype != c) {
      converted.resize(static_cast<size_t>(T * d * dtype_size(c)));
      convert_activations(x, x_dtype, converted.data(), c, T * d);
      x_c = converted.data();
    }
    const int64_t rows = layout_.total_rows;
    buffer_.resize(static_cast<size_t>(rows * d * dtype_size(c)));
    expert_out_.resize(buffer_.size());
    dispatch(x_c, c, d, layout_, buffer_.data());

    DropoutSpec dropout;
    if (training && options_.expert_dropout > 0) {
      dropout = {options_.expert_dropout, options_.router.seed, kStreamDropout + training_steps_++,
                 0};
    }
    if (!comm_) {
      experts_forward(shape_, weights_.compute_params(c), layout_.expert_offset.data(), c,
                      buffer_.data(), expert_out_.data(), &cache_, dropout);
    } else {
      forward_experts(dropout);
    }

    if (x_dtype == c) {
      combine(expert_out_.data(), c, d, layout_, plan->gate.data(), y);
    } else {
      std::vector<char> y_c(static_cast<size_t>(T * d * dtype_size(c)));
      combine(expert_out_.data(), c, d, layout_, plan->gate.data(), y_c.data());
      convert_activations(y_c.data(), c, y, x_dtype, T * d);
    }
    x_dtype_ = x_dtype;
    tokens_ = T;
  });
  has_forward_ = true;
}

void SwitchFFN::exchange_counts() {
  const int W = comm_->size();
  const int64_t E = num_experts_, E_local = shape_.num_experts;
  const RoutingPlan& plan = router_.forward_plan();
  // One gather carries everything the ranks must know of each other: rows per expert, tokens,
  // groups and the loss sums.
  const int64_t width = E + 4;
  std::vector<int64_t> mine(static_cast<size_t>(width));
  for (int64_t e = 0; e < E; ++e) {
    mine[static_cast<size_t>(e)] = layout_.expert_offset[static_cast<size_t>(e + 1)] -
                                   layout_.expert_offset[static_cast<size_t>(e)];
  }
  mine[static_cast<size_t>(E)] = plan.num_tokens;
  mine[static_cast<size_t>(E + 1)] = plan.num_groups;
  mine[static_cast<size_t>(E + 2)] = double_bits(plan.aux_sum);
  mine[static_cast<size_t>(E + 3)] = double_bits(plan.z_sum);
  std::vector<int64_t> all(static_cast<size_t>(W * width));
  comm_->all_gather(mine.data(), all.data(), width, comm::CommDType::int64);

  Exchange& x = exchange_;
  x.counts.assign(static_cast<size_t>(W * E), 0);
  int64_t tokens = 0, groups = 0;
  double aux_sum = 0, z_sum = 0;  // added in rank order: the one-rank layer's group order
  for (int w = 0; w < W; ++w) {
    const int64_t* row = all.data() + w * width;
    std::copy_n(row, E, x.counts.data() + w * E);
    tokens += row[E];
    groups += row[E + 1];
    aux_sum += bits_double(row[E + 2]);
    z_sum += bits_double(row[E + 3]);
  }
  if (tokens > 0 && groups > 0) router_.set_global_losses(groups, tokens, aux_sum, z_sum);

  const int me = comm_->rank();
  x.send_rows.assign(static_cast<size_t>(W), 0);
  x.recv_rows.assign(static_cast<size_t>(W), 0);
  x.local_offsets.assign(static_cast<size_t>(E_local + 1), 0);
  for (int w = 0; w < W; ++w) {
    for (int64_t e = 0; e < E_local; ++e) {
      x.send_rows[static_cast<size_t>(w)] +=
          x.counts[static_cast<size_t>(me * E + w * E_local + e)];
      const int64_t rows = x.counts[static_cast<size_t>(w * E + first_expert_ + e)];
      x.recv_rows[static_cast<size_t>(w)] += rows;
      x.local_offsets[static_cast<size_t>(e + 1)] += rows;
    }
  }
  for (int64_t e = 0; e < E_local; ++e) {
    x.local_offsets[static_cast<size_t>(e + 1)] += x.local_offsets[static_cast<size_t>(e)];
  }
  x.first_row = 0;
  for (int w = 0; w < W; ++w) {
    for (int64_t e = 0; e < first_expert_; ++e)
      x.first_row += x.counts[static_cast<size_t>(w * E + e)];
  }
}

void SwitchFFN::exchange_rows(const void* send, void* recv, bool to_owners) {
  const int W = comm_->size();
  const int64_t d = shape_.d_model;
  const std::vector<int64_t>& out_rows = to_owners ? exchange_.send_rows : exchange_.recv_rows;
  const std::vector<int64_t>& in_rows = to_owners ? exchange_.recv_rows : exchange_.send_rows;
  std::vector<int64_t> send_counts(W), send_displs(W), recv_counts(W), recv_displs(W);
  comm::packed_row_blocks(out_rows.data(), W, d, send_counts.data(), send_displs.data());
  comm::packed_row_blocks(in_rows.data(), W, d, recv_counts.data(), recv_displs.data());
  comm_->all_to_all_v(send, send_counts.data(), send_displs.data(), recv, recv_counts.data(),
                      recv_displs.data(), wire_dtype(options_.dtype));
}

void SwitchFFN::permute_rows(const void* from, void* to, bool to_expert_major) const {
  // The wire holds, from each rank in rank order, its rows for this rank's experts in expert
  // order; the experts want expert by expert, and within an expert rank by rank.
  const int W = comm_->size();
  const int64_t E = num_experts_, E_local = shape_.num_experts;
  const int64_t row_bytes = shape_.d_model * dtype_size(options_.dtype);
  struct Block {
    int64_t wire_row, expert_row, rows;
  };
  std::vector<Block> blocks;
  std::vector<int64_t> expert_at(exchange_.local_offsets.begin(),
                                 exchange_.local_offsets.end() - 1);
  int64_t wire_row = 0;
  for (int w = 0; w < W; ++w) {
    for (int64_t e = 0; e < E_local; ++e) {
      const int64_t rows = exchange_.counts[static_cast<size_t>(w * E + first_expert_ + e)];
      if (rows > 0) blocks.push_back({wire_row, expert_at[static_cast<size_t>(e)], rows});
      wire_row += rows;
      expert_at[static_cast<size_t>(e)] += rows;
    }
  }
  const char* src = static_cast<const char*>(from);
  char* dst = static_cast<char*>(to);
  detail::parallel_for(static_cast<int64_t>(blocks.size()), [&](int64_t i) {
    const Block& b = blocks[static_cast<size_t>(i)];
    const int64_t from_row = to_expert_major ? b.wire_row : b.expert_row;
    const int64_t to_row = to_expert_major ? b.expert_row : b.wire_row;
    std::memcpy(dst + to_row * row_bytes, src + from_row * row_bytes,
                static_cast<size_t>(b.rows * row_bytes));
  });
}

void SwitchFFN::forward_experts(DropoutSpec dropout) {
  exchange_counts();
  const int64_t row_bytes = shape_.d_model * dtype_size(options_.dtype);
  const int64_t local_rows = exchange_.local_offsets.back();
  wire_.resize(static_cast<size_t>(local_rows * row_bytes));
  expert_in_.resize(wire_.size());
  expert_result_.resize(wire_.size());
  exchange_rows(buffer_.data(), wire_.data(), /*to_owners=*/true);
  permute_rows(wire_.data(), expert_in_.data(), /*to_expert_major=*/true);
  dropout.first_row = exchange_.first_row;
  experts_forward(shape_, weights_.compute_params(options_.dtype), exchange_.local_offsets.data(),
                  options_.dtype, expert_in_.data(), expert_result_.data(), &cache_, dropout);
  permute_rows(expert_result_.data(), wire_.data(), /*to_expert_major=*/false);
  exchange_rows(wire_.data(), expert_out_.data(), /*to_owners=*/false);
}

void SwitchFFN::backward_experts() {
  // d_expert_out_ (this rank's packed rows) -> the owners; their input gradients come back
  // into d_buffer_. expert_result_ is free after the forward, so it holds the permuted dy.
  d_expert_in_.resize(expert_in_.size());
  exchange_rows(d_expert_out_.data(), wire_.data(), /*to_owners=*/true);
  permute_rows(wire_.data(), expert_result_.data(), /*to_expert_major=*/true);
  experts_backward(shape_, weights_.params(), exchange_.local_offsets.data(), expert_in_.data(),
                   cache_, expert_result_.data(), d_expert_in_.data(), weights_.grads());
  permute_rows(d_expert_in_.data(), wire_.data(), /*to_expert_major=*/false);
  exchange_rows(wire_.data(), d_buffer_.data(), /*to_owners=*/false);
}

void SwitchFFN::backward(const void* dy, void* dx) {
  PYSWITCH_CHECK_STATE(has_forward_,
                       "SwitchFFN.backward: no forward pass to differentiate; call forward(x) "
                       "first");
  poison_on_failure(comm_, "SwitchFFN.backward", [&] {
    const int64_t T = tokens_, d = shape_.d_model, k = router_.options().route.k;
    const DType c = options_.dtype;
    const RoutingPlan& plan = router_.forward_plan();
    const void* dy_c = dy;
    std::vector<char> converted;
    if (x_dtype_ != c) {
      converted.resize(static_cast<size_t>(T * d * dtype_size(c)));
      convert_activations(dy, x_dtype_, converted.data(), c, T * d);
      dy_c = converted.data();
    }
    d_expert_out_.resize(expert_out_.size());
    d_gate_.resize(static_cast<size_t>(T * k));
    combine_backward(dy_c, expert_out_.data(), c, d, layout_, plan.gate.data(),
                     d_expert_out_.data(), d_gate_.data());
    d_buffer_.resize(buffer_.size());
    if (!comm_) {
      experts_backward(shape_, weights_.params(), layout_.expert_offset.data(), buffer_.data(),
                       cache_, d_expert_out_.data(), d_buffer_.data(), weights_.grads());
    } else {
      backward_experts();
    }
    dx_experts_.resize(static_cast<size_t>(T * d * dtype_size(c)));
    dispatch_backward(d_buffer_.data(), c, d, layout_, dx_experts_.data());

    // The router's path: d(gate) plus the scaled losses, back to x through the logits.
    dx_router_.resize(static_cast<size_t>(T * d * dtype_size(x_dtype_)));
    router_.backward(d_gate_.data(), options_.aux_loss_coef, options_.z_loss_coef,
                     dx_router_.data());
    add_activations(dx_experts_.data(), c, dx_router_.data(), x_dtype_, T * d, dx);
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
  softmax_rows(router_.last_logits().data(), T, E, probs.data());
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
    : shape_{1, d_model, d_ff, options.activation},
      options_(options),
      weights_((check_sizes("DenseFFN", d_model, d_ff, 1), shape_), options.use_bias,
               options.init_scale, options.seed) {
  check_dropout("DenseFFN", "dropout", options.dropout);
  if (options.dtype == DType::bfloat16) weights_.enable_compute_copy();
}

void DenseFFN::forward(const void* x, DType x_dtype, int64_t T, bool training, void* y) {
  PYSWITCH_CHECK_ARG(T >= 1, "DenseFFN.forward: x must have at least one token row, got shape (", T,
                     ", ", shape_.d_model, ")");
  has_forward_ = false;
  const int64_t d = shape_.d_model;
  const DType c = options_.dtype;
  x_compute_.resize(static_cast<size_t>(T * d * dtype_size(c)));
  convert_activations(x, x_dtype, x_compute_.data(), c, T * d);
  const int64_t offsets[2] = {0, T};
  DropoutSpec dropout;
  if (training && options_.dropout > 0) {
    dropout = {options_.dropout, options_.seed, kStreamDropout + training_steps_++};
  }
  y_compute_.resize(x_compute_.size());
  experts_forward(shape_, weights_.compute_params(c), offsets, c, x_compute_.data(),
                  y_compute_.data(), &cache_, dropout);
  convert_activations(y_compute_.data(), c, y, x_dtype, T * d);
  x_dtype_ = x_dtype;
  tokens_ = T;
  has_forward_ = true;
}

void DenseFFN::backward(const void* dy, void* dx) {
  PYSWITCH_CHECK_STATE(has_forward_,
                       "DenseFFN.backward: no forward pass to differentiate; call forward(x) "
                       "first");
  const int64_t T = tokens_, d = shape_.d_model;
  const DType c = options_.dtype;
  dy_compute_.resize(x_compute_.size());
  dx_compute_.resize(x_compute_.size());
  convert_activations(dy, x_dtype_, dy_compute_.data(), c, T * d);
  const int64_t offsets[2] = {0, T};
  experts_backward(shape_, weights_.params(), offsets, x_compute_.data(), cache_,
                   dy_compute_.data(), dx_compute_.data(), weights_.grads());
  convert_activations(dx_compute_.data(), c, dx, x_dtype_, T * d);
}

}  // namespace pyswitch::moe
