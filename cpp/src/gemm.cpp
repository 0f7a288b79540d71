// GEMMs on oneDNN: dnnl_sgemm for float32, the matmul primitive for bfloat16 (bf16 operands,
// float32 accumulation and output). Blocked over rows for thread-count independence.
#include "gemm.hpp"

#include <omp.h>

#include <algorithm>
#include <oneapi/dnnl/dnnl.hpp>
#include <unordered_map>

#include "parallel.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/matmul.hpp"

namespace pyswitch::detail {
namespace {

constexpr int64_t kRowBlock = 128;

dnnl::engine& cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One bf16 x bf16 -> f32 matmul through the primitive (oneDNN caches primitives by descriptor,
// so repeated shapes cost a lookup, not a JIT).
void matmul_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
                 int64_t ldc) {
  using dt = dnnl::memory::data_type;
  using dims = dnnl::memory::dims;
  const dnnl::memory::desc a_md(dims{M, K}, dt::bf16, trans_a ? dims{1, lda} : dims{lda, 1});
  const dnnl::memory::desc b_md(dims{K, N}, dt::bf16, trans_b ? dims{1, ldb} : dims{ldb, 1});
  const dnnl::memory::desc c_md(dims{M, N}, dt::f32, dims{ldc, 1});
  dnnl::primitive_attr attr;
  if (alpha != 1.0f) attr.set_scales_mask(DNNL_ARG_WEIGHTS, 0);
  if (beta != 0.0f) {
    dnnl::post_ops ops;
    ops.append_sum(beta);
    attr.set_post_ops(ops);
  }
  dnnl::engine& engine = cpu_engine();
  const dnnl::matmul::primitive_desc pd(engine, a_md, b_md, c_md, attr);
  dnnl::memory a_mem(a_md, engine, const_cast<void*>(A));
  dnnl::memory b_mem(b_md, engine, const_cast<void*>(B));
  dnnl::memory c_mem(c_md, engine, C);
  dnnl::stream stream(engine);
  std::unordered_map<int, dnnl::memory> args{
      {DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, c_mem}};
  float alpha_value = alpha;
  if (alpha != 1.0f) {
    dnnl::memory scale_mem(dnnl::memory::desc(dims{1}, dt::f32, dims{1}), engine, &alpha_value);
    args.insert({DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, scale_mem});
  }
  dnnl::matmul(pd).execute(stream, args);
  stream.wait();
}

void gemm_single_call(DType dtype, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                      float alpha, const void* A, int64_t lda, const void* B, int64_t ldb,
                      float beta, float* C, int64_t ldc) {
  // oneDNN sizes its parallelism by omp_get_max_threads() of the calling thread; one thread per
  // block keeps its blocking (and so the rounding) independent of the pool size.
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(1);
  try {
    if (dtype == DType::float32) {
      const dnnl_status_t status = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', M, N, K,
                                              alpha, static_cast<const float*>(A), lda,
                                              static_cast<const float*>(B), ldb, beta, C, ldc);
      if (status != dnnl_success) {
        throw Error(concat("gemm: oneDNN dnnl_sgemm failed with status ", static_cast<int>(status),
                           " for M=", M, " N=", N, " K=", K));
      }
    } else {
      matmul_bf16(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    }
  } catch (const dnnl::error& e) {
    omp_set_num_threads(saved_threads);
    throw Error(concat("gemm: oneDNN failed (", e.what(), ") for M=", M, " N=", N, " K=", K,
                       " dtype=", dtype_name(dtype)));
  } catch (...) {
    omp_set_num_threads(saved_threads);
    throw;
  }
  omp_set_num_threads(saved_threads);
}

}  // namespace

void gemm(DType dtype, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
          const void* A, int64_t lda, const void* B, int64_t ldb, float beta, float* C,
          int64_t ldc) {
  const int64_t element = dtype_size(dtype);
  parallel_for(ceil_div(M, kRowBlock), [&](int64_t b) {
    const int64_t m0 = b * kRowBlock;
    const int64_t rows = std::min(kRowBlock, M - m0);
    const char* a_block = static_cast<const char*>(A) + (trans_a ? m0 : m0 * lda) * element;
    gemm_serial(dtype, trans_a, trans_b, rows, N, K, alpha, a_block, lda, B, ldb, beta,
                C + m0 * ldc, ldc);
  });
}

void gemm_serial(DType dtype, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                 float alpha, const void* A, int64_t lda, const void* B, int64_t ldb, float beta,
                 float* C, int64_t ldc) {
  PYSWITCH_CHECK_ARG(beta == 0.0f || beta == 1.0f, "gemm: beta must be 0 or 1, got ", beta);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == 0.0f ? 0.0f : C[m * ldc + n];
    }
    return;
  }
  gemm_single_call(dtype, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm_threaded(DType dtype, int64_t M, int64_t N, int64_t K, const void* A, const void* B,
                   float* C) {
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
      matmul_bf16(false, false, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N);
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
  PYSWITCH_CHECK_ARG(M >= 0 && N >= 0 && K >= 0, "matmul: sizes must be >= 0, got M=", M, " N=", N,
                     " K=", K);
  detail::gemm_threaded(dtype, M, N, K, A, B, C);
}

}  // namespace pyswitch
