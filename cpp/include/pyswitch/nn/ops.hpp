/// @file nn/ops.hpp
/// The transformer ops of the Switch language model, each with its backward: RMSNorm, rotary
/// position embedding, causal multi-head self-attention, a linear layer with float32 master
/// weights, token embedding and softmax cross-entropy. Row-major float32 buffers owned by the
/// caller; every op splits its work into fixed blocks, so results are bit-identical for any
/// thread count. Thread-safe (no shared state); multi-threaded inside.
#pragma once

#include <cstdint>
#include <vector>

#include "pyswitch/backend.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch::nn {

/// y = x / sqrt(mean(x^2) + eps) * weight, per row. x, y: (T, d); weight: (d,); inv_rms: (T,)
/// written (kept for the backward).
void rmsnorm_forward(const float* x, const float* weight, int64_t T, int64_t d, float eps, float* y,
                     float* inv_rms);

/// dx (T, d) written; d_weight (d,) written (summed over rows in a fixed order).
void rmsnorm_backward(const float* dy, const float* x, const float* weight, const float* inv_rms,
                      int64_t T, int64_t d, float* dx, float* d_weight);

/// Rotary position embedding (Su et al. 2021, the GPT-NeoX "half split" layout) applied in place
/// to the q and k parts of a fused qkv buffer: qkv is (B * S, 3 * H * Dh), rows ordered batch
/// then position; for head h, q = columns [h*Dh, (h+1)*Dh), k = the same plus H*Dh. Position of
/// row r is r % S. Dh must be even. inverse=true applies the inverse rotation (the backward).
void rope_apply(float* qkv, int64_t B, int64_t S, int64_t H, int64_t Dh, double base, bool inverse);

/// Causal self-attention over a fused qkv buffer (B * S, 3 * H * Dh): out (B * S, H * Dh) =
/// concat over heads of softmax(q k^T / sqrt(Dh) + causal mask) v. probs (B, H, S, S) is written
/// for the backward (upper triangle zero). float32 throughout; the softmax is the active ISA's
/// vectorised kernel, bit-identical on every ISA. A query row whose scores hold a NaN or an
/// infinity gets NaN probabilities.
void attention_forward(const float* qkv, int64_t B, int64_t S, int64_t H, int64_t Dh, float* out,
                       float* probs);

/// d_qkv (B * S, 3 * H * Dh) written, given d_out (B * S, H * Dh).
void attention_backward(const float* d_out, const float* qkv, const float* probs, int64_t B,
                        int64_t S, int64_t H, int64_t Dh, float* d_qkv);

/// A dense projection y = x @ W with W (in, out) float32 (the master copy). In bfloat16 mode x
/// and W are rounded to bf16 and the GEMM accumulates in float32; y is float32 either way.
/// Holds the bf16 copies it needs between forward and backward (not thread-safe per instance).
/// The constructor throws InvalidArgument for sizes below 1 or an integer compute dtype.
class Linear {
 public:
  Linear(int64_t in_features, int64_t out_features, DType compute);
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  /// x (T, in) float32 -> y (T, out) float32 (written). Keeps what backward needs.
  void forward(const float* weight, const float* x, int64_t T, float* y);
  /// dy (T, out) -> dx (T, in) written (or skipped when null); d_weight (in, out) written.
  void backward(const float* weight, const float* x, const float* dy, int64_t T, float* dx,
                float* d_weight);

 private:
  int64_t in_, out_;
  DType compute_;
  const BackendOps* ops_;  // the conversions and GEMMs go through this table
  std::vector<bf16> x_bf16_, w_bf16_, dy_bf16_;
};

/// out (T, d) = table[tokens[t]]; tokens (T,) int32 in [0, V). Throws InvalidArgument naming
/// the first token outside [0, V).
void embedding_forward(const float* table, int64_t V, int64_t d, const int32_t* tokens, int64_t T,
                       float* out);

/// d_table (V, d) += sum over t with tokens[t] == v of d_out[t] (accumulated, in token order).
void embedding_backward(const float* d_out, const int32_t* tokens, int64_t T, int64_t V, int64_t d,
                        float* d_table);

/// Softmax cross-entropy of logits (T, V) against targets (T,) int32: returns the sum over rows
/// of -log softmax(logits)[target] (double); d_logits (T, V) = (softmax - onehot) * grad_scale
/// when d_logits is not null. Throws InvalidArgument for a target outside [0, V).
double cross_entropy(const float* logits, const int32_t* targets, int64_t T, int64_t V,
                     float grad_scale, float* d_logits);

}  // namespace pyswitch::nn
