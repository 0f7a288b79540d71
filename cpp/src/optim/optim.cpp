// AdamW, Adafactor, global-norm clipping and the learning-rate schedule.
#include "pyswitch/optim/optim.hpp"

#include <algorithm>
#include <cmath>

#include "parallel.hpp"
#include "pyswitch/error.hpp"

namespace pyswitch::optim {
namespace {

constexpr int64_t kBlock = 1 << 14;

// sum of f(i) over [0, n) in fixed blocks, combined in block order. Within a block, eight
// independent partial sums (i mod 8), added in lane order at the end: the same bits on every
// machine and thread count, and no loop-carried dependency on one accumulator, so the compiler
// vectorises it without being allowed to reassociate.
template <typename F>
double blocked_sum(int64_t n, F&& f) {
  constexpr int64_t kLanes = 8;
  const int64_t blocks = detail::ceil_div(n, kBlock);
  std::vector<double> partial(static_cast<size_t>(std::max<int64_t>(blocks, 0)), 0.0);
  detail::parallel_for(blocks, [&](int64_t b) {
    double lane[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t begin = b * kBlock, end = std::min(n, (b + 1) * kBlock);
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) lane[l] += f(i + l);
    }
    for (; i < end; ++i) lane[(i - begin) % kLanes] += f(i);
    double s = 0;
    for (int64_t l = 0; l < kLanes; ++l) s += lane[l];
    partial[static_cast<size_t>(b)] = s;
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

// The bf16 compute copy of the block just updated, while it is still in cache. float_to_bf16
// is the scalar reference of convert_f32_to_bf16 (bit-identical on every ISA).
inline void refresh_copy(const float* param, bf16* copy, int64_t begin, int64_t end) {
  if (copy == nullptr) return;
  for (int64_t i = begin; i < end; ++i) copy[i] = float_to_bf16(param[i]);
}

}  // namespace

void check_step(const char* where, int64_t step, double lr) {
  PYSWITCH_CHECK_ARG(step >= 1, where, ": step must be >= 1, got ", step);
  PYSWITCH_CHECK_ARG(std::isfinite(lr) && lr >= 0, where, ": lr must be finite and >= 0, got ", lr);
}

void adamw_step(float* param, const float* grad, float* m, float* v, int64_t n, int64_t step,
                double lr, const AdamWOptions& o, bool decay, bf16* param_bf16) {
  check_step("adamw_step", step, lr);
  const double c1 = 1.0 - std::pow(o.beta1, static_cast<double>(step));
  const double c2 = 1.0 - std::pow(o.beta2, static_cast<double>(step));
  const float b1 = static_cast<float>(o.beta1), b2 = static_cast<float>(o.beta2);
  const float step_size = static_cast<float>(lr / c1);
  const float inv_sqrt_c2 = static_cast<float>(1.0 / std::sqrt(c2));
  const float eps = static_cast<float>(o.eps);
  const float shrink = decay ? static_cast<float>(1.0 - lr * o.weight_decay) : 1.0f;
  detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t b) {
    const int64_t end = std::min(n, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < end; ++i) {
      const float g = grad[i];
      m[i] = b1 * m[i] + (1.0f - b1) * g;
      v[i] = b2 * v[i] + (1.0f - b2) * g * g;
      const float denom = std::sqrt(v[i]) * inv_sqrt_c2 + eps;
      param[i] = param[i] * shrink - step_size * (m[i] / denom);
    }
    refresh_copy(param, param_bf16, b * kBlock, end);
  });
}

void adafactor_step(float* param, const float* grad, float* row_state, float* col_state,
                    float* full_state, const AdafactorShape& s, int64_t step, double lr,
                    const AdafactorOptions& o, bf16* param_bf16) {
  check_step("adafactor_step", step, lr);
  const double rho = 1.0 - std::pow(static_cast<double>(step), -o.decay_rate);
  const int64_t per = s.rows * s.cols, n = s.batches * per;
  std::vector<float> update(static_cast<size_t>(n));
  if (s.factored()) {
    detail::parallel_for(s.batches, [&](int64_t b) {
      const float* g = grad + b * per;
      float* R = row_state + b * s.rows;
      float* C = col_state + b * s.cols;
      std::vector<double> col_sum(static_cast<size_t>(s.cols), 0.0);
      double row_mean_total = 0;
      for (int64_t i = 0; i < s.rows; ++i) {
        double row_sum = 0;
        for (int64_t j = 0; j < s.cols; ++j) {
          const double g2 = static_cast<double>(g[i * s.cols + j]) * g[i * s.cols + j] + o.eps;
          row_sum += g2;
          col_sum[static_cast<size_t>(j)] += g2;
        }
        R[i] = static_cast<float>(rho * R[i] + (1 - rho) * row_sum / static_cast<double>(s.cols));
        row_mean_total += R[i];
      }
      for (int64_t j = 0; j < s.cols; ++j) {
        C[j] = static_cast<float>(rho * C[j] + (1 - rho) * col_sum[static_cast<size_t>(j)] /
                                                   static_cast<double>(s.rows));
      }
      const double row_mean = row_mean_total / static_cast<double>(s.rows);
      float* u = update.data() + b * per;
      for (int64_t i = 0; i < s.rows; ++i) {
        for (int64_t j = 0; j < s.cols; ++j) {
          const double vhat = static_cast<double>(R[i]) * C[j] / row_mean;
          u[i * s.cols + j] = static_cast<float>(g[i * s.cols + j] / std::sqrt(vhat));
        }
      }
    });
  } else {
    detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t b) {
      const int64_t end = std::min(n, (b + 1) * kBlock);
      for (int64_t i = b * kBlock; i < end; ++i) {
        const double g2 = static_cast<double>(grad[i]) * grad[i] + o.eps;
        full_state[i] = static_cast<float>(rho * full_state[i] + (1 - rho) * g2);
        update[static_cast<size_t>(i)] =
            static_cast<float>(grad[i] / std::sqrt(static_cast<double>(full_state[i])));
      }
    });
  }
  // Update clipping: divide by max(1, RMS(update) / threshold), over the whole tensor.
  const double rms =
      std::sqrt(blocked_sum(n,
                            [&](int64_t i) {
                              return static_cast<double>(update[static_cast<size_t>(i)]) *
                                     update[static_cast<size_t>(i)];
                            }) /
                static_cast<double>(std::max<int64_t>(n, 1)));
  const float scale = static_cast<float>(lr / std::max(1.0, rms / o.clip_threshold));
  const float shrink = static_cast<float>(1.0 - lr * o.weight_decay);
  detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t b) {
    const int64_t end = std::min(n, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < end; ++i) {
      param[i] = param[i] * shrink - scale * update[static_cast<size_t>(i)];
    }
    refresh_copy(param, param_bf16, b * kBlock, end);
  });
}

double sum_of_squares(const float* data, int64_t n) {
  PYSWITCH_CHECK_ARG(n >= 0, "sum_of_squares: n must be >= 0, got ", n);
  return blocked_sum(n, [data](int64_t i) { return static_cast<double>(data[i]) * data[i]; });
}

void scale_in_place(float* data, int64_t n, float factor) {
  PYSWITCH_CHECK_ARG(n >= 0, "scale_in_place: n must be >= 0, got ", n);
  detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t b) {
    const int64_t end = std::min(n, (b + 1) * kBlock);
    for (int64_t i = b * kBlock; i < end; ++i) data[i] *= factor;
  });
}

double global_norm(const std::vector<std::pair<const float*, int64_t>>& tensors) {
  double total = 0;
  for (const auto& [data, n] : tensors) total += sum_of_squares(data, n);
  return std::sqrt(total);
}

double clip_by_global_norm(const std::vector<std::pair<float*, int64_t>>& tensors,
                           double max_norm) {
  PYSWITCH_CHECK_ARG(max_norm > 0 && std::isfinite(max_norm),
                     "clip_by_global_norm: max_norm must be finite and > 0, got ", max_norm);
  std::vector<std::pair<const float*, int64_t>> view(tensors.begin(), tensors.end());
  const double norm = global_norm(view);
  // A non-finite norm scales nothing: the caller sees it and skips the step.
  if (!std::isfinite(norm) || !(norm > max_norm)) return norm;
  const float scale = static_cast<float>(max_norm / norm);
  for (const auto& [data, n] : tensors) scale_in_place(data, n, scale);
  return norm;
}

double learning_rate(int64_t step, double peak, int64_t warmup, int64_t total,
                     const std::string& decay, double final_fraction) {
  PYSWITCH_CHECK_ARG(step >= 0 && warmup >= 0 && total >= 1,
                     "learning_rate: step and warmup must be >= 0 and total >= 1, got ", step, ", ",
                     warmup, ", ", total);
  PYSWITCH_CHECK_ARG(
      decay == "cosine" || decay == "linear" || decay == "rsqrt" || decay == "constant",
      "learning_rate: decay must be 'cosine', 'linear', 'rsqrt' or 'constant', got '", decay, "'");
  if (warmup > 0 && step < warmup) return peak * static_cast<double>(step + 1) / warmup;
  if (decay == "constant") return peak;
  if (decay == "rsqrt") {
    return peak * std::sqrt(static_cast<double>(std::max<int64_t>(warmup, 1)) /
                            static_cast<double>(std::max<int64_t>(step, 1)));
  }
  const double span = static_cast<double>(std::max<int64_t>(total - warmup, 1));
  const double progress = std::min(1.0, static_cast<double>(step - warmup) / span);
  const double floor = peak * final_fraction;
  if (decay == "linear") return peak - (peak - floor) * progress;
  if (decay == "cosine") {
    return floor + (peak - floor) * 0.5 * (1.0 + std::cos(3.14159265358979323846 * progress));
  }
  throw InvalidArgument(
      "learning_rate: decay must be 'cosine', 'linear', 'rsqrt' or 'constant', "
      "got '" +
      decay + "'");
}

}  // namespace pyswitch::optim
