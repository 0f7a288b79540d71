// GEMM kernel tests: the scalar tier against the documented per-element FMA chain (written
// plainly here) and a double-precision product; every other ISA, thread count and row split
// against the scalar tier, bit for bit.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gemm.hpp"
#include "harness.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/cpu_isa.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/threading.hpp"
#include "test_data.hpp"

using namespace pyswitch;

namespace {

struct Problem {
  bool trans_a, trans_b, bf16;
  int64_t M, N, K;
  float alpha, beta;
};

// Operands stored as the call expects them: A is (M, K), or (K, M) when trans_a; B is (K, N),
// or (N, K) when trans_b. bf16 problems keep both the bf16 bits and their exact float values.
struct Operands {
  std::vector<float> a, b, c0;
  std::vector<bf16> a16, b16;
  int64_t lda, ldb;
};

Operands make_operands(const Problem& p, uint32_t seed) {
  Operands o;
  o.a = normal_vector(static_cast<size_t>(p.M * p.K), seed);
  o.b = normal_vector(static_cast<size_t>(p.K * p.N), seed + 1);
  o.c0 = normal_vector(static_cast<size_t>(p.M * p.N), seed + 2);
  o.lda = p.trans_a ? p.M : p.K;
  o.ldb = p.trans_b ? p.K : p.N;
  if (p.bf16) {
    for (float& x : o.a) {
      o.a16.push_back(float_to_bf16(x));
      x = bf16_to_float(o.a16.back());
    }
    for (float& x : o.b) {
      o.b16.push_back(float_to_bf16(x));
      x = bf16_to_float(o.b16.back());
    }
  }
  return o;
}

float a_at(const Problem& p, const Operands& o, int64_t m, int64_t k) {
  return p.trans_a ? o.a[k * o.lda + m] : o.a[m * o.lda + k];
}
float b_at(const Problem& p, const Operands& o, int64_t k, int64_t n) {
  return p.trans_b ? o.b[n * o.ldb + k] : o.b[k * o.ldb + n];
}

// The contract of gemm.hpp, element by element.
std::vector<float> chain_reference(const Problem& p, const Operands& o) {
  std::vector<float> c = o.c0;
  for (int64_t m = 0; m < p.M; ++m) {
    for (int64_t n = 0; n < p.N; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < p.K; ++k) acc = std::fma(a_at(p, o, m, k), b_at(p, o, k, n), acc);
      float out = p.alpha == 1.0f ? acc : p.alpha * acc;
      if (p.beta == 1.0f) out = o.c0[m * p.N + n] + out;
      c[m * p.N + n] = out;
    }
  }
  return c;
}

std::vector<float> run(const Problem& p, const Operands& o, bool serial = false) {
  std::vector<float> c = o.c0;
  const void* A = p.bf16 ? static_cast<const void*>(o.a16.data()) : o.a.data();
  const void* B = p.bf16 ? static_cast<const void*>(o.b16.data()) : o.b.data();
  const DType dtype = p.bf16 ? DType::bfloat16 : DType::float32;
  if (serial) {
    detail::gemm_serial(dtype, p.trans_a, p.trans_b, p.M, p.N, p.K, p.alpha, A, o.lda, B, o.ldb,
                        p.beta, c.data(), p.N);
  } else {
    detail::gemm(dtype, p.trans_a, p.trans_b, p.M, p.N, p.K, p.alpha, A, o.lda, B, o.ldb, p.beta,
                 c.data(), p.N);
  }
  return c;
}

bool same_bits(const std::vector<float>& x, const std::vector<float>& y) {
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
}

std::vector<Problem> problems() {
  std::vector<Problem> out;
  // Sizes cover register-block tails (M not a multiple of 4/6/12, N of 16/32), K blocking
  // (K > 256, K = 256 exactly) and tiles (M > 192, N > 256).
  const int64_t shapes[][3] = {{1, 1, 1},    {5, 7, 3},      {13, 33, 256}, {7, 17, 257},
                               {40, 100, 9}, {200, 70, 600}, {3, 300, 31},  {193, 20, 40}};
  for (const auto& s : shapes) {
    for (int t = 0; t < 8; ++t) {
      const bool ta = t & 1, tb = t & 2, bf = t & 4;
      out.push_back({ta, tb, bf, s[0], s[1], s[2], 1.0f, 0.0f});
      out.push_back({ta, tb, bf, s[0], s[1], s[2], 0.37f, 1.0f});
    }
  }
  out.push_back({false, false, false, 9, 11, 700, 1.0f, 1.0f});
  out.push_back({true, false, false, 9, 11, 700, 0.5f, 0.0f});
  // Tall calls: tiles of several 96-row blocks (all of M in a serial call) against one packed
  // B block, with acc parked over K blocks in C or, with beta = 1, in a buffer.
  out.push_back({false, false, false, 1000, 40, 600, 1.0f, 1.0f});
  out.push_back({true, false, false, 1000, 70, 300, 0.5f, 0.0f});
  out.push_back({false, true, true, 500, 300, 520, 1.0f, 1.0f});
  return out;
}

struct IsaGuard {
  CpuIsa saved = active_cpu_isa();
  int threads = get_num_threads();
  ~IsaGuard() {
    set_cpu_isa(saved);
    set_num_threads(threads);
  }
};

}  // namespace

TEST(gemm_scalar_is_the_documented_fma_chain_and_close_to_double) {
  IsaGuard guard;
  set_cpu_isa(CpuIsa::scalar);
  uint32_t seed = 10;
  for (const Problem& p : problems()) {
    const Operands o = make_operands(p, seed += 3);
    const std::vector<float> got = run(p, o);
    CHECK(same_bits(got, chain_reference(p, o)));
    double worst = 0.0;
    for (int64_t m = 0; m < p.M; ++m) {
      for (int64_t n = 0; n < p.N; ++n) {
        double exact = 0.0, magnitude = 0.0;
        for (int64_t k = 0; k < p.K; ++k) {
          const double term = static_cast<double>(a_at(p, o, m, k)) * b_at(p, o, k, n);
          exact += term;
          magnitude += std::fabs(term);
        }
        exact = p.alpha * exact + (p.beta == 1.0f ? o.c0[m * p.N + n] : 0.0);
        const double scale = std::fabs(p.alpha) * magnitude + 1.0;
        worst = std::max(worst, std::fabs(got[m * p.N + n] - exact) / scale);
      }
    }
    CHECK(worst < 1e-5);
  }
}

TEST(gemm_every_isa_thread_count_and_row_split_matches_scalar_bitwise) {
  IsaGuard guard;
  uint32_t seed = 500;
  for (const Problem& p : problems()) {
    const Operands o = make_operands(p, seed += 3);
    set_cpu_isa(CpuIsa::scalar);
    set_num_threads(1);
    const std::vector<float> expect = run(p, o);
    for (CpuIsa isa : supported_cpu_isas()) {
      set_cpu_isa(isa);
      for (int threads : {1, 2, 3}) {
        set_num_threads(threads);
        const bool ok = same_bits(run(p, o), expect) && same_bits(run(p, o, true), expect);
        if (!ok) {
          std::printf("  %s threads=%d M=%lld N=%lld K=%lld ta=%d tb=%d bf16=%d differs\n",
                      cpu_isa_name(isa), threads, static_cast<long long>(p.M),
                      static_cast<long long>(p.N), static_cast<long long>(p.K), p.trans_a,
                      p.trans_b, p.bf16);
        }
        CHECK(ok);
      }
      // A row computed in a call of other rows (here: rows [first, first + count) alone) gives
      // the bits it gets in the whole call: what expert parallelism relies on.
      if (p.trans_a || p.M < 3) continue;
      const int64_t first = p.M / 3, count = p.M - p.M / 3 - 1;
      Problem part = p;
      part.M = count;
      Operands sub = o;
      sub.a.assign(o.a.begin() + first * o.lda, o.a.begin() + (first + count) * o.lda);
      if (p.bf16)
        sub.a16.assign(o.a16.begin() + first * o.lda, o.a16.begin() + (first + count) * o.lda);
      sub.c0.assign(o.c0.begin() + first * p.N, o.c0.begin() + (first + count) * p.N);
      const std::vector<float> got = run(part, sub);
      CHECK(std::memcmp(got.data(), expect.data() + first * p.N, got.size() * sizeof(float)) == 0);
    }
  }
}

TEST(gemm_propagates_nan_and_inf_row_by_row) {
  IsaGuard guard;
  const Problem p{false, false, false, 7, 19, 5, 1.0f, 0.0f};
  Operands o = make_operands(p, 77);
  o.a[2 * p.K + 1] = std::numeric_limits<float>::quiet_NaN();
  o.a[4 * p.K + 0] = std::numeric_limits<float>::infinity();
  for (CpuIsa isa : supported_cpu_isas()) {
    set_cpu_isa(isa);
    const std::vector<float> c = run(p, o);
    for (int64_t n = 0; n < p.N; ++n) {
      CHECK(std::isnan(c[2 * p.N + n]));
      CHECK(std::isinf(c[4 * p.N + n]) || std::isnan(c[4 * p.N + n]));
      CHECK(std::isfinite(c[3 * p.N + n]) && std::isfinite(c[5 * p.N + n]));
    }
  }
}

TEST(gemm_rejects_bad_beta_and_handles_empty_sizes) {
  std::vector<float> c(6, 5.0f), a(6, 1.0f), b(6, 1.0f);
  CHECK_THROWS(InvalidArgument,
               detail::gemm(DType::float32, false, false, 2, 3, 2, 1.0f, a.data(), 2, b.data(), 3,
                            0.5f, c.data(), 3),
               "beta must be 0 or 1");
  detail::gemm(DType::float32, false, false, 2, 3, 0, 1.0f, a.data(), 0, b.data(), 3, 1.0f,
               c.data(), 3);
  CHECK(c[0] == 5.0f && c[5] == 5.0f);  // K = 0 with beta = 1 keeps C
  detail::gemm(DType::float32, false, false, 2, 3, 0, 1.0f, a.data(), 0, b.data(), 3, 0.0f,
               c.data(), 3);
  CHECK(c[0] == 0.0f && c[5] == 0.0f);  // K = 0 with beta = 0 zeroes C
}
