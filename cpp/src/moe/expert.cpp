// Expert FFNs over a packed buffer: per-expert GEMMs on fixed row blocks, so every result is
// independent of the thread count, and the small GEMMs of many experts still fill every core.
#include "pyswitch/moe/expert.hpp"

#include <algorithm>
#include <cmath>

#include "gemm.hpp"
#include "parallel.hpp"
#include "pyswitch/error.hpp"

namespace pyswitch::moe {
namespace {

constexpr int64_t kRowBlock = 128;

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

inline float gelu(float x) {
  return 0.5f * x * (1.0f + std::tanh(kGeluC * (x + kGeluA * x * x * x)));
}
inline float gelu_grad(float x) {
  const float inner = kGeluC * (x + kGeluA * x * x * x);
  const float th = std::tanh(inner);
  return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * kGeluC * (1.0f + 3.0f * kGeluA * x * x);
}

// (expert, first row, rows) units: every expert's rows cut into fixed blocks.
struct Unit {
  int64_t expert, first, rows;
};
std::vector<Unit> row_units(const int64_t* offsets, int64_t E, int64_t block) {
  std::vector<Unit> units;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t r = offsets[e]; r < offsets[e + 1]; r += block) {
      units.push_back({e, r, std::min(block, offsets[e + 1] - r)});
    }
  }
  return units;
}

void validate(const char* where, const ExpertShape& s, const ExpertParams& p,
              const int64_t* offsets) {
  PYSWITCH_CHECK_ARG(s.num_experts >= 1 && s.d_model >= 1 && s.d_ff >= 1, where,
                     ": num_experts, d_model and d_ff must be >= 1, got ", s.num_experts, ", ",
                     s.d_model, ", ", s.d_ff);
  PYSWITCH_CHECK_ARG(p.w_in && p.w_out, where, ": w_in and w_out are required");
  PYSWITCH_CHECK_ARG((s.activation == Activation::geglu) == (p.w_gate != nullptr), where,
                     ": w_gate must be given exactly when the activation is geglu");
  PYSWITCH_CHECK_ARG(offsets[0] == 0, where, ": offsets[0] must be 0, got ", offsets[0]);
  for (int64_t e = 0; e < s.num_experts; ++e) {
    PYSWITCH_CHECK_ARG(offsets[e + 1] >= offsets[e], where,
                       ": offsets must be non-decreasing, got offsets[", e, "]=", offsets[e],
                       " > offsets[", e + 1, "]=", offsets[e + 1]);
  }
}

}  // namespace

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "geglu") return Activation::geglu;
  throw InvalidArgument("activation must be 'relu', 'gelu' or 'geglu', got '" + name + "'");
}

void experts_forward(const ExpertShape& s, const ExpertParams& p, const int64_t* offsets,
                     const float* x, float* y, ExpertCache* cache) {
  validate("experts_forward", s, p, offsets);
  const int64_t E = s.num_experts, d = s.d_model, f = s.d_ff;
  const int64_t rows = offsets[E];
  const bool geglu = s.activation == Activation::geglu;
  ExpertCache local;
  ExpertCache& c = cache ? *cache : local;
  c.pre.resize(static_cast<size_t>(rows * f));
  c.hidden.resize(static_cast<size_t>(rows * f));
  c.linear.resize(geglu ? static_cast<size_t>(rows * f) : 0);
  const std::vector<Unit> units = row_units(offsets, E, kRowBlock);
  detail::parallel_for(static_cast<int64_t>(units.size()), [&](int64_t u) {
    const Unit& w = units[static_cast<size_t>(u)];
    const float* xb = x + w.first * d;
    float* pre = c.pre.data() + w.first * f;
    float* hidden = c.hidden.data() + w.first * f;
    detail::sgemm(false, false, w.rows, f, d, 1.0f, xb, d, p.w_in + w.expert * d * f, f, 0.0f, pre,
                  f);
    if (p.b_in) {
      for (int64_t r = 0; r < w.rows; ++r) {
        for (int64_t j = 0; j < f; ++j) pre[r * f + j] += p.b_in[w.expert * f + j];
      }
    }
    if (geglu) {
      float* linear = c.linear.data() + w.first * f;
      detail::sgemm(false, false, w.rows, f, d, 1.0f, xb, d, p.w_gate + w.expert * d * f, f, 0.0f,
                    linear, f);
      for (int64_t i = 0; i < w.rows * f; ++i) hidden[i] = gelu(pre[i]) * linear[i];
    } else if (s.activation == Activation::gelu) {
      for (int64_t i = 0; i < w.rows * f; ++i) hidden[i] = gelu(pre[i]);
    } else {
      for (int64_t i = 0; i < w.rows * f; ++i) hidden[i] = pre[i] > 0.0f ? pre[i] : 0.0f;
    }
    float* yb = y + w.first * d;
    detail::sgemm(false, false, w.rows, d, f, 1.0f, hidden, f, p.w_out + w.expert * f * d, d, 0.0f,
                  yb, d);
    if (p.b_out) {
      for (int64_t r = 0; r < w.rows; ++r) {
        for (int64_t j = 0; j < d; ++j) yb[r * d + j] += p.b_out[w.expert * d + j];
      }
    }
  });
}

void experts_backward(const ExpertShape& s, const ExpertParams& p, const int64_t* offsets,
                      const float* x, const ExpertCache& c, const float* dy, float* dx,
                      const ExpertGrads& g) {
  validate("experts_backward", s, p, offsets);
  const int64_t E = s.num_experts, d = s.d_model, f = s.d_ff;
  const int64_t rows = offsets[E];
  const bool geglu = s.activation == Activation::geglu;
  PYSWITCH_CHECK_ARG(static_cast<int64_t>(c.hidden.size()) == rows * f,
                     "experts_backward: the "
                     "cache does not come from a forward over these ",
                     rows, " rows");
  std::vector<float> d_pre(static_cast<size_t>(rows * f));
  std::vector<float> d_linear(geglu ? static_cast<size_t>(rows * f) : 0);
  // Row-parallel part: d_hidden = dy W_out^T, through the activation, dx = d_pre W_in^T (+ ...).
  const std::vector<Unit> units = row_units(offsets, E, kRowBlock);
  detail::parallel_for(static_cast<int64_t>(units.size()), [&](int64_t u) {
    const Unit& w = units[static_cast<size_t>(u)];
    float* dp = d_pre.data() + w.first * f;
    detail::sgemm(false, true, w.rows, f, d, 1.0f, dy + w.first * d, d, p.w_out + w.expert * f * d,
                  d, 0.0f, dp, f);  // d_hidden, turned into d_pre in place below
    const float* pre = c.pre.data() + w.first * f;
    if (geglu) {
      const float* linear = c.linear.data() + w.first * f;
      float* dl = d_linear.data() + w.first * f;
      for (int64_t i = 0; i < w.rows * f; ++i) {
        dl[i] = dp[i] * gelu(pre[i]);
        dp[i] = dp[i] * linear[i] * gelu_grad(pre[i]);
      }
    } else if (s.activation == Activation::gelu) {
      for (int64_t i = 0; i < w.rows * f; ++i) dp[i] *= gelu_grad(pre[i]);
    } else {
      for (int64_t i = 0; i < w.rows * f; ++i) dp[i] = pre[i] > 0.0f ? dp[i] : 0.0f;
    }
    float* dxb = dx + w.first * d;
    detail::sgemm(false, true, w.rows, d, f, 1.0f, dp, f, p.w_in + w.expert * d * f, f, 0.0f, dxb,
                  d);
    if (geglu) {
      detail::sgemm(false, true, w.rows, d, f, 1.0f, d_linear.data() + w.first * f, f,
                    p.w_gate + w.expert * d * f, f, 1.0f, dxb, d);
    }
  });
  // Weight gradients: per expert, reductions over its rows (K = rows), split over output rows.
  const int64_t d_blocks = detail::ceil_div(d, kRowBlock),
                f_blocks = detail::ceil_div(f, kRowBlock);
  detail::parallel_for(E * (d_blocks + f_blocks), [&](int64_t u) {
    const int64_t e = u / (d_blocks + f_blocks), part = u % (d_blocks + f_blocks);
    const int64_t first = offsets[e], n = offsets[e + 1] - offsets[e];
    if (part < d_blocks) {  // dW_in[e] rows [m0, m0+mb) = x_e^T d_pre_e
      const int64_t m0 = part * kRowBlock, mb = std::min(kRowBlock, d - m0);
      float* out = g.w_in + e * d * f + m0 * f;
      if (n == 0) {
        std::fill(out, out + mb * f, 0.0f);
      } else {
        detail::sgemm(true, false, mb, f, n, 1.0f, x + first * d + m0, d, d_pre.data() + first * f,
                      f, 0.0f, out, f);
      }
      if (geglu) {
        float* out_gate = g.w_gate + e * d * f + m0 * f;
        if (n == 0) {
          std::fill(out_gate, out_gate + mb * f, 0.0f);
        } else {
          detail::sgemm(true, false, mb, f, n, 1.0f, x + first * d + m0, d,
                        d_linear.data() + first * f, f, 0.0f, out_gate, f);
        }
      }
    } else {  // dW_out[e] rows [m0, m0+mb) = hidden_e^T dy_e
      const int64_t m0 = (part - d_blocks) * kRowBlock, mb = std::min(kRowBlock, f - m0);
      float* out = g.w_out + e * f * d + m0 * d;
      if (n == 0) {
        std::fill(out, out + mb * d, 0.0f);
      } else {
        detail::sgemm(true, false, mb, d, n, 1.0f, c.hidden.data() + first * f + m0, f,
                      dy + first * d, d, 0.0f, out, d);
      }
    }
  });
  // Bias gradients: column sums in row order.
  for (int64_t e = 0; e < E; ++e) {
    if (g.b_in) {
      float* out = g.b_in + e * f;
      std::fill(out, out + f, 0.0f);
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
        for (int64_t j = 0; j < f; ++j) out[j] += d_pre[static_cast<size_t>(r * f + j)];
      }
    }
    if (g.b_out) {
      float* out = g.b_out + e * d;
      std::fill(out, out + d, 0.0f);
      for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) {
        for (int64_t j = 0; j < d; ++j) out[j] += dy[r * d + j];
      }
    }
  }
}

}  // namespace pyswitch::moe
