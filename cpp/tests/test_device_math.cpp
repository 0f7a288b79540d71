// The arithmetic the CUDA kernels share with the CPU (PYSWITCH_HD: route_math.hpp, Philox in
// random.hpp, bf16 rounding), run on the host in every build: the router's row math must equal
// the CPU table at the scalar tier bit for bit, and Philox must match the published Random123
// known-answer vectors. This is what CI, which has no GPU, can check of the device code.
#include <cstdint>
#include <cstring>
#include <vector>

#include "harness.hpp"
#include "pyswitch/backend.hpp"
#include "pyswitch/cpu_isa.hpp"
#include "pyswitch/moe/route_math.hpp"
#include "pyswitch/random.hpp"
#include "test_data.hpp"

using namespace pyswitch;

namespace {

bool same_bits(float a, float b) {
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

}  // namespace

TEST(device_math_router_rows_equal_the_cpu_scalar_tier) {
  const CpuIsa saved = active_cpu_isa();
  set_cpu_isa(CpuIsa::scalar);
  for (int64_t E : {1, 2, 5, 16, 17, 33, 64, 100}) {
    const int64_t T = 41;
    std::vector<float> logits = normal_vector(static_cast<size_t>(T * E), 5, 3.0f);
    if (E > 2) logits[static_cast<size_t>(E + 1)] = logits[static_cast<size_t>(E + 2)];  // a tie
    logits[0] = -200.0f;  // an exp below FLT_MIN: exactly 0
    std::vector<float> probs(logits.size());
    cpu_backend().softmax_rows(TensorView::contiguous(logits.data(), DType::float32, {T, E}),
                               TensorView::contiguous(probs.data(), DType::float32, {T, E}));
    moe::RouteOptions options;
    options.k = E >= 3 ? 3 : 1;
    options.capacity_factor = std::nullopt;  // dropless: every raw gate survives
    moe::RoutingPlan plan;
    cpu_backend().route(TensorView::contiguous(logits.data(), DType::float32, {T, E}), options,
                        plan);
    bool softmax_equal = true, top_k_equal = true, gates_equal = true;
    for (int64_t t = 0; t < T; ++t) {
      const float* row = logits.data() + t * E;
      const float mx = moe::route_math::row_max(row, E);
      const double inv_sum = 1.0 / moe::route_math::row_exp_sum(row, E, mx);
      for (int64_t j = 0; j < E; ++j) {
        softmax_equal = softmax_equal && same_bits(moe::route_math::row_prob(row, j, mx, inv_sum),
                                                   probs[static_cast<size_t>(t * E + j)]);
      }
      int32_t index[3];
      moe::route_math::row_top_k(row, E, options.k, index);
      for (int64_t c = 0; c < options.k; ++c) {
        const size_t a = static_cast<size_t>(t * options.k + c);
        top_k_equal = top_k_equal && index[c] == plan.expert_index[a];
        gates_equal =
            gates_equal &&
            same_bits(moe::route_math::row_prob(row, index[c], mx, inv_sum), plan.gate[a]);
      }
    }
    CHECK(softmax_equal);
    CHECK(top_k_equal);
    CHECK(gates_equal);
  }
  set_cpu_isa(saved);
}

TEST(device_math_exp_matches_the_cpu_exp_at_the_edges) {
  // exp(0) == 1 exactly (route's top-1 probability relies on it); below -87.3 exactly 0.
  CHECK(moe::route_math::exp_nonpositive(0.0f) == 1.0f);
  CHECK(moe::route_math::exp_nonpositive(-87.31f) == 0.0f);
  CHECK(moe::route_math::exp_nonpositive(-87.29f) > 0.0f);
  double worst = 0;
  for (float x = -80.0f; x <= 0.0f; x += 0.0173f) {
    const double got = moe::route_math::exp_nonpositive(x), want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(got - want) / want);
  }
  CHECK(worst < 4e-7);  // a few float ulps
}

TEST(device_math_philox_matches_random123_known_answers) {
  // Random123's kat_vectors for philox4x32_10: counter (c0..c3), key (k0, k1) -> 4 words. Our
  // mapping: counter = (index lo, index hi, stream lo, stream hi), key = (seed lo, seed hi).
  uint32_t out[4];
  philox4x32(0, 0, 0, out);
  CHECK(out[0] == 0x6627e8d5u && out[1] == 0xe169c58du && out[2] == 0xbc57ac4cu &&
        out[3] == 0x9b00dbd8u);
  philox4x32(~uint64_t{0}, ~uint64_t{0}, ~uint64_t{0}, out);
  CHECK(out[0] == 0x408f276du && out[1] == 0x41c83b0eu && out[2] == 0xa20bc7c6u &&
        out[3] == 0x6d5451fdu);
}
