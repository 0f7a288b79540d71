// SwitchLM tests (model/switch_lm.hpp): the forward against a plain double-precision reference
// model written here from the definitions, whole-model gradients by central finite differences
// (of the reference in double and of the float32 model itself), parameters(), logits() against
// step()'s CE, learning on a repeating sequence with AdamW, determinism and the random state,
// construction and input errors.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "harness.hpp"
#include "pyswitch/comm/local.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/model/switch_lm.hpp"
#include "pyswitch/model/trainer.hpp"
#include "pyswitch/optim/optim.hpp"
#include "pyswitch/threading.hpp"

using namespace pyswitch;
using namespace pyswitch::model;

namespace {

// d_model 8, 2 heads of 4, d_ff 16, 4 experts; layer 1 is a Switch layer. Dropless in training
// and eval and no jitter, so routing is a deterministic function of the parameters. Larger loss
// coefficients than the defaults so that the aux / z gradient paths are visible.
SwitchLMConfig tiny_config() {
  SwitchLMConfig c;
  c.vocab_size = 16;
  c.d_model = 8;
  c.num_layers = 2;
  c.num_heads = 2;
  c.d_ff = 16;
  c.num_experts = 4;
  c.expert_every = 2;
  c.capacity_factor = std::nullopt;
  c.eval_capacity_factor = std::nullopt;
  c.jitter_eps = 0.0;
  c.aux_loss_coef = 0.1;
  c.z_loss_coef = 0.05;
  c.init_scale = 0.5;
  c.seed = 1;
  return c;
}

constexpr int64_t kB = 2, kS = 6;

std::vector<int32_t> random_tokens(int64_t rows, int64_t cols, int64_t V, uint32_t seed) {
  std::mt19937 gen(seed);
  std::vector<int32_t> t(static_cast<size_t>(rows * cols));
  for (auto& x : t) x = static_cast<int32_t>(gen() % static_cast<uint32_t>(V));
  return t;
}

using Params = std::map<std::string, std::vector<double>>;

Params params_of(SwitchLM& model) {
  Params p;
  for (const ParamRef& r : model.parameters()) {
    int64_t n = 1;
    for (int64_t s : r.shape) n *= s;
    p[r.name] = std::vector<double>(r.data, r.data + n);
  }
  return p;
}

// ----- the double-precision reference model -----

struct RefOut {
  double ce = 0, aux = 0, z = 0, total = 0;
  std::vector<double> logits;              // (T, V)
  std::vector<int> signature;              // routing decisions, drops and relu on/off patterns
  std::vector<int64_t> tokens_per_expert;  // of the last Switch layer
  double min_gap = 1e9;                    // smallest probability gap at a routing decision
};

std::vector<double> rmsnorm(const std::vector<double>& x, const std::vector<double>& w, int64_t T,
                            int64_t d, double eps) {
  std::vector<double> y(x.size());
  for (int64_t t = 0; t < T; ++t) {
    double ms = 0;
    for (int64_t j = 0; j < d; ++j) ms += x[t * d + j] * x[t * d + j];
    const double inv = 1.0 / std::sqrt(ms / d + static_cast<double>(static_cast<float>(eps)));
    for (int64_t j = 0; j < d; ++j) y[t * d + j] = x[t * d + j] * inv * w[j];
  }
  return y;
}

// (T, n) @ (n, m)
std::vector<double> matmul(const std::vector<double>& a, const double* b, int64_t T, int64_t n,
                           int64_t m) {
  std::vector<double> out(static_cast<size_t>(T * m), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < m; ++j) out[t * m + j] += a[t * n + i] * b[i * m + j];
    }
  }
  return out;
}

// relu(x W_in) W_out for one row, recording the relu pattern.
void ffn_row(const double* x, const double* w_in, const double* w_out, int64_t d, int64_t f,
             double* y, std::vector<int>* sig) {
  std::vector<double> h(static_cast<size_t>(f), 0.0);
  for (int64_t i = 0; i < d; ++i) {
    for (int64_t j = 0; j < f; ++j) h[j] += x[i] * w_in[i * f + j];
  }
  for (int64_t j = 0; j < f; ++j) {
    sig->push_back(h[j] > 0);
    if (h[j] < 0) h[j] = 0;
  }
  for (int64_t i = 0; i < d; ++i) y[i] = 0;
  for (int64_t j = 0; j < f; ++j) {
    for (int64_t i = 0; i < d; ++i) y[i] += h[j] * w_out[j * d + i];
  }
}

// tokens (B, S + 1); CE averaged over loss_tokens.
RefOut reference(const Params& P, const SwitchLMConfig& c, const std::vector<int32_t>& tokens,
                 int64_t B, int64_t S, bool training, int64_t loss_tokens) {
  const int64_t d = c.d_model, V = c.vocab_size, H = c.num_heads, Dh = d / H, T = B * S;
  const int64_t f = c.d_ff, E = c.num_experts, k = c.k;
  RefOut out;
  std::vector<int32_t> inputs(T), targets(T);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      inputs[b * S + s] = tokens[b * (S + 1) + s];
      targets[b * S + s] = tokens[b * (S + 1) + s + 1];
    }
  }
  const auto& embed = P.at("embed");
  std::vector<double> h(static_cast<size_t>(T * d));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < d; ++j) h[t * d + j] = embed[inputs[t] * d + j];
  }
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    // Attention.
    const auto a = rmsnorm(h, P.at(p + "attn_norm"), T, d, c.norm_eps);
    auto qkv = matmul(a, P.at(p + "w_qkv").data(), T, d, 3 * d);
    for (int64_t t = 0; t < T; ++t) {
      const double pos = static_cast<double>(t % S);
      for (int64_t part = 0; part < 2; ++part) {
        for (int64_t hh = 0; hh < H; ++hh) {
          double* v = qkv.data() + t * 3 * d + part * d + hh * Dh;
          for (int64_t i = 0; i < Dh / 2; ++i) {
            const double ang = pos * std::pow(c.rope_base, -2.0 * i / Dh);
            const double x1 = v[i], x2 = v[i + Dh / 2];
            v[i] = x1 * std::cos(ang) - x2 * std::sin(ang);
            v[i + Dh / 2] = x1 * std::sin(ang) + x2 * std::cos(ang);
          }
        }
      }
    }
    std::vector<double> att(static_cast<size_t>(T * d), 0.0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hh = 0; hh < H; ++hh) {
        for (int64_t i = 0; i < S; ++i) {
          const double* q = qkv.data() + (b * S + i) * 3 * d + hh * Dh;
          std::vector<double> sc(static_cast<size_t>(i + 1));
          double mx = -1e300, sum = 0;
          for (int64_t j = 0; j <= i; ++j) {
            const double* kk = qkv.data() + (b * S + j) * 3 * d + d + hh * Dh;
            double s = 0;
            for (int64_t x = 0; x < Dh; ++x) s += q[x] * kk[x];
            sc[j] = s / std::sqrt(static_cast<double>(Dh));
            mx = std::max(mx, sc[j]);
          }
          for (double& s : sc) sum += (s = std::exp(s - mx));
          for (int64_t j = 0; j <= i; ++j) {
            const double* vv = qkv.data() + (b * S + j) * 3 * d + 2 * d + hh * Dh;
            for (int64_t x = 0; x < Dh; ++x)
              att[(b * S + i) * d + hh * Dh + x] += sc[j] / sum * vv[x];
          }
        }
      }
    }
    const auto proj = matmul(att, P.at(p + "w_o").data(), T, d, d);
    for (size_t i = 0; i < h.size(); ++i) h[i] += proj[i];
    // FFN.
    const auto fn = rmsnorm(h, P.at(p + "ffn_norm"), T, d, c.norm_eps);
    std::vector<double> y(static_cast<size_t>(T * d), 0.0), row(static_cast<size_t>(d));
    const bool is_switch = c.num_experts > 0 && (l + 1) % c.expert_every == 0;
    if (!is_switch) {
      for (int64_t t = 0; t < T; ++t) {
        ffn_row(fn.data() + t * d, P.at(p + "ffn.w_in").data(), P.at(p + "ffn.w_out").data(), d, f,
                y.data() + t * d, &out.signature);
      }
    } else {
      const auto logits = matmul(fn, P.at(p + "ffn.router").data(), T, d, E);
      std::vector<double> probs(static_cast<size_t>(T * E)), P_mean(E, 0.0);
      std::vector<int> choice(static_cast<size_t>(T * k));
      std::vector<int64_t> count(E, 0);
      double zsum = 0;
      for (int64_t t = 0; t < T; ++t) {
        double mx = -1e300, sum = 0;
        for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[t * E + e]);
        for (int64_t e = 0; e < E; ++e) sum += std::exp(logits[t * E + e] - mx);
        const double lse = mx + std::log(sum);
        zsum += lse * lse;
        std::vector<int> order(E);
        std::iota(order.begin(), order.end(), 0);
        for (int64_t e = 0; e < E; ++e) {
          probs[t * E + e] = std::exp(logits[t * E + e] - lse);
          P_mean[e] += probs[t * E + e] / T;
        }
        std::stable_sort(order.begin(), order.end(),
                         [&](int x, int z) { return probs[t * E + x] > probs[t * E + z]; });
        for (int64_t j = 0; j < k; ++j) {
          choice[t * k + j] = order[j];
          out.signature.push_back(order[j]);
          ++count[order[j]];
          if (j + 1 < E) {
            out.min_gap =
                std::min(out.min_gap, probs[t * E + order[j]] - probs[t * E + order[j + 1]]);
          }
        }
      }
      // Capacity (position priority: first choices in token order, then second choices).
      const std::optional<double> cf = training ? c.capacity_factor : c.eval_capacity_factor;
      int64_t C = T;
      if (cf) {
        C = std::min<int64_t>(
            T, std::max<int64_t>(4, static_cast<int64_t>(std::floor(*cf * k * T / E))));
      }
      std::vector<int64_t> fill(E, 0);
      for (int64_t j = 0; j < k; ++j) {
        for (int64_t t = 0; t < T; ++t) {
          const int e = choice[t * k + j];
          const bool kept = fill[e]++ < C;
          out.signature.push_back(kept);
          if (!kept) continue;
          ffn_row(fn.data() + t * d, P.at(p + "ffn.w_in").data() + e * d * f,
                  P.at(p + "ffn.w_out").data() + e * f * d, d, f, row.data(), &out.signature);
          for (int64_t i = 0; i < d; ++i) y[t * d + i] += probs[t * E + e] * row[i];
        }
      }
      double aux = 0;
      for (int64_t e = 0; e < E; ++e) aux += static_cast<double>(count[e]) / (T * k) * P_mean[e];
      out.aux += c.aux_loss_coef * E * aux;
      out.z += c.z_loss_coef * zsum / T;
      out.tokens_per_expert = count;
    }
    for (size_t i = 0; i < h.size(); ++i) h[i] += y[i];
  }
  const auto zf = rmsnorm(h, P.at("final_norm"), T, d, c.norm_eps);
  out.logits.assign(static_cast<size_t>(T * V), 0.0);
  double ce = 0;
  for (int64_t t = 0; t < T; ++t) {
    double mx = -1e300, sum = 0;
    for (int64_t v = 0; v < V; ++v) {
      double s = 0;
      for (int64_t j = 0; j < d; ++j) s += zf[t * d + j] * embed[v * d + j];
      out.logits[t * V + v] = s;
      mx = std::max(mx, s);
    }
    for (int64_t v = 0; v < V; ++v) sum += std::exp(out.logits[t * V + v] - mx);
    ce += mx + std::log(sum) - out.logits[t * V + targets[t]];
  }
  out.ce = ce / loss_tokens;
  out.total = out.ce + out.aux + out.z;
  return out;
}

bool rel_close(double got, double expect, double rtol) {
  return std::fabs(got - expect) <= rtol * std::max(std::fabs(expect), 1e-30);
}

// Copies of every gradient, by name.
std::map<std::string, std::vector<float>> grads_of(SwitchLM& model) {
  std::map<std::string, std::vector<float>> g;
  for (const ParamRef& r : model.parameters()) {
    int64_t n = 1;
    for (int64_t s : r.shape) n *= s;
    g[r.name] = std::vector<float>(r.grad, r.grad + n);
  }
  return g;
}

}  // namespace

TEST(model_parameters_names_shapes_and_flags) {
  const SwitchLMConfig c = tiny_config();
  SwitchLM model(c);
  const int64_t d = c.d_model, f = c.d_ff, E = c.num_experts, V = c.vocab_size;
  struct Expect {
    std::string name;
    std::vector<int64_t> shape;
    bool expert;
  };
  const std::vector<Expect> expect = {
      {"embed", {V, d}, false},
      {"layers.0.attn_norm", {d}, false},
      {"layers.0.w_qkv", {d, 3 * d}, false},
      {"layers.0.w_o", {d, d}, false},
      {"layers.0.ffn_norm", {d}, false},
      {"layers.0.ffn.w_in", {d, f}, false},
      {"layers.0.ffn.w_out", {f, d}, false},
      {"layers.1.attn_norm", {d}, false},
      {"layers.1.w_qkv", {d, 3 * d}, false},
      {"layers.1.w_o", {d, d}, false},
      {"layers.1.ffn_norm", {d}, false},
      {"layers.1.ffn.router", {d, E}, false},
      {"layers.1.ffn.w_in", {E, d, f}, true},
      {"layers.1.ffn.w_out", {E, f, d}, true},
      {"final_norm", {d}, false},
  };
  const auto params = model.parameters();
  CHECK_EQ(params.size(), expect.size());
  int64_t total = 0;
  for (size_t i = 0; i < std::min(params.size(), expect.size()); ++i) {
    const ParamRef& p = params[i];
    CHECK_EQ(p.name, expect[i].name);
    CHECK(p.shape == expect[i].shape);
    CHECK_EQ(p.expert, expect[i].expert);
    CHECK_EQ(p.decay, expect[i].shape.size() >= 2);  // matrices decay; norm weights do not
    CHECK(p.data != nullptr && p.grad != nullptr && p.data != p.grad);
    int64_t n = 1;
    for (int64_t s : expect[i].shape) n *= s;
    total += n;
    if (p.shape.size() == 1) {  // norm weights start at one
      for (int64_t j = 0; j < n; ++j) CHECK_EQ(p.data[j], 1.0f);
    } else {  // initialised, finite, not all zero
      double sq = 0;
      for (int64_t j = 0; j < n; ++j) sq += static_cast<double>(p.data[j]) * p.data[j];
      CHECK(std::isfinite(sq) && sq > 0);
    }
  }
  // Closed form: V d + per layer (2 d + 4 d^2) + dense 2 d f + Switch (d E + 2 E d f) + d.
  CHECK_EQ(total, V * d + 2 * (2 * d + 4 * d * d) + 2 * d * f + (d * E + 2 * E * d * f) + d);
  CHECK_EQ(model.num_parameters(), total);
  CHECK(!model.is_switch_layer(0));
  CHECK(model.is_switch_layer(1));
  // Distinct tensors never alias.
  for (size_t i = 0; i + 1 < params.size(); ++i) CHECK(params[i].data != params[i + 1].data);

  // Every layer a Switch layer; and the dense model has no router and no expert tensors.
  SwitchLMConfig every = c;
  every.expert_every = 1;
  SwitchLM all_switch(every);
  CHECK(all_switch.is_switch_layer(0) && all_switch.is_switch_layer(1));
  int routers = 0;
  for (const ParamRef& p : all_switch.parameters())
    routers += p.name.find("router") != std::string::npos;
  CHECK_EQ(routers, 2);
  SwitchLMConfig dense = c;
  dense.num_experts = 0;
  SwitchLM dense_model(dense);
  CHECK(!dense_model.is_switch_layer(0) && !dense_model.is_switch_layer(1));
  for (const ParamRef& p : dense_model.parameters()) {
    CHECK(!p.expert);
    CHECK(p.name.find("router") == std::string::npos);
  }
  CHECK_EQ(dense_model.num_parameters(), V * d + 2 * (2 * d + 4 * d * d) + 2 * 2 * d * f + d);
}

TEST(model_forward_matches_double_reference) {
  // Dropless (the gradient config), with capacity (training 1.25 / eval 2.0), and dense.
  for (int variant = 0; variant < 3; ++variant) {
    SwitchLMConfig c = tiny_config();
    if (variant == 1) {
      c.capacity_factor = 1.0;
      c.eval_capacity_factor = 2.0;
      c.expert_every = 1;
      c.k = 2;
    }
    if (variant == 2) c.num_experts = 0;
    SwitchLM model(c);
    const auto tokens = random_tokens(kB, kS + 1, c.vocab_size, 7);
    const Params P = params_of(model);
    for (bool training : {false, true}) {
      const LossParts got = model.step(tokens.data(), kB, kS, training, false, kB * kS);
      const RefOut ref = reference(P, c, tokens, kB, kS, training, kB * kS);
      CHECK(ref.min_gap > 1e-4);  // precondition: routing is far from a tie
      CHECK_EQ(got.tokens, kB * kS);
      CHECK(rel_close(got.ce, ref.ce, 1e-6));
      CHECK(rel_close(got.total, ref.total, 1e-6));
      CHECK(std::fabs(got.total - (got.ce + got.aux + got.z)) <= 1e-15 * got.total);
      if (c.num_experts > 0) {
        CHECK(got.aux > 0 && got.z > 0);
        CHECK(rel_close(got.aux, ref.aux, 1e-6));
        CHECK(rel_close(got.z, ref.z, 1e-6));
        const auto stats = model.switch_stats();
        CHECK_EQ(static_cast<int64_t>(stats.size()), variant == 1 ? 2 : 1);
        if (!stats.empty()) CHECK(stats.back().tokens_per_expert == ref.tokens_per_expert);
      } else {
        CHECK_EQ(got.aux, 0.0);
        CHECK_EQ(got.z, 0.0);
        CHECK(model.switch_stats().empty());
      }
      if (variant == 1 && training) {
        // Capacity max(4, floor(1.0 * 2 * 12 / 4)) = 6 in training drops assignments here.
        CHECK(model.switch_stats().back().drop_fraction > 0);
      }
    }
  }
}

TEST(model_logits_match_reference_and_step_ce) {
  const SwitchLMConfig c = tiny_config();
  SwitchLM model(c);
  const int64_t V = c.vocab_size;
  const auto tokens = random_tokens(kB, kS + 1, V, 8);
  std::vector<int32_t> inputs(kB * kS);
  for (int64_t b = 0; b < kB; ++b) {
    std::copy_n(tokens.begin() + b * (kS + 1), kS, inputs.begin() + b * kS);
  }
  std::vector<float> logits(kB * kS * V, -7.0f);
  model.logits(inputs.data(), kB, kS, logits.data());
  const RefOut ref = reference(params_of(model), c, tokens, kB, kS, false, kB * kS);
  double max_ref = 0, max_err = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(ref.logits[i]));
    max_err = std::max(max_err, std::fabs(logits[i] - ref.logits[i]));
  }
  CHECK(max_err <= 1e-5 * max_ref);
  // step()'s CE is the mean CE of these logits, computed here in double.
  double ce = 0;
  for (int64_t t = 0; t < kB * kS; ++t) {
    const float* row = logits.data() + t * V;
    double mx = -1e300, sum = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, static_cast<double>(row[v]));
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - mx);
    const int32_t target = tokens[(t / kS) * (kS + 1) + t % kS + 1];
    ce += mx + std::log(sum) - row[target];
  }
  ce /= kB * kS;
  const LossParts loss = model.step(tokens.data(), kB, kS, false, false, kB * kS);
  CHECK(rel_close(loss.ce, ce, 1e-6));
  // Parameters are live: a zero final norm makes every logit 0, so the CE is ln V exactly.
  for (const ParamRef& p : model.parameters()) {
    if (p.name == "final_norm") std::fill(p.data, p.data + c.d_model, 0.0f);
  }
  model.logits(inputs.data(), kB, kS, logits.data());
  CHECK(std::all_of(logits.begin(), logits.end(), [](float x) { return x == 0.0f; }));
  CHECK(rel_close(model.step(tokens.data(), kB, kS, false, false, kB * kS).ce,
                  std::log(static_cast<double>(V)), 1e-12));
}

TEST(model_logits_are_causal) {
  // Dense (no capacity coupling between tokens): a position's logits depend on earlier tokens
  // only, bit for bit; a later change does reach later positions.
  SwitchLMConfig c = tiny_config();
  c.num_experts = 0;
  SwitchLM model(c);
  const int64_t S = 12, V = c.vocab_size;
  auto tokens = random_tokens(1, S, V, 15);
  std::vector<float> a(S * V), b(S * V);
  model.logits(tokens.data(), 1, S, a.data());
  for (int64_t s = 7; s < S; ++s) tokens[s] = (tokens[s] + 1) % V;
  model.logits(tokens.data(), 1, S, b.data());
  CHECK(std::memcmp(a.data(), b.data(), 7 * V * sizeof(float)) == 0);
  CHECK(std::memcmp(a.data() + 7 * V, b.data() + 7 * V, V * sizeof(float)) != 0);
}

TEST(model_gradients_match_reference_finite_differences) {
  // Every gradient tensor against central differences of the double reference (h = 1e-5):
  // a sample of coordinates per tensor plus its largest-gradient one; coordinates whose
  // perturbation changes a routing decision or a relu's on/off pattern are skipped.
  for (int variant = 0; variant < 2; ++variant) {
    SwitchLMConfig c = tiny_config();
    if (variant == 1) {  // both layers Switch, top-2, another RoPE base and RMSNorm eps
      c.expert_every = 1;
      c.k = 2;
      c.rope_base = 100.0;
      c.norm_eps = 1e-3;
      c.seed = 3;
    }
    SwitchLM model(c);
    const auto tokens = random_tokens(kB, kS + 1, c.vocab_size, 9);
    const int64_t loss_tokens = 3 * kB * kS;  // a global count: scales the CE part only
    const LossParts loss = model.step(tokens.data(), kB, kS, true, true, loss_tokens);
    const Params base = params_of(model);
    const RefOut ref0 = reference(base, c, tokens, kB, kS, true, loss_tokens);
    CHECK(ref0.min_gap > 1e-4);
    CHECK(rel_close(loss.total, ref0.total, 1e-6));
    const auto grads = grads_of(model);
    std::mt19937 gen(5);
    int checked = 0, skipped = 0, failed = 0;
    for (const auto& [name, g] : grads) {
      double scale = 0;
      size_t argmax = 0;
      for (size_t i = 0; i < g.size(); ++i) {
        if (std::fabs(g[i]) > scale) scale = std::fabs(g[i]), argmax = i;
      }
      if (!(scale > 0)) {
        std::printf("  %s: gradient is all zero\n", name.c_str());
        ++failed;
        continue;
      }
      std::vector<size_t> idx = {argmax};
      for (int s = 0; s < 6; ++s) idx.push_back(gen() % g.size());
      for (size_t i : idx) {
        const double h = 1e-5;
        Params p = base;
        p[name][i] += h;
        const RefOut up = reference(p, c, tokens, kB, kS, true, loss_tokens);
        p[name][i] -= 2 * h;
        const RefOut down = reference(p, c, tokens, kB, kS, true, loss_tokens);
        if (up.signature != ref0.signature || down.signature != ref0.signature) {
          ++skipped;
          continue;
        }
        ++checked;
        const double fd = (up.total - down.total) / (2 * h);
        if (std::fabs(g[i] - fd) > 1e-4 * scale + 1e-3 * std::fabs(fd)) {
          std::printf("  %s[%zu]: analytic %.8g numeric %.8g (max |g| %.3g)\n", name.c_str(), i,
                      g[i], fd, scale);
          ++failed;
        }
      }
    }
    CHECK_EQ(failed, 0);
    CHECK(skipped <= (checked + skipped) / 5);
    CHECK(checked >= 5 * static_cast<int>(grads.size()));
  }
}

TEST(model_gradients_match_float32_finite_differences) {
  // The float32 model's own loss, differentiated numerically (h = 1e-3, the actual float32
  // step used as the denominator) on the largest-gradient coordinates of every tensor: the
  // loss is only float32-accurate, hence the looser tolerance. The reference's signature
  // tells when a perturbation changes the routing.
  const SwitchLMConfig c = tiny_config();
  SwitchLM model(c);
  const auto tokens = random_tokens(kB, kS + 1, c.vocab_size, 10);
  model.step(tokens.data(), kB, kS, true, true, kB * kS);
  const auto grads = grads_of(model);
  const Params base = params_of(model);
  const auto sig0 = reference(base, c, tokens, kB, kS, true, kB * kS).signature;
  int checked = 0, failed = 0;
  for (const ParamRef& p : model.parameters()) {
    const auto& g = grads.at(p.name);
    std::vector<size_t> order(g.size());
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + 2, order.end(),
                      [&](size_t a, size_t b) { return std::fabs(g[a]) > std::fabs(g[b]); });
    for (size_t n = 0; n < 2; ++n) {
      const size_t i = order[n];
      const float old = p.data[i];
      double values[2], steps[2];
      bool routing_changed = false;
      for (int s = 0; s < 2; ++s) {
        p.data[i] = old + (s == 0 ? 1e-3f : -1e-3f);
        steps[s] = static_cast<double>(p.data[i]) - old;
        Params q = base;
        q[p.name][i] = p.data[i];
        routing_changed |= reference(q, c, tokens, kB, kS, true, kB * kS).signature != sig0;
        values[s] = model.step(tokens.data(), kB, kS, true, false, kB * kS).total;
      }
      p.data[i] = old;
      if (routing_changed) continue;
      const double fd = (values[0] - values[1]) / (steps[0] - steps[1]);
      ++checked;
      if (std::fabs(g[i] - fd) > 2e-2 * std::fabs(g[i]) + 3e-4) {
        std::printf("  %s[%zu]: analytic %.6g numeric %.6g\n", p.name.c_str(), i, g[i], fd);
        ++failed;
      }
    }
  }
  CHECK_EQ(failed, 0);
  CHECK(checked >= 24);  // of 30
}

TEST(model_bfloat16_close_to_float32) {
  // Same seed, same float32 master weights: bf16 compute changes the loss by bf16 rounding
  // only, and every gradient points the same way (cosine similarity > 0.99).
  SwitchLMConfig c = tiny_config();
  SwitchLM m32(c);
  c.dtype = DType::bfloat16;
  SwitchLM m16(c);
  const auto tokens = random_tokens(kB, kS + 1, c.vocab_size, 16);
  const LossParts l32 = m32.step(tokens.data(), kB, kS, true, true, kB * kS);
  const LossParts l16 = m16.step(tokens.data(), kB, kS, true, true, kB * kS);
  CHECK(rel_close(l16.total, l32.total, 5e-3));
  CHECK(l16.total != l32.total);
  const auto g32 = grads_of(m32), g16 = grads_of(m16);
  for (const auto& [name, a] : g32) {
    const auto& b = g16.at(name);
    double ab = 0, aa = 0, bb = 0;
    for (size_t i = 0; i < a.size(); ++i) {
      ab += static_cast<double>(a[i]) * b[i];
      aa += static_cast<double>(a[i]) * a[i];
      bb += static_cast<double>(b[i]) * b[i];
    }
    const double cosine = ab / std::sqrt(aa * bb);
    if (!(cosine > 0.99)) std::printf("  %s: cosine %.5f\n", name.c_str(), cosine);
    CHECK(cosine > 0.99);
  }
}

TEST(model_loss_tokens_scales_dense_gradients_exactly) {
  // Dense: only the CE depends on loss_tokens; doubling it halves the CE and every gradient
  // exactly (a power-of-two scale through linear backward ops).
  SwitchLMConfig c = tiny_config();
  c.num_experts = 0;
  SwitchLM model(c);
  const auto tokens = random_tokens(kB, kS + 1, c.vocab_size, 11);
  const LossParts a = model.step(tokens.data(), kB, kS, true, true, kB * kS);
  const auto ga = grads_of(model);
  const LossParts b = model.step(tokens.data(), kB, kS, true, true, 2 * kB * kS);
  const auto gb = grads_of(model);
  CHECK_EQ(b.ce, a.ce / 2);
  for (const auto& [name, g] : ga) {
    for (size_t i = 0; i < g.size(); ++i) CHECK_EQ(gb.at(name)[i], g[i] * 0.5f);
  }
}

TEST(model_loss_decreases_with_adamw_on_a_repeating_sequence) {
  SwitchLMConfig c = tiny_config();
  c.capacity_factor = 1.25;  // the defaults: capacity and jitter in training
  c.eval_capacity_factor = 2.0;
  c.jitter_eps = 1e-2;
  c.aux_loss_coef = 1e-2;
  c.z_loss_coef = 1e-3;
  c.init_scale = 0.1;
  SwitchLM model(c);
  // Period 5: the next token is a function of the current one.
  const int32_t pattern[5] = {3, 11, 7, 0, 14};
  const int64_t B = 4, S = 15;
  std::vector<int32_t> tokens(B * (S + 1));
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s <= S; ++s) tokens[b * (S + 1) + s] = pattern[(b + s) % 5];
  }
  auto params = model.parameters();
  std::vector<std::vector<float>> m, v;
  for (const ParamRef& p : params) {
    int64_t n = 1;
    for (int64_t s : p.shape) n *= s;
    m.emplace_back(n, 0.0f);
    v.emplace_back(n, 0.0f);
  }
  const double initial = model.step(tokens.data(), B, S, false, false, B * S).ce;
  // A near-uniform start: about ln 16 (small logits; the tied head favours the input token).
  CHECK(initial > 0.8 * std::log(16.0) && initial < 1.25 * std::log(16.0));
  std::vector<double> history;
  for (int64_t step = 1; step <= 25; ++step) {
    const LossParts loss = model.step(tokens.data(), B, S, true, true, B * S);
    CHECK(std::isfinite(loss.total));
    history.push_back(loss.ce);
    for (size_t i = 0; i < params.size(); ++i) {
      int64_t n = static_cast<int64_t>(m[i].size());
      optim::adamw_step(params[i].data, params[i].grad, m[i].data(), v[i].data(), n, step, 3e-2,
                        optim::AdamWOptions{}, params[i].decay);
    }
  }
  const double final_ce = model.step(tokens.data(), B, S, false, false, B * S).ce;
  std::printf("  ce: initial %.4f, after 25 steps %.4f\n", initial, final_ce);
  CHECK(final_ce < 0.25 * initial);
  CHECK(history.back() < history.front());
  CHECK(std::accumulate(history.end() - 5, history.end(), 0.0) <
        0.5 * std::accumulate(history.begin(), history.begin() + 5, 0.0));
}

TEST(model_same_seed_is_bitwise_deterministic) {
  SwitchLMConfig c = tiny_config();
  c.capacity_factor = 1.25;
  c.jitter_eps = 0.1;  // the random state is exercised too
  const auto tokens = random_tokens(kB, kS + 1, c.vocab_size, 12);
  const int saved = get_num_threads();
  std::vector<std::vector<double>> losses;
  std::vector<std::vector<float>> finals;
  for (int run = 0; run < 3; ++run) {
    set_num_threads(run == 2 ? 3 : 1);  // the third run: another thread count
    SwitchLM model(c);
    auto params = model.parameters();
    std::vector<double> l;
    for (int64_t step = 1; step <= 3; ++step) {
      const LossParts loss = model.step(tokens.data(), kB, kS, true, true, kB * kS);
      l.insert(l.end(), {loss.ce, loss.aux, loss.z, loss.total});
      for (const ParamRef& p : params) {
        int64_t n = 1;
        for (int64_t s : p.shape) n *= s;
        std::vector<float> m(n, 0.0f), v(n, 0.0f);
        optim::adamw_step(p.data, p.grad, m.data(), v.data(), n, 1, 1e-2, optim::AdamWOptions{},
                          p.decay);
      }
    }
    std::vector<float> all;
    for (const ParamRef& p : params) {
      int64_t n = 1;
      for (int64_t s : p.shape) n *= s;
      all.insert(all.end(), p.data, p.data + n);
      all.insert(all.end(), p.grad, p.grad + n);
    }
    losses.push_back(l);
    finals.push_back(all);
  }
  set_num_threads(saved);
  CHECK(losses[0] == losses[1]);
  CHECK(finals[0] == finals[1]);
  CHECK(losses[0] == losses[2]);
  CHECK(finals[0] == finals[2]);
  // Another seed: other parameters.
  SwitchLMConfig other = c;
  other.seed = 2;
  SwitchLM a(c), b(other);
  CHECK(std::memcmp(a.parameters()[0].data, b.parameters()[0].data,
                    c.vocab_size * c.d_model * sizeof(float)) != 0);
}

TEST(model_set_training_steps_replays_the_random_state) {
  SwitchLMConfig c = tiny_config();
  c.capacity_factor = 1.25;
  c.jitter_eps = 0.1;
  SwitchLM model(c);
  const auto tokens = random_tokens(kB, kS + 1, c.vocab_size, 13);
  CHECK_EQ(model.training_steps(), 0u);
  const double eval0 = model.step(tokens.data(), kB, kS, false, false, kB * kS).total;
  CHECK_EQ(model.training_steps(), 0u);  // eval forwards draw nothing
  const double a = model.step(tokens.data(), kB, kS, true, false, kB * kS).total;
  const double b = model.step(tokens.data(), kB, kS, true, true, kB * kS).total;
  CHECK_EQ(model.training_steps(), 2u);
  CHECK(a != b);  // jitter draws differ between training forwards
  CHECK(a != eval0);
  std::vector<float> logits(kB * kS * c.vocab_size);
  std::vector<int32_t> inputs(tokens.begin(), tokens.begin() + kS);
  model.logits(inputs.data(), 1, kS, logits.data());
  CHECK_EQ(model.training_steps(), 2u);
  model.set_training_steps(0);
  CHECK_EQ(model.training_steps(), 0u);
  CHECK_EQ(model.step(tokens.data(), kB, kS, true, false, kB * kS).total, a);
  CHECK_EQ(model.step(tokens.data(), kB, kS, true, false, kB * kS).total, b);
  model.set_training_steps(1);
  CHECK_EQ(model.step(tokens.data(), kB, kS, true, false, kB * kS).total, b);
  CHECK_EQ(model.training_steps(), 2u);
  // A fresh model moved to step 1 draws what the first model drew at step 1.
  SwitchLM fresh(c);
  fresh.set_training_steps(1);
  CHECK_EQ(fresh.step(tokens.data(), kB, kS, true, false, kB * kS).total, b);
  // Eval is unaffected by the state.
  CHECK_EQ(model.step(tokens.data(), kB, kS, false, false, kB * kS).total, eval0);
}

TEST(model_step_and_logits_reject_bad_inputs) {
  const SwitchLMConfig c = tiny_config();
  SwitchLM model(c);
  auto tokens = random_tokens(kB, kS + 1, c.vocab_size, 14);
  std::vector<float> logits(kB * kS * c.vocab_size);
  tokens[kS + 1] = 16;  // row 1, position 0: an input
  CHECK_THROWS(InvalidArgument, model.step(tokens.data(), kB, kS, true, true, kB * kS),
               "token 16 (row 1, position 0) is outside the vocabulary [0, 16)");
  tokens[kS + 1] = 0;
  tokens[kS] = -1;  // row 0, last position: a target only
  CHECK_THROWS(InvalidArgument, model.step(tokens.data(), kB, kS, true, false, kB * kS),
               "token -1 (row 0, position 6)");
  CHECK_EQ(model.training_steps(), 0u);  // rejected calls do not advance the random state
  tokens[kS] = 0;
  CHECK_THROWS(InvalidArgument, model.step(tokens.data(), 0, kS, false, false, 1), "B=0");
  CHECK_THROWS(InvalidArgument, model.step(tokens.data(), kB, 0, false, false, 1), "S=0");
  CHECK_THROWS(InvalidArgument, model.step(tokens.data(), kB, kS, false, true, 0),
               "loss_tokens must be >= 1, got 0");
  std::vector<int32_t> bad_inputs(kS, 3);
  bad_inputs[2] = 99;
  CHECK_THROWS(InvalidArgument, model.logits(bad_inputs.data(), 1, kS, logits.data()),
               "outside the vocabulary");
  CHECK_THROWS(InvalidArgument, model.logits(bad_inputs.data(), 1, 0, logits.data()), "S=0");
  CHECK_EQ(model.training_steps(), 0u);
  // The model still works after rejected calls.
  CHECK(std::isfinite(model.step(tokens.data(), kB, kS, true, true, kB * kS).total));
}

TEST(model_constructor_rejects_bad_configs) {
  struct Bad {
    void (*change)(SwitchLMConfig&);
    const char* fragment;
  };
  const Bad cases[] = {
      {[](SwitchLMConfig& c) { c.d_model = 18, c.num_heads = 4; }, "d_model=18 and num_heads=4"},
      {[](SwitchLMConfig& c) { c.d_model = 6, c.num_heads = 2; }, "heads of even size"},
      {[](SwitchLMConfig& c) { c.num_heads = 0; }, "num_heads"},
      {[](SwitchLMConfig& c) { c.num_layers = 0; }, "num_layers"},
      {[](SwitchLMConfig& c) { c.d_ff = 0; }, "d_ff"},
      {[](SwitchLMConfig& c) { c.vocab_size = 1; }, "vocab_size"},
      {[](SwitchLMConfig& c) { c.num_experts = -1; }, "num_experts must be >= 0"},
      {[](SwitchLMConfig& c) { c.expert_every = 0; }, "expert_every must be >= 1, got 0"},
      {[](SwitchLMConfig& c) { c.expert_every = 3; }, "expert_every=3"},
      {[](SwitchLMConfig& c) { c.k = 0; }, "k must be in [1, num_experts=4], got 0"},
      {[](SwitchLMConfig& c) { c.k = 5; }, "k must be in [1, num_experts=4], got 5"},
      {[](SwitchLMConfig& c) { c.capacity_factor = 0.0; }, "capacity_factor"},
      {[](SwitchLMConfig& c) { c.capacity_factor = -1.0; }, "capacity_factor"},
      {[](SwitchLMConfig& c) { c.eval_capacity_factor = std::nan(""); }, "eval_capacity_factor"},
      {[](SwitchLMConfig& c) { c.jitter_eps = -0.1; }, "jitter_eps"},
      {[](SwitchLMConfig& c) { c.jitter_eps = 1.0; }, "jitter_eps"},
      {[](SwitchLMConfig& c) { c.init_scale = 0.0; }, "init_scale"},
      {[](SwitchLMConfig& c) { c.rope_base = 0.0; }, "rope_base"},
      {[](SwitchLMConfig& c) { c.rope_base = std::nan(""); }, "rope_base"},
      {[](SwitchLMConfig& c) { c.norm_eps = -1.0; }, "norm_eps"},
      {[](SwitchLMConfig& c) { c.aux_loss_coef = -1.0; }, "aux_loss_coef"},
      {[](SwitchLMConfig& c) { c.z_loss_coef = std::nan(""); }, "z_loss_coef"},
  };
  for (const Bad& bad : cases) {
    SwitchLMConfig c = tiny_config();
    bad.change(c);
    CHECK_THROWS(InvalidArgument, SwitchLM model(c), bad.fragment);
  }
  // The dense model has no Switch layer, whatever expert_every says.
  SwitchLMConfig dense = tiny_config();
  dense.num_experts = 0;
  dense.expert_every = 3;
  SwitchLM ok(dense);
  CHECK(!ok.is_switch_layer(2));
  // Experts are sharded over the communicator's ranks: 4 experts do not split over 3.
  comm::LocalGroup group(3);
  CHECK_THROWS(InvalidArgument, SwitchLM model(tiny_config(), &group.comm(0)),
               "num_experts=4 must be divisible by the number of ranks 3");
}

TEST(model_trainer_refreshes_the_bf16_copy_in_its_update) {
  // bf16: the Trainer's update writes the FFN matrices' bf16 copy in the same pass as the
  // masters, so the next forward rounds nothing, and gives the bits of a fresh model holding
  // the same masters (whose forward rounds them).
  for (const char* optimizer : {"adamw", "adafactor"}) {
    for (int64_t experts : {4, 0}) {
      SwitchLMConfig c = tiny_config();
      c.num_experts = experts;
      c.dtype = DType::bfloat16;
      SwitchLM model(c);
      TrainerOptions o;
      o.optimizer = optimizer;
      o.warmup_steps = 0;
      o.peak_lr = 1e-2;
      Trainer trainer(model, o);
      const int64_t B = 2, S = 8;
      std::vector<int32_t> tokens(B * (S + 1));
      for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<int32_t>((i * 7) % 16);
      for (int64_t step = 0; step < 2; ++step) {
        CHECK(trainer.step(tokens.data(), B, S, step, 5, B * S).updated);
      }
      const int64_t refreshes = model.copy_refreshes();
      const int64_t V = c.vocab_size;
      std::vector<float> logits(B * S * V), expect(B * S * V);
      model.logits(tokens.data(), B, S, logits.data());
      CHECK_EQ(model.copy_refreshes(), refreshes);  // the optimizer's copy was used as is
      SwitchLMConfig c2 = c;
      c2.seed = c.seed + 1;
      SwitchLM fresh(c2);
      std::vector<ParamRef> from = model.parameters(), to = fresh.parameters();
      for (size_t i = 0; i < from.size(); ++i) {
        int64_t n = 1;
        for (int64_t s : from[i].shape) n *= s;
        std::memcpy(to[i].data, from[i].data, static_cast<size_t>(n) * sizeof(float));
      }
      fresh.logits(tokens.data(), B, S, expect.data());
      CHECK(std::memcmp(logits.data(), expect.data(), logits.size() * sizeof(float)) == 0);
    }
  }
}
