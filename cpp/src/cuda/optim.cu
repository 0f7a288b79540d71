// The CUDA optimizer updates: AdamW and Adafactor on float32 master parameters, with the
// optional bf16 compute copy refreshed in the same pass. The step's scalars are computed on the
// host exactly as optim/optim.cpp computes them, every element goes through the CPU's float and
// double operations, and Adafactor's sums run in the CPU's order (its update RMS through
// sum_of_squares, the same blocked sum), so the updates are bit-identical to the CPU table.
#include <algorithm>
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/kernel_utils.cuh"
#include "cuda/ops.hpp"
#include "pyswitch/bf16.hpp"

namespace pyswitch::cuda::ops {
namespace {

using namespace detail;  // kernel_utils.cuh and common.cuh

// The optional bf16 compute copy of an optimizer update: null data means none.
bf16* compute_copy_of(const char* op, const TensorView& copy, int64_t n) {
  return pyswitch::detail::check_compute_copy(Device::cuda, op, copy, n) ? copy.as<bf16>()
                                                                         : nullptr;
}

struct AdamWScalars {
  float b1, b2, step_size, inv_sqrt_c2, eps, shrink;
};

__global__ void adamw_kernel(float* param, const float* grad, float* m, float* v, int64_t n,
                             AdamWScalars k, bf16* copy) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float g = grad[i];
    const float m_new = k.b1 * m[i] + (1.0f - k.b1) * g;
    const float v_new = k.b2 * v[i] + (1.0f - k.b2) * g * g;
    m[i] = m_new;
    v[i] = v_new;
    const float denom = sqrtf(v_new) * k.inv_sqrt_c2 + k.eps;
    const float p = param[i] * k.shrink - k.step_size * (m_new / denom);
    param[i] = p;
    if (copy) copy[i] = float_to_bf16(p);
  }
}

// Factored second moment, row factor: the mean over the row of g^2 + eps, summed along the row.
__global__ void adafactor_rows(const float* grad, int64_t batches, int64_t rows, int64_t cols,
                               double rho, double eps, float* row_state) {
  for (int64_t r = first_index(); r < batches * rows; r += grid_stride()) {
    const float* g = grad + r * cols;
    double row_sum = 0;
    for (int64_t j = 0; j < cols; ++j) row_sum += static_cast<double>(g[j]) * g[j] + eps;
    row_state[r] =
        static_cast<float>(rho * row_state[r] + (1 - rho) * row_sum / static_cast<double>(cols));
  }
}

// Column factor: the mean over the column, summed down the column.
__global__ void adafactor_cols(const float* grad, int64_t batches, int64_t rows, int64_t cols,
                               double rho, double eps, float* col_state) {
  for (int64_t c = first_index(); c < batches * cols; c += grid_stride()) {
    const float* g = grad + (c / cols) * rows * cols + c % cols;
    double col_sum = 0;
    for (int64_t i = 0; i < rows; ++i) {
      col_sum += static_cast<double>(g[i * cols]) * g[i * cols] + eps;
    }
    col_state[c] =
        static_cast<float>(rho * col_state[c] + (1 - rho) * col_sum / static_cast<double>(rows));
  }
}

// The mean of each matrix's updated row factor, summed in row order.
__global__ void adafactor_row_means(const float* row_state, int64_t batches, int64_t rows,
                                    double* row_mean) {
  for (int64_t b = first_index(); b < batches; b += grid_stride()) {
    double total = 0;
    for (int64_t i = 0; i < rows; ++i) total += row_state[b * rows + i];
    row_mean[b] = total / static_cast<double>(rows);
  }
}

__global__ void adafactor_factored_update(const float* grad, const float* row_state,
                                          const float* col_state, const double* row_mean, int64_t n,
                                          int64_t rows, int64_t cols, float* update) {
  for (int64_t idx = first_index(); idx < n; idx += grid_stride()) {
    const int64_t r = idx / cols, b = r / rows;  // r counts (batch, row)
    const double vhat =
        static_cast<double>(row_state[r]) * col_state[b * cols + idx % cols] / row_mean[b];
    update[idx] = static_cast<float>(grad[idx] / sqrt(vhat));
  }
}

__global__ void adafactor_full_update(const float* grad, int64_t n, double rho, double eps,
                                      float* full_state, float* update) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const double g2 = static_cast<double>(grad[i]) * grad[i] + eps;
    const float state = static_cast<float>(rho * full_state[i] + (1 - rho) * g2);
    full_state[i] = state;
    update[i] = static_cast<float>(grad[i] / sqrt(static_cast<double>(state)));
  }
}

__global__ void adafactor_apply(float* param, const float* update, int64_t n, float shrink,
                                float scale, bf16* copy) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    const float p = param[i] * shrink - scale * update[i];
    param[i] = p;
    if (copy) copy[i] = float_to_bf16(p);
  }
}

}  // namespace

void adamw_update(const TensorView& param, const TensorView& grad, const TensorView& m,
                  const TensorView& v, int64_t step, double lr, const optim::AdamWOptions& options,
                  bool decay, const TensorView& compute_copy) {
  const int64_t n = pyswitch::detail::check_adamw(Device::cuda, param, grad, m, v);
  bf16* copy = compute_copy_of("adamw_update", compute_copy, n);
  optim::check_step("adamw_step", step, lr);
  if (n == 0) return;
  const double c1 = 1.0 - std::pow(options.beta1, static_cast<double>(step));
  const double c2 = 1.0 - std::pow(options.beta2, static_cast<double>(step));
  AdamWScalars k;
  k.b1 = static_cast<float>(options.beta1);
  k.b2 = static_cast<float>(options.beta2);
  k.step_size = static_cast<float>(lr / c1);
  k.inv_sqrt_c2 = static_cast<float>(1.0 / std::sqrt(c2));
  k.eps = static_cast<float>(options.eps);
  k.shrink = decay ? static_cast<float>(1.0 - lr * options.weight_decay) : 1.0f;
  adamw_kernel<<<blocks_for(n), kThreads, 0, stream()>>>(param.as<float>(), grad.as<const float>(),
                                                         m.as<float>(), v.as<float>(), n, k, copy);
  check_launch("adamw_update");
}

void adafactor_update(const TensorView& param, const TensorView& grad, const TensorView& row_state,
                      const TensorView& col_state, const TensorView& full_state,
                      const optim::AdafactorShape& shape, int64_t step, double lr,
                      const optim::AdafactorOptions& options, const TensorView& compute_copy) {
  const int64_t n = shape.batches * shape.rows * shape.cols;
  pyswitch::detail::check_adafactor(Device::cuda, param, grad, n);
  auto state = [&](const char* name, const TensorView& view, int64_t expected) -> float* {
    return pyswitch::detail::check_adafactor_state(Device::cuda, name, view, expected)
               ? view.as<float>()
               : nullptr;
  };
  float* rows_f = state("row_state", row_state, shape.row_state());
  float* cols_f = state("col_state", col_state, shape.col_state());
  float* full_f = state("full_state", full_state, shape.full_state());
  bf16* copy = compute_copy_of("adafactor_update", compute_copy, n);
  optim::check_step("adafactor_step", step, lr);
  if (n == 0) return;
  const double rho = 1.0 - std::pow(static_cast<double>(step), -options.decay_rate);
  const float* g = grad.as<const float>();
  DeviceArray<float> update(n, "adafactor_update");
  if (shape.factored()) {
    const int64_t B = shape.batches, R = shape.rows, C = shape.cols;
    adafactor_rows<<<blocks_for(B * R), kThreads, 0, stream()>>>(g, B, R, C, rho, options.eps,
                                                                 rows_f);
    check_launch("adafactor_update");
    adafactor_cols<<<blocks_for(B * C), kThreads, 0, stream()>>>(g, B, R, C, rho, options.eps,
                                                                 cols_f);
    check_launch("adafactor_update");
    DeviceArray<double> row_mean(B, "adafactor_update");
    adafactor_row_means<<<blocks_for(B), kThreads, 0, stream()>>>(rows_f, B, R, row_mean.data());
    check_launch("adafactor_update");
    adafactor_factored_update<<<blocks_for(n), kThreads, 0, stream()>>>(
        g, rows_f, cols_f, row_mean.data(), n, R, C, update.data());
    check_launch("adafactor_update");
  } else {
    adafactor_full_update<<<blocks_for(n), kThreads, 0, stream()>>>(g, n, rho, options.eps, full_f,
                                                                    update.data());
    check_launch("adafactor_update");
  }
  // Update clipping: divide by max(1, RMS(update) / threshold), over the whole tensor.
  const double rms = std::sqrt(
      sum_of_squares(TensorView::contiguous(update.data(), DType::float32, {n}, Device::cuda)) /
      static_cast<double>(n));
  const float scale = static_cast<float>(lr / std::max(1.0, rms / options.clip_threshold));
  const float shrink = static_cast<float>(1.0 - lr * options.weight_decay);
  adafactor_apply<<<blocks_for(n), kThreads, 0, stream()>>>(param.as<float>(), update.data(), n,
                                                            shrink, scale, copy);
  check_launch("adafactor_update");
}

}  // namespace pyswitch::cuda::ops
