// Switch FFN layer tests (moe/switch_layer.hpp): SwitchFFN and DenseFFN forward against a plain
// double-precision layer written here from SPEC sections 1-2 (top-k routing, capacity with
// position priority, groups, gates, aux and z losses), backward against central finite
// differences of that reference, bfloat16 compute, statistics, and bad arguments.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "harness.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/comm/local.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/moe/switch_layer.hpp"
#include "test_data.hpp"

using namespace pyswitch;
using namespace pyswitch::moe;

namespace {

double gelu_ref(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

// The layer's parameters in double.
struct LayerParams {
  std::vector<double> x, router, w_in, w_out, b_in, b_out;  // b_*: empty without bias
};

struct Setup {
  int64_t T, d, f, E;
  RouteOptions route;
  std::optional<double> cf;  // the capacity factor of the mode under test
  Activation act;
  double aux_coef, z_coef;
};

struct RefOut {
  std::vector<double> y;
  double aux = 0, z = 0;       // scaled
  double loss = 0;             // sum(dy * y) + aux + z
  std::vector<int> expert;     // (T, k)
  std::vector<int> kept;       // (T, k)
  std::vector<int> signature;  // expert, kept, relu patterns
  std::vector<int64_t> counts;
  double min_gap = 1e9;
  double entropy = 0;  // mean over tokens
};

std::vector<double> expert_ffn(const LayerParams& p, const Setup& s, int e, const double* x,
                               std::vector<int>* sig) {
  const int64_t d = s.d, f = s.f;
  std::vector<double> h(static_cast<size_t>(f)), y(static_cast<size_t>(d));
  for (int64_t j = 0; j < f; ++j) {
    double a = p.b_in.empty() ? 0.0 : p.b_in[e * f + j];
    for (int64_t i = 0; i < d; ++i) a += x[i] * p.w_in[(e * d + i) * f + j];
    if (s.act == Activation::relu) {
      sig->push_back(a > 0);
      h[j] = a > 0 ? a : 0;
    } else {
      h[j] = gelu_ref(a);
    }
  }
  for (int64_t i = 0; i < d; ++i) {
    double v = p.b_out.empty() ? 0.0 : p.b_out[e * d + i];
    for (int64_t j = 0; j < f; ++j) v += h[j] * p.w_out[(e * f + j) * d + i];
    y[i] = v;
  }
  return y;
}

RefOut reference(const LayerParams& p, const Setup& s, const std::vector<float>& dy) {
  const int64_t T = s.T, d = s.d, E = s.E, k = s.route.k;
  const int64_t G = s.route.group_size > 0 ? s.route.group_size : T;
  RefOut out;
  out.y.assign(static_cast<size_t>(T * d), 0.0);
  out.expert.resize(static_cast<size_t>(T * k));
  out.kept.resize(static_cast<size_t>(T * k));
  out.counts.assign(E, 0);
  std::vector<double> probs(static_cast<size_t>(T * E)), gates(static_cast<size_t>(T * k));
  double zsum = 0;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> logit(E, 0.0);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t i = 0; i < d; ++i) logit[e] += p.x[t * d + i] * p.router[i * E + e];
    }
    const double mx = *std::max_element(logit.begin(), logit.end());
    double sum = 0;
    for (double l : logit) sum += std::exp(l - mx);
    const double lse = mx + std::log(sum);
    zsum += lse * lse;
    for (int64_t e = 0; e < E; ++e) {
      probs[t * E + e] = std::exp(logit[e] - lse);
      if (probs[t * E + e] > 0) out.entropy -= probs[t * E + e] * std::log(probs[t * E + e]) / T;
    }
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return probs[t * E + a] > probs[t * E + b]; });
    double gsum = 0;
    for (int64_t j = 0; j < k; ++j) gsum += probs[t * E + order[j]];
    for (int64_t j = 0; j < k; ++j) {
      out.expert[t * k + j] = order[j];
      out.signature.push_back(order[j]);
      ++out.counts[order[j]];
      gates[t * k + j] = probs[t * E + order[j]] / (s.route.normalize_gates ? gsum : 1.0);
      if (j + 1 < E) {
        out.min_gap = std::min(out.min_gap, probs[t * E + order[j]] - probs[t * E + order[j + 1]]);
      }
    }
  }
  // Per group: capacity, position priority (first choices in token order, then second ...),
  // and E * sum_i f_i P_i.
  double aux_sum = 0;
  for (int64_t g0 = 0; g0 < T; g0 += G) {
    int64_t C = G;
    if (s.cf) {
      C = std::min<int64_t>(G,
                            std::max<int64_t>(s.route.min_capacity,
                                              static_cast<int64_t>(std::floor(*s.cf * k * G / E))));
    }
    std::vector<int64_t> fill(E, 0);
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t t = g0; t < g0 + G; ++t) {
        const int e = out.expert[t * k + j];
        const bool kept = fill[e]++ < C;
        out.kept[t * k + j] = kept;
        out.signature.push_back(kept);
        if (!kept) continue;
        const auto ye = expert_ffn(p, s, e, p.x.data() + t * d, &out.signature);
        for (int64_t i = 0; i < d; ++i) out.y[t * d + i] += gates[t * k + j] * ye[i];
      }
    }
    double aux = 0;
    for (int64_t e = 0; e < E; ++e) {
      double P = 0;
      for (int64_t t = g0; t < g0 + G; ++t) P += probs[t * E + e] / G;
      aux += static_cast<double>(fill[e]) / (G * k) * P;  // fill[e]: assignments before capacity
    }
    aux_sum += E * aux;
  }
  out.aux = s.aux_coef * aux_sum / (T / G);
  out.z = s.z_coef * zsum / T;
  out.loss = out.aux + out.z;
  for (int64_t i = 0; i < T * d; ++i) out.loss += out.y[i] * dy[i];
  return out;
}

// Central differences of the reference's loss on a sample of `param` (plus its argmax), against
// `grad`; perturbations that change the signature are skipped. Returns {checked, failed}.
std::pair<int, int> check_grad(const char* name, LayerParams& p, std::vector<double>& param,
                               const float* grad, const Setup& s, const std::vector<float>& dy,
                               const std::vector<int>& sig0, double scale_tol) {
  int checked = 0, failed = 0;
  double scale = 0;
  size_t argmax = 0;
  for (size_t i = 0; i < param.size(); ++i) {
    if (std::fabs(grad[i]) > scale) scale = std::fabs(grad[i]), argmax = i;
  }
  std::vector<size_t> idx = {argmax};
  for (size_t i = 0; i < param.size(); i += 1 + param.size() / 12) idx.push_back(i);
  for (size_t i : idx) {
    const double saved = param[i], h = 1e-6;
    param[i] = saved + h;
    const RefOut up = reference(p, s, dy);
    param[i] = saved - h;
    const RefOut down = reference(p, s, dy);
    param[i] = saved;
    if (up.signature != sig0 || down.signature != sig0) continue;
    ++checked;
    const double fd = (up.loss - down.loss) / (2 * h);
    if (std::fabs(fd - grad[i]) > scale_tol * scale + 1e-4 * std::fabs(fd) + 1e-6) {
      std::printf("  %s[%zu]: numeric %.8f analytic %.8f\n", name, i, fd, grad[i]);
      ++failed;
    }
  }
  return {checked, failed};
}

}  // namespace

TEST(switch_layer_forward_backward_match_reference) {
  struct Variant {
    int64_t k;
    std::optional<double> cf;
    int64_t min_capacity, group_size;
    bool normalize, bias, training;
    Activation act;
  };
  const Variant variants[] = {
      // Switch top-1, capacity 1.0 (tokens dropped), training mode, relu.
      {1, 1.0, 1, 0, false, false, true, Activation::relu},
      // Top-2 dropless, eval mode, gelu with biases.
      {2, std::nullopt, 4, 0, false, true, false, Activation::gelu},
      // Two groups of 10, top-2 with normalized gates, capacity 1.0 per group.
      {2, 1.0, 1, 10, true, false, true, Activation::relu},
  };
  int total_checked = 0;
  for (const Variant& v : variants) {
    Setup s{20, 6, 8, 4, {}, v.cf, v.act, 0.3, 0.2};
    s.route.k = v.k;
    s.route.min_capacity = v.min_capacity;
    s.route.group_size = v.group_size;
    s.route.normalize_gates = v.normalize;
    SwitchFFNOptions o;
    o.router.route = s.route;
    o.router.route.capacity_factor = v.training ? v.cf : 9.0;  // the other mode's factor differs
    o.router.eval_capacity_factor = v.training ? std::optional<double>(9.0) : v.cf;
    o.router.jitter_eps = 0.0;
    o.router.init_scale = 2.0;  // decisive routing
    o.router.seed = 7;
    o.activation = v.act;
    o.use_bias = v.bias;
    o.aux_loss_coef = s.aux_coef;
    o.z_loss_coef = s.z_coef;
    SwitchFFN layer(s.d, s.f, s.E, o);
    CHECK_EQ(layer.num_experts(), s.E);
    CHECK_EQ(layer.local_experts(), s.E);
    CHECK(!layer.has_forward());
    ExpertWeights& w = layer.weights();
    const int64_t nin = s.E * s.d * s.f;
    if (v.bias) {  // random biases, so that they matter
      const auto bi = normal_vector(s.E * s.f, 1, 0.3f), bo = normal_vector(s.E * s.d, 2, 0.3f);
      std::copy(bi.begin(), bi.end(), w.b_in());
      std::copy(bo.begin(), bo.end(), w.b_out());
    }
    const auto x = normal_vector(s.T * s.d, 3), dy = normal_vector(s.T * s.d, 4);
    LayerParams p;
    p.x.assign(x.begin(), x.end());
    p.router.assign(layer.router_weight(), layer.router_weight() + s.d * s.E);
    p.w_in.assign(w.w_in(), w.w_in() + nin);
    p.w_out.assign(w.w_out(), w.w_out() + nin);
    if (v.bias) {
      p.b_in.assign(w.b_in(), w.b_in() + s.E * s.f);
      p.b_out.assign(w.b_out(), w.b_out() + s.E * s.d);
    }
    const RefOut ref = reference(p, s, dy);
    CHECK(ref.min_gap > 1e-4);  // precondition: no routing decision near a tie

    std::vector<float> y(s.T * s.d, 5.0f);
    layer.forward(x.data(), DType::float32, s.T, v.training, y.data());
    CHECK(layer.has_forward());
    CHECK_EQ(layer.forward_tokens(), s.T);
    double err = 0, ymax = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      err = std::max(err, std::fabs(y[i] - ref.y[i]));
      ymax = std::max(ymax, std::fabs(ref.y[i]));
    }
    CHECK(err <= 1e-5 * (1 + ymax));
    const RoutingPlan& plan = layer.plan();
    int dropped = 0;
    for (int64_t i = 0; i < s.T * v.k; ++i) {
      CHECK_EQ(plan.expert_index[i], ref.expert[i]);
      CHECK_EQ(plan.slot[i] >= 0, ref.kept[i] == 1);
      dropped += ref.kept[i] == 0;
    }
    if (v.cf) CHECK(dropped > 0);  // the capacity case drops assignments
    // Dropped tokens (all k dropped) have exactly zero output.
    for (int64_t t = 0; t < s.T; ++t) {
      bool any = false;
      for (int64_t j = 0; j < v.k; ++j) any |= ref.kept[t * v.k + j] == 1;
      if (!any) {
        for (int64_t i = 0; i < s.d; ++i) CHECK_EQ(y[t * s.d + i], 0.0f);
      }
    }
    CHECK(std::fabs(layer.aux_loss() - ref.aux) <= 1e-6 * ref.aux);
    CHECK(std::fabs(layer.z_loss() - ref.z) <= 1e-6 * ref.z);
    const SwitchStats st = layer.stats();
    CHECK(st.tokens_per_expert == ref.counts);
    CHECK(std::fabs(st.drop_fraction - static_cast<double>(dropped) / (s.T * v.k)) <= 1e-12);
    CHECK(std::fabs(st.router_entropy - ref.entropy) <= 1e-5 * ref.entropy);

    // Backward: d/d(everything) of sum(dy * y) + aux + z.
    std::vector<float> dx(s.T * s.d, 5.0f);
    layer.backward(dy.data(), dx.data());
    int checked = 0, failed = 0;
    auto add = [&](std::pair<int, int> r) {
      checked += r.first;
      failed += r.second;
    };
    add(check_grad("x", p, p.x, dx.data(), s, dy, ref.signature, 1e-4));
    add(check_grad("router", p, p.router, layer.router_weight_grad(), s, dy, ref.signature, 1e-4));
    add(check_grad("w_in", p, p.w_in, w.w_in_grad(), s, dy, ref.signature, 1e-4));
    add(check_grad("w_out", p, p.w_out, w.w_out_grad(), s, dy, ref.signature, 1e-4));
    if (v.bias) {
      add(check_grad("b_in", p, p.b_in, w.b_in_grad(), s, dy, ref.signature, 1e-4));
      add(check_grad("b_out", p, p.b_out, w.b_out_grad(), s, dy, ref.signature, 1e-4));
    }
    CHECK_EQ(failed, 0);
    CHECK(checked >= 40);
    total_checked += checked;
  }
  CHECK(total_checked >= 150);
}

TEST(switch_layer_bfloat16_compute_close_to_float32_reference) {
  // bf16 compute on float32 and bf16 activations: within bf16 rounding of the reference.
  Setup s{16, 8, 12, 4, {}, std::nullopt, Activation::relu, 0.01, 0.001};
  SwitchFFNOptions o;
  o.router.route.capacity_factor = std::nullopt;
  o.router.eval_capacity_factor = std::nullopt;
  o.router.init_scale = 2.0;
  o.dtype = DType::bfloat16;
  SwitchFFN layer(s.d, s.f, s.E, o);
  const auto x = normal_vector(s.T * s.d, 5);
  LayerParams p;
  p.x.assign(x.begin(), x.end());
  p.router.assign(layer.router_weight(), layer.router_weight() + s.d * s.E);
  p.w_in.assign(layer.weights().w_in(), layer.weights().w_in() + s.E * s.d * s.f);
  p.w_out.assign(layer.weights().w_out(), layer.weights().w_out() + s.E * s.d * s.f);
  const std::vector<float> zero_dy(s.T * s.d, 0.0f);
  const RefOut ref = reference(p, s, zero_dy);
  double ymax = 0;
  for (double v : ref.y) ymax = std::max(ymax, std::fabs(v));
  std::vector<float> y(s.T * s.d);
  layer.forward(x.data(), DType::float32, s.T, false, y.data());
  CHECK(layer.forward_dtype() == DType::float32);
  double err = 0;
  for (size_t i = 0; i < y.size(); ++i) err = std::max(err, std::fabs(y[i] - ref.y[i]));
  CHECK(err <= 2e-2 * ymax);
  CHECK(err > 0);  // bf16 rounding is visible
  // The router stays float32 (selective precision): the losses match the float32 reference.
  CHECK(std::fabs(layer.aux_loss() - ref.aux) <= 1e-6 * ref.aux);
  std::vector<bf16> xb(x.size()), yb(x.size());
  for (size_t i = 0; i < x.size(); ++i) xb[i] = float_to_bf16(x[i]);
  layer.forward(xb.data(), DType::bfloat16, s.T, false, yb.data());
  CHECK(layer.forward_dtype() == DType::bfloat16);
  err = 0;
  for (size_t i = 0; i < y.size(); ++i)
    err = std::max(err, std::fabs(bf16_to_float(yb[i]) - ref.y[i]));
  CHECK(err <= 3e-2 * ymax);
  // Backward in bf16 against the float32 layer of the same seed (whose gradients the reference
  // test checks by finite differences): cosine similarity of every gradient > 0.99.
  SwitchFFNOptions o32 = o;
  o32.dtype = DType::float32;
  SwitchFFN layer32(s.d, s.f, s.E, o32);
  const auto dy = normal_vector(s.T * s.d, 6);
  std::vector<float> dx(x.size()), dx32(x.size()), y32(x.size());
  layer.forward(x.data(), DType::float32, s.T, true, y.data());
  layer.backward(dy.data(), dx.data());
  layer32.forward(x.data(), DType::float32, s.T, true, y32.data());
  layer32.backward(dy.data(), dx32.data());
  auto cosine = [](const float* a, const float* b, int64_t n) {
    double ab = 0, aa = 0, bb = 0;
    for (int64_t i = 0; i < n; ++i) {
      ab += static_cast<double>(a[i]) * b[i];
      aa += static_cast<double>(a[i]) * a[i];
      bb += static_cast<double>(b[i]) * b[i];
    }
    return ab / std::sqrt(aa * bb);
  };
  const int64_t nw = s.E * s.d * s.f;
  CHECK(cosine(dx.data(), dx32.data(), s.T * s.d) > 0.99);
  CHECK(cosine(layer.router_weight_grad(), layer32.router_weight_grad(), s.d * s.E) > 0.99);
  CHECK(cosine(layer.weights().w_in_grad(), layer32.weights().w_in_grad(), nw) > 0.99);
  CHECK(cosine(layer.weights().w_out_grad(), layer32.weights().w_out_grad(), nw) > 0.99);
  CHECK(std::memcmp(layer.weights().w_in_grad(), layer32.weights().w_in_grad(), nw * 4) != 0);
}

TEST(switch_layer_dense_ffn_matches_reference) {
  const int64_t T = 9, d = 5, f = 7;
  DenseFFNOptions o;
  o.use_bias = true;
  o.init_scale = 1.0;
  DenseFFN dense(d, f, o);
  CHECK_EQ(dense.d_model(), d);
  CHECK_EQ(dense.d_ff(), f);
  ExpertWeights& w = dense.weights();
  const auto bi = normal_vector(f, 6, 0.3f), bo = normal_vector(d, 7, 0.3f);
  std::copy(bi.begin(), bi.end(), w.b_in());
  std::copy(bo.begin(), bo.end(), w.b_out());
  const auto x = normal_vector(T * d, 8), dy = normal_vector(T * d, 9);
  // A one-expert, dropless, uncapped "Switch" reference whose gate is 1 (E = 1: softmax = 1).
  Setup s{T, d, f, 1, {}, std::nullopt, Activation::relu, 0.0, 0.0};
  LayerParams p;
  p.x.assign(x.begin(), x.end());
  p.router.assign(d, 0.0);
  p.w_in.assign(w.w_in(), w.w_in() + d * f);
  p.w_out.assign(w.w_out(), w.w_out() + f * d);
  p.b_in.assign(w.b_in(), w.b_in() + f);
  p.b_out.assign(w.b_out(), w.b_out() + d);
  const RefOut ref = reference(p, s, dy);
  std::vector<float> y(T * d), dx(T * d);
  dense.forward(x.data(), DType::float32, T, true, y.data());
  for (size_t i = 0; i < y.size(); ++i) CHECK(std::fabs(y[i] - ref.y[i]) <= 1e-5);
  dense.backward(dy.data(), dx.data());
  int checked = 0, failed = 0;
  for (auto r : {check_grad("x", p, p.x, dx.data(), s, dy, ref.signature, 1e-4),
                 check_grad("w_in", p, p.w_in, w.w_in_grad(), s, dy, ref.signature, 1e-4),
                 check_grad("w_out", p, p.w_out, w.w_out_grad(), s, dy, ref.signature, 1e-4),
                 check_grad("b_in", p, p.b_in, w.b_in_grad(), s, dy, ref.signature, 1e-4),
                 check_grad("b_out", p, p.b_out, w.b_out_grad(), s, dy, ref.signature, 1e-4)}) {
    checked += r.first;
    failed += r.second;
  }
  CHECK_EQ(failed, 0);
  CHECK(checked >= 40);
}

TEST(switch_layer_errors_name_the_argument) {
  SwitchFFNOptions o;
  CHECK_THROWS(InvalidArgument, SwitchFFN(0, 8, 4, o), "d_model must be >= 1, got 0");
  CHECK_THROWS(InvalidArgument, SwitchFFN(8, 0, 4, o), "d_ff must be >= 1, got 0");
  CHECK_THROWS(InvalidArgument, SwitchFFN(8, 8, 0, o), "num_experts must be >= 1, got 0");
  o.expert_dropout = 1.0;
  CHECK_THROWS(InvalidArgument, SwitchFFN(8, 8, 4, o), "expert_dropout must be in [0, 1), got 1");
  o.expert_dropout = 0.0;
  o.aux_loss_coef = std::numeric_limits<double>::infinity();
  CHECK_THROWS(InvalidArgument, SwitchFFN(8, 8, 4, o), "aux_loss_coef");
  o.aux_loss_coef = 1e-2;
  o.router.route.k = 5;
  CHECK_THROWS(InvalidArgument, SwitchFFN(8, 8, 4, o), "k must be in [1, num_experts=4], got 5");
  o.router.route.k = 1;
  o.router.jitter_eps = 1.5;
  CHECK_THROWS(InvalidArgument, SwitchFFN(8, 8, 4, o), "jitter_eps");
  o.router.jitter_eps = 0.0;
  comm::LocalGroup group(3);
  CHECK_THROWS(InvalidArgument, SwitchFFN(8, 8, 4, o, &group.comm(0)),
               "num_experts must be divisible");

  SwitchFFN layer(4, 8, 4, o);
  std::vector<float> x(12 * 4, 0.5f), y(12 * 4);
  CHECK_THROWS(Error, layer.backward(x.data(), y.data()), "no forward pass");
  CHECK_THROWS(Error, layer.plan(), "no forward pass");
  CHECK_THROWS(InvalidArgument, layer.forward(x.data(), DType::float32, 0, false, y.data()),
               "at least one token");
  x[3 * 4 + 2] = std::nanf("");
  CHECK_THROWS(InvalidArgument, layer.forward(x.data(), DType::float32, 12, false, y.data()),
               "row 3 is not finite");
  CHECK(!layer.has_forward());  // a failed forward leaves nothing to differentiate
  CHECK_THROWS(Error, layer.backward(x.data(), y.data()), "no forward pass");
  o.router.route.group_size = 5;
  SwitchFFN grouped(4, 8, 4, o);
  x[3 * 4 + 2] = 0.5f;
  CHECK_THROWS(InvalidArgument, grouped.forward(x.data(), DType::float32, 12, false, y.data()),
               "group_size=5 must divide the number of tokens T=12");

  DenseFFNOptions d;
  CHECK_THROWS(InvalidArgument, DenseFFN(0, 4, d), "d_model must be >= 1");
  d.dropout = -0.5;
  CHECK_THROWS(InvalidArgument, DenseFFN(4, 4, d), "dropout must be in [0, 1), got -0.5");
  d.dropout = 0.0;
  d.init_scale = 0.0;
  CHECK_THROWS(InvalidArgument, DenseFFN(4, 4, d), "init_scale");
  d.init_scale = 0.1;
  DenseFFN dense(4, 4, d);
  CHECK_THROWS(Error, dense.backward(x.data(), y.data()), "no forward pass");
  CHECK_THROWS(InvalidArgument, dense.forward(x.data(), DType::float32, 0, false, y.data()),
               "at least one token");
}

namespace {

// Copies every master of `from` (read through the const accessors: no mark) into `to` (through
// the non-const ones, which mark `to`'s bf16 copy stale).
void copy_masters(const ExpertWeights& from, ExpertWeights& to, int64_t n_in, int64_t n_out,
                  int64_t n_bias_in, int64_t n_bias_out) {
  std::copy_n(from.w_in(), n_in, to.w_in());
  std::copy_n(from.w_out(), n_out, to.w_out());
  if (from.w_gate()) std::copy_n(from.w_gate(), n_in, to.w_gate());
  if (from.b_in()) {
    std::copy_n(from.b_in(), n_bias_in, to.b_in());
    std::copy_n(from.b_out(), n_bias_out, to.b_out());
  }
}

}  // namespace

TEST(switch_layer_bf16_copy_follows_the_masters) {
  // The bf16 compute copy is kept between forwards and re-rounded when the masters may have
  // changed: a non-const accessor or mark_params_changed() after writes through a kept pointer.
  const int64_t T = 24, d = 8, f = 12, E = 4;
  SwitchFFNOptions o;
  o.router.route.capacity_factor = std::nullopt;
  o.router.eval_capacity_factor = std::nullopt;
  o.router.init_scale = 2.0;
  o.activation = Activation::geglu;
  o.use_bias = true;
  o.dtype = DType::bfloat16;
  SwitchFFN layer(d, f, E, o);
  const auto x = normal_vector(T * d, 5);
  std::vector<float> y(x.size()), y_ref(x.size());
  layer.forward(x.data(), DType::float32, T, false, y.data());
  const ExpertWeights& cw = layer.weights();
  CHECK_EQ(cw.copy_refreshes(), 1);
  layer.forward(x.data(), DType::float32, T, false, y.data());
  CHECK_EQ(cw.copy_refreshes(), 1);  // nothing written: the copy is reused

  // The same masters in a fresh layer (another seed) must give the same bits.
  auto same_as_fresh = [&]() {
    SwitchFFNOptions o2 = o;
    o2.router.seed = 77;
    SwitchFFN fresh(d, f, E, o2);
    std::copy_n(layer.router_weight(), d * E, fresh.router_weight());
    copy_masters(cw, fresh.weights(), E * d * f, E * f * d, E * f, E * d);
    layer.forward(x.data(), DType::float32, T, false, y.data());
    fresh.forward(x.data(), DType::float32, T, false, y_ref.data());
    return std::memcmp(y.data(), y_ref.data(), y.size() * sizeof(float)) == 0;
  };
  CHECK(same_as_fresh());
  CHECK_EQ(cw.copy_refreshes(), 1);  // reading the masters through const paths marks nothing

  // A pointer kept from before the forwards and written after them: the copy is stale (what
  // the header documents) until mark_params_changed().
  float* kept = layer.weights().w_out();
  layer.forward(x.data(), DType::float32, T, false, y.data());
  CHECK_EQ(cw.copy_refreshes(), 2);
  for (int64_t i = 0; i < E * f * d; i += 3) kept[i] = -kept[i] + 0.25f;
  CHECK(!cw.copy_needs_refresh());
  CHECK(!same_as_fresh());  // the cached copy really is reused
  layer.weights().mark_params_changed();
  CHECK(cw.copy_needs_refresh());
  CHECK(same_as_fresh());

  // Fetching a writable pointer after a forward marks the copy itself.
  layer.forward(x.data(), DType::float32, T, false, y.data());
  layer.weights().w_gate()[5] += 1.0f;
  CHECK(same_as_fresh());
  layer.forward(x.data(), DType::float32, T, false, y.data());
  layer.weights().w_in()[7] *= -3.0f;
  CHECK(same_as_fresh());

  // While a live view is registered every forward re-rounds.
  layer.weights().add_live_view();
  const int64_t before = cw.copy_refreshes();
  layer.forward(x.data(), DType::float32, T, false, y.data());
  layer.forward(x.data(), DType::float32, T, false, y.data());
  CHECK_EQ(cw.copy_refreshes(), before + 2);
  layer.weights().remove_live_view();
  CHECK(layer.weights().copy_needs_refresh());

  // A float32 layer has no copy and never rounds its weights.
  SwitchFFNOptions o32 = o;
  o32.dtype = DType::float32;
  SwitchFFN layer32(d, f, E, o32);
  layer32.forward(x.data(), DType::float32, T, false, y.data());
  CHECK(!layer32.weights().has_compute_copy());
  CHECK_EQ(layer32.weights().copy_refreshes(), 0);
}
