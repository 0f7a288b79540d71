// The language model's ops: RMSNorm, RoPE, causal attention, Linear, embedding, cross-entropy.
#include "pyswitch/nn/ops.hpp"

#include <algorithm>
#include <cmath>
#include <memory>
#include <mutex>
#include <vector>

#include "cpu/kernels.hpp"
#include "gemm.hpp"
#include "parallel.hpp"
#include "pyswitch/error.hpp"

namespace pyswitch::nn {
namespace {

constexpr int64_t kRows = 64;  // rows per unit of parallel work

}  // namespace

void rmsnorm_forward(const float* x, const float* weight, int64_t T, int64_t d, float eps, float* y,
                     float* inv_rms) {
  detail::parallel_for(detail::ceil_div(T, kRows), [&](int64_t b) {
    const int64_t end = std::min(T, (b + 1) * kRows);
    for (int64_t t = b * kRows; t < end; ++t) {
      const float* row = x + t * d;
      double squares = 0;
      for (int64_t j = 0; j < d; ++j) squares += static_cast<double>(row[j]) * row[j];
      const float inv = static_cast<float>(1.0 / std::sqrt(squares / static_cast<double>(d) + eps));
      inv_rms[t] = inv;
      float* out = y + t * d;
      for (int64_t j = 0; j < d; ++j) out[j] = row[j] * inv * weight[j];
    }
  });
}

void rmsnorm_backward(const float* dy, const float* x, const float* weight, const float* inv_rms,
                      int64_t T, int64_t d, float* dx, float* d_weight) {
  const int64_t blocks = detail::ceil_div(T, kRows);
  std::vector<double> partial(static_cast<size_t>(blocks * d), 0.0);
  detail::parallel_for(blocks, [&](int64_t b) {
    const int64_t end = std::min(T, (b + 1) * kRows);
    double* dw = partial.data() + b * d;
    for (int64_t t = b * kRows; t < end; ++t) {
      const float* row = x + t * d;
      const float* g = dy + t * d;
      const double inv = inv_rms[t];
      double dot = 0;  // sum_j dy_j w_j x_j
      for (int64_t j = 0; j < d; ++j) {
        dot += static_cast<double>(g[j]) * weight[j] * row[j];
        dw[j] += static_cast<double>(g[j]) * row[j] * inv;
      }
      const double coef = inv * inv * inv * dot / static_cast<double>(d);
      float* out = dx + t * d;
      for (int64_t j = 0; j < d; ++j) {
        out[j] = static_cast<float>(inv * weight[j] * g[j] - coef * row[j]);
      }
    }
  });
  for (int64_t j = 0; j < d; ++j) {
    double sum = 0;
    for (int64_t b = 0; b < blocks; ++b) sum += partial[static_cast<size_t>(b * d + j)];
    d_weight[j] = static_cast<float>(sum);
  }
}

namespace {

struct RopeTable {
  std::vector<float> cos, sin, minus_sin;  // (S, Dh / 2)
};

// The cos/sin tables of the last few (S, Dh, base): a model calls rope_apply twice per layer
// per step with the same sizes, and the tables cost S * Dh / 2 pow, sin and cos in double.
std::shared_ptr<const RopeTable> rope_table(int64_t S, int64_t Dh, double base) {
  struct Entry {
    int64_t S, Dh;
    double base;
    std::shared_ptr<const RopeTable> table;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;  // most recent last; at most 4 entries
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : cache)
      if (e.S == S && e.Dh == Dh && e.base == base) return e.table;
  }
  auto table = std::make_shared<RopeTable>();
  const int64_t half = Dh / 2;
  table->cos.resize(static_cast<size_t>(S * half));
  table->sin.resize(table->cos.size());
  table->minus_sin.resize(table->cos.size());
  for (int64_t p = 0; p < S; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle =
          static_cast<double>(p) * std::pow(base, -2.0 * static_cast<double>(i) / Dh);
      const size_t at = static_cast<size_t>(p * half + i);
      table->cos[at] = static_cast<float>(std::cos(angle));
      table->sin[at] = static_cast<float>(std::sin(angle));
      table->minus_sin[at] = static_cast<float>(-std::sin(angle));
    }
  }
  std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() == 4) cache.erase(cache.begin());
  cache.push_back({S, Dh, base, table});
  return table;
}

}  // namespace

void rope_apply(float* qkv, int64_t B, int64_t S, int64_t H, int64_t Dh, double base,
                bool inverse) {
  PYSWITCH_CHECK_ARG(Dh % 2 == 0, "rope: the head dimension must be even, got ", Dh);
  const int64_t half = Dh / 2, width = 3 * H * Dh;
  const std::shared_ptr<const RopeTable> table = rope_table(S, Dh, base);
  const std::vector<float>& cos_table = table->cos;
  const std::vector<float>& sin_table = inverse ? table->minus_sin : table->sin;
  const int64_t rows = B * S;
  detail::parallel_for(detail::ceil_div(rows, kRows), [&](int64_t b) {
    const int64_t end = std::min(rows, (b + 1) * kRows);
    for (int64_t r = b * kRows; r < end; ++r) {
      const float* c = cos_table.data() + (r % S) * half;
      const float* s = sin_table.data() + (r % S) * half;
      for (int64_t part = 0; part < 2; ++part) {  // q, then k
        for (int64_t h = 0; h < H; ++h) {
          float* v = qkv + r * width + part * H * Dh + h * Dh;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = v[i], x2 = v[i + half];
            v[i] = x1 * c[i] - x2 * s[i];
            v[i + half] = x1 * s[i] + x2 * c[i];
          }
        }
      }
    }
  });
}

// Query rows are processed in blocks of kQueryBlock: block [i0, i1) attends to keys [0, i1)
// only, which skips most of the masked half of every S x S product (causality) while keeping
// GEMMs large enough to run near peak. The blocks are fixed, so results never depend on the
// thread count (one (batch, head) pair per task, serial inside).
constexpr int64_t kQueryBlock = 64;

// dst (Dh, S) = one head's (S, Dh) slice of the packed rows (row stride `stride`), transposed
// once per (batch, head): the query blocks then multiply by it untransposed, whose packing is a
// vector copy, instead of each re-transposing the keys element by element. Values are copied,
// so the products are bit-identical either way.
void transpose_head(const float* src, int64_t S, int64_t Dh, int64_t stride,
                    std::vector<float>& dst) {
  dst.resize(static_cast<size_t>(S * Dh));
  constexpr int64_t kBlock = 16;
  for (int64_t s0 = 0; s0 < S; s0 += kBlock) {
    const int64_t s1 = std::min(S, s0 + kBlock);
    for (int64_t d = 0; d < Dh; ++d) {
      float* out = dst.data() + d * S;
      for (int64_t s = s0; s < s1; ++s) out[s] = src[s * stride + d];
    }
  }
}

void attention_forward(const float* qkv, int64_t B, int64_t S, int64_t H, int64_t Dh, float* out,
                       float* probs) {
  const int64_t width = 3 * H * Dh, out_width = H * Dh;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
  const cpu::KernelTable& kernels = cpu::active_kernels();
  detail::parallel_for(B * H, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const float* q = qkv + b * S * width + h * Dh;
    const float* k = q + H * Dh;
    const float* v = q + 2 * H * Dh;
    float* p = probs + bh * S * S;
    float* o = out + b * S * out_width + h * Dh;
    thread_local std::vector<float> k_t;
    transpose_head(k, S, Dh, width, k_t);
    for (int64_t i0 = 0; i0 < S; i0 += kQueryBlock) {
      const int64_t i1 = std::min(S, i0 + kQueryBlock);
      detail::gemm_serial(DType::float32, false, false, i1 - i0, i1, Dh, scale, q + i0 * width,
                          width, k_t.data(), S, 0.0f, p + i0 * S, S);
      kernels.causal_softmax_rows(p + i0 * S, i1 - i0, S, i0 + 1, S);
      detail::gemm_serial(DType::float32, false, false, i1 - i0, Dh, i1, 1.0f, p + i0 * S, S, v,
                          width, 0.0f, o + i0 * out_width, out_width);
    }
  });
}

void attention_backward(const float* d_out, const float* qkv, const float* probs, int64_t B,
                        int64_t S, int64_t H, int64_t Dh, float* d_qkv) {
  const int64_t width = 3 * H * Dh, out_width = H * Dh;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
  const cpu::KernelTable& kernels = cpu::active_kernels();
  detail::parallel_for(B * H, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const float* q = qkv + b * S * width + h * Dh;
    const float* k = q + H * Dh;
    const float* v = q + 2 * H * Dh;
    const float* p = probs + bh * S * S;
    const float* g = d_out + b * S * out_width + h * Dh;
    float* dq = d_qkv + b * S * width + h * Dh;
    float* dk = dq + H * Dh;
    float* dv = dq + 2 * H * Dh;
    // dK and dV accumulate over query blocks.
    for (int64_t j = 0; j < S; ++j) {
      std::fill(dk + j * width, dk + j * width + Dh, 0.0f);
      std::fill(dv + j * width, dv + j * width + Dh, 0.0f);
    }
    thread_local std::vector<float> ds, v_t;
    ds.resize(static_cast<size_t>(kQueryBlock * S));
    transpose_head(v, S, Dh, width, v_t);
    for (int64_t i0 = 0; i0 < S; i0 += kQueryBlock) {
      const int64_t i1 = std::min(S, i0 + kQueryBlock), n = i1 - i0;
      // dP = dO V^T, then dS = P * (dP - rowsum(P * dP)), over the keys [0, i1).
      detail::gemm_serial(DType::float32, false, false, n, i1, Dh, 1.0f, g + i0 * out_width,
                          out_width, v_t.data(), S, 0.0f, ds.data(), S);
      kernels.causal_softmax_backward_rows(p + i0 * S, S, ds.data(), S, n, i0 + 1, i1);
      detail::gemm_serial(DType::float32, true, false, i1, Dh, n, 1.0f, p + i0 * S, S,
                          g + i0 * out_width, out_width, 1.0f, dv, width);
      detail::gemm_serial(DType::float32, false, false, n, Dh, i1, scale, ds.data(), S, k, width,
                          0.0f, dq + i0 * width, width);
      detail::gemm_serial(DType::float32, true, false, i1, Dh, n, scale, ds.data(), S,
                          q + i0 * width, width, 1.0f, dk, width);
    }
  });
}

Linear::Linear(int64_t in_features, int64_t out_features, DType compute)
    : in_(in_features), out_(out_features), compute_(compute), ops_(&cpu_backend()) {
  PYSWITCH_CHECK_ARG(in_features >= 1 && out_features >= 1,
                     "Linear: in_features and out_features must be >= 1, got ", in_features,
                     " and ", out_features);
  check_floating(compute, "Linear", "compute dtype");
}

namespace {
TensorView matrix(const void* data, DType dtype, int64_t rows, int64_t cols) {
  return TensorView::contiguous(data, dtype, {rows, cols});
}
}  // namespace

void Linear::forward(const float* weight, const float* x, int64_t T, float* y) {
  const TensorView y_view = matrix(y, DType::float32, T, out_);
  if (compute_ == DType::float32) {
    ops_->gemm(matrix(x, DType::float32, T, in_), false, matrix(weight, DType::float32, in_, out_),
               false, y_view, 1.0f, 0.0f);
    return;
  }
  x_bf16_.resize(static_cast<size_t>(T * in_));
  w_bf16_.resize(static_cast<size_t>(in_ * out_));
  const TensorView x_c = matrix(x_bf16_.data(), DType::bfloat16, T, in_);
  const TensorView w_c = matrix(w_bf16_.data(), DType::bfloat16, in_, out_);
  ops_->convert(matrix(x, DType::float32, T, in_), x_c);
  ops_->convert(matrix(weight, DType::float32, in_, out_), w_c);
  ops_->gemm(x_c, false, w_c, false, y_view, 1.0f, 0.0f);
}

void Linear::backward(const float* weight, const float* x, const float* dy, int64_t T, float* dx,
                      float* d_weight) {
  const TensorView d_weight_view = matrix(d_weight, DType::float32, in_, out_);
  if (compute_ == DType::float32) {
    const TensorView dy_view = matrix(dy, DType::float32, T, out_);
    if (dx) {
      ops_->gemm(dy_view, false, matrix(weight, DType::float32, in_, out_), true,
                 matrix(dx, DType::float32, T, in_), 1.0f, 0.0f);
    }
    ops_->gemm(matrix(x, DType::float32, T, in_), true, dy_view, false, d_weight_view, 1.0f, 0.0f);
    return;
  }
  // The forward's bf16 copies of x and W are still current (same step).
  PYSWITCH_CHECK_STATE(static_cast<int64_t>(x_bf16_.size()) == T * in_ && !w_bf16_.empty(),
                       "Linear::backward: bfloat16 mode needs a forward over the same ", T,
                       " rows first");
  dy_bf16_.resize(static_cast<size_t>(T * out_));
  const TensorView dy_c = matrix(dy_bf16_.data(), DType::bfloat16, T, out_);
  ops_->convert(matrix(dy, DType::float32, T, out_), dy_c);
  if (dx) {
    ops_->gemm(dy_c, false, matrix(w_bf16_.data(), DType::bfloat16, in_, out_), true,
               matrix(dx, DType::float32, T, in_), 1.0f, 0.0f);
  }
  ops_->gemm(matrix(x_bf16_.data(), DType::bfloat16, T, in_), true, dy_c, false, d_weight_view,
             1.0f, 0.0f);
  (void)weight;
  (void)x;
}

void embedding_forward(const float* table, int64_t V, int64_t d, const int32_t* tokens, int64_t T,
                       float* out) {
  for (int64_t t = 0; t < T; ++t) {
    PYSWITCH_CHECK_ARG(tokens[t] >= 0 && tokens[t] < V, "embedding: token ", t, " is ", tokens[t],
                       ", outside the vocabulary [0, ", V, ")");
  }
  detail::parallel_for(detail::ceil_div(T, kRows), [&](int64_t b) {
    const int64_t end = std::min(T, (b + 1) * kRows);
    for (int64_t t = b * kRows; t < end; ++t) {
      std::copy_n(table + static_cast<int64_t>(tokens[t]) * d, d, out + t * d);
    }
  });
}

void embedding_backward(const float* d_out, const int32_t* tokens, int64_t T, int64_t V, int64_t d,
                        float* d_table) {
  // Each unit owns a range of vocabulary rows and adds its tokens in token order.
  constexpr int64_t kVocabRows = 8;
  detail::parallel_for(detail::ceil_div(V, kVocabRows), [&](int64_t b) {
    const int64_t first = b * kVocabRows, last = std::min(V, first + kVocabRows);
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = tokens[t];
      if (v < first || v >= last) continue;
      float* row = d_table + v * d;
      const float* g = d_out + t * d;
      for (int64_t j = 0; j < d; ++j) row[j] += g[j];
    }
  });
}

double cross_entropy(const float* logits, const int32_t* targets, int64_t T, int64_t V,
                     float grad_scale, float* d_logits) {
  for (int64_t t = 0; t < T; ++t) {
    PYSWITCH_CHECK_ARG(targets[t] >= 0 && targets[t] < V, "cross_entropy: target ", t, " is ",
                       targets[t], ", outside [0, ", V, ")");
  }
  const int64_t blocks = detail::ceil_div(T, kRows);
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
  detail::parallel_for(blocks, [&](int64_t b) {
    const int64_t end = std::min(T, (b + 1) * kRows);
    double loss = 0;
    for (int64_t t = b * kRows; t < end; ++t) {
      const float* row = logits + t * V;
      const float mx = *std::max_element(row, row + V);
      double sum = 0;
      for (int64_t j = 0; j < V; ++j) sum += std::exp(static_cast<double>(row[j] - mx));
      const double lse = static_cast<double>(mx) + std::log(sum);
      loss += lse - row[targets[t]];
      if (d_logits) {
        float* out = d_logits + t * V;
        for (int64_t j = 0; j < V; ++j) {
          out[j] = static_cast<float>(std::exp(static_cast<double>(row[j]) - lse) * grad_scale);
        }
        out[targets[t]] -= grad_scale;
      }
    }
    partial[static_cast<size_t>(b)] = loss;
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace pyswitch::nn
