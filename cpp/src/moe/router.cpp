// Token-choice routing (SPEC section 1): the row kernels find top-k and the loss sums, then
// each group assigns capacity slots in priority order. Also its backward and the Router layer.
#include "pyswitch/moe/router.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>

#include "cpu/kernels.hpp"
#include "moe/route_internal.hpp"
#include "parallel.hpp"
#include "pyswitch/backend.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/random.hpp"

namespace pyswitch::moe {
namespace {

std::string shape_text(int64_t rows, int64_t cols) {
  return detail::concat("(", rows, ", ", cols, ")");
}

}  // namespace

namespace route_detail {

void validate_route(const char* where, int64_t T, int64_t E, const RouteOptions& o) {
  PYSWITCH_CHECK_ARG(T >= 1, where, ": logits must have at least one token row, got shape ",
                     shape_text(T, E));
  PYSWITCH_CHECK_ARG(E >= 1, where, ": logits must have at least one expert column, got shape ",
                     shape_text(T, E));
  PYSWITCH_CHECK_ARG(
      T <= std::numeric_limits<int32_t>::max() && E <= std::numeric_limits<int32_t>::max(), where,
      ": logits shape ", shape_text(T, E), " is too large (each dimension must be < 2^31)");
  PYSWITCH_CHECK_ARG(o.k >= 1 && o.k <= E, where, ": k must be in [1, num_experts=", E, "], got ",
                     o.k);
  PYSWITCH_CHECK_ARG(o.group_size >= 0, where, ": group_size must be positive, got ", o.group_size);
  if (o.group_size > 0) {
    PYSWITCH_CHECK_ARG(T % o.group_size == 0, where, ": group_size=", o.group_size,
                       " must divide the number of tokens T=", T);
  }
  if (o.capacity_factor) {
    PYSWITCH_CHECK_ARG(std::isfinite(*o.capacity_factor) && *o.capacity_factor > 0, where,
                       ": capacity_factor must be finite and > 0 (or None for dropless), got ",
                       *o.capacity_factor);
  }
  PYSWITCH_CHECK_ARG(o.min_capacity >= 0, where, ": min_capacity must be >= 0, got ",
                     o.min_capacity);
  PYSWITCH_CHECK_ARG(
      !(o.normalize_gates && o.k == 1), where,
      ": normalize_gates=True needs k > 1 (with k=1 every gate would be 1), got k=1");
}

void throw_nonfinite_row(const char* where, const float* values, int64_t E, int64_t row) {
  int64_t column = 0;
  while (column < E && std::isfinite(values[column])) ++column;
  throw InvalidArgument(detail::concat(where, ": logits row ", row, " is not finite (column ",
                                       column, " holds ", values[column],
                                       "); router logits must be finite"));
}

}  // namespace route_detail

Priority parse_priority(const std::string& name) {
  if (name == "position") return Priority::position;
  if (name == "batch_prioritized") return Priority::batch_prioritized;
  throw InvalidArgument("priority must be 'position' or 'batch_prioritized', got '" + name + "'");
}

CapacityRounding parse_capacity_rounding(const std::string& name) {
  if (name == "floor") return CapacityRounding::floor;
  if (name == "ceil") return CapacityRounding::ceil;
  throw InvalidArgument("capacity_rounding must be 'floor' or 'ceil', got '" + name + "'");
}

int64_t expert_capacity(int64_t S, int64_t E, int64_t k, double capacity_factor,
                        int64_t min_capacity, CapacityRounding rounding) {
  // Same operation order as the SPEC formula, cf * k * S / E, so references written plainly in
  // float64 agree exactly.
  const double raw =
      capacity_factor * static_cast<double>(k) * static_cast<double>(S) / static_cast<double>(E);
  const double rounded = rounding == CapacityRounding::floor ? std::floor(raw) : std::ceil(raw);
  int64_t capacity = rounded < static_cast<double>(S) ? static_cast<int64_t>(rounded) : S;
  capacity = std::max(capacity, min_capacity);
  return std::min(capacity, S);
}

void check_logits_finite(const char* where, const float* logits, int64_t T, int64_t E) {
  const int64_t blocks = detail::ceil_div(T, route_detail::kRouteRowBlock);
  std::vector<int64_t> first_bad(static_cast<size_t>(blocks), -1);
  detail::parallel_for(blocks, [&](int64_t b) {
    const int64_t end = std::min(T, (b + 1) * route_detail::kRouteRowBlock);
    for (int64_t r = b * route_detail::kRouteRowBlock; r < end; ++r) {
      for (int64_t j = 0; j < E; ++j) {
        if (!std::isfinite(logits[r * E + j])) {
          first_bad[static_cast<size_t>(b)] = r;
          return;
        }
      }
    }
  });
  for (int64_t bad : first_bad) {
    if (bad >= 0) route_detail::throw_nonfinite_row(where, logits + bad * E, E, bad);
  }
}

namespace route_detail {

RoutingPlan start_plan(int64_t T, int64_t E, const RouteOptions& o) {
  const int64_t k = o.k;
  const int64_t S = o.group_size > 0 ? o.group_size : T;
  const int64_t G = T / S;

  RoutingPlan plan;
  plan.num_tokens = T;
  plan.num_experts = E;
  plan.k = k;
  plan.group_size = S;
  plan.num_groups = G;
  plan.normalize_gates = o.normalize_gates;
  plan.expert_index.resize(static_cast<size_t>(T * k));
  plan.gate.resize(static_cast<size_t>(T * k));
  plan.slot.resize(static_cast<size_t>(T * k));
  plan.tokens_per_expert.assign(static_cast<size_t>(E), 0);
  plan.group_expert_count.assign(static_cast<size_t>(G * E), 0);

  return plan;
}

std::vector<double> unit_z_from_rows(const std::vector<float>& row_max,
                                     const std::vector<double>& row_sum, int64_t S, int64_t G) {
  const int64_t units_per_group = detail::ceil_div(S, kRouteRowBlock);
  std::vector<double> unit_z(static_cast<size_t>(G * units_per_group), 0.0);
  detail::parallel_for(G * units_per_group, [&](int64_t u) {
    const int64_t g = u / units_per_group;
    const int64_t first = g * S + (u % units_per_group) * kRouteRowBlock;
    const int64_t last = std::min(first + kRouteRowBlock, (g + 1) * S);
    double z = 0;
    for (int64_t r = first; r < last; ++r) {
      const double lse = static_cast<double>(row_max[static_cast<size_t>(r)]) +
                         std::log(row_sum[static_cast<size_t>(r)]);
      z += lse * lse;
    }
    unit_z[static_cast<size_t>(u)] = z;
  });
  return unit_z;
}

void finish_route(RoutingPlan& plan, const RouteOptions& o, const std::vector<float>& top1,
                  const std::vector<double>& unit_prob, const std::vector<double>& unit_z) {
  const int64_t T = plan.num_tokens, E = plan.num_experts, k = plan.k;
  const int64_t S = plan.group_size, G = plan.num_groups;
  const int64_t units_per_group = detail::ceil_div(S, kRouteRowBlock);
  const bool batch_prioritized = o.priority == Priority::batch_prioritized;
  // Group by group, so that expert parallelism (one group per rank) adds the same partial sums.
  double z_total = 0;
  for (int64_t g = 0; g < G; ++g) {
    double group_z = 0;
    for (int64_t u = g * units_per_group; u < (g + 1) * units_per_group; ++u) {
      group_z += unit_z[static_cast<size_t>(u)];
    }
    z_total += group_z;
  }
  plan.z_sum = z_total;
  plan.loss_tokens = T;
  plan.z_loss = z_total / static_cast<double>(T);

  if (o.normalize_gates) {
    for (int64_t t = 0; t < T; ++t) {
      float* g = plan.gate.data() + t * k;
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += g[j];
      for (int64_t j = 0; j < k; ++j) g[j] = static_cast<float>(g[j] / sum);
    }
  }

  // Pass 2, per group: the position of every assignment in priority order. Positions are
  // final slots in capacity mode; dropless needs the largest count first.
  const bool dropless = !o.capacity_factor.has_value();
  const int64_t capacity =
      dropless ? 0
               : expert_capacity(S, E, k, *o.capacity_factor, o.min_capacity, o.capacity_rounding);
  detail::parallel_for(G, [&](int64_t g) {
    std::vector<int32_t> order(static_cast<size_t>(S));
    std::iota(order.begin(), order.end(), 0);
    if (batch_prioritized) {
      const float* p = top1.data() + g * S;
      std::stable_sort(order.begin(), order.end(),
                       [p](int32_t a, int32_t b) { return p[a] > p[b]; });
    }
    int64_t* counts = plan.group_expert_count.data() + g * E;
    for (int64_t choice = 0; choice < k; ++choice) {
      for (int32_t local : order) {
        const int64_t a = (g * S + local) * k + choice;
        const int64_t e = plan.expert_index[static_cast<size_t>(a)];
        plan.slot[static_cast<size_t>(a)] = static_cast<int32_t>(counts[e]++);
      }
    }
  });

  int64_t max_count = 0;
  for (int64_t c : plan.group_expert_count) max_count = std::max(max_count, c);
  plan.capacity = dropless ? max_count : capacity;

  int64_t dropped = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int32_t base = static_cast<int32_t>(g * plan.capacity);
    for (int64_t a = g * S * k; a < (g + 1) * S * k; ++a) {
      int32_t& s = plan.slot[static_cast<size_t>(a)];
      if (s >= plan.capacity) {
        s = -1;
        plan.gate[static_cast<size_t>(a)] = 0.0f;
        ++dropped;
      } else {
        s += base;
      }
    }
  }
  plan.dropped = dropped;

  // Aux loss: per group E * sum_i f_i P_i, then the mean over groups.
  double aux = 0;
  for (int64_t g = 0; g < G; ++g) {
    double group_sum = 0;
    for (int64_t i = 0; i < E; ++i) {
      double prob_sum = 0;
      for (int64_t u = g * units_per_group; u < (g + 1) * units_per_group; ++u) {
        prob_sum += unit_prob[static_cast<size_t>(u * E + i)];
      }
      const double f =
          static_cast<double>(plan.group_expert_count[static_cast<size_t>(g * E + i)]) /
          static_cast<double>(S * k);
      group_sum += f * (prob_sum / static_cast<double>(S));
      plan.tokens_per_expert[static_cast<size_t>(i)] +=
          plan.group_expert_count[static_cast<size_t>(g * E + i)];
    }
    aux += static_cast<double>(E) * group_sum;
  }
  plan.aux_sum = aux;
  plan.loss_groups = G;
  plan.aux_loss = aux / static_cast<double>(G);
}

}  // namespace route_detail

RoutingPlan route(const float* logits, int64_t T, int64_t E, const RouteOptions& o) {
  route_detail::validate_route("route", T, E, o);
  RoutingPlan plan = route_detail::start_plan(T, E, o);
  const int64_t k = o.k, S = plan.group_size, G = plan.num_groups;
  const bool batch_prioritized = o.priority == Priority::batch_prioritized;
  std::vector<float> top1(batch_prioritized ? static_cast<size_t>(T) : 0);

  // Pass 1: per row top-k, gates, and per-unit sums of probabilities and z.
  const int64_t units_per_group = detail::ceil_div(S, route_detail::kRouteRowBlock);
  const int64_t units = G * units_per_group;
  std::vector<double> unit_prob(static_cast<size_t>(units * E), 0.0);
  std::vector<double> unit_z(static_cast<size_t>(units), 0.0);
  std::vector<int64_t> unit_bad(static_cast<size_t>(units), -1);
  const cpu::KernelTable& kernels = cpu::active_kernels();
  detail::parallel_for(units, [&](int64_t u) {
    const int64_t g = u / units_per_group;
    const int64_t first = g * S + (u % units_per_group) * route_detail::kRouteRowBlock;
    const int64_t rows = std::min(route_detail::kRouteRowBlock, (g + 1) * S - first);
    std::vector<float> scratch(static_cast<size_t>(2 * E + 32));
    cpu::RouteRowsArgs args;
    args.logits = logits + first * E;
    args.rows = rows;
    args.num_experts = E;
    args.k = k;
    args.expert_index = plan.expert_index.data() + first * k;
    args.gate = plan.gate.data() + first * k;
    args.top1_prob = batch_prioritized ? top1.data() + first : nullptr;
    args.prob_sum = unit_prob.data() + u * E;
    args.z_sum = unit_z.data() + u;
    args.scratch = scratch.data();
    kernels.route_rows(args);
    if (args.first_bad_row >= 0) unit_bad[static_cast<size_t>(u)] = first + args.first_bad_row;
  });
  for (int64_t bad : unit_bad) {  // units are in row order, so this is the first bad row
    if (bad >= 0) route_detail::throw_nonfinite_row("route", logits + bad * E, E, bad);
  }

  route_detail::finish_route(plan, o, top1, unit_prob, unit_z);
  return plan;
}

void softmax_rows(const float* logits, int64_t T, int64_t E, float* probs) {
  const cpu::KernelTable& kernels = cpu::active_kernels();
  detail::parallel_for(detail::ceil_div(T, route_detail::kRouteRowBlock), [&](int64_t b) {
    const int64_t first = b * route_detail::kRouteRowBlock;
    const int64_t rows = std::min(route_detail::kRouteRowBlock, T - first);
    std::vector<float> scratch(static_cast<size_t>(E + 32));
    kernels.softmax_rows(logits + first * E, rows, E, probs + first * E, scratch.data());
  });
}

void route_backward(const float* logits, const RoutingPlan& plan, const float* d_gate,
                    double aux_coef, double z_coef, float* d_logits) {
  const int64_t T = plan.num_tokens, E = plan.num_experts, k = plan.k;
  const int64_t S = plan.group_size;
  // The losses average over these counts: this plan's own, or the global ones under expert
  // parallelism.
  const int64_t G = plan.loss_groups > 0 ? plan.loss_groups : plan.num_groups;
  const int64_t loss_tokens = plan.loss_tokens > 0 ? plan.loss_tokens : T;
  const cpu::KernelTable& kernels = cpu::active_kernels();
  detail::parallel_for(detail::ceil_div(T, route_detail::kRouteRowBlock), [&](int64_t b) {
    const int64_t first = b * route_detail::kRouteRowBlock;
    const int64_t rows = std::min(route_detail::kRouteRowBlock, T - first);
    std::vector<float> probs(static_cast<size_t>(rows * E));
    std::vector<float> scratch(static_cast<size_t>(E + 32));
    std::vector<double> d_prob(static_cast<size_t>(E));
    kernels.softmax_rows(logits + first * E, rows, E, probs.data(), scratch.data());
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = first + r;
      const int64_t g = t / S;
      const float* p = probs.data() + r * E;
      const int32_t* experts = plan.expert_index.data() + t * k;
      const int32_t* slots = plan.slot.data() + t * k;
      const float* dg = d_gate + t * k;
      // d(loss)/d(prob): the load-balancing term first (f_i is a count, P_i a mean).
      const double aux_scale = aux_coef * static_cast<double>(E) /
                               (static_cast<double>(S) * static_cast<double>(S * k) * G);
      for (int64_t i = 0; i < E; ++i) {
        d_prob[static_cast<size_t>(i)] =
            aux_scale *
            static_cast<double>(plan.group_expert_count[static_cast<size_t>(g * E + i)]);
      }
      if (plan.normalize_gates) {
        double sum = 0, weighted = 0;
        for (int64_t j = 0; j < k; ++j) sum += p[experts[j]];
        for (int64_t j = 0; j < k; ++j) {
          if (slots[j] >= 0) weighted += static_cast<double>(dg[j]) * p[experts[j]];
        }
        for (int64_t j = 0; j < k; ++j) {
          double grad = -weighted / (sum * sum);
          if (slots[j] >= 0) grad += static_cast<double>(dg[j]) / sum;
          d_prob[static_cast<size_t>(experts[j])] += grad;
        }
      } else {
        for (int64_t j = 0; j < k; ++j) {
          if (slots[j] >= 0) d_prob[static_cast<size_t>(experts[j])] += dg[j];
        }
      }
      // Softmax backward, plus the z-loss term 2 * lse * p / T taken directly on the logits.
      double dot = 0;
      for (int64_t i = 0; i < E; ++i)
        dot += static_cast<double>(p[i]) * d_prob[static_cast<size_t>(i)];
      const float* row = logits + t * E;
      double lse = 0;
      if (z_coef != 0) {
        const double mx = *std::max_element(row, row + E);
        double sum = 0;
        for (int64_t i = 0; i < E; ++i) sum += std::exp(static_cast<double>(row[i]) - mx);
        lse = mx + std::log(sum);
      }
      const double z_scale = z_coef * 2.0 * lse / static_cast<double>(loss_tokens);
      float* out = d_logits + t * E;
      for (int64_t i = 0; i < E; ++i) {
        const double pi = p[i];
        out[i] = static_cast<float>(pi * (d_prob[static_cast<size_t>(i)] - dot) + z_scale * pi);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The Router layer.

Router::Router(int64_t d_model, int64_t num_experts, const RouterOptions& options,
               const BackendOps* ops)
    : d_model_(d_model),
      num_experts_(num_experts),
      options_(options),
      ops_(ops != nullptr ? ops : &cpu_backend()) {
  PYSWITCH_CHECK_ARG(d_model >= 1, "Router: d_model must be >= 1, got ", d_model);
  PYSWITCH_CHECK_ARG(num_experts >= 1, "Router: num_experts must be >= 1, got ", num_experts);
  PYSWITCH_CHECK_ARG(d_model <= (int64_t{1} << 31) && num_experts <= (int64_t{1} << 31) &&
                         d_model * num_experts <= (int64_t{1} << 34),
                     "Router: d_model * num_experts = ", d_model, " * ", num_experts,
                     " is too large (at most 2^34 weights)");
  // Validate routing options once with a stand-in T that every group size divides.
  RouteOptions check = options.route;
  const int64_t stand_in_tokens = check.group_size > 0 ? check.group_size : 1;
  route_detail::validate_route("Router", stand_in_tokens, num_experts, check);
  if (options.eval_capacity_factor) {
    check.capacity_factor = options.eval_capacity_factor;
    PYSWITCH_CHECK_ARG(
        std::isfinite(*options.eval_capacity_factor) && *options.eval_capacity_factor > 0,
        "Router: eval_capacity_factor must be finite and > 0 (or None), got ",
        *options.eval_capacity_factor);
  }
  PYSWITCH_CHECK_ARG(options.jitter_eps >= 0 && options.jitter_eps < 1,
                     "Router: jitter_eps must be in [0, 1), got ", options.jitter_eps);
  PYSWITCH_CHECK_ARG(std::isfinite(options.init_scale) && options.init_scale > 0,
                     "Router: init_scale must be finite and > 0, got ", options.init_scale);
  const int64_t n = d_model * num_experts;
  weight_ = TableBuffer(*ops_, DType::float32, n);
  weight_.fill_on_host([&](void* values) {
    truncated_normal(static_cast<float*>(values), n,
                     std::sqrt(options.init_scale / static_cast<double>(d_model)), options.seed,
                     kStreamInit + 0);
  });
  weight_grad_ = TableBuffer(*ops_, DType::float32, n);
  for (TableBuffer* scratch : {&x_used_, &jitter_, &logits_, &d_logits_, &dx_f32_}) {
    *scratch = TableBuffer(*ops_, DType::float32, 0);
  }
}

const RoutingPlan& Router::forward(const void* x, DType dtype, int64_t T, bool training) {
  PYSWITCH_CHECK_ARG(T >= 1, "Router.forward: x must have at least one token row, got shape (", T,
                     ", ", d_model_, ")");
  return forward_shard(x, dtype, T, training, 0);
}

void Router::set_global_losses(int64_t groups, int64_t tokens, double aux_sum, double z_sum) {
  PYSWITCH_CHECK_STATE(has_forward_, "Router.set_global_losses: no forward pass yet");
  PYSWITCH_CHECK_ARG(groups >= 1 && tokens >= 1, "Router.set_global_losses: groups and tokens ",
                     "must be >= 1, got ", groups, " and ", tokens);
  plan_.loss_groups = groups;
  plan_.loss_tokens = tokens;
  plan_.aux_sum = aux_sum;
  plan_.z_sum = z_sum;
  plan_.aux_loss = aux_sum / static_cast<double>(groups);
  plan_.z_loss = z_sum / static_cast<double>(tokens);
}

const RoutingPlan& Router::forward_shard(const void* x, DType dtype, int64_t T, bool training,
                                         int64_t first_token) {
  PYSWITCH_CHECK_ARG(T >= 0 && first_token >= 0, "Router.forward: token counts must be >= 0, got ",
                     T, " tokens from token ", first_token);
  check_floating(dtype, "Router.forward", "x dtype");
  const int64_t n = T * d_model_;
  has_forward_ = false;
  x_used_.resize(n);
  jitter_active_ = training && options_.jitter_eps > 0;
  if (jitter_active_) {
    jitter_.resize(n);
    const float eps = static_cast<float>(options_.jitter_eps);
    // The step counter advances on every rank, tokens or not, so that ranks stay in step.
    const uint64_t stream = kStreamJitter + training_steps_++;
    jitter_.fill_on_host([&](void* values) {
      uniform(static_cast<float*>(values), n, 1.0f - eps, 1.0f + eps, options_.seed, stream,
              first_token * d_model_);
    });
  }
  if (T == 0) {
    const RouteOptions& o = options_.route;
    plan_ = RoutingPlan{};
    plan_.num_experts = num_experts_;
    plan_.k = o.k;
    plan_.group_size = o.group_size;
    plan_.normalize_gates = o.normalize_gates;
    plan_.tokens_per_expert.assign(static_cast<size_t>(num_experts_), 0);
    logits_.resize(0);
    x_dtype_ = dtype;
    has_forward_ = true;
    return plan_;
  }
  // The float32 router input (selective precision), times the jitter.
  const TensorView x_used = x_used_.view({T, d_model_});
  ops_->convert(TensorView::contiguous(x, dtype, {T, d_model_}, ops_->device), x_used);
  if (jitter_active_) ops_->multiply(x_used, jitter_.view({T, d_model_}));
  logits_.resize(T * num_experts_);
  const TensorView logits = logits_.view({T, num_experts_});
  ops_->gemm(x_used, false, weight_.view({d_model_, num_experts_}), false, logits, 1.0f, 0.0f);
  RouteOptions route_options = options_.route;
  if (!training) route_options.capacity_factor = options_.eval_capacity_factor;
  ops_->route(logits, route_options, plan_);
  x_dtype_ = dtype;
  has_forward_ = true;
  return plan_;
}

void Router::backward(const float* d_gate, double aux_coef, double z_coef, void* dx) {
  PYSWITCH_CHECK_STATE(has_forward_,
                       "Router.backward: no forward pass to differentiate; call "
                       "forward(x) first");
  const int64_t T = plan_.num_tokens, E = num_experts_, d = d_model_;
  if (T == 0) {  // an expert-parallel rank without tokens: its share of the gradient is zero
    weight_grad_.fill_zero();
    return;
  }
  const Device device = ops_->device;
  d_logits_.resize(T * E);
  const TensorView d_logits_view = d_logits_.view({T, E});
  ops_->route_backward(logits_.view({T, E}), plan_,
                       TensorView::contiguous(d_gate, DType::float32, {T, plan_.k}, device),
                       aux_coef, z_coef, d_logits_view);
  ops_->gemm(x_used_.view({T, d}), true, d_logits_view, false, weight_grad_.view({d, E}), 1.0f,
             0.0f);
  void* dx_out = dx;
  if (x_dtype_ == DType::bfloat16) {
    dx_f32_.resize(T * d);
    dx_out = dx_f32_.data();
  }
  // dx = d_logits W^T, then times the jitter (the forward scaled x by it). The table's GEMM
  // gives each row the same bits however many rows share the call, which expert parallelism
  // relies on (its ranks hold different row counts).
  const TensorView dx_view = TensorView::contiguous(dx_out, DType::float32, {T, d}, device);
  ops_->gemm(d_logits_view, false, weight_.view({d, E}), true, dx_view, 1.0f, 0.0f);
  if (jitter_active_) ops_->multiply(dx_view, jitter_.view({T, d}));
  if (x_dtype_ == DType::bfloat16) {
    ops_->convert(dx_view, TensorView::contiguous(dx, DType::bfloat16, {T, d}, device));
  }
}

}  // namespace pyswitch::moe
