/// @file activation_math.hpp
/// The expert FFN's elementwise arithmetic, written once for the host and the CUDA kernels
/// (PYSWITCH_HD): the tanh-approximation GELU and its derivative, and the inverted-dropout draw.
/// The CPU (moe/expert.cpp) and the CUDA backend (cuda/experts.cu) both call these, so their
/// float32 activations agree bit for bit; library tanh functions (glibc's, CUDA's tanhf) differ
/// in the last bit, which is why tanh is built here on the router's exp (route_math.hpp).
/// Pure, thread-safe.
#pragma once

#include <cstdint>

#include "pyswitch/detail/host_device.hpp"
#include "pyswitch/moe/route_math.hpp"
#include "pyswitch/random.hpp"

namespace pyswitch::moe::activation_math {

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

/// tanh(z) = sign(z) (1 - e) / (1 + e) with e = exp(-2|z|): a few float ulps from the true
/// value, exactly +-1 for |z| > 43.65 and exactly 0 at 0.
PYSWITCH_HD inline float tanh_approx(float z) {
  const float magnitude = z < 0.0f ? -z : z;
  const float e = route_math::exp_nonpositive(-2.0f * magnitude);
  const float t = (1.0f - e) / (1.0f + e);
  return z < 0.0f ? -t : t;
}

PYSWITCH_HD inline float gelu(float x) {
  return 0.5f * x * (1.0f + tanh_approx(kGeluC * (x + kGeluA * x * x * x)));
}

PYSWITCH_HD inline float gelu_grad(float x) {
  const float th = tanh_approx(kGeluC * (x + kGeluA * x * x * x));
  return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * kGeluC * (1.0f + 3.0f * kGeluA * x * x);
}

/// The inverted-dropout multiplier of hidden element `index` (global: (first_row + row) * d_ff
/// + column): 0 when word index % 4 of Philox block index / 4 is below `rate`, else keep_scale
/// (the caller's float(1 / (1 - rate))).
PYSWITCH_HD inline float dropout_multiplier(uint64_t seed, uint64_t stream, int64_t index,
                                            float rate, float keep_scale) {
  uint32_t words[4];
  philox4x32(seed, stream, static_cast<uint64_t>(index) / 4, words);
  return uniform_from_bits(words[index % 4]) < rate ? 0.0f : keep_scale;
}

}  // namespace pyswitch::moe::activation_math
