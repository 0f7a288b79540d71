/// @file moe/expert.hpp
/// The expert FFNs of a Switch layer, forward and backward, over a packed expert buffer:
/// expert e owns rows [offsets[e], offsets[e+1]) and computes
/// act(x W_in[e] + b_in[e]) W_out[e] + b_out[e]  (GEGLU: gelu(x W_in[e]) * (x W_gate[e])).
/// Compute in float32, or bfloat16 operands with float32 accumulation; GEMMs on pyswitch's own
/// kernel (one FMA chain per element), so every row is bit-identical for any thread count, CPU
/// kernel set and split of the rows (docs/determinism.md).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "pyswitch/bf16.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch::moe {

/// relu (the paper's default), gelu (tanh approximation, as in T5 v1.1), geglu (Shazeer 2020).
enum class Activation { relu, gelu, geglu };

/// Parses "relu" / "gelu" / "geglu"; InvalidArgument otherwise.
Activation parse_activation(const std::string& name);

struct ExpertShape {
  int64_t num_experts = 0;  ///< E
  int64_t d_model = 0;
  int64_t d_ff = 0;
  Activation activation = Activation::relu;
};

/// Row-major float32 weights, owned by the caller: w_in (E, d_model, d_ff); w_gate
/// (E, d_model, d_ff), geglu only; w_out (E, d_ff, d_model); b_in (E, d_ff) and b_out
/// (E, d_model), or null for no bias.
struct ExpertParams {
  const float* w_in = nullptr;
  const float* w_gate = nullptr;
  const float* w_out = nullptr;
  const float* b_in = nullptr;
  const float* b_out = nullptr;
};

/// Gradients in the layout of ExpertParams; written (not accumulated). Each must be non-null
/// exactly where the parameter is (w_in and w_out always); otherwise InvalidArgument.
struct ExpertGrads {
  float* w_in = nullptr;
  float* w_gate = nullptr;
  float* w_out = nullptr;
  float* b_in = nullptr;
  float* b_out = nullptr;
};

/// Owned float32 parameters of E expert FFNs (E = 1 for a dense FFN) and their gradients, in
/// the layout of ExpertParams. Initialised truncated-normal with std = sqrt(init_scale / fan_in)
/// cut at 2 std (fan_in = d_model for w_in and w_gate, d_ff for w_out); biases start at zero.
/// Accessors return live pointers (null for an absent tensor). Not thread-safe.
///
/// Under expert parallelism a rank holds experts [first_expert, first_expert + E) of a layer;
/// they are initialised with exactly the values those experts get in a one-rank layer of the
/// same seed (the init streams are indexed by global expert).
class ExpertWeights {
 public:
  /// Throws InvalidArgument for init_scale that is not finite and positive.
  ExpertWeights(const ExpertShape& shape, bool use_bias, double init_scale, uint64_t seed,
                int64_t first_expert = 0);

  float* w_in() { return w_in_.data(); }
  float* w_gate() { return w_gate_.empty() ? nullptr : w_gate_.data(); }
  float* w_out() { return w_out_.data(); }
  float* b_in() { return b_in_.empty() ? nullptr : b_in_.data(); }
  float* b_out() { return b_out_.empty() ? nullptr : b_out_.data(); }
  float* w_in_grad() { return g_w_in_.data(); }
  float* w_gate_grad() { return g_w_gate_.empty() ? nullptr : g_w_gate_.data(); }
  float* w_out_grad() { return g_w_out_.data(); }
  float* b_in_grad() { return g_b_in_.empty() ? nullptr : g_b_in_.data(); }
  float* b_out_grad() { return g_b_out_.empty() ? nullptr : g_b_out_.data(); }
  ExpertParams params() const;
  ExpertGrads grads();

 private:
  std::vector<float> w_in_, w_gate_, w_out_, b_in_, b_out_;
  std::vector<float> g_w_in_, g_w_gate_, g_w_out_, g_b_in_, g_b_out_;
};

/// Inverted dropout on the hidden activation (training only): element (row, j) is kept unless
/// the Philox draw for (seed, stream, (first_row + row) * d_ff + j) is below `rate`; kept values
/// are scaled by 1 / (1 - rate). rate 0 disables it. first_row places a rank's expert buffer
/// inside the one-rank layer's buffer, so expert parallelism draws the same masks.
struct DropoutSpec {
  double rate = 0.0;
  uint64_t seed = 0;
  uint64_t stream = 0;
  int64_t first_row = 0;
};

/// What the backward pass needs from the forward. Filled by experts_forward.
struct ExpertCache {
  DType dtype = DType::float32;
  DropoutSpec dropout;
  std::vector<float> pre, linear;         ///< (rows, d_ff) float32 pre-activations (linear: geglu)
  std::vector<float> hidden;              ///< (rows, d_ff) after activation and dropout
  std::vector<bf16> hidden_bf16;          ///< the same rounded to bf16 (bf16 compute only)
  std::vector<bf16> w_in, w_gate, w_out;  ///< bf16 copies of the weights (bf16 compute only)
  /// Backward workspace, kept between steps so that its pages are touched once, not per step.
  std::vector<float> d_pre, d_linear;
  std::vector<bf16> d_pre_bf16, d_linear_bf16;
};

/// x (rows, d_model) -> y (rows, d_model), both of `dtype` (float32 or bfloat16), rows =
/// offsets[E]. offsets: (E + 1,) non-decreasing from 0. cache may be null (inference; dropout is
/// then off). Throws InvalidArgument for bad shapes, offsets, dropout rate or an integer dtype.
void experts_forward(const ExpertShape& shape, const ExpertParams& params, const int64_t* offsets,
                     DType dtype, const void* x, void* y, ExpertCache* cache,
                     const DropoutSpec& dropout = {});

/// dy (rows, d_model) -> dx (rows, d_model) (both of the forward's dtype) and the float32
/// parameter gradients, given the forward's x and cache (whose workspace it reuses).
void experts_backward(const ExpertShape& shape, const ExpertParams& params, const int64_t* offsets,
                      const void* x, ExpertCache& cache, const void* dy, void* dx,
                      const ExpertGrads& grads);

}  // namespace pyswitch::moe
