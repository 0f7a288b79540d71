// The CUDA router ops: route, route_backward and softmax_rows. The per-row pass (softmax
// statistics, top-k, raw gates, per-unit loss sums) runs on the device with route_math.hpp, the
// CPU row kernels' arithmetic written once for both, so it is bit-identical to the CPU; the plan
// is then finished on the host by the CPU's own code (route_detail::finish_route: capacity slots
// in priority order, drops, losses). Routing decisions, gates and losses are therefore exactly
// the CPU's. The plan is a host structure (backend.hpp), so route synchronises.
#include <climits>
#include <cmath>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/ops.hpp"
#include "moe/route_internal.hpp"
#include "pyswitch/moe/route_math.hpp"

namespace pyswitch::cuda::ops {
namespace {

namespace rm = moe::route_math;
using detail::check_cuda;
using detail::check_launch;
using detail::DeviceArray;
using detail::kFloat32Only;
using detail::require;

__device__ bool row_is_finite(const float* row, int64_t num_experts) {
  for (int64_t j = 0; j < num_experts; ++j) {
    if (!isfinite(row[j])) return false;
  }
  return true;
}

// One thread per token row: what the CPU's route_rows writes for that row, plus the row's max
// and exp sum for the host's z-loss and the unit kernel. A non-finite row records its index in
// first_bad (an integer minimum: the same result whatever the thread order).
__global__ void route_rows_kernel(const float* logits, int64_t num_tokens, int64_t num_experts,
                                  int64_t k, int32_t* expert_index, float* gate, float* top1_prob,
                                  float* row_max, double* row_sum, int* first_bad) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* row = logits + t * num_experts;
    if (!row_is_finite(row, num_experts)) {
      atomicMin(first_bad, static_cast<int>(t));
      continue;
    }
    const float mx = rm::row_max(row, num_experts);
    const double sum = rm::row_exp_sum(row, num_experts, mx);
    const double inv_sum = 1.0 / sum;
    int32_t* index_out = expert_index + t * k;
    rm::row_top_k(row, num_experts, k, index_out);
    for (int64_t c = 0; c < k; ++c) gate[t * k + c] = rm::row_prob(row, index_out[c], mx, inv_sum);
    if (top1_prob) top1_prob[t] = static_cast<float>(inv_sum);  // exp(0) == 1 exactly
    row_max[t] = mx;
    row_sum[t] = sum;
  }
}

// One thread per (unit, expert): the unit's sum of that expert's probabilities, rows in order,
// each added as double(exp) * (1 / row sum): the CPU's daccumulate_scaled, addition for
// addition.
__global__ void unit_prob_kernel(const float* logits, int64_t num_experts, int64_t group_size,
                                 int64_t units_per_group, int64_t units, const float* row_max,
                                 const double* row_sum, double* unit_prob) {
  const int64_t block = moe::route_detail::kRouteRowBlock;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < units * num_experts; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t u = i / num_experts, e = i % num_experts;
    const int64_t g = u / units_per_group;
    const int64_t first = g * group_size + (u % units_per_group) * block;
    const int64_t last = min(first + block, (g + 1) * group_size);
    double acc = 0;
    for (int64_t r = first; r < last; ++r) {
      const double inv_sum = 1.0 / row_sum[r];
      acc += static_cast<double>(rm::exp_nonpositive(logits[r * num_experts + e] - row_max[r])) *
             inv_sum;
    }
    unit_prob[i] = acc;
  }
}

__global__ void softmax_rows_kernel(const float* logits, int64_t rows, int64_t num_experts,
                                    float* probs) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < rows;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float* row = logits + t * num_experts;
    float* out = probs + t * num_experts;
    if (!row_is_finite(row, num_experts)) {
      for (int64_t j = 0; j < num_experts; ++j) out[j] = __int_as_float(0x7fc00000);
      continue;
    }
    const float mx = rm::row_max(row, num_experts);
    const double inv_sum = 1.0 / rm::row_exp_sum(row, num_experts, mx);
    for (int64_t j = 0; j < num_experts; ++j) out[j] = rm::row_prob(row, j, mx, inv_sum);
  }
}

// One thread per token: the CPU's route_backward row, with d_prob formed per expert on the fly
// (the same additions in the same order: the aux term, then the token's choices in order).
struct RouteBackwardArgs {
  const float* logits;
  const int32_t* expert_index;
  const int32_t* slot;
  const int64_t* group_expert_count;
  const float* d_gate;
  float* d_logits;
  int64_t num_tokens, num_experts, k, group_size;
  double aux_scale, z_coef;
  int64_t loss_tokens;
  bool normalize_gates;
};

__device__ double d_prob_of(const RouteBackwardArgs& a, int64_t t, int64_t i, const float* row,
                            float mx, double inv_sum, double gate_sum, double weighted) {
  const int64_t g = t / a.group_size;
  double d = a.aux_scale * static_cast<double>(a.group_expert_count[g * a.num_experts + i]);
  const int32_t* experts = a.expert_index + t * a.k;
  const int32_t* slots = a.slot + t * a.k;
  const float* dg = a.d_gate + t * a.k;
  for (int64_t j = 0; j < a.k; ++j) {
    if (experts[j] != i) continue;
    if (a.normalize_gates) {
      double grad = -weighted / (gate_sum * gate_sum);
      if (slots[j] >= 0) grad += static_cast<double>(dg[j]) / gate_sum;
      d += grad;
    } else if (slots[j] >= 0) {
      d += dg[j];
    }
  }
  return d;
}

__global__ void route_backward_kernel(RouteBackwardArgs a) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < a.num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t E = a.num_experts;
    const float* row = a.logits + t * E;
    float* out = a.d_logits + t * E;
    // The CPU takes the probabilities from softmax_rows: NaN for a non-finite row.
    const bool finite = row_is_finite(row, E);
    const float mx = finite ? rm::row_max(row, E) : 0.0f;
    const double inv_sum = finite ? 1.0 / rm::row_exp_sum(row, E, mx) : 0.0;
    auto prob = [&](int64_t j) {
      return finite ? rm::row_prob(row, j, mx, inv_sum) : __int_as_float(0x7fc00000);
    };
    double gate_sum = 0, weighted = 0;
    if (a.normalize_gates) {
      const int32_t* experts = a.expert_index + t * a.k;
      for (int64_t j = 0; j < a.k; ++j) gate_sum += prob(experts[j]);
      for (int64_t j = 0; j < a.k; ++j) {
        if (a.slot[t * a.k + j] >= 0) {
          weighted += static_cast<double>(a.d_gate[t * a.k + j]) * prob(experts[j]);
        }
      }
    }
    double dot = 0;
    for (int64_t i = 0; i < E; ++i) {
      dot +=
          static_cast<double>(prob(i)) * d_prob_of(a, t, i, row, mx, inv_sum, gate_sum, weighted);
    }
    double lse = 0;
    if (a.z_coef != 0) {
      double row_max_d = row[0];
      for (int64_t i = 1; i < E; ++i) row_max_d = fmax(row_max_d, static_cast<double>(row[i]));
      double sum = 0;
      for (int64_t i = 0; i < E; ++i) sum += exp(static_cast<double>(row[i]) - row_max_d);
      lse = row_max_d + log(sum);
    }
    const double z_scale = a.z_coef * 2.0 * lse / static_cast<double>(a.loss_tokens);
    for (int64_t i = 0; i < E; ++i) {
      const double pi = prob(i);
      const double d = d_prob_of(a, t, i, row, mx, inv_sum, gate_sum, weighted);
      out[i] = static_cast<float>(pi * (d - dot) + z_scale * pi);
    }
  }
}

}  // namespace

void route(const TensorView& logits, const moe::RouteOptions& options, moe::RoutingPlan& plan) {
  require("route", "logits", logits, kFloat32Only, {-1, -1});
  const int64_t T = logits.shape[0], E = logits.shape[1];
  moe::route_detail::validate_route("route", T, E, options);
  moe::RoutingPlan out = moe::route_detail::start_plan(T, E, options);
  const int64_t k = out.k, S = out.group_size, G = out.num_groups;
  const bool batch_prioritized = options.priority == moe::Priority::batch_prioritized;
  const float* data = logits.as<const float>();

  DeviceArray<int32_t> expert_index(T * k, "route");
  DeviceArray<float> gate(T * k, "route"), top1(batch_prioritized ? T : 0, "route");
  DeviceArray<float> row_max(T, "route");
  DeviceArray<double> row_sum(T, "route");
  DeviceArray<int> first_bad = DeviceArray<int>::upload({INT_MAX}, "route");
  route_rows_kernel<<<detail::blocks_for(T), detail::kThreads, 0, detail::stream()>>>(
      data, T, E, k, expert_index.data(), gate.data(), batch_prioritized ? top1.data() : nullptr,
      row_max.data(), row_sum.data(), first_bad.data());
  check_launch("route");
  const int bad = first_bad.download("route")[0];
  if (bad != INT_MAX) {
    std::vector<float> values(static_cast<size_t>(E));
    check_cuda(cudaMemcpy(values.data(), data + static_cast<int64_t>(bad) * E,
                          static_cast<size_t>(E) * sizeof(float), cudaMemcpyDeviceToHost),
               "route");
    moe::route_detail::throw_nonfinite_row("route", values.data(), E, bad);
  }

  const int64_t units_per_group =
      (S + moe::route_detail::kRouteRowBlock - 1) / moe::route_detail::kRouteRowBlock;
  const int64_t units = G * units_per_group;
  DeviceArray<double> unit_prob(units * E, "route");
  unit_prob_kernel<<<detail::blocks_for(units * E), detail::kThreads, 0, detail::stream()>>>(
      data, E, S, units_per_group, units, row_max.data(), row_sum.data(), unit_prob.data());
  check_launch("route");

  out.expert_index = expert_index.download("route");
  out.gate = gate.download("route");
  const std::vector<float> top1_host = top1.download("route");
  const std::vector<double> unit_prob_host = unit_prob.download("route");
  // The z sums on the host, as the CPU row kernel forms them (std::log, rows in order).
  const std::vector<double> unit_z = moe::route_detail::unit_z_from_rows(
      row_max.download("route"), row_sum.download("route"), S, G);
  moe::route_detail::finish_route(out, options, top1_host, unit_prob_host, unit_z);
  plan = std::move(out);
}

void route_backward(const TensorView& logits, const moe::RoutingPlan& plan,
                    const TensorView& d_gate, double aux_coef, double z_coef,
                    const TensorView& d_logits) {
  pyswitch::detail::check_route_backward(Device::cuda, logits, plan, d_gate, d_logits);
  const int64_t T = plan.num_tokens, E = plan.num_experts, k = plan.k;
  if (T == 0 || E == 0) return;
  const int64_t G = plan.loss_groups > 0 ? plan.loss_groups : plan.num_groups;
  const int64_t S = plan.group_size;
  const DeviceArray<int32_t> expert_index =
      DeviceArray<int32_t>::upload(plan.expert_index, "route_backward");
  const DeviceArray<int32_t> slot = DeviceArray<int32_t>::upload(plan.slot, "route_backward");
  const DeviceArray<int64_t> counts =
      DeviceArray<int64_t>::upload(plan.group_expert_count, "route_backward");
  RouteBackwardArgs a;
  a.logits = logits.as<const float>();
  a.expert_index = expert_index.data();
  a.slot = slot.data();
  a.group_expert_count = counts.data();
  a.d_gate = d_gate.as<const float>();
  a.d_logits = d_logits.as<float>();
  a.num_tokens = T;
  a.num_experts = E;
  a.k = k;
  a.group_size = S;
  // Exactly the CPU's expression: f_i is a count, P_i a mean.
  a.aux_scale =
      aux_coef * static_cast<double>(E) / (static_cast<double>(S) * static_cast<double>(S * k) * G);
  a.z_coef = z_coef;
  a.loss_tokens = plan.loss_tokens > 0 ? plan.loss_tokens : T;
  a.normalize_gates = plan.normalize_gates;
  route_backward_kernel<<<detail::blocks_for(T), detail::kThreads, 0, detail::stream()>>>(a);
  check_launch("route_backward");
}

void softmax_rows(const TensorView& logits, const TensorView& probs) {
  pyswitch::detail::check_softmax_rows(Device::cuda, logits, probs);
  const int64_t T = logits.shape[0], E = logits.shape[1];
  if (T == 0 || E == 0) return;
  softmax_rows_kernel<<<detail::blocks_for(T), detail::kThreads, 0, detail::stream()>>>(
      logits.as<const float>(), T, E, probs.as<float>());
  check_launch("softmax_rows");
}

}  // namespace pyswitch::cuda::ops
