/// @file moe/expert.hpp
/// The expert FFNs of a Switch layer, forward and backward, over a packed expert buffer:
/// expert e owns rows [offsets[e], offsets[e+1]) and computes
/// act(x W_in[e] + b_in[e]) W_out[e] + b_out[e]  (GEGLU: gelu(x W_in[e]) * (x W_gate[e])).
/// float32 in this version; GEMMs through oneDNN, deterministic for any thread count.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

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

/// Gradients in the layout of ExpertParams; written (not accumulated). Null entries are
/// skipped (they must be null exactly where the parameter is).
struct ExpertGrads {
  float* w_in = nullptr;
  float* w_gate = nullptr;
  float* w_out = nullptr;
  float* b_in = nullptr;
  float* b_out = nullptr;
};

/// What the backward pass needs from the forward: (rows, d_ff) pre-activations (and the linear
/// branch for geglu) and the hidden activations.
struct ExpertCache {
  std::vector<float> pre, linear, hidden;
};

/// x (rows, d_model) -> y (rows, d_model), rows = offsets[E]. offsets: (E + 1,) non-decreasing
/// from 0. cache may be null (inference). Throws InvalidArgument for bad shapes or offsets.
void experts_forward(const ExpertShape& shape, const ExpertParams& params, const int64_t* offsets,
                     const float* x, float* y, ExpertCache* cache);

/// dy (rows, d_model) -> dx (rows, d_model) and the parameter gradients, given the forward's x
/// and cache.
void experts_backward(const ExpertShape& shape, const ExpertParams& params, const int64_t* offsets,
                      const float* x, const ExpertCache& cache, const float* dy, float* dx,
                      const ExpertGrads& grads);

}  // namespace pyswitch::moe
