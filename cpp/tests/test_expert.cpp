// Expert FFN tests: forward against a plain double-precision loop, backward against central
// finite differences of that loop, every activation, biases, empty experts, thread counts.
#include <cmath>
#include <random>
#include <vector>

#include "harness.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/moe/expert.hpp"
#include "pyswitch/threading.hpp"

using namespace pyswitch;
using namespace pyswitch::moe;

namespace {

struct Problem {
  ExpertShape shape;
  std::vector<int64_t> offsets;
  std::vector<float> x, w_in, w_gate, w_out, b_in, b_out, dy;
  ExpertParams params() const {
    ExpertParams p;
    p.w_in = w_in.data();
    p.w_out = w_out.data();
    p.w_gate = shape.activation == Activation::geglu ? w_gate.data() : nullptr;
    p.b_in = b_in.empty() ? nullptr : b_in.data();
    p.b_out = b_out.empty() ? nullptr : b_out.data();
    return p;
  }
};

Problem make_problem(Activation act, bool bias, std::vector<int64_t> counts, int64_t d, int64_t f,
                     uint32_t seed) {
  Problem pr;
  pr.shape = {static_cast<int64_t>(counts.size()), d, f, act};
  pr.offsets = {0};
  for (int64_t c : counts) pr.offsets.push_back(pr.offsets.back() + c);
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 0.5f);
  auto fill = [&](std::vector<float>& v, int64_t n) {
    v.resize(static_cast<size_t>(n));
    for (float& x : v) x = dist(gen);
  };
  const int64_t E = pr.shape.num_experts, rows = pr.offsets.back();
  fill(pr.x, rows * d);
  fill(pr.w_in, E * d * f);
  fill(pr.w_gate, E * d * f);
  fill(pr.w_out, E * f * d);
  if (bias) {
    fill(pr.b_in, E * f);
    fill(pr.b_out, E * d);
  }
  fill(pr.dy, rows * d);
  return pr;
}

double gelu_ref(double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

// sum(dy * y) computed plainly in double.
double loss_ref(const Problem& pr) {
  const int64_t d = pr.shape.d_model, f = pr.shape.d_ff;
  double loss = 0;
  for (int64_t e = 0; e < pr.shape.num_experts; ++e) {
    for (int64_t r = pr.offsets[e]; r < pr.offsets[e + 1]; ++r) {
      std::vector<double> h(f);
      for (int64_t j = 0; j < f; ++j) {
        double a = pr.b_in.empty() ? 0.0 : pr.b_in[e * f + j], lin = 0;
        for (int64_t i = 0; i < d; ++i) {
          a += static_cast<double>(pr.x[r * d + i]) * pr.w_in[(e * d + i) * f + j];
          lin += static_cast<double>(pr.x[r * d + i]) * pr.w_gate[(e * d + i) * f + j];
        }
        switch (pr.shape.activation) {
          case Activation::relu:
            h[j] = a > 0 ? a : 0;
            break;
          case Activation::gelu:
            h[j] = gelu_ref(a);
            break;
          case Activation::geglu:
            h[j] = gelu_ref(a) * lin;
            break;
        }
      }
      for (int64_t i = 0; i < d; ++i) {
        double y = pr.b_out.empty() ? 0.0 : pr.b_out[e * d + i];
        for (int64_t j = 0; j < f; ++j) y += h[j] * pr.w_out[(e * f + j) * d + i];
        loss += y * pr.dy[r * d + i];
      }
    }
  }
  return loss;
}

}  // namespace

TEST(experts_forward_and_backward_match_reference) {
  for (Activation act : {Activation::relu, Activation::gelu, Activation::geglu}) {
    for (bool bias : {false, true}) {
      Problem pr = make_problem(act, bias, {3, 0, 5, 1}, 6, 7, 11);
      const int64_t rows = pr.offsets.back(), d = pr.shape.d_model;
      std::vector<float> y(rows * d);
      ExpertCache cache;
      experts_forward(pr.shape, pr.params(), pr.offsets.data(), DType::float32, pr.x.data(),
                      y.data(), &cache);
      double loss = 0;
      for (int64_t i = 0; i < rows * d; ++i) loss += static_cast<double>(y[i]) * pr.dy[i];
      CHECK(std::fabs(loss - loss_ref(pr)) <= 1e-4 * (1 + std::fabs(loss)));

      std::vector<float> dx(rows * d), gw_in(pr.w_in.size()), gw_gate(pr.w_gate.size()),
          gw_out(pr.w_out.size()), gb_in(pr.b_in.size()), gb_out(pr.b_out.size());
      ExpertGrads g{gw_in.data(), act == Activation::geglu ? gw_gate.data() : nullptr,
                    gw_out.data(), bias ? gb_in.data() : nullptr, bias ? gb_out.data() : nullptr};
      experts_backward(pr.shape, pr.params(), pr.offsets.data(), pr.x.data(), cache, pr.dy.data(),
                       dx.data(), g);
      // Central differences of the double reference, on a sample of every tensor.
      auto check_grad = [&](std::vector<float>& param, const std::vector<float>& grad,
                            const char* name) {
        for (size_t i = 0; i < param.size(); i += 1 + param.size() / 13) {
          const float saved = param[i];
          const double h = 1e-3;
          param[i] = static_cast<float>(saved + h);
          const double up = loss_ref(pr);
          param[i] = static_cast<float>(saved - h);
          const double down = loss_ref(pr);
          param[i] = saved;
          const double numeric = (up - down) / (2 * h);
          if (std::fabs(numeric - grad[i]) > 2e-3 + 2e-3 * std::fabs(numeric)) {
            std::printf("  %s[%zu]: numeric %.6f analytic %.6f\n", name, i, numeric, grad[i]);
            CHECK(false);
          }
        }
      };
      check_grad(pr.x, dx, "x");
      check_grad(pr.w_in, gw_in, "w_in");
      check_grad(pr.w_out, gw_out, "w_out");
      if (act == Activation::geglu) check_grad(pr.w_gate, gw_gate, "w_gate");
      if (bias) {
        check_grad(pr.b_in, gb_in, "b_in");
        check_grad(pr.b_out, gb_out, "b_out");
      }
    }
  }
}

TEST(experts_bit_identical_for_any_thread_count) {
  Problem pr = make_problem(Activation::gelu, true, {300, 17, 0, 129}, 40, 72, 5);
  const int64_t rows = pr.offsets.back(), d = pr.shape.d_model;
  const int saved = get_num_threads();
  std::vector<std::vector<float>> outs;
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    std::vector<float> y(rows * d), dx(rows * d), gw_in(pr.w_in.size()), gw_out(pr.w_out.size()),
        gb_in(pr.b_in.size()), gb_out(pr.b_out.size());
    ExpertCache cache;
    experts_forward(pr.shape, pr.params(), pr.offsets.data(), DType::float32, pr.x.data(), y.data(),
                    &cache);
    ExpertGrads g{gw_in.data(), nullptr, gw_out.data(), gb_in.data(), gb_out.data()};
    experts_backward(pr.shape, pr.params(), pr.offsets.data(), pr.x.data(), cache, pr.dy.data(),
                     dx.data(), g);
    y.insert(y.end(), dx.begin(), dx.end());
    y.insert(y.end(), gw_in.begin(), gw_in.end());
    y.insert(y.end(), gw_out.begin(), gw_out.end());
    outs.push_back(y);
  }
  set_num_threads(saved);
  CHECK(outs[0] == outs[1]);
  CHECK(outs[0] == outs[2]);
}

TEST(experts_reject_bad_offsets_and_missing_weights) {
  Problem pr = make_problem(Activation::relu, false, {2, 2}, 3, 4, 1);
  std::vector<float> y(4 * 3);
  std::vector<int64_t> bad = {0, 3, 2};
  CHECK_THROWS(InvalidArgument,
               experts_forward(pr.shape, pr.params(), bad.data(), DType::float32, pr.x.data(),
                               y.data(), nullptr),
               "offsets must be non-decreasing");
  ExpertShape geglu = pr.shape;
  geglu.activation = Activation::geglu;
  CHECK_THROWS(InvalidArgument,
               experts_forward(geglu, pr.params(), pr.offsets.data(), DType::float32, pr.x.data(),
                               y.data(), nullptr),
               "w_gate must be given exactly when the activation is geglu");
  CHECK_THROWS(InvalidArgument, parse_activation("swish"), "activation must be");
}
