// Expert FFNs over a packed buffer: per-expert GEMMs on fixed row blocks, so every result is
// independent of the thread count, and the small GEMMs of many experts still fill every core.
#include "pyswitch/moe/expert.hpp"

#include <algorithm>
#include <cmath>

#include "gemm.hpp"
#include "parallel.hpp"
#include "pyswitch/backend.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/moe/activation_math.hpp"
#include "pyswitch/random.hpp"

namespace pyswitch::moe {
namespace {

// Rows per unit of work. Each unit is one single-threaded GEMM, and oneDNN packs the weight
// panel once per call, so larger units amortise packing; 512 rows still leave every expert of
// a typical layer (E = 64, ~160 tokens each) one unit.
constexpr int64_t kRowBlock = 512;

using activation_math::gelu;
using activation_math::gelu_grad;

// The dropout multiplier of hidden element `index`: 0 or 1 / (1 - rate) (activation_math.hpp,
// shared with the CUDA kernels).
inline float dropout_scale(const DropoutSpec& spec, int64_t index) {
  return activation_math::dropout_multiplier(spec.seed, spec.stream, index,
                                             static_cast<float>(spec.rate),
                                             static_cast<float>(1.0 / (1.0 - spec.rate)));
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

// Element pointer arithmetic on a buffer of either dtype.
inline const void* at(const void* base, DType dtype, int64_t index) {
  return static_cast<const char*>(base) + index * dtype_size(dtype);
}
inline void* at(void* base, DType dtype, int64_t index) {
  return static_cast<char*>(base) + index * dtype_size(dtype);
}

// Stores a float32 block into `out` of dtype, or leaves it when out already is that block.
void store_block(const float* block, DType dtype, void* out, int64_t n) {
  if (dtype == DType::float32) {
    if (static_cast<const void*>(block) != out) std::copy_n(block, n, static_cast<float*>(out));
  } else {
    bf16* dst = static_cast<bf16*>(out);
    convert_f32_to_bf16(block, dst, n);
  }
}

// Rounds n weights into `out`, reusing its storage from the previous step (no page faults).
void round_weights(const float* src, int64_t n, std::vector<bf16>& out) {
  out.resize(static_cast<size_t>(n));
  convert_f32_to_bf16(src, out.data(), n);
}

}  // namespace

ExpertWeights::ExpertWeights(const ExpertShape& s, bool use_bias, double init_scale, uint64_t seed,
                             int64_t first_expert, const BackendOps& ops)
    : ops_(&ops) {
  PYSWITCH_CHECK_ARG(std::isfinite(init_scale) && init_scale > 0,
                     "init_scale must be finite and > 0, got ", init_scale);
  const int64_t E = s.num_experts, d = s.d_model, f = s.d_ff;
  auto init = [&](TableBuffer& out, int64_t n, int64_t fan_in, uint64_t stream) {
    out = TableBuffer(ops, DType::float32, n);
    const double std_dev = std::sqrt(init_scale / static_cast<double>(fan_in));
    out.fill_on_host([&](void* values) {
      truncated_normal(static_cast<float*>(values), n, std_dev, seed, kStreamInit + stream,
                       first_expert * d * f);
    });
  };
  init(w_in_, E * d * f, d, 1);
  init(w_out_, E * f * d, f, 2);
  if (s.activation == Activation::geglu) init(w_gate_, E * d * f, d, 3);
  if (use_bias) {
    b_in_ = TableBuffer(ops, DType::float32, E * f);
    b_out_ = TableBuffer(ops, DType::float32, E * d);
  }
  g_w_in_ = TableBuffer(ops, DType::float32, w_in_.size());
  g_w_out_ = TableBuffer(ops, DType::float32, w_out_.size());
  if (!w_gate_.empty()) g_w_gate_ = TableBuffer(ops, DType::float32, w_gate_.size());
  if (use_bias) {
    g_b_in_ = TableBuffer(ops, DType::float32, b_in_.size());
    g_b_out_ = TableBuffer(ops, DType::float32, b_out_.size());
  }
}

ExpertParams ExpertWeights::params() const {
  return {w_in(), w_gate(), w_out(), b_in(), b_out()};
}

void ExpertWeights::enable_compute_copy() {
  if (has_compute_copy()) return;
  w_in_bf16_ = TableBuffer(*ops_, DType::bfloat16, w_in_.size());
  w_out_bf16_ = TableBuffer(*ops_, DType::bfloat16, w_out_.size());
  if (!w_gate_.empty()) w_gate_bf16_ = TableBuffer(*ops_, DType::bfloat16, w_gate_.size());
  mark_params_changed();
}

ExpertParams ExpertWeights::compute_params(DType dtype) {
  ExpertParams p = params();
  if (dtype != DType::bfloat16 || !has_compute_copy()) return p;
  // Clear the flag before reading the masters: a mark made while rounding survives.
  const bool stale = stale_.exchange(false, std::memory_order_relaxed);
  if (stale || live_views() > 0) {
    auto round = [&](const TableBuffer& master, const TableBuffer& copy) {
      if (!master.empty()) ops_->convert(master.view({master.size()}), copy.view({copy.size()}));
    };
    round(w_in_, w_in_bf16_);
    round(w_out_, w_out_bf16_);
    round(w_gate_, w_gate_bf16_);
    ++refreshes_;
  }
  p.w_in_bf16 = w_in_bf16();
  p.w_out_bf16 = w_out_bf16();
  p.w_gate_bf16 = w_gate_bf16();
  return p;
}

ExpertGrads ExpertWeights::grads() {
  return {w_in_grad(), w_gate_grad(), w_out_grad(), b_in_grad(), b_out_grad()};
}

void validate_experts(const char* where, const ExpertShape& s, const ExpertParams& p,
                      const int64_t* offsets) {
  PYSWITCH_CHECK_ARG(offsets != nullptr, where, ": offsets must not be null");
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

Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "geglu") return Activation::geglu;
  throw InvalidArgument("activation must be 'relu', 'gelu' or 'geglu', got '" + name + "'");
}

void experts_forward(const ExpertShape& s, const ExpertParams& p, const int64_t* offsets,
                     DType dtype, const void* x, void* y, ExpertCache* cache,
                     const DropoutSpec& dropout) {
  validate_experts("experts_forward", s, p, offsets);
  check_floating(dtype, "experts_forward");
  PYSWITCH_CHECK_ARG(dropout.rate >= 0.0 && dropout.rate < 1.0,
                     "experts_forward: dropout rate must be in [0, 1), got ", dropout.rate);
  const int64_t E = s.num_experts, d = s.d_model, f = s.d_ff;
  const int64_t rows = offsets[E];
  const bool geglu = s.activation == Activation::geglu;
  const bool bf16_compute = dtype == DType::bfloat16;
  ExpertCache local;
  ExpertCache& c = cache ? *cache : local;
  c.dtype = dtype;
  c.dropout = cache ? dropout : DropoutSpec{};
  c.pre.resize(static_cast<size_t>(rows * f));
  c.hidden.resize(static_cast<size_t>(rows * f));
  c.linear.resize(geglu ? static_cast<size_t>(rows * f) : 0);
  c.hidden_bf16.resize(bf16_compute ? static_cast<size_t>(rows * f) : 0);
  const void* w_in = p.w_in;
  const void* w_gate = p.w_gate;
  const void* w_out = p.w_out;
  c.w_in_used = c.w_gate_used = c.w_out_used = nullptr;
  if (bf16_compute) {
    if (p.w_in_bf16 && p.w_out_bf16 && (!geglu || p.w_gate_bf16)) {
      // The caller's copy (ExpertWeights keeps it in step with the masters): no rounding pass.
      c.w_in_used = p.w_in_bf16;
      c.w_out_used = p.w_out_bf16;
      c.w_gate_used = geglu ? p.w_gate_bf16 : nullptr;
    } else {
      round_weights(p.w_in, E * d * f, c.w_in);
      round_weights(p.w_out, E * f * d, c.w_out);
      if (geglu) round_weights(p.w_gate, E * d * f, c.w_gate);
      c.w_in_used = c.w_in.data();
      c.w_out_used = c.w_out.data();
      c.w_gate_used = geglu ? c.w_gate.data() : nullptr;
    }
    w_in = c.w_in_used;
    w_out = c.w_out_used;
    w_gate = c.w_gate_used;
  }
  const bool drop = c.dropout.rate > 0.0;
  const std::vector<Unit> units = row_units(offsets, E, kRowBlock);
  detail::parallel_for(static_cast<int64_t>(units.size()), [&](int64_t u) {
    const Unit& w = units[static_cast<size_t>(u)];
    const void* xb = at(x, dtype, w.first * d);
    float* pre = c.pre.data() + w.first * f;
    float* hidden = c.hidden.data() + w.first * f;
    detail::gemm_serial(dtype, false, false, w.rows, f, d, 1.0f, xb, d,
                        at(w_in, dtype, w.expert * d * f), f, 0.0f, pre, f);
    if (p.b_in) {
      for (int64_t r = 0; r < w.rows; ++r) {
        for (int64_t j = 0; j < f; ++j) pre[r * f + j] += p.b_in[w.expert * f + j];
      }
    }
    if (geglu) {
      float* linear = c.linear.data() + w.first * f;
      detail::gemm_serial(dtype, false, false, w.rows, f, d, 1.0f, xb, d,
                          at(w_gate, dtype, w.expert * d * f), f, 0.0f, linear, f);
      for (int64_t i = 0; i < w.rows * f; ++i) hidden[i] = gelu(pre[i]) * linear[i];
    } else if (s.activation == Activation::gelu) {
      for (int64_t i = 0; i < w.rows * f; ++i) hidden[i] = gelu(pre[i]);
    } else {
      for (int64_t i = 0; i < w.rows * f; ++i) hidden[i] = pre[i] > 0.0f ? pre[i] : 0.0f;
    }
    if (drop) {
      for (int64_t i = 0; i < w.rows * f; ++i) {
        hidden[i] *= dropout_scale(c.dropout, (c.dropout.first_row + w.first) * f + i);
      }
    }
    const void* hidden_operand = hidden;
    if (bf16_compute) {
      bf16* rounded = c.hidden_bf16.data() + w.first * f;
      convert_f32_to_bf16(hidden, rounded, w.rows * f);
      hidden_operand = rounded;
    }
    std::vector<float> out_block;
    float* yb = static_cast<float*>(at(y, dtype, w.first * d));
    if (bf16_compute) {
      out_block.resize(static_cast<size_t>(w.rows * d));
      yb = out_block.data();
    }
    detail::gemm_serial(dtype, false, false, w.rows, d, f, 1.0f, hidden_operand, f,
                        at(w_out, dtype, w.expert * f * d), d, 0.0f, yb, d);
    if (p.b_out) {
      for (int64_t r = 0; r < w.rows; ++r) {
        for (int64_t j = 0; j < d; ++j) yb[r * d + j] += p.b_out[w.expert * d + j];
      }
    }
    store_block(yb, dtype, at(y, dtype, w.first * d), w.rows * d);
  });
}

void experts_backward(const ExpertShape& s, const ExpertParams& p, const int64_t* offsets,
                      const void* x, ExpertCache& c, const void* dy, void* dx,
                      const ExpertGrads& g) {
  validate_experts("experts_backward", s, p, offsets);
  PYSWITCH_CHECK_ARG(g.w_in != nullptr && g.w_out != nullptr &&
                         (g.w_gate != nullptr) == (p.w_gate != nullptr) &&
                         (g.b_in != nullptr) == (p.b_in != nullptr) &&
                         (g.b_out != nullptr) == (p.b_out != nullptr),
                     "experts_backward: gradient pointers must be given exactly for the parameters "
                     "present (w_in, w_out, and w_gate / b_in / b_out when the layer has them)");
  const int64_t E = s.num_experts, d = s.d_model, f = s.d_ff;
  const int64_t rows = offsets[E];
  const bool geglu = s.activation == Activation::geglu;
  const DType dtype = c.dtype;
  const bool bf16_compute = dtype == DType::bfloat16;
  PYSWITCH_CHECK_ARG(static_cast<int64_t>(c.hidden.size()) == rows * f,
                     "experts_backward: the cache does not come from a forward over these ", rows,
                     " rows");
  // The bf16 weights of the forward (not p's copy, which the caller may have refreshed since).
  PYSWITCH_CHECK_ARG(!bf16_compute || (c.w_in_used && c.w_out_used),
                     "experts_backward: the cache does not come from a bf16 forward");
  const void* w_in = bf16_compute ? static_cast<const void*>(c.w_in_used) : p.w_in;
  const void* w_gate = bf16_compute ? static_cast<const void*>(c.w_gate_used) : p.w_gate;
  const void* w_out = bf16_compute ? static_cast<const void*>(c.w_out_used) : p.w_out;
  const void* hidden = bf16_compute ? static_cast<const void*>(c.hidden_bf16.data())
                                    : static_cast<const void*>(c.hidden.data());
  const bool drop = c.dropout.rate > 0.0;
  // float32 d_pre (for the biases and the activation), plus the GEMM operand copies in bf16.
  std::vector<float>& d_pre = c.d_pre;
  std::vector<float>& d_linear = c.d_linear;
  std::vector<bf16>& d_pre_bf16 = c.d_pre_bf16;
  std::vector<bf16>& d_linear_bf16 = c.d_linear_bf16;
  d_pre.resize(static_cast<size_t>(rows * f));
  d_linear.resize(geglu ? static_cast<size_t>(rows * f) : 0);
  d_pre_bf16.resize(bf16_compute ? static_cast<size_t>(rows * f) : 0);
  d_linear_bf16.resize(bf16_compute && geglu ? static_cast<size_t>(rows * f) : 0);
  const void* d_pre_operand = bf16_compute ? static_cast<const void*>(d_pre_bf16.data())
                                           : static_cast<const void*>(d_pre.data());
  const void* d_linear_operand = bf16_compute ? static_cast<const void*>(d_linear_bf16.data())
                                              : static_cast<const void*>(d_linear.data());

  // Row-parallel part: d_hidden = dy W_out^T, through dropout and the activation, then
  // dx = d_pre W_in^T (+ d_linear W_gate^T).
  const std::vector<Unit> units = row_units(offsets, E, kRowBlock);
  detail::parallel_for(static_cast<int64_t>(units.size()), [&](int64_t u) {
    const Unit& w = units[static_cast<size_t>(u)];
    const int64_t n = w.rows * f;
    float* dp = d_pre.data() + w.first * f;
    detail::gemm_serial(dtype, false, true, w.rows, f, d, 1.0f, at(dy, dtype, w.first * d), d,
                        at(w_out, dtype, w.expert * f * d), d, 0.0f, dp,
                        f);  // d_hidden, in place
    if (drop) {
      for (int64_t i = 0; i < n; ++i)
        dp[i] *= dropout_scale(c.dropout, (c.dropout.first_row + w.first) * f + i);
    }
    const float* pre = c.pre.data() + w.first * f;
    if (geglu) {
      const float* linear = c.linear.data() + w.first * f;
      float* dl = d_linear.data() + w.first * f;
      for (int64_t i = 0; i < n; ++i) {
        dl[i] = dp[i] * gelu(pre[i]);
        dp[i] = dp[i] * linear[i] * gelu_grad(pre[i]);
      }
    } else if (s.activation == Activation::gelu) {
      for (int64_t i = 0; i < n; ++i) dp[i] *= gelu_grad(pre[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) dp[i] = pre[i] > 0.0f ? dp[i] : 0.0f;
    }
    if (bf16_compute) {
      bf16* rounded = d_pre_bf16.data() + w.first * f;
      convert_f32_to_bf16(dp, rounded, n);
      if (geglu) {
        bf16* rounded_linear = d_linear_bf16.data() + w.first * f;
        const float* dl = d_linear.data() + w.first * f;
        convert_f32_to_bf16(dl, rounded_linear, n);
      }
    }
    std::vector<float> dx_block(static_cast<size_t>(w.rows * d));
    detail::gemm_serial(dtype, false, true, w.rows, d, f, 1.0f,
                        at(d_pre_operand, dtype, w.first * f), f, at(w_in, dtype, w.expert * d * f),
                        f, 0.0f, dx_block.data(), d);
    if (geglu) {
      detail::gemm_serial(dtype, false, true, w.rows, d, f, 1.0f,
                          at(d_linear_operand, dtype, w.first * f), f,
                          at(w_gate, dtype, w.expert * d * f), f, 1.0f, dx_block.data(), d);
    }
    store_block(dx_block.data(), dtype, at(dx, dtype, w.first * d), w.rows * d);
  });

  // Weight gradients: per expert, reductions over its rows (K = rows), split over output rows.
  const int64_t d_blocks = detail::ceil_div(d, kRowBlock);
  const int64_t f_blocks = detail::ceil_div(f, kRowBlock);
  detail::parallel_for(E * (d_blocks + f_blocks), [&](int64_t u) {
    const int64_t e = u / (d_blocks + f_blocks), part = u % (d_blocks + f_blocks);
    const int64_t first = offsets[e], n = offsets[e + 1] - offsets[e];
    if (part < d_blocks) {  // dW_in[e] rows [m0, m0 + mb) = x_e^T d_pre_e (and W_gate's)
      const int64_t m0 = part * kRowBlock, mb = std::min(kRowBlock, d - m0);
      detail::gemm_serial(dtype, true, false, mb, f, n, 1.0f, at(x, dtype, first * d + m0), d,
                          at(d_pre_operand, dtype, first * f), f, 0.0f, g.w_in + e * d * f + m0 * f,
                          f);
      if (geglu) {
        detail::gemm_serial(dtype, true, false, mb, f, n, 1.0f, at(x, dtype, first * d + m0), d,
                            at(d_linear_operand, dtype, first * f), f, 0.0f,
                            g.w_gate + e * d * f + m0 * f, f);
      }
    } else {  // dW_out[e] rows [m0, m0 + mb) = hidden_e^T dy_e
      const int64_t m0 = (part - d_blocks) * kRowBlock, mb = std::min(kRowBlock, f - m0);
      detail::gemm_serial(dtype, true, false, mb, d, n, 1.0f, at(hidden, dtype, first * f + m0), f,
                          at(dy, dtype, first * d), d, 0.0f, g.w_out + e * f * d + m0 * d, d);
    }
  });

  // Bias gradients: column sums in row order.
  std::vector<float> dy_row(static_cast<size_t>(d));
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
        if (bf16_compute) {
          convert_bf16_to_f32(static_cast<const bf16*>(dy) + r * d, dy_row.data(), d);
        } else {
          std::copy_n(static_cast<const float*>(dy) + r * d, d, dy_row.data());
        }
        for (int64_t j = 0; j < d; ++j) out[j] += dy_row[static_cast<size_t>(j)];
      }
    }
  }
}

}  // namespace pyswitch::moe
