/// @file optim/optim.hpp
/// Optimizers on float32 master parameters: AdamW (Loshchilov & Hutter 2019) and Adafactor
/// (Shazeer & Stern 2018, the Switch Transformer paper's optimizer), global-norm gradient
/// clipping and the warmup + decay learning-rate schedule. Buffers are flat, row-major, owned
/// by the caller; optimizer state starts at zero. Every reduction runs in fixed blocks, so the
/// same inputs give bit-identical updates for any thread count.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "pyswitch/bf16.hpp"

namespace pyswitch::optim {

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;  ///< decoupled: param -= lr * weight_decay * param
};

/// The step/lr checks every optimizer update runs: InvalidArgument naming `where` for step < 1
/// or an lr that is not finite and >= 0.
void check_step(const char* where, int64_t step, double lr);

/// One AdamW step: m, v (n) float32 moments updated in place; step >= 1 is the bias-correction
/// count. decay=false skips weight decay (norms and biases by convention; SwitchLM decays its
/// matrices, the tied embedding and the routers included).
/// param_bf16 (optional, n): a bf16 compute copy of param, written with float_to_bf16 of each
/// updated element in the same pass (bit-identical to convert_f32_to_bf16 afterwards).
/// Throws InvalidArgument for step < 1 or a non-finite or negative lr.
void adamw_step(float* param, const float* grad, float* m, float* v, int64_t n, int64_t step,
                double lr, const AdamWOptions& options, bool decay, bf16* param_bf16 = nullptr);

struct AdafactorOptions {
  double decay_rate = 0.8;      ///< second-moment decay 1 - step^-decay_rate (paper: 0.8)
  double eps = 1e-30;           ///< added to grad^2
  double clip_threshold = 1.0;  ///< update RMS clipping (paper: 1.0)
  double weight_decay = 0.0;
};

/// Sizes of Adafactor's state for a tensor seen as `batches` matrices of (rows, cols): factored
/// (row: batches*rows, col: batches*cols, full: 0) when rows and cols are both >= 2, else one
/// unfactored accumulator per element (full: batches*rows*cols).
struct AdafactorShape {
  int64_t batches = 1, rows = 1, cols = 1;
  bool factored() const { return rows >= 2 && cols >= 2; }
  int64_t row_state() const { return factored() ? batches * rows : 0; }
  int64_t col_state() const { return factored() ? batches * cols : 0; }
  int64_t full_state() const { return factored() ? 0 : batches * rows * cols; }
};

/// One Adafactor step without momentum (beta1 = 0, as in the paper), with update clipping and
/// an explicit learning rate (the schedule supplies it). State arrays sized by `shape`.
/// param_bf16: as in adamw_step, refreshed in the final update pass.
void adafactor_step(float* param, const float* grad, float* row_state, float* col_state,
                    float* full_state, const AdafactorShape& shape, int64_t step, double lr,
                    const AdafactorOptions& options, bf16* param_bf16 = nullptr);

/// Sum over i of double(data[i])^2, in fixed blocks (bit-identical for any thread count).
/// Throws InvalidArgument for n < 0.
double sum_of_squares(const float* data, int64_t n);

/// data[i] *= factor, in float32. Throws InvalidArgument for n < 0.
void scale_in_place(float* data, int64_t n, float factor);

/// sqrt(sum of squares) over all the (pointer, count) tensors, in double, in a fixed order
/// (sum_of_squares of each tensor, added in list order).
double global_norm(const std::vector<std::pair<const float*, int64_t>>& tensors);

/// Multiplies every tensor by min(1, max_norm / norm); returns the norm before clipping.
double clip_by_global_norm(const std::vector<std::pair<float*, int64_t>>& tensors, double max_norm);

/// Learning rate at `step` (0-based): linear warmup to peak over warmup_steps, then "cosine"
/// decay to peak * final_fraction at total_steps, "linear" decay, "rsqrt" (peak *
/// sqrt(warmup / step), the paper's inverse square root) or "constant".
double learning_rate(int64_t step, double peak, int64_t warmup_steps, int64_t total_steps,
                     const std::string& decay, double final_fraction = 0.1);

}  // namespace pyswitch::optim
