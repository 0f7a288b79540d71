// Optimizer tests (optim/optim.hpp): AdamW and Adafactor against plain double-precision
// references over several steps and against first-step closed forms, global-norm clipping,
// the learning-rate schedules' closed forms, and bad arguments.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "harness.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/optim/optim.hpp"
#include "pyswitch/threading.hpp"
#include "test_data.hpp"

using namespace pyswitch;
using namespace pyswitch::optim;

namespace {

double max_abs_diff(const std::vector<float>& got, const std::vector<double>& expect) {
  double worst = 0;
  for (size_t i = 0; i < expect.size(); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(got[i]) - expect[i]));
  }
  return worst;
}

double max_rel_diff(const std::vector<float>& got, const std::vector<double>& expect) {
  double worst = 0;
  for (size_t i = 0; i < expect.size(); ++i) {
    worst = std::max(worst, std::fabs(got[i] - expect[i]) / std::max(std::fabs(expect[i]), 1e-30));
  }
  return worst;
}

// Adafactor (Shazeer & Stern 2018, Algorithm 4 without momentum) in double, for a tensor seen
// as `batches` (rows, cols) matrices: factored second moments when rows, cols >= 2, relative
// update clipping over the whole tensor, decoupled weight decay.
struct AdafactorRef {
  int64_t batches, rows, cols;
  AdafactorOptions o;
  std::vector<double> R, C, V;
  double last_rms = 0;
  AdafactorRef(int64_t b, int64_t r, int64_t c, const AdafactorOptions& opts)
      : batches(b), rows(r), cols(c), o(opts), R(b * r, 0.0), C(b * c, 0.0), V(b * r * c, 0.0) {}
  bool factored() const { return rows >= 2 && cols >= 2; }
  void step(std::vector<double>& p, const std::vector<float>& g, int64_t t, double lr) {
    const double rho = 1.0 - std::pow(static_cast<double>(t), -o.decay_rate);
    const int64_t per = rows * cols, n = batches * per;
    std::vector<double> u(n);
    for (int64_t b = 0; b < batches; ++b) {
      auto g2 = [&](int64_t i, int64_t j) {
        const double x = g[b * per + i * cols + j];
        return x * x + o.eps;
      };
      if (factored()) {
        for (int64_t i = 0; i < rows; ++i) {
          double mean = 0;
          for (int64_t j = 0; j < cols; ++j) mean += g2(i, j) / cols;
          R[b * rows + i] = rho * R[b * rows + i] + (1 - rho) * mean;
        }
        for (int64_t j = 0; j < cols; ++j) {
          double mean = 0;
          for (int64_t i = 0; i < rows; ++i) mean += g2(i, j) / rows;
          C[b * cols + j] = rho * C[b * cols + j] + (1 - rho) * mean;
        }
        double row_mean = 0;
        for (int64_t i = 0; i < rows; ++i) row_mean += R[b * rows + i] / rows;
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < cols; ++j) {
            const double vhat = R[b * rows + i] * C[b * cols + j] / row_mean;
            u[b * per + i * cols + j] = g[b * per + i * cols + j] / std::sqrt(vhat);
          }
        }
      } else {
        for (int64_t i = 0; i < rows; ++i) {
          for (int64_t j = 0; j < cols; ++j) {
            double& v = V[b * per + i * cols + j];
            v = rho * v + (1 - rho) * g2(i, j);
            u[b * per + i * cols + j] = g[b * per + i * cols + j] / std::sqrt(v);
          }
        }
      }
    }
    double ms = 0;
    for (double x : u) ms += x * x / static_cast<double>(n);
    last_rms = std::sqrt(ms);
    const double scale = lr / std::max(1.0, last_rms / o.clip_threshold);
    for (int64_t i = 0; i < n; ++i) p[i] = p[i] * (1 - lr * o.weight_decay) - scale * u[i];
  }
};

}  // namespace

TEST(optim_adamw_matches_reference_over_steps) {
  const int64_t n = 37;
  for (bool decay : {true, false}) {
    AdamWOptions o;
    o.beta1 = 0.8;
    o.beta2 = 0.9;
    o.eps = 1e-6;
    o.weight_decay = 0.3;
    std::vector<float> p = normal_vector(n, 1), m(n, 0.0f), v(n, 0.0f);
    std::vector<double> rp(p.begin(), p.end()), rm(n, 0.0), rv(n, 0.0);
    for (int64_t t = 1; t <= 5; ++t) {
      const auto g = normal_vector(n, 10 + static_cast<uint32_t>(t), t == 3 ? 1e-3f : 1.0f);
      const double lr = 0.01 * t;
      adamw_step(p.data(), g.data(), m.data(), v.data(), n, t, lr, o, decay);
      for (int64_t i = 0; i < n; ++i) {
        rm[i] = o.beta1 * rm[i] + (1 - o.beta1) * g[i];
        rv[i] = o.beta2 * rv[i] + (1 - o.beta2) * static_cast<double>(g[i]) * g[i];
        const double mhat = rm[i] / (1 - std::pow(o.beta1, t));
        const double vhat = rv[i] / (1 - std::pow(o.beta2, t));
        rp[i] = rp[i] - (decay ? lr * o.weight_decay * rp[i] : 0.0) -
                lr * mhat / (std::sqrt(vhat) + o.eps);
      }
      CHECK(max_rel_diff(m, rm) <= 1e-5);
      CHECK(max_rel_diff(v, rv) <= 1e-5);
      CHECK(max_abs_diff(p, rp) <= 1e-6);
    }
  }
}

TEST(optim_adamw_first_step_closed_form) {
  // Step 1 from zero state: mhat = g, vhat = g^2, so p -= lr * g / (|g| + eps) (+ decay).
  const std::vector<float> g = {0.5f, -3.0f, 1e-4f, -2e-2f, 0.0f};
  const int64_t n = static_cast<int64_t>(g.size());
  AdamWOptions o;  // defaults: eps 1e-8, weight_decay 0.1
  std::vector<float> p(n, 2.0f), m(n, 0.0f), v(n, 0.0f);
  adamw_step(p.data(), g.data(), m.data(), v.data(), n, 1, 0.1, o, true);
  for (int64_t i = 0; i < n; ++i) {
    const double expect = 2.0 * (1 - 0.1 * 0.1) - 0.1 * g[i] / (std::fabs(g[i]) + 1e-8);
    CHECK(std::fabs(p[i] - expect) <= 1e-6);
  }
  // lr = 0: only the state moves.
  std::vector<float> q(n, 1.0f), m2(n, 0.0f), v2(n, 0.0f);
  adamw_step(q.data(), g.data(), m2.data(), v2.data(), n, 1, 0.0, o, true);
  for (int64_t i = 0; i < n; ++i) {
    CHECK_EQ(q[i], 1.0f);
    CHECK(std::fabs(m2[i] - 0.1 * g[i]) <= 1e-7);
  }
}

TEST(optim_adamw_rejects_bad_step_and_lr) {
  std::vector<float> p(3, 0.0f), g(3, 1.0f), m(3, 0.0f), v(3, 0.0f);
  AdamWOptions o;
  CHECK_THROWS(InvalidArgument,
               adamw_step(p.data(), g.data(), m.data(), v.data(), 3, 0, 0.1, o, true),
               "step must be >= 1, got 0");
  CHECK_THROWS(InvalidArgument,
               adamw_step(p.data(), g.data(), m.data(), v.data(), 3, 1, std::nan(""), o, true),
               "lr must be finite");
  CHECK_THROWS(InvalidArgument,
               adamw_step(p.data(), g.data(), m.data(), v.data(), 3, 1, -1e-3, o, true),
               "lr must be finite and >= 0");
  CHECK_THROWS(InvalidArgument,
               adamw_step(p.data(), g.data(), m.data(), v.data(), 3, 1,
                          std::numeric_limits<double>::infinity(), o, true),
               "lr");
  // A rejected call changes nothing.
  CHECK(p == std::vector<float>(3, 0.0f));
  CHECK(m == std::vector<float>(3, 0.0f));
}

TEST(optim_adafactor_matches_reference_over_steps) {
  struct Case {
    int64_t b, r, c;
    double clip;
  };
  for (const Case& cs : {Case{1, 6, 5, 1.0}, Case{3, 4, 3, 0.3}, Case{1, 1, 20, 1.0},
                         Case{2, 7, 1, 0.3}, Case{4, 1, 3, 1.0}}) {
    AdafactorShape shape{cs.b, cs.r, cs.c};
    AdafactorOptions o;
    o.clip_threshold = cs.clip;
    o.weight_decay = 0.05;
    const int64_t n = cs.b * cs.r * cs.c;
    CHECK_EQ(shape.factored(), cs.r >= 2 && cs.c >= 2);
    CHECK_EQ(shape.row_state() + shape.col_state() + shape.full_state(),
             shape.factored() ? cs.b * (cs.r + cs.c) : n);
    std::vector<float> p = normal_vector(n, 2), row(shape.row_state(), 0.0f),
                       col(shape.col_state(), 0.0f), full(shape.full_state(), 0.0f);
    std::vector<double> rp(p.begin(), p.end());
    AdafactorRef ref(cs.b, cs.r, cs.c, o);
    std::mt19937 gen(3);
    std::uniform_real_distribution<float> row_scale(0.1f, 3.0f);
    bool clipped = false;
    for (int64_t t = 1; t <= 6; ++t) {
      // Row structure in the gradient so that the factorisation matters.
      auto g = normal_vector(n, 20 + static_cast<uint32_t>(t), t == 4 ? 1e-3f : 1.0f);
      for (int64_t i = 0; i < n; i += cs.c) {
        const float s = row_scale(gen);
        for (int64_t j = 0; j < cs.c; ++j) g[i + j] *= s;
      }
      const double lr = 1e-2;
      adafactor_step(p.data(), g.data(), row.data(), col.data(), full.data(), shape, t, lr, o);
      ref.step(rp, g, t, lr);
      clipped |= ref.last_rms > cs.clip;
      if (shape.factored()) {
        CHECK(max_rel_diff(row, ref.R) <= 1e-5);
        CHECK(max_rel_diff(col, ref.C) <= 1e-5);
      } else {
        CHECK(max_rel_diff(full, ref.V) <= 1e-5);
      }
      CHECK(max_abs_diff(p, rp) <= 1e-6 * static_cast<double>(t));
    }
    if (cs.clip < 1.0) CHECK(clipped);  // the clipping branch was exercised
  }
}

TEST(optim_adafactor_first_step_closed_forms) {
  // Unfactored, step 1: rho = 0, V = g^2 + eps, u = sign(g), RMS(u) = 1: p -= lr * sign(g).
  const std::vector<float> g = {0.5f, -3.0f, 1e-4f, -2e-2f};
  std::vector<float> p(4, 0.0f), full(4, 0.0f);
  AdafactorOptions o;
  adafactor_step(p.data(), g.data(), nullptr, nullptr, full.data(), AdafactorShape{1, 1, 4}, 1, 0.1,
                 o);
  for (int i = 0; i < 4; ++i) {
    CHECK(std::fabs(p[i] - (g[i] > 0 ? -0.1 : 0.1)) <= 1e-7);
    CHECK(std::fabs(full[i] - static_cast<double>(g[i]) * g[i]) <= 1e-6 * g[i] * g[i]);
  }
  // Factored, rank-one |g| = a b^T with eps = 0: the factored estimate is exact, u = sign(g).
  const double a[3] = {1.0, 2.0, 0.5}, b[4] = {0.1, 1.0, 3.0, 0.2};
  const int sign[12] = {1, -1, 1, -1, -1, 1, 1, 1, 1, 1, -1, 1};
  std::vector<float> gm(12), pm(12, 0.0f), row(3, 0.0f), col(4, 0.0f);
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 4; ++j) gm[i * 4 + j] = static_cast<float>(sign[i * 4 + j] * a[i] * b[j]);
  }
  o.eps = 0.0;
  adafactor_step(pm.data(), gm.data(), row.data(), col.data(), nullptr, AdafactorShape{1, 3, 4}, 1,
                 0.01, o);
  for (int i = 0; i < 12; ++i) CHECK(std::fabs(pm[i] + 0.01 * sign[i]) <= 1e-7);
  CHECK_THROWS(InvalidArgument,
               adafactor_step(pm.data(), gm.data(), row.data(), col.data(), nullptr,
                              AdafactorShape{1, 3, 4}, 0, 0.01, o),
               "step must be >= 1");
  CHECK_THROWS(InvalidArgument,
               adafactor_step(pm.data(), gm.data(), row.data(), col.data(), nullptr,
                              AdafactorShape{1, 3, 4}, 2, -0.01, o),
               "lr must be finite and >= 0");
}

TEST(optim_global_norm_and_clipping) {
  // A tensor larger than one reduction block (16384), a small one and an empty one.
  std::vector<float> a = normal_vector(20000, 4), b = normal_vector(7, 5, 10.0f);
  double sq = 0;
  for (float x : a) sq += static_cast<double>(x) * x;
  for (float x : b) sq += static_cast<double>(x) * x;
  const double expect = std::sqrt(sq);
  const double norm = global_norm({{a.data(), 20000}, {b.data(), 7}, {b.data(), 0}});
  CHECK(std::fabs(norm - expect) <= 1e-12 * expect);
  CHECK_EQ(global_norm({}), 0.0);

  // Above max_norm: every element scaled by max_norm / norm; returns the norm before.
  const std::vector<float> a0 = a, b0 = b;
  const double max_norm = expect / 4;
  const double before = clip_by_global_norm({{a.data(), 20000}, {b.data(), 7}}, max_norm);
  CHECK(std::fabs(before - expect) <= 1e-12 * expect);
  const double after = global_norm({{a.data(), 20000}, {b.data(), 7}});
  CHECK(std::fabs(after - max_norm) <= 1e-6 * max_norm);
  for (size_t i = 0; i < a.size(); i += 997) CHECK(std::fabs(a[i] - 0.25 * a0[i]) <= 1e-6);
  for (size_t i = 0; i < b.size(); ++i) CHECK(std::fabs(b[i] - 0.25 * b0[i]) <= 1e-5);

  // Below max_norm: untouched, bit for bit.
  const std::vector<float> a1 = a;
  CHECK(std::fabs(clip_by_global_norm({{a.data(), 20000}}, 1e9) -
                  global_norm({{a1.data(), 20000}})) == 0.0);
  CHECK(a == a1);

  // A non-finite norm is returned and nothing is scaled.
  std::vector<float> c = {1.0f, std::numeric_limits<float>::infinity(), 2.0f};
  CHECK(std::isinf(clip_by_global_norm({{c.data(), 3}}, 1.0)));
  CHECK_EQ(c[0], 1.0f);
  CHECK_EQ(c[2], 2.0f);
  c[1] = std::nanf("");
  CHECK(std::isnan(clip_by_global_norm({{c.data(), 3}}, 1.0)));
  CHECK_EQ(c[0], 1.0f);

  for (double bad : {0.0, -1.0, std::nan(""), std::numeric_limits<double>::infinity()}) {
    CHECK_THROWS(InvalidArgument, clip_by_global_norm({{a.data(), 3}}, bad),
                 "max_norm must be finite and > 0");
  }
}

TEST(optim_learning_rate_closed_forms) {
  const double peak = 2.0, pi = 3.14159265358979323846;
  const int64_t total = 110;
  auto near = [](double a, double b) { return std::fabs(a - b) <= 1e-12 * (1 + std::fabs(b)); };
  for (int64_t warmup : {0, 1, 10}) {
    // Warmup: linear from peak / warmup (step 0) to peak (step warmup - 1).
    for (int64_t s = 0; s < warmup; ++s) {
      for (const char* decay : {"cosine", "linear", "rsqrt", "constant"}) {
        CHECK(near(learning_rate(s, peak, warmup, total, decay), peak * (s + 1) / warmup));
      }
    }
    for (int64_t s = warmup; s <= total + 20; s += 5) {
      const double progress = std::min(1.0, static_cast<double>(s - warmup) / (total - warmup));
      const double floor = 0.1 * peak;
      CHECK(near(learning_rate(s, peak, warmup, total, "constant"), peak));
      CHECK(
          near(learning_rate(s, peak, warmup, total, "linear"), peak + (floor - peak) * progress));
      CHECK(near(learning_rate(s, peak, warmup, total, "cosine"),
                 floor + (peak - floor) * 0.5 * (1 + std::cos(pi * progress))));
      CHECK(near(learning_rate(s, peak, warmup, total, "rsqrt"),
                 peak * std::sqrt(static_cast<double>(std::max<int64_t>(warmup, 1)) /
                                  std::max<int64_t>(s, 1))));
    }
    CHECK(near(learning_rate(warmup, peak, warmup, total, "cosine"), peak));
  }
  // Landmarks: the cosine midpoint, the end of the decay, final_fraction.
  CHECK(near(learning_rate(60, 1.0, 10, 110, "cosine"), 0.55));
  CHECK(near(learning_rate(110, 1.0, 10, 110, "cosine"), 0.1));
  CHECK(near(learning_rate(500, 1.0, 10, 110, "linear", 0.0), 0.0));
  CHECK(near(learning_rate(60, 1.0, 10, 110, "linear", 0.5), 0.75));
  CHECK(near(learning_rate(40, 1.0, 10, 110, "rsqrt"), 0.5));

  CHECK_THROWS(InvalidArgument, learning_rate(-1, 1.0, 10, 100, "cosine"), "step");
  CHECK_THROWS(InvalidArgument, learning_rate(0, 1.0, -1, 100, "cosine"), "warmup");
  CHECK_THROWS(InvalidArgument, learning_rate(0, 1.0, 10, 0, "cosine"), "total");
  CHECK_THROWS(InvalidArgument, learning_rate(20, 1.0, 10, 100, "exponential"),
               "decay must be 'cosine', 'linear', 'rsqrt' or 'constant', got 'exponential'");
  CHECK_THROWS(InvalidArgument, learning_rate(20, 1.0, 10, 100, "COSINE"), "decay");
}

TEST(optim_updates_bit_identical_for_any_thread_count) {
  // 40000 elements: three AdamW / clipping blocks; Adafactor over 5 batches of (100, 80).
  const int64_t n = 40000;
  const auto g = normal_vector(n, 6);
  const int saved = get_num_threads();
  std::vector<std::vector<float>> runs;
  std::vector<double> norms;
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    std::vector<float> p = normal_vector(n, 7), m(n, 0.0f), v(n, 0.0f), q = p, gc = g;
    std::vector<float> row(5 * 100, 0.0f), col(5 * 80, 0.0f);
    for (int64_t t = 1; t <= 2; ++t) {
      adamw_step(p.data(), g.data(), m.data(), v.data(), n, t, 1e-3, AdamWOptions{}, true);
      adafactor_step(q.data(), g.data(), row.data(), col.data(), nullptr,
                     AdafactorShape{5, 100, 80}, t, 1e-2, AdafactorOptions{});
    }
    norms.push_back(clip_by_global_norm({{gc.data(), n}}, 1.0));
    for (auto* x : {&m, &v, &q, &row, &col, &gc}) p.insert(p.end(), x->begin(), x->end());
    runs.push_back(p);
  }
  set_num_threads(saved);
  CHECK(runs[0] == runs[1]);
  CHECK(runs[0] == runs[2]);
  CHECK_EQ(norms[0], norms[1]);
  CHECK_EQ(norms[0], norms[2]);
}

TEST(optim_fused_bf16_copy_matches_rounding_afterwards) {
  // adamw_step / adafactor_step with a bf16 copy: the same master bits as without, and the copy
  // equals convert_f32_to_bf16 of the updated masters (the rounding forwards used to do).
  const int64_t rows = 37, cols = 1000, n = rows * cols;  // several blocks
  const auto grad = normal_vector(n, 2);
  for (int which = 0; which < 2; ++which) {
    auto a = normal_vector(n, 1, 0.1f);
    auto b = a;
    std::vector<bf16> copy(n), expect(n);
    std::vector<float> m1(n, 0.0f), v1(n, 0.0f), m2(n, 0.0f), v2(n, 0.0f);
    AdafactorShape shape{1, rows, cols};
    std::vector<float> r1(rows, 0.0f), c1(cols, 0.0f), r2(rows, 0.0f), c2(cols, 0.0f);
    for (int64_t step = 1; step <= 2; ++step) {
      if (which == 0) {
        adamw_step(a.data(), grad.data(), m1.data(), v1.data(), n, step, 1e-2, {}, true);
        adamw_step(b.data(), grad.data(), m2.data(), v2.data(), n, step, 1e-2, {}, true,
                   copy.data());
      } else {
        adafactor_step(a.data(), grad.data(), r1.data(), c1.data(), nullptr, shape, step, 1e-2, {});
        adafactor_step(b.data(), grad.data(), r2.data(), c2.data(), nullptr, shape, step, 1e-2, {},
                       copy.data());
      }
    }
    CHECK(std::memcmp(a.data(), b.data(), n * sizeof(float)) == 0);
    convert_f32_to_bf16(a.data(), expect.data(), n);
    CHECK(std::memcmp(copy.data(), expect.data(), n * sizeof(bf16)) == 0);
  }
}
