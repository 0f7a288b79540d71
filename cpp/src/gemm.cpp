// The core's GEMMs: pyswitch's own packed, register-blocked kernel (cpu/gemm_tile.inl) on the
// active ISA, with C split into tiles run on the pool. oneDNN stays as the comparison
// (gemm_onednn_threaded) for pyswitch.matmul(library="onednn") and the benchmarks.
#include "gemm.hpp"

#include <omp.h>

#include <algorithm>
#include <oneapi/dnnl/dnnl.hpp>

#include "cpu/kernels.hpp"
#include "parallel.hpp"
#include "pyswitch/cpu_isa.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/matmul.hpp"

namespace pyswitch::detail {
namespace {

// Tiles of C per task. The tiling decides speed only: every element's arithmetic is fixed by
// the kernel (gemm_tile.inl), so results never depend on it.
constexpr int64_t kRowUnit = 96;  // tile heights are multiples of this (of every register block)
constexpr int64_t kMaxTileCols = 256;
constexpr int64_t kMinTileCols = 64;

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One bf16 x bf16 -> f32 matmul through oneDNN's primitive (cached by descriptor, so repeated
// shapes cost a lookup, not a JIT). Fails on CPUs where oneDNN has no bf16 matmul (below
// AVX-512); the core's own kernel has no such limit.
void onednn_matmul_bf16(int64_t M, int64_t N, int64_t K, const void* A, const void* B, float* C) {
  using dt = dnnl::memory::data_type;
  using dims = dnnl::memory::dims;
  const dnnl::memory::desc a_md(dims{M, K}, dt::bf16, dims{K, 1});
  const dnnl::memory::desc b_md(dims{K, N}, dt::bf16, dims{N, 1});
  const dnnl::memory::desc c_md(dims{M, N}, dt::f32, dims{N, 1});
  dnnl::engine& engine = cpu_engine();
  const dnnl::matmul::primitive_desc pd(engine, a_md, b_md, c_md);
  dnnl::memory a_mem(a_md, engine, const_cast<void*>(A));
  dnnl::memory b_mem(b_md, engine, const_cast<void*>(B));
  dnnl::memory c_mem(c_md, engine, C);
  dnnl::stream stream(engine);
  dnnl::matmul(pd).execute(
      stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}});
  stream.wait();
}

void zero_k_product(int64_t M, int64_t N, float beta, float* C, int64_t ldc) {
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == 0.0f ? 0.0f : C[m * ldc + n];
  }
}

struct TilePlan {
  int64_t row_tiles, tile_rows, col_tiles, tile_cols;
};

// Columns are narrowed until there are a few tiles per thread (expert-sized M, say 160 rows,
// would otherwise leave cores idle), but never below what keeps a tile efficient. Rows are then
// grouped into tiles of up to kMaxRowUnits units while every thread still gets several tiles: a
// tile packs its columns of B once for all its rows. Taller tiles would pay more than they save
// once K spans several blocks, because acc parked between K blocks no longer stays in L2 (on a
// Zen 3, 4096-row tiles at K = 1024 ran 12% slower than 384-row ones).
constexpr int64_t kMaxRowUnits = 4;

TilePlan plan_tiles(int64_t M, int64_t N, int threads) {
  const int64_t units = ceil_div(M, kRowUnit);
  TilePlan plan{0, 0, 0, kMaxTileCols};
  while (threads > 1 && plan.tile_cols > kMinTileCols &&
         units * ceil_div(N, plan.tile_cols) < 4 * static_cast<int64_t>(threads)) {
    plan.tile_cols /= 2;
  }
  plan.col_tiles = ceil_div(N, plan.tile_cols);
  const int64_t spare = units * plan.col_tiles / (4 * int64_t{threads});
  const int64_t group = std::clamp<int64_t>(spare, 1, kMaxRowUnits);
  plan.tile_rows = group * kRowUnit;
  plan.row_tiles = ceil_div(M, plan.tile_rows);
  return plan;
}

template <typename Loop>
void run_tiles(DType dtype, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
               float alpha, const void* A, int64_t lda, const void* B, int64_t ldb, float beta,
               float* C, int64_t ldc, int threads, Loop&& loop) {
  check_floating(dtype, "gemm");
  PYSWITCH_CHECK_ARG(beta == 0.0f || beta == 1.0f, "gemm: beta must be 0 or 1, got ", beta);
  PYSWITCH_CHECK_ARG(M >= 0 && N >= 0 && K >= 0, "gemm: sizes must be >= 0, got M=", M, " N=", N,
                     " K=", K);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    zero_k_product(M, N, beta, C, ldc);
    return;
  }
  const bool bf16 = dtype == DType::bfloat16;
  const cpu::KernelTable& kernels = cpu::active_kernels();
  const TilePlan plan = plan_tiles(M, N, threads);
  loop(plan.row_tiles * plan.col_tiles, [&](int64_t tile) {
    cpu::GemmTileArgs t;
    t.a = {A, lda, trans_a, bf16};
    t.b = {B, ldb, trans_b, bf16};
    t.K = K;
    t.m0 = (tile / plan.col_tiles) * plan.tile_rows;
    t.n0 = (tile % plan.col_tiles) * plan.tile_cols;
    t.rows = std::min(plan.tile_rows, M - t.m0);
    t.cols = std::min(plan.tile_cols, N - t.n0);
    t.alpha = alpha;
    t.beta_one = beta == 1.0f;
    t.c = C + t.m0 * ldc + t.n0;
    t.ldc = ldc;
    kernels.gemm_tile(t);
  });
}

}  // namespace

void gemm(DType dtype, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
          int64_t ldc) {
  run_tiles(dtype, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc,
            get_num_threads(), [](int64_t tiles, auto&& body) { parallel_for(tiles, body); });
}

void gemm_serial(DType dtype, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                 float alpha, const void* A, int64_t lda, const void* B, int64_t ldb, float beta,
                 float* C, int64_t ldc) {
  run_tiles(dtype, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, 1,
            [](int64_t tiles, auto&& body) {
              for (int64_t t = 0; t < tiles; ++t) body(t);
            });
}

std::string gemm_path(DType dtype) {
  const CpuIsa isa = active_cpu_isa();
  const char* block = isa == CpuIsa::avx512_bf16 ? "12x32" : isa == CpuIsa::avx2 ? "6x16" : "4x32";
  return concat("pyswitch ", cpu_isa_name(isa), " kernel, ", block, " register block: ",
                dtype == DType::bfloat16 ? "bf16 operands widened exactly to float32, " : "",
                "float32 FMA chain over k");
}

void gemm_onednn_threaded(DType dtype, int64_t M, int64_t N, int64_t K, const void* A,
                          const void* B, float* C) {
  if (M == 0 || N == 0) return;
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(get_num_threads());
  try {
    if (K == 0) {
      std::fill(C, C + M * N, 0.0f);
    } else if (dtype == DType::float32) {
      if (dnnl_sgemm('N', 'N', M, N, K, 1.0f, static_cast<const float*>(A), K,
                     static_cast<const float*>(B), N, 0.0f, C, N) != dnnl_success) {
        throw Error(concat("matmul: oneDNN dnnl_sgemm failed for M=", M, " N=", N, " K=", K));
      }
    } else {
      onednn_matmul_bf16(M, N, K, A, B, C);
    }
  } catch (const dnnl::error& e) {
    omp_set_num_threads(saved_threads);
    throw Error(concat("matmul: oneDNN failed (", e.what(), ")"));
  } catch (...) {
    omp_set_num_threads(saved_threads);
    throw;
  }
  omp_set_num_threads(saved_threads);
}

}  // namespace pyswitch::detail

namespace pyswitch {

void matmul(DType dtype, int64_t M, int64_t N, int64_t K, const void* A, const void* B, float* C) {
  check_floating(dtype, "matmul");
  PYSWITCH_CHECK_ARG(M >= 0 && N >= 0 && K >= 0, "matmul: sizes must be >= 0, got M=", M, " N=", N,
                     " K=", K);
  detail::gemm(dtype, false, false, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N);
}

void matmul_onednn(DType dtype, int64_t M, int64_t N, int64_t K, const void* A, const void* B,
                   float* C) {
  check_floating(dtype, "matmul");
  PYSWITCH_CHECK_ARG(M >= 0 && N >= 0 && K >= 0, "matmul: sizes must be >= 0, got M=", M, " N=", N,
                     " K=", K);
  detail::gemm_onednn_threaded(dtype, M, N, K, A, B, C);
}

}  // namespace pyswitch
