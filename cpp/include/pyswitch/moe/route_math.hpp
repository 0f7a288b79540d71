/// @file route_math.hpp
/// The router's per-row arithmetic, written once for the host and the CUDA kernels
/// (PYSWITCH_HD): the exp of the softmax, the canonical 16-lane double sum, top-k with ties to
/// the lowest index. They reproduce the CPU row kernels (cpu/route_rows.inl at the scalar tier)
/// operation for operation, so the CUDA router's expert_index, slots, gates and loss sums are
/// bit-identical to the CPU's by construction; cpp/tests/test_device_math.cpp checks these
/// functions against the CPU table on the host, in every CI run.
///
/// All functions are pure and thread-safe. Rows must be finite (the callers check first).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "pyswitch/detail/host_device.hpp"

namespace pyswitch::moe::route_math {

/// Lanes of the CPU row kernels: sums are accumulated per lane (element j in lane j % 16) and
/// the lanes are then added in a fixed pairwise tree.
constexpr int kLanes = 16;

PYSWITCH_HD inline float round_to_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);
#endif
}

/// expf for x <= 0 (Cephes-style 2^n * p(r), the CPU's exp_nonpositive lane for lane): inputs
/// below -87.3 give exactly 0.
PYSWITCH_HD inline float exp_nonpositive(float x) {
  const float lowest = -87.3f;
  const float clamped = x > lowest ? x : lowest;
  const float n = round_to_even(clamped * 1.44269504088896341f);
  float r = fmaf(n, -0.693359375f, clamped);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, r * r, r + 1.0f);
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return x < lowest ? 0.0f : p * scale;
}

/// The canonical reduction of 16 lanes: a fixed pairwise tree.
PYSWITCH_HD inline double reduce_lanes(const double lanes[kLanes]) {
  double level[8];
  for (int i = 0; i < 8; ++i) level[i] = lanes[i] + lanes[i + 8];
  for (int i = 0; i < 4; ++i) level[i] = level[i] + level[i + 4];
  for (int i = 0; i < 2; ++i) level[i] = level[i] + level[i + 2];
  return level[0] + level[1];
}

/// The largest value of a finite row.
PYSWITCH_HD inline float row_max(const float* row, int64_t num_experts) {
  float m = row[0];
  for (int64_t j = 1; j < num_experts; ++j) m = row[j] > m ? row[j] : m;
  return m;
}

/// sum_j exp(row_j - row_max) in double, accumulated per lane and reduced by reduce_lanes.
PYSWITCH_HD inline double row_exp_sum(const float* row, int64_t num_experts, float max_value) {
  double lanes[kLanes] = {};
  for (int64_t j = 0; j < num_experts; ++j) {
    lanes[j % kLanes] += static_cast<double>(exp_nonpositive(row[j] - max_value));
  }
  return reduce_lanes(lanes);
}

/// The k largest logits of a row, in descending order, ties to the lower index:
/// index_out[c] is the lowest index holding the largest value not yet chosen.
PYSWITCH_HD inline void row_top_k(const float* row, int64_t num_experts, int64_t k,
                                  int32_t* index_out) {
  for (int64_t choice = 0; choice < k; ++choice) {
    int32_t best = -1;
    for (int64_t j = 0; j < num_experts; ++j) {
      bool taken = false;
      for (int64_t c = 0; c < choice; ++c) taken = taken || index_out[c] == j;
      if (!taken && (best < 0 || row[j] > row[best])) best = static_cast<int32_t>(j);
    }
    index_out[choice] = best;
  }
}

/// Probability of expert j in a row with max `max_value` and inverse exp sum `inv_sum`, rounded
/// as the CPU rounds gates and softmax outputs: float(double(exp) * inv_sum).
PYSWITCH_HD inline float row_prob(const float* row, int64_t j, float max_value, double inv_sum) {
  return static_cast<float>(static_cast<double>(exp_nonpositive(row[j] - max_value)) * inv_sum);
}

}  // namespace pyswitch::moe::route_math
