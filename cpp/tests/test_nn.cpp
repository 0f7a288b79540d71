// Transformer op tests (nn/ops.hpp): RMSNorm, RoPE, causal attention, Linear (float32 and
// bfloat16), embedding and cross-entropy, forward against plain double-precision loops and
// backward against central finite differences of those loops (or closed forms); thread-count
// bit-identity; bad arguments.
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "cpu/kernels.hpp"
#include "harness.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/cpu_isa.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/nn/ops.hpp"
#include "pyswitch/threading.hpp"
#include "test_data.hpp"

using namespace pyswitch;
using namespace pyswitch::nn;

namespace {

std::vector<double> to_double(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

// Largest |got - expect| over the arrays.
double max_abs_diff(const float* got, const std::vector<double>& expect) {
  double worst = 0;
  for (size_t i = 0; i < expect.size(); ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(got[i]) - expect[i]));
  }
  return worst;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

// Central differences of f (a scalar function of the double vector x) at every coordinate,
// compared with the analytic gradient: |g - fd| <= atol + rtol * |fd|.
template <typename F>
int check_gradient(const char* what, std::vector<double> x, const float* grad, F&& f, double h,
                   double atol, double rtol) {
  int bad = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = f(x);
    x[i] = saved - h;
    const double down = f(x);
    x[i] = saved;
    const double fd = (up - down) / (2 * h);
    if (std::fabs(fd - grad[i]) > atol + rtol * std::fabs(fd)) {
      if (bad < 5) std::printf("  %s[%zu]: numeric %.8f analytic %.8f\n", what, i, fd, grad[i]);
      ++bad;
    }
  }
  return bad;
}

// float32 -> bfloat16 -> float32, round to nearest even, written here from the definition
// (finite inputs only).
float round_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  bits &= 0xffff0000u;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// ----- double references -----

std::vector<double> rmsnorm_ref(const std::vector<double>& x, const std::vector<double>& w,
                                int64_t T, int64_t d, double eps) {
  std::vector<double> y(x.size());
  for (int64_t t = 0; t < T; ++t) {
    double ms = 0;
    for (int64_t j = 0; j < d; ++j) ms += x[t * d + j] * x[t * d + j];
    const double inv = 1.0 / std::sqrt(ms / d + eps);
    for (int64_t j = 0; j < d; ++j) y[t * d + j] = x[t * d + j] * inv * w[j];
  }
  return y;
}

// Half-split RoPE of the q and k parts of qkv (B*S, 3*H*Dh), position r % S.
std::vector<double> rope_ref(std::vector<double> qkv, int64_t B, int64_t S, int64_t H, int64_t Dh,
                             double base) {
  const int64_t half = Dh / 2, width = 3 * H * Dh;
  for (int64_t r = 0; r < B * S; ++r) {
    const double pos = static_cast<double>(r % S);
    for (int64_t part = 0; part < 2; ++part) {
      for (int64_t h = 0; h < H; ++h) {
        double* v = qkv.data() + r * width + part * H * Dh + h * Dh;
        for (int64_t i = 0; i < half; ++i) {
          const double angle = pos * std::pow(base, -2.0 * i / Dh);
          const double x1 = v[i], x2 = v[i + half];
          v[i] = x1 * std::cos(angle) - x2 * std::sin(angle);
          v[i + half] = x1 * std::sin(angle) + x2 * std::cos(angle);
        }
      }
    }
  }
  return qkv;
}

// Causal attention: out (B*S, H*Dh) and probs (B, H, S, S).
void attention_ref(const std::vector<double>& qkv, int64_t B, int64_t S, int64_t H, int64_t Dh,
                   std::vector<double>* out, std::vector<double>* probs) {
  const int64_t width = 3 * H * Dh;
  out->assign(static_cast<size_t>(B * S * H * Dh), 0.0);
  probs->assign(static_cast<size_t>(B * H * S * S), 0.0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < S; ++i) {
        const double* q = qkv.data() + (b * S + i) * width + h * Dh;
        std::vector<double> s(static_cast<size_t>(i + 1));
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j <= i; ++j) {
          const double* k = qkv.data() + (b * S + j) * width + H * Dh + h * Dh;
          double dot = 0;
          for (int64_t c = 0; c < Dh; ++c) dot += q[c] * k[c];
          s[j] = dot / std::sqrt(static_cast<double>(Dh));
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (double& v : s) sum += (v = std::exp(v - mx));
        for (int64_t j = 0; j <= i; ++j) {
          const double p = s[j] / sum;
          (*probs)[((b * H + h) * S + i) * S + j] = p;
          const double* v = qkv.data() + (b * S + j) * width + 2 * H * Dh + h * Dh;
          for (int64_t c = 0; c < Dh; ++c) (*out)[(b * S + i) * H * Dh + h * Dh + c] += p * v[c];
        }
      }
    }
  }
}

double dot(const std::vector<double>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

TEST(nn_rmsnorm_forward_backward_match_reference) {
  // 130 rows: three row blocks, so d_weight adds partial sums across blocks.
  const int64_t T = 130, d = 5;
  const float eps = 1e-5f;
  auto x = normal_vector(T * d, 1);
  for (int64_t j = 0; j < d; ++j) x[j] *= 1e-3f;  // a row whose mean square is near eps
  const auto w = normal_vector(d, 2);
  const auto dy = normal_vector(T * d, 3);
  std::vector<float> y(T * d), inv(T), dx(T * d), dw(d);
  rmsnorm_forward(x.data(), w.data(), T, d, eps, y.data(), inv.data());
  const auto ref = rmsnorm_ref(to_double(x), to_double(w), T, d, eps);
  CHECK(max_abs_diff(y.data(), ref) <= 1e-6 * max_abs(ref));
  for (int64_t t = 0; t < T; ++t) {
    double ms = 0;
    for (int64_t j = 0; j < d; ++j) ms += static_cast<double>(x[t * d + j]) * x[t * d + j];
    const double expect = 1.0 / std::sqrt(ms / d + eps);
    CHECK(std::fabs(inv[t] - expect) <= 1e-6 * expect);
  }
  rmsnorm_backward(dy.data(), x.data(), w.data(), inv.data(), T, d, dx.data(), dw.data());
  const auto wd = to_double(w), xd = to_double(x);
  CHECK_EQ(
      check_gradient(
          "dx", xd, dx.data(),
          [&](const std::vector<double>& xv) { return dot(rmsnorm_ref(xv, wd, T, d, eps), dy); },
          1e-7, 1e-5, 1e-5),
      0);
  CHECK_EQ(
      check_gradient(
          "d_weight", wd, dw.data(),
          [&](const std::vector<double>& wv) { return dot(rmsnorm_ref(xd, wv, T, d, eps), dy); },
          1e-6, 1e-5, 1e-5),
      0);
}

TEST(nn_rope_matches_reference_and_inverse_is_the_transpose) {
  const int64_t B = 2, S = 7, H = 2, Dh = 6, width = 3 * H * Dh;
  for (double base : {10000.0, 3.0}) {
    const auto qkv = normal_vector(B * S * width, 4);
    std::vector<float> got = qkv;
    rope_apply(got.data(), B, S, H, Dh, base, false);
    const auto ref = rope_ref(to_double(qkv), B, S, H, Dh, base);
    CHECK(max_abs_diff(got.data(), ref) <= 2e-6 * max_abs(ref));
    // v is untouched and position 0 (rows 0 and S) is the identity: bit-exact.
    for (int64_t r = 0; r < B * S; ++r) {
      for (int64_t c = 0; c < width; ++c) {
        if (c >= 2 * H * Dh || r % S == 0) CHECK_EQ(got[r * width + c], qkv[r * width + c]);
      }
    }
    // The inverse undoes the rotation.
    std::vector<float> back = got;
    rope_apply(back.data(), B, S, H, Dh, base, true);
    CHECK(max_abs_diff(back.data(), to_double(qkv)) <= 2e-6 * max_abs(to_double(qkv)));
    // It is the backward: <rope(x), g> == <x, rope^-1(g)> (a rotation's inverse is its transpose).
    const auto g = normal_vector(B * S * width, 5);
    std::vector<float> g_back = g;
    rope_apply(g_back.data(), B, S, H, Dh, base, true);
    const double lhs = dot(ref, g), rhs = dot(to_double(qkv), g_back);
    CHECK(std::fabs(lhs - rhs) <= 1e-5 * (1 + std::fabs(lhs)));
  }
  std::vector<float> buf(3 * 2 * 3);
  CHECK_THROWS(InvalidArgument, rope_apply(buf.data(), 1, 1, 2, 3, 10000.0, false),
               "head dimension must be even, got 3");
}

TEST(nn_attention_forward_matches_reference) {
  const int64_t B = 2, S = 5, H = 2, Dh = 3;
  const auto qkv = normal_vector(B * S * 3 * H * Dh, 6);
  std::vector<float> out(B * S * H * Dh), probs(B * H * S * S, -1.0f);
  attention_forward(qkv.data(), B, S, H, Dh, out.data(), probs.data());
  std::vector<double> ref_out, ref_probs;
  attention_ref(to_double(qkv), B, S, H, Dh, &ref_out, &ref_probs);
  CHECK(max_abs_diff(out.data(), ref_out) <= 1e-5);
  CHECK(max_abs_diff(probs.data(), ref_probs) <= 1e-6);
  // The upper triangle is exactly zero, and row 0 attends only to itself (p = 1).
  for (int64_t bh = 0; bh < B * H; ++bh) {
    for (int64_t i = 0; i < S; ++i) {
      for (int64_t j = i + 1; j < S; ++j) CHECK_EQ(probs[(bh * S + i) * S + j], 0.0f);
    }
    CHECK_EQ(probs[bh * S * S], 1.0f);
  }
}

TEST(nn_attention_softmax_kernels_match_reference_and_every_isa) {
  // Row lengths 1..70 cross every tail of the 16-lane chunks; scores up to +-30 exercise the
  // exp range reduction. Scalar is checked against double softmax, every ISA bitwise against
  // scalar.
  const int64_t rows = 70, width = 72, first_valid = 1;
  auto scores = normal_vector(rows * width, 31);
  for (float& x : scores) x *= 10.0f;
  const auto upstream = normal_vector(rows * width, 32);
  std::vector<float> probs_scalar, grads_scalar;
  for (CpuIsa isa : supported_cpu_isas()) {
    const cpu::KernelTable& k = cpu::kernels_for(isa);
    std::vector<float> probs = scores, grads = upstream;
    k.causal_softmax_rows(probs.data(), rows, width, first_valid, width);
    k.causal_softmax_backward_rows(probs.data(), width, grads.data(), width, rows, first_valid,
                                   width);
    if (isa == CpuIsa::scalar) {
      probs_scalar = probs;
      grads_scalar = grads;
      continue;
    }
    CHECK(std::memcmp(probs.data(), probs_scalar.data(), probs.size() * 4) == 0);
    CHECK(std::memcmp(grads.data(), grads_scalar.data(), grads.size() * 4) == 0);
  }
  double worst_p = 0, worst_g = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = first_valid + r;
    const float* s = scores.data() + r * width;
    const float* g = upstream.data() + r * width;
    double mx = -1e300, sum = 0, dot = 0;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, static_cast<double>(s[j]));
    std::vector<double> p(n);
    for (int64_t j = 0; j < n; ++j) sum += p[j] = std::exp(static_cast<double>(s[j]) - mx);
    for (int64_t j = 0; j < n; ++j) dot += (p[j] /= sum) * g[j];
    for (int64_t j = 0; j < width; ++j) {
      const float got_p = probs_scalar[r * width + j], got_g = grads_scalar[r * width + j];
      if (j >= n) {
        CHECK_EQ(got_p, 0.0f);
        CHECK_EQ(got_g, 0.0f);
        continue;
      }
      worst_p = std::max(worst_p, std::fabs(got_p - p[j]));
      worst_g = std::max(worst_g, std::fabs(got_g - p[j] * (g[j] - dot)));
    }
  }
  CHECK(worst_p <= 1e-6);
  CHECK(worst_g <= 1e-5);
  // A non-finite score makes its row NaN on every ISA, never a plausible distribution.
  for (CpuIsa isa : supported_cpu_isas()) {
    for (float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      std::vector<float> row(40, 0.5f);
      row[33] = bad;
      cpu::kernels_for(isa).causal_softmax_rows(row.data(), 1, 40, 37, 40);
      for (int64_t j = 0; j < 37; ++j) CHECK(std::isnan(row[j]));
      for (int64_t j = 37; j < 40; ++j) CHECK_EQ(row[j], 0.0f);
    }
  }
}

TEST(nn_attention_backward_matches_finite_differences) {
  const int64_t B = 2, S = 5, H = 2, Dh = 3;
  const auto qkv = normal_vector(B * S * 3 * H * Dh, 7);
  const auto d_out = normal_vector(B * S * H * Dh, 8);
  std::vector<float> out(B * S * H * Dh), probs(B * H * S * S), d_qkv(qkv.size(), 123.0f);
  attention_forward(qkv.data(), B, S, H, Dh, out.data(), probs.data());
  attention_backward(d_out.data(), qkv.data(), probs.data(), B, S, H, Dh, d_qkv.data());
  auto loss = [&](const std::vector<double>& q) {
    std::vector<double> o, p;
    attention_ref(q, B, S, H, Dh, &o, &p);
    return dot(o, d_out);
  };
  CHECK_EQ(check_gradient("d_qkv", to_double(qkv), d_qkv.data(), loss, 1e-6, 2e-5, 1e-4), 0);
}

TEST(nn_linear_float32_matches_reference) {
  const int64_t T = 9, in = 7, out = 5;
  const auto x = normal_vector(T * in, 9), w = normal_vector(in * out, 10),
             dy = normal_vector(T * out, 11);
  Linear lin(in, out, DType::float32);
  CHECK_EQ(lin.in_features(), in);
  CHECK_EQ(lin.out_features(), out);
  std::vector<float> y(T * out), dx(T * in, 7.0f), dw(in * out, 7.0f);
  lin.forward(w.data(), x.data(), T, y.data());
  std::vector<double> y_ref(T * out, 0.0), dx_ref(T * in, 0.0), dw_ref(in * out, 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < in; ++i) {
      for (int64_t o = 0; o < out; ++o) {
        y_ref[t * out + o] += static_cast<double>(x[t * in + i]) * w[i * out + o];
        dx_ref[t * in + i] += static_cast<double>(dy[t * out + o]) * w[i * out + o];
        dw_ref[i * out + o] += static_cast<double>(x[t * in + i]) * dy[t * out + o];
      }
    }
  }
  CHECK(max_abs_diff(y.data(), y_ref) <= 1e-5);
  lin.backward(w.data(), x.data(), dy.data(), T, dx.data(), dw.data());
  CHECK(max_abs_diff(dx.data(), dx_ref) <= 1e-5);
  CHECK(max_abs_diff(dw.data(), dw_ref) <= 1e-5);
  // dx may be skipped; d_weight is the same.
  std::vector<float> dw2(in * out, -1.0f);
  lin.backward(w.data(), x.data(), dy.data(), T, nullptr, dw2.data());
  CHECK(dw2 == dw);
  CHECK_THROWS(InvalidArgument, Linear(0, 3, DType::float32), "in_features");
  CHECK_THROWS(InvalidArgument, Linear(3, -1, DType::bfloat16), "out_features");
}

TEST(nn_linear_bfloat16_rounds_operands_and_accumulates_in_float32) {
  const int64_t T = 6, in = 33, out = 4;
  const auto x = normal_vector(T * in, 12), w = normal_vector(in * out, 13),
             dy = normal_vector(T * out, 14);
  Linear lin(in, out, DType::bfloat16);
  std::vector<float> y(T * out), dx(T * in), dw(in * out);
  lin.forward(w.data(), x.data(), T, y.data());
  lin.backward(w.data(), x.data(), dy.data(), T, dx.data(), dw.data());
  // Reference on the bf16-rounded operands in double; float32 accumulation rounding only.
  std::vector<double> y_ref(T * out, 0.0), dx_ref(T * in, 0.0), dw_ref(in * out, 0.0);
  double y_unrounded_err = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t o = 0; o < out; ++o) {
      double exact = 0;
      for (int64_t i = 0; i < in; ++i) {
        const double xb = round_bf16(x[t * in + i]), wb = round_bf16(w[i * out + o]);
        const double gb = round_bf16(dy[t * out + o]);
        y_ref[t * out + o] += xb * wb;
        dx_ref[t * in + i] += gb * wb;
        dw_ref[i * out + o] += xb * gb;
        exact += static_cast<double>(x[t * in + i]) * w[i * out + o];
      }
      y_unrounded_err = std::max(y_unrounded_err, std::fabs(exact - y_ref[t * out + o]));
    }
  }
  CHECK(max_abs_diff(y.data(), y_ref) <= 1e-5);
  CHECK(max_abs_diff(dx.data(), dx_ref) <= 1e-5);
  CHECK(max_abs_diff(dw.data(), dw_ref) <= 1e-5);
  // The rounding is visible: the float32 product differs by far more than that.
  CHECK(y_unrounded_err > 1e-3);
}

TEST(nn_embedding_forward_copies_rows_and_backward_accumulates) {
  const int64_t V = 20, d = 3, T = 40;  // V > 8: several vocabulary blocks in the backward
  const auto table = normal_vector(V * d, 15);
  std::mt19937 gen(16);
  std::vector<int32_t> tokens(T);
  for (auto& t : tokens) t = static_cast<int32_t>(gen() % V);
  tokens[3] = tokens[7] = tokens[30] = 11;  // repeats
  tokens[0] = 0;
  tokens[1] = V - 1;
  std::vector<float> out(T * d);
  embedding_forward(table.data(), V, d, tokens.data(), T, out.data());
  for (int64_t t = 0; t < T; ++t) {
    CHECK(std::memcmp(out.data() + t * d, table.data() + tokens[t] * d, d * sizeof(float)) == 0);
  }
  const auto d_out = normal_vector(T * d, 17);
  std::vector<float> d_table = normal_vector(V * d, 18);  // accumulated into, not overwritten
  std::vector<double> expect = to_double(d_table);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < d; ++j) expect[tokens[t] * d + j] += d_out[t * d + j];
  }
  embedding_backward(d_out.data(), tokens.data(), T, V, d, d_table.data());
  CHECK(max_abs_diff(d_table.data(), expect) <= 1e-5);

  tokens[5] = -1;
  CHECK_THROWS(InvalidArgument, embedding_forward(table.data(), V, d, tokens.data(), T, out.data()),
               "token 5 is -1");
  tokens[5] = static_cast<int32_t>(V);
  CHECK_THROWS(InvalidArgument, embedding_forward(table.data(), V, d, tokens.data(), T, out.data()),
               "token 5 is 20, outside the vocabulary [0, 20)");
}

TEST(nn_cross_entropy_matches_closed_form) {
  const int64_t T = 70, V = 7;  // 70 rows: two row blocks
  auto logits = normal_vector(T * V, 19, 3.0f);
  std::mt19937 gen(20);
  std::vector<int32_t> targets(T);
  for (auto& t : targets) t = static_cast<int32_t>(gen() % V);
  // A row with huge logits: a naive exp overflows; the loss is 2000 + log(1 + 5 e^-1000).
  for (int64_t j = 0; j < V; ++j) logits[j] = j == 0 ? 1000.0f : j == 1 ? -1000.0f : 0.0f;
  targets[0] = 1;
  const float scale = 0.25f;
  std::vector<float> d_logits(T * V, 9.0f);
  const double loss = cross_entropy(logits.data(), targets.data(), T, V, scale, d_logits.data());
  double expect = 0;
  std::vector<double> d_expect(T * V);
  for (int64_t t = 0; t < T; ++t) {
    double mx = -1e300;
    for (int64_t j = 0; j < V; ++j) mx = std::max(mx, static_cast<double>(logits[t * V + j]));
    double sum = 0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(logits[t * V + j] - mx);
    const double lse = mx + std::log(sum);
    expect += lse - logits[t * V + targets[t]];
    for (int64_t j = 0; j < V; ++j) {
      d_expect[t * V + j] = (std::exp(logits[t * V + j] - lse) - (j == targets[t])) * scale;
    }
  }
  CHECK(std::isfinite(loss));
  CHECK(std::fabs(loss - expect) <= 1e-9 * std::fabs(expect));
  CHECK(max_abs_diff(d_logits.data(), d_expect) <= 1e-7);
  CHECK_EQ(d_logits[0], scale);  // softmax of row 0 is one-hot on column 0
  CHECK_EQ(d_logits[1], -scale);
  // Without d_logits: the same loss.
  CHECK_EQ(cross_entropy(logits.data(), targets.data(), T, V, scale, nullptr), loss);
  // Uniform logits: ln V per row.
  std::vector<float> zeros(3 * V, 0.0f);
  CHECK(std::fabs(cross_entropy(zeros.data(), targets.data(), 3, V, 1.0f, nullptr) -
                  3 * std::log(static_cast<double>(V))) <= 1e-12);

  targets[2] = static_cast<int32_t>(V);
  CHECK_THROWS(InvalidArgument,
               cross_entropy(logits.data(), targets.data(), T, V, scale, d_logits.data()),
               "target 2 is 7");
  targets[2] = -3;
  CHECK_THROWS(InvalidArgument, cross_entropy(logits.data(), targets.data(), T, V, scale, nullptr),
               "target 2 is -3");
}

TEST(nn_ops_bit_identical_for_any_thread_count) {
  const int64_t T = 200, d = 6, V = 9, B = 2, S = 100, H = 1, Dh = 2;
  const auto x = normal_vector(T * d, 21), w = normal_vector(d, 22), dy = normal_vector(T * d, 23);
  const auto logits = normal_vector(T * V, 24);
  std::vector<int32_t> targets(T);
  for (int64_t t = 0; t < T; ++t) targets[t] = static_cast<int32_t>((t * 7) % V);
  const int saved = get_num_threads();
  std::vector<std::vector<float>> runs;
  std::vector<double> losses;
  for (int threads : {1, 2, 3}) {
    set_num_threads(threads);
    std::vector<float> y(T * d), inv(T), dx(T * d), dw(d), dl(T * V), qkv = x;
    rmsnorm_forward(x.data(), w.data(), T, d, 1e-6f, y.data(), inv.data());
    rmsnorm_backward(dy.data(), x.data(), w.data(), inv.data(), T, d, dx.data(), dw.data());
    rope_apply(qkv.data(), B, S, H, Dh, 10000.0, false);
    losses.push_back(cross_entropy(logits.data(), targets.data(), T, V, 0.5f, dl.data()));
    for (auto* v : {&inv, &dx, &dw, &dl, &qkv}) y.insert(y.end(), v->begin(), v->end());
    runs.push_back(y);
  }
  set_num_threads(saved);
  CHECK(runs[0] == runs[1]);
  CHECK(runs[0] == runs[2]);
  CHECK_EQ(losses[0], losses[1]);
  CHECK_EQ(losses[0], losses[2]);
}
