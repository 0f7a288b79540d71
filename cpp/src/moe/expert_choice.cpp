// Expert-choice routing (Zhou et al. 2022): each expert takes its top-C tokens of each group.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "parallel.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/moe/router.hpp"

namespace pyswitch::moe {

ExpertChoicePlan route_expert_choice(const float* logits, int64_t T, int64_t E,
                                     double capacity_factor, int64_t group_size) {
  const char* where = "route_expert_choice";
  PYSWITCH_CHECK_ARG(T >= 1, where, ": logits must have at least one token row, got shape (", T,
                     ", ", E, ")");
  PYSWITCH_CHECK_ARG(E >= 1, where, ": logits must have at least one expert column, got shape (", T,
                     ", ", E, ")");
  PYSWITCH_CHECK_ARG(
      T <= std::numeric_limits<int32_t>::max() && E <= std::numeric_limits<int32_t>::max(), where,
      ": logits shape (", T, ", ", E, ") is too large");
  PYSWITCH_CHECK_ARG(std::isfinite(capacity_factor) && capacity_factor > 0, where,
                     ": capacity_factor must be finite and > 0, got ", capacity_factor);
  PYSWITCH_CHECK_ARG(group_size >= 0, where, ": group_size must be positive, got ", group_size);
  if (group_size > 0) {
    PYSWITCH_CHECK_ARG(T % group_size == 0, where, ": group_size=", group_size,
                       " must divide the number of tokens T=", T);
  }
  check_logits_finite(where, logits, T, E);

  const int64_t S = group_size > 0 ? group_size : T;
  const int64_t G = T / S;
  const double raw = std::floor(capacity_factor * static_cast<double>(S) / static_cast<double>(E));
  const int64_t C = std::min(
      S, std::max<int64_t>(1, raw < static_cast<double>(S) ? static_cast<int64_t>(raw) : S));

  ExpertChoicePlan plan;
  plan.num_tokens = T;
  plan.num_experts = E;
  plan.group_size = S;
  plan.num_groups = G;
  plan.capacity = C;
  plan.token_index.resize(static_cast<size_t>(E * G * C));
  plan.gate.resize(static_cast<size_t>(E * G * C));
  plan.experts_per_token.assign(static_cast<size_t>(T), 0);

  std::vector<double> group_z(static_cast<size_t>(G), 0.0);
  detail::parallel_for(G, [&](int64_t g) {
    std::vector<float> probs(static_cast<size_t>(S * E));
    softmax_rows(logits + g * S * E, S, E, probs.data());
    double z = 0;
    for (int64_t t = 0; t < S; ++t) {
      const float* row = logits + (g * S + t) * E;
      const double mx = *std::max_element(row, row + E);
      double sum = 0;
      for (int64_t i = 0; i < E; ++i) sum += std::exp(static_cast<double>(row[i]) - mx);
      const double lse = mx + std::log(sum);
      z += lse * lse;
    }
    group_z[static_cast<size_t>(g)] = z;
    std::vector<int32_t> order(static_cast<size_t>(S));
    for (int64_t e = 0; e < E; ++e) {
      std::iota(order.begin(), order.end(), 0);
      auto higher = [&](int32_t a, int32_t b) {
        const float pa = probs[static_cast<size_t>(a * E + e)];
        const float pb = probs[static_cast<size_t>(b * E + e)];
        return pa > pb || (pa == pb && a < b);
      };
      std::partial_sort(order.begin(), order.begin() + C, order.end(), higher);
      for (int64_t c = 0; c < C; ++c) {
        const int32_t local = order[static_cast<size_t>(c)];
        const size_t at = static_cast<size_t>(e * G * C + g * C + c);
        plan.token_index[at] = static_cast<int32_t>(g * S + local);
        plan.gate[at] = probs[static_cast<size_t>(local * E + e)];
        plan.experts_per_token[static_cast<size_t>(g * S + local)] += 1;
      }
    }
  });
  double z_total = 0;
  for (double z : group_z) z_total += z;
  plan.z_loss = z_total / static_cast<double>(T);
  return plan;
}

}  // namespace pyswitch::moe
