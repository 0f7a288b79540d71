// The CUDA GEMM: c (M, N) float32 = alpha * op(a) op(b) + beta * c, row-major.
//
// float32 operands run on this file's tiled kernel, which keeps the CPU reference's arithmetic
// contract (gemm.hpp): every element of C is the chain acc = fma(a[m, k], b[k, n], acc) over
// k = 0, 1, ..., K-1 from +0, then alpha * acc, then c_old + that when beta == 1. The results
// are therefore bit-identical to the CPU table, and a row's result never depends on M or on
// the kernel a library would pick for the shape. cuBLAS would reorder the sum over k (split-K,
// its epilogue's FMA), which moves results by far more than the 1e-5 relative bound that
// float32 GEMMs are held to once the sum cancels.
// bfloat16 operands run on cuBLAS (tensor cores, float32 accumulation), within the bfloat16
// tolerance; the handle forbids atomics, so its results repeat run to run.
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "cuda/ops.hpp"

namespace pyswitch::cuda::ops {
namespace {

using detail::check_cublas;
using detail::check_cuda;
using detail::check_launch;
using detail::stream;

constexpr int kTile = 64;   // C tile edge per block
constexpr int kDepth = 16;  // k steps staged in shared memory
constexpr int kMicro = 4;   // C elements per thread per tile edge
constexpr int kTileThreads = (kTile / kMicro) * (kTile / kMicro);  // 256
constexpr int kPaddedTile = kTile + 4;  // staggers the transposed shared-memory stores
constexpr unsigned kMaxGridY = 65535;

// One block computes a kTile x kTile tile of C; thread (ty, tx) owns rows ty * 4 + [0, 4) and
// columns tx * 4 + [0, 4) of it. Column tiles beyond the grid's y limit are looped over.
__global__ void __launch_bounds__(kTileThreads)
    sgemm_fma_chain_tiled(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                          const float* a, int64_t lda, const float* b, int64_t ldb, bool beta_one,
                          float* c) {
  __shared__ __align__(16) float a_tile[kDepth][kPaddedTile];  // [k][m]
  __shared__ __align__(16) float b_tile[kDepth][kPaddedTile];  // [k][n]
  const int tx = threadIdx.x % (kTile / kMicro), ty = threadIdx.x / (kTile / kMicro);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t col_tiles = (N + kTile - 1) / kTile;
  for (int64_t col_tile = blockIdx.y; col_tile < col_tiles; col_tile += gridDim.y) {
    const int64_t n0 = col_tile * kTile;
    float acc[kMicro][kMicro] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
      // The fastest-varying thread index walks each operand's contiguous dimension.
      for (int e = threadIdx.x; e < kDepth * kTile; e += kTileThreads) {
        const int mm = trans_a ? e % kTile : e / kDepth, ka = trans_a ? e / kTile : e % kDepth;
        const int64_t m = m0 + mm, k_a = k0 + ka;
        a_tile[ka][mm] = m < M && k_a < K ? (trans_a ? a[k_a * lda + m] : a[m * lda + k_a]) : 0.0f;
        const int nn = trans_b ? e / kDepth : e % kTile, kb = trans_b ? e % kDepth : e / kTile;
        const int64_t n = n0 + nn, k_b = k0 + kb;
        b_tile[kb][nn] = n < N && k_b < K ? (trans_b ? b[n * ldb + k_b] : b[k_b * ldb + n]) : 0.0f;
      }
      __syncthreads();
      // Only the real k steps: padding would add fma(0, 0, acc) terms the CPU never adds.
      const int depth = static_cast<int>(min(static_cast<int64_t>(kDepth), K - k0));
      for (int kk = 0; kk < depth; ++kk) {
        const float4 av = *reinterpret_cast<const float4*>(&a_tile[kk][ty * kMicro]);
        const float4 bv = *reinterpret_cast<const float4*>(&b_tile[kk][tx * kMicro]);
        const float a_vals[kMicro] = {av.x, av.y, av.z, av.w};
        const float b_vals[kMicro] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
        for (int i = 0; i < kMicro; ++i) {
#pragma unroll
          for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(a_vals[i], b_vals[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
    for (int i = 0; i < kMicro; ++i) {
      const int64_t m = m0 + ty * kMicro + i;
      if (m >= M) break;
      for (int j = 0; j < kMicro; ++j) {
        const int64_t n = n0 + tx * kMicro + j;
        if (n >= N) break;
        const float product = alpha == 1.0f ? acc[i][j] : alpha * acc[i][j];
        c[m * N + n] = beta_one ? c[m * N + n] + product : product;
      }
    }
  }
}

// The same chains, one C element per thread: for skinny shapes, where 64 x 64 tiles would be
// mostly padding (the router's logits, N = E) or too few to fill the GPU (its weight gradient,
// M x N = d_model x E with K = tokens). Lanes walk n fastest, so a warp's loads of op(b) are
// contiguous and its loads of op(a) are shared by the lanes of one row; the k loop is unrolled
// so that the loads of the next steps are in flight while the FMA chain, which must stay
// sequential, runs.
__global__ void sgemm_fma_chain_per_element(bool trans_a, bool trans_b, int64_t M, int64_t N,
                                            int64_t K, float alpha, const float* a, int64_t lda,
                                            const float* b, int64_t ldb, bool beta_one, float* c) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < M * N;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = i / N, n = i % N;
    const int64_t a_step = trans_a ? lda : 1, b_step = trans_b ? 1 : ldb;
    const float* a_k = trans_a ? a + m : a + m * lda;
    const float* b_k = trans_b ? b + n * ldb : b + n;
    constexpr int kUnroll = 8;
    float acc = 0.0f;
    int64_t k = 0;
    for (; k + kUnroll <= K; k += kUnroll) {
      float av[kUnroll], bv[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        av[u] = a_k[(k + u) * a_step];
        bv[u] = b_k[(k + u) * b_step];
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) acc = fmaf(av[u], bv[u], acc);
    }
    for (; k < K; ++k) acc = fmaf(a_k[k * a_step], b_k[k * b_step], acc);
    const float product = alpha == 1.0f ? acc : alpha * acc;
    c[i] = beta_one ? c[i] + product : product;
  }
}

int multiprocessor_count() {
  int device = 0, count = 0;
  check_cuda(cudaGetDevice(&device), "gemm");
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), "gemm");
  return count;
}

}  // namespace

void sgemm_fma_chain(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                     const float* a, int64_t lda, const float* b, int64_t ldb, bool beta_one,
                     float* c) {
  const int64_t row_tiles = (M + kTile - 1) / kTile, col_tiles = (N + kTile - 1) / kTile;
  if (M < kTile / 2 || N < kTile / 2 || row_tiles * col_tiles < multiprocessor_count()) {
    sgemm_fma_chain_per_element<<<detail::blocks_for(M * N), detail::kThreads, 0, stream()>>>(
        trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta_one, c);
    check_launch("gemm");
    return;
  }
  const dim3 grid(static_cast<unsigned>(row_tiles),
                  static_cast<unsigned>(std::min<int64_t>(col_tiles, kMaxGridY)));
  sgemm_fma_chain_tiled<<<grid, kTileThreads, 0, stream()>>>(trans_a, trans_b, M, N, K, alpha, a,
                                                             lda, b, ldb, beta_one, c);
  check_launch("gemm");
}

// Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS gets b as its first
// operand and a as its second, each transposed when the caller's flag is set.
void bf16_gemm_cublas(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                      const void* a, int64_t lda, const void* b, int64_t ldb, float beta,
                      float* c) {
  check_cublas(cublasGemmEx_64(detail::cublas_handle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                               trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, N, M, K, &alpha, b, CUDA_R_16BF,
                               ldb, a, CUDA_R_16BF, lda, &beta, c, CUDA_R_32F, N,
                               CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "gemm");
}

void gemm(const TensorView& a, bool trans_a, const TensorView& b, bool trans_b, const TensorView& c,
          float alpha, float beta) {
  const auto [M, N, K] =
      pyswitch::detail::require_gemm(Device::cuda, a, trans_a, b, trans_b, c, beta);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    // An empty product: C = beta * C, with no alpha (as the CPU's GEMM).
    if (beta == 0.0f) {
      check_cuda(cudaMemsetAsync(c.data, 0, static_cast<size_t>(c.nbytes()), stream()), "gemm");
    }
    return;
  }
  if (a.dtype == DType::float32) {
    sgemm_fma_chain(trans_a, trans_b, M, N, K, alpha, a.as<const float>(), a.shape[1],
                    b.as<const float>(), b.shape[1], beta == 1.0f, c.as<float>());
  } else {
    bf16_gemm_cublas(trans_a, trans_b, M, N, K, alpha, a.data, a.shape[1], b.data, b.shape[1], beta,
                     c.as<float>());
  }
}

}  // namespace pyswitch::cuda::ops
