// float32 GEMM on oneDNN (dnnl_sgemm), blocked over rows for thread-count independence.
#include "gemm.hpp"

#include <oneapi/dnnl/dnnl.h>

#include <algorithm>
#include <exception>

#include "parallel.hpp"
#include "pyswitch/error.hpp"

namespace pyswitch::detail {
namespace {
constexpr int64_t kRowBlock = 128;
}

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
           int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  parallel_for(ceil_div(M, kRowBlock), [&](int64_t b) {
    const int64_t m0 = b * kRowBlock;
    const int64_t rows = std::min(kRowBlock, M - m0);
    const float* a_block = trans_a ? A + m0 : A + m0 * lda;
    // oneDNN sizes its own parallelism by omp_get_max_threads() of the calling thread; one
    // thread per block keeps its K-splitting (and so the rounding) independent of the pool.
    const int saved_threads = omp_get_max_threads();
    omp_set_num_threads(1);
    const dnnl_status_t status = dnnl_sgemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', rows, N, K,
                                            alpha, a_block, lda, B, ldb, beta, C + m0 * ldc, ldc);
    omp_set_num_threads(saved_threads);
    if (status != dnnl_success) {
      throw Error(detail::concat("sgemm: oneDNN dnnl_sgemm failed with status ",
                                 static_cast<int>(status), " for M=", rows, " N=", N, " K=", K));
    }
  });
}

}  // namespace pyswitch::detail
