// The CUDA transformer ops: RMSNorm, RoPE, causal attention, embedding and cross-entropy, each
// following the CPU reference (nn/ops.cpp) operation for operation. Attention replays the CPU's
// GEMM chains and its 16-lane causal softmax (cpu/route_rows.inl) exactly, the embedding
// backward adds rows in token order, and RMSNorm's d_weight and cross-entropy's sums keep the
// CPU's sequential order, so those results are bit-identical. The exceptions (tree-summed
// RMSNorm row statistics, the device's double transcendentals) are noted where they occur.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/kernel_utils.cuh"
#include "cuda/ops.hpp"
#include "pyswitch/moe/route_math.hpp"

namespace pyswitch::cuda::ops {
namespace {

using namespace detail;  // kernel_utils.cuh and common.cuh

constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;  // row-per-warp kernels: 8 rows per block
// nn/ops.cpp's row blocks: RMSNorm's d_weight partials and cross-entropy's loss partials are
// per kRowBlock rows, combined in block order.
constexpr int64_t kRowBlock = 64;
// nn/ops.cpp's attention query blocks: block [i0, i1) multiplies over keys [0, i1), so a query
// row's products run over the keys up to its block's end, not just its causal prefix.
constexpr int64_t kQueryBlock = 64;

__device__ inline int64_t first_warp_row() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
}
__device__ inline int64_t warp_row_stride() {
  return static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
}
__device__ inline int lane_id() {
  return static_cast<int>(threadIdx.x % kWarp);
}
__device__ inline int64_t query_block_end(int64_t i, int64_t S) {
  return min(S, (i / kQueryBlock + 1) * kQueryBlock);
}

// Sum over a kThreads block in a fixed tree: the same shape every launch, so the same bits
// every run.
__device__ double block_sum(double value, double* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const double total = scratch[0];
  __syncthreads();  // scratch is free again for the caller's next reduction
  return total;
}

// ---- RMSNorm ---------------------------------------------------------------------------------
// The row statistics are double sums, tree-summed here where the CPU sums sequentially; they
// differ by about 1e-16 relative, so the float results they feed match the CPU's except when a
// value falls within that distance of a float rounding boundary.

__global__ void rmsnorm_forward_rows(const float* x, const float* weight, int64_t T, int64_t d,
                                     float eps, float* y, float* inv_rms) {
  __shared__ double scratch[kThreads];
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const float* row = x + t * d;
    double squares = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      squares += static_cast<double>(row[j]) * row[j];
    }
    squares = block_sum(squares, scratch);
    const float inv = static_cast<float>(1.0 / sqrt(squares / static_cast<double>(d) + eps));
    if (threadIdx.x == 0) inv_rms[t] = inv;
    float* out = y + t * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[j] = row[j] * inv * weight[j];
  }
}

__global__ void rmsnorm_backward_rows(const float* dy, const float* x, const float* weight,
                                      const float* inv_rms, int64_t T, int64_t d, float* dx) {
  __shared__ double scratch[kThreads];
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const float* row = x + t * d;
    const float* g = dy + t * d;
    const double inv = inv_rms[t];
    double dot = 0;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      dot += static_cast<double>(g[j]) * weight[j] * row[j];
    }
    dot = block_sum(dot, scratch);
    const double coef = inv * inv * inv * dot / static_cast<double>(d);
    float* out = dx + t * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      out[j] = static_cast<float>(inv * weight[j] * g[j] - coef * row[j]);
    }
  }
}

// partial[b * d + j]: row block b's contribution to d_weight[j], summed over its rows in order.
__global__ void rmsnorm_weight_partials(const float* dy, const float* x, const float* inv_rms,
                                        int64_t T, int64_t d, int64_t row_blocks, double* partial) {
  for (int64_t idx = first_index(); idx < row_blocks * d; idx += grid_stride()) {
    const int64_t b = idx / d, j = idx % d;
    const int64_t end = min(T, (b + 1) * kRowBlock);
    double sum = 0;
    for (int64_t t = b * kRowBlock; t < end; ++t) {
      sum += static_cast<double>(dy[t * d + j]) * x[t * d + j] * static_cast<double>(inv_rms[t]);
    }
    partial[idx] = sum;
  }
}

__global__ void rmsnorm_weight_total(const double* partial, int64_t d, int64_t row_blocks,
                                     float* d_weight) {
  for (int64_t j = first_index(); j < d; j += grid_stride()) {
    double sum = 0;
    for (int64_t b = 0; b < row_blocks; ++b) sum += partial[b * d + j];
    d_weight[j] = static_cast<float>(sum);
  }
}

// ---- RoPE ------------------------------------------------------------------------------------
// The CPU builds its cos/sin table with the host's libm in double; the device's double pow,
// sin and cos are within 2 ulp of it, so a table entry rounded to float can differ by one float
// ulp in rare cases (within RoPE's tolerance).

__global__ void rope_table(int64_t S, int64_t Dh, double base, bool inverse, float* cos_table,
                           float* sin_table) {
  const int64_t half = Dh / 2;
  for (int64_t idx = first_index(); idx < S * half; idx += grid_stride()) {
    const int64_t p = idx / half, i = idx % half;
    const double angle =
        static_cast<double>(p) * pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(Dh));
    cos_table[idx] = static_cast<float>(cos(angle));
    const float s = static_cast<float>(sin(angle));
    sin_table[idx] = inverse ? -s : s;
  }
}

// One thread per rotated pair (row, q or k, head, i).
__global__ void rope_rotate(float* qkv, int64_t rows, int64_t S, int64_t H, int64_t Dh,
                            const float* cos_table, const float* sin_table) {
  const int64_t half = Dh / 2, width = 3 * H * Dh;
  for (int64_t idx = first_index(); idx < rows * 2 * H * half; idx += grid_stride()) {
    const int64_t i = idx % half, head = idx / half;  // head counts (row, part, h)
    const int64_t r = head / (2 * H), part_head = head % (2 * H);
    float* v = qkv + r * width + part_head * Dh;
    const float c = cos_table[(r % S) * half + i], s = sin_table[(r % S) * half + i];
    const float x1 = v[i], x2 = v[i + half];
    v[i] = x1 * c - x2 * s;
    v[i + half] = x1 * s + x2 * c;
  }
}

// ---- causal attention ------------------------------------------------------------------------

// route_rows.inl's exp_nonpositive, lane for lane (route_math.hpp).
using moe::route_math::exp_nonpositive;

// route_rows.inl's reduce_lanes over lanes 0..15 of the warp (lane l holding lanes[l]): the
// pairwise tree (l, l + 8), (l, l + 4), (l, l + 2), (0, 1). Every lane gets the total.
template <class T>
__device__ inline T reduce_16_lanes(T value) {
  for (int offset = 8; offset > 0; offset /= 2) {
    value = value + __shfl_down_sync(kFullWarp, value, offset);
  }
  return __shfl_sync(kFullWarp, value, 0);
}

struct AttentionShape {
  int64_t B, S, H, Dh;
  __host__ __device__ int64_t width() const { return 3 * H * Dh; }  // qkv row
  __host__ __device__ int64_t out_width() const { return H * Dh; }  // out / d_out row
};

// One warp per query row (b, h, i): its scores over keys [0, i], their causal softmax
// (causal_softmax_rows_impl: max, exps summed in 16 double lanes and the canonical tree, then
// scaled by the float inverse of the sum), zeros for keys (i, S).
__global__ void attention_probs(const float* qkv, AttentionShape s, float scale, float* probs) {
  const int lane = lane_id();
  const int64_t width = s.width();
  for (int64_t row = first_warp_row(); row < s.B * s.H * s.S; row += warp_row_stride()) {
    const int64_t bh = row / s.S, i = row % s.S, b = bh / s.H, h = bh % s.H;
    const float* q = qkv + (b * s.S + i) * width + h * s.Dh;
    const float* keys = qkv + b * s.S * width + s.H * s.Dh + h * s.Dh;
    float* p = probs + row * s.S;
    const int64_t live = i + 1;
    bool finite = true;
    float row_max = -FLT_MAX;
    for (int64_t j = lane; j < live; j += kWarp) {
      float acc = 0.0f;
      for (int64_t d = 0; d < s.Dh; ++d) acc = fmaf(q[d], keys[j * width + d], acc);
      // With Dh == 0 the CPU's GEMM writes 0 for the empty product, without alpha.
      const float score = s.Dh == 0 ? 0.0f : scale * acc;
      p[j] = score;
      finite = finite && isfinite(score);
      row_max = row_max > score ? row_max : score;
    }
    for (int64_t j = live + lane; j < s.S; j += kWarp) p[j] = 0.0f;
    finite = __all_sync(kFullWarp, finite);
    if (!finite) {
      // As the CPU: a non-finite score makes the whole causal prefix NaN.
      for (int64_t j = lane; j < live; j += kWarp) p[j] = __int_as_float(0x7fc00000);
      continue;
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullWarp, row_max, offset);
      row_max = row_max > other ? row_max : other;
    }
    for (int64_t j = lane; j < live; j += kWarp) p[j] = exp_nonpositive(p[j] - row_max);
    __syncwarp();
    double lane_sum = 0;
    if (lane < 16) {
      for (int64_t j = lane; j < live; j += 16) lane_sum += static_cast<double>(p[j]);
    }
    const float inv = static_cast<float>(1.0 / reduce_16_lanes(lane_sum));
    __syncwarp();
    for (int64_t j = lane; j < live; j += kWarp) p[j] = p[j] * inv;
  }
}

// out (b, i, h, d) = sum over keys j < the query block's end of probs[i, j] * v[j, d], as the
// CPU's P V GEMM chain. One thread per element of out, in out's memory order.
__global__ void attention_out(const float* qkv, const float* probs, AttentionShape s, float* out) {
  const int64_t width = s.width(), count = s.B * s.S * s.H * s.Dh;
  for (int64_t idx = first_index(); idx < count; idx += grid_stride()) {
    const int64_t d = idx % s.Dh, h = (idx / s.Dh) % s.H, r = idx / (s.H * s.Dh);
    const int64_t b = r / s.S, i = r % s.S;
    const float* p = probs + ((b * s.H + h) * s.S + i) * s.S;
    const float* values = qkv + b * s.S * width + 2 * s.H * s.Dh + h * s.Dh + d;
    float acc = 0.0f;
    for (int64_t j = 0; j < query_block_end(i, s.S); ++j) acc = fmaf(p[j], values[j * width], acc);
    out[idx] = acc;
  }
}

// One warp per query row: dS = P * (dP - rowsum(P * dP)) over keys [0, i], dP = dO V^T (the
// CPU's GEMM chain over d), the row sum in 16 float lanes and the canonical tree
// (causal_softmax_backward_rows_impl); zeros for keys (i, S).
__global__ void attention_score_grads(const float* d_out, const float* qkv, const float* probs,
                                      AttentionShape s, float* ds) {
  const int lane = lane_id();
  const int64_t width = s.width(), out_width = s.out_width();
  for (int64_t row = first_warp_row(); row < s.B * s.H * s.S; row += warp_row_stride()) {
    const int64_t bh = row / s.S, i = row % s.S, b = bh / s.H, h = bh % s.H;
    const float* g = d_out + (b * s.S + i) * out_width + h * s.Dh;
    const float* values = qkv + b * s.S * width + 2 * s.H * s.Dh + h * s.Dh;
    const float* p = probs + row * s.S;
    float* grads = ds + row * s.S;
    const int64_t live = i + 1;
    for (int64_t j = lane; j < live; j += kWarp) {
      float acc = 0.0f;
      for (int64_t d = 0; d < s.Dh; ++d) acc = fmaf(g[d], values[j * width + d], acc);
      grads[j] = acc;
    }
    for (int64_t j = live + lane; j < s.S; j += kWarp) grads[j] = 0.0f;
    __syncwarp();
    float lane_dot = 0.0f;
    if (lane < 16) {
      for (int64_t j = lane; j < live; j += 16) lane_dot = fmaf(p[j], grads[j], lane_dot);
    }
    const float dot = reduce_16_lanes(lane_dot);
    __syncwarp();
    for (int64_t j = lane; j < live; j += kWarp) grads[j] = p[j] * (grads[j] - dot);
  }
}

// dq (b, i, h, d) = scale * sum over keys j < the query block's end of dS[i, j] * k[j, d].
__global__ void attention_query_grads(const float* qkv, const float* ds, AttentionShape s,
                                      float scale, float* d_qkv) {
  const int64_t width = s.width(), count = s.B * s.S * s.H * s.Dh;
  for (int64_t idx = first_index(); idx < count; idx += grid_stride()) {
    const int64_t d = idx % s.Dh, h = (idx / s.Dh) % s.H, r = idx / (s.H * s.Dh);
    const int64_t b = r / s.S, i = r % s.S;
    const float* grads = ds + ((b * s.H + h) * s.S + i) * s.S;
    const float* keys = qkv + b * s.S * width + s.H * s.Dh + h * s.Dh + d;
    float acc = 0.0f;
    for (int64_t j = 0; j < query_block_end(i, s.S); ++j)
      acc = fmaf(grads[j], keys[j * width], acc);
    d_qkv[r * width + h * s.Dh + d] = scale * acc;
  }
}

// dk and dv of key row j: the CPU accumulates one GEMM per query block whose keys reach j (from
// j's own block on), each a chain over the block's query rows, added to the running sum.
__global__ void attention_key_value_grads(const float* d_out, const float* qkv, const float* probs,
                                          const float* ds, AttentionShape s, float scale,
                                          float* d_qkv) {
  const int64_t width = s.width(), out_width = s.out_width(), count = s.B * s.S * s.H * s.Dh;
  for (int64_t idx = first_index(); idx < count; idx += grid_stride()) {
    const int64_t d = idx % s.Dh, h = (idx / s.Dh) % s.H, r = idx / (s.H * s.Dh);
    const int64_t b = r / s.S, j = r % s.S;
    const float* p = probs + (b * s.H + h) * s.S * s.S + j;
    const float* grads = ds + (b * s.H + h) * s.S * s.S + j;
    const float* g = d_out + b * s.S * out_width + h * s.Dh + d;
    const float* q = qkv + b * s.S * width + h * s.Dh + d;
    float dk = 0.0f, dv = 0.0f;
    for (int64_t i0 = j / kQueryBlock * kQueryBlock; i0 < s.S; i0 += kQueryBlock) {
      const int64_t i1 = min(s.S, i0 + kQueryBlock);
      float acc_k = 0.0f, acc_v = 0.0f;
      for (int64_t i = i0; i < i1; ++i) {
        acc_v = fmaf(p[i * s.S], g[i * out_width], acc_v);
        acc_k = fmaf(grads[i * s.S], q[i * width], acc_k);
      }
      dv = dv + acc_v;
      dk = dk + scale * acc_k;
    }
    d_qkv[r * width + s.H * s.Dh + h * s.Dh + d] = dk;
    d_qkv[r * width + 2 * s.H * s.Dh + h * s.Dh + d] = dv;
  }
}

AttentionShape attention_shape(int64_t batch, int64_t heads, std::pair<int64_t, int64_t> sizes) {
  return {batch, sizes.first, heads, sizes.second};
}

float attention_scale(int64_t Dh) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
}

// ---- token checks, embedding and cross-entropy ------------------------------------------------

__global__ void find_first_out_of_range(const int32_t* values, int64_t n, int64_t limit,
                                        unsigned long long* first) {
  for (int64_t i = first_index(); i < n; i += grid_stride()) {
    if (values[i] < 0 || values[i] >= limit) atomicMin(first, static_cast<unsigned long long>(i));
  }
}

struct OutOfRange {
  int64_t index;  // -1 when every value is in range
  int32_t value;
};

// The first of n device int32 values outside [0, limit), for the CPU's InvalidArgument (which
// names the first offender). Integer atomicMin: the answer does not depend on thread order.
OutOfRange first_out_of_range(const char* op, const int32_t* values, int64_t n, int64_t limit) {
  DeviceArray<unsigned long long> first =
      DeviceArray<unsigned long long>::upload({static_cast<unsigned long long>(n)}, op);
  find_first_out_of_range<<<blocks_for(n), kThreads, 0, stream()>>>(values, n, limit, first.data());
  check_launch(op);
  const unsigned long long found = first.download(op)[0];
  if (found >= static_cast<unsigned long long>(n)) return {-1, 0};
  OutOfRange bad{static_cast<int64_t>(found), 0};
  check_cuda(cudaMemcpy(&bad.value, values + bad.index, sizeof bad.value, cudaMemcpyDeviceToHost),
             op);
  return bad;
}

__global__ void embedding_gather(const float* table, const int32_t* tokens, int64_t T, int64_t d,
                                 float* out) {
  for (int64_t idx = first_index(); idx < T * d; idx += grid_stride()) {
    out[idx] = table[static_cast<int64_t>(tokens[idx / d]) * d + idx % d];
  }
}

// Block b owns vocabulary row rows[b] and adds the d_out rows of its tokens, listed in token
// order in order[offsets[b], offsets[b + 1]): the CPU's order, so the sums are bit-identical.
__global__ void embedding_accumulate(const float* d_out, const int64_t* rows,
                                     const int64_t* offsets, const int64_t* order,
                                     int64_t used_rows, int64_t d, float* d_table) {
  for (int64_t b = blockIdx.x; b < used_rows; b += gridDim.x) {
    float* row = d_table + rows[b] * d;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      float acc = row[j];
      for (int64_t k = offsets[b]; k < offsets[b + 1]; ++k) acc = acc + d_out[order[k] * d + j];
      row[j] = acc;
    }
  }
}

// One warp per row: its max (order-free for the rows whose loss is not NaN anyway), the sum of
// exp(row - max) in double added sequentially in column order as the CPU does, and the target's
// logit. Every lane adds the same shuffled values, so every lane holds the same sum.
__global__ void cross_entropy_rows(const float* logits, const int32_t* targets, int64_t T,
                                   int64_t V, float* row_max, double* exp_sum,
                                   float* target_logit) {
  const int lane = lane_id();
  for (int64_t t = first_warp_row(); t < T; t += warp_row_stride()) {
    const float* row = logits + t * V;
    float mx = -INFINITY;
    for (int64_t j = lane; j < V; j += kWarp) mx = mx < row[j] ? row[j] : mx;
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const float other = __shfl_xor_sync(kFullWarp, mx, offset);
      mx = mx < other ? other : mx;
    }
    mx = __shfl_sync(kFullWarp, mx, 0);
    double sum = 0;
    for (int64_t base = 0; base < V; base += kWarp) {
      const int64_t j = base + lane;
      const double e = j < V ? exp(static_cast<double>(row[j] - mx)) : 0.0;
      const int count = static_cast<int>(min(static_cast<int64_t>(kWarp), V - base));
      for (int k = 0; k < count; ++k) sum += __shfl_sync(kFullWarp, e, k);
    }
    if (lane == 0) {
      row_max[t] = mx;
      exp_sum[t] = sum;
      target_logit[t] = row[targets[t]];
    }
  }
}

__global__ void cross_entropy_grads(const float* logits, const int32_t* targets, const double* lse,
                                    int64_t T, int64_t V, float grad_scale, float* d_logits) {
  for (int64_t idx = first_index(); idx < T * V; idx += grid_stride()) {
    const int64_t t = idx / V;
    const float grad =
        static_cast<float>(exp(static_cast<double>(logits[idx]) - lse[t]) * grad_scale);
    d_logits[idx] = idx % V == targets[t] ? grad - grad_scale : grad;
  }
}

}  // namespace

void rmsnorm_forward(const TensorView& x, const TensorView& weight, float eps, const TensorView& y,
                     const TensorView& inv_rms) {
  const auto [T, d] = pyswitch::detail::check_rmsnorm_forward(Device::cuda, x, weight, y, inv_rms);
  if (T == 0) return;
  rmsnorm_forward_rows<<<blocks_for(T, 1), kThreads, 0, stream()>>>(
      x.as<const float>(), weight.as<const float>(), T, d, eps, y.as<float>(), inv_rms.as<float>());
  check_launch("rmsnorm_forward");
}

void rmsnorm_backward(const TensorView& dy, const TensorView& x, const TensorView& weight,
                      const TensorView& inv_rms, const TensorView& dx, const TensorView& d_weight) {
  const auto [T, d] =
      pyswitch::detail::check_rmsnorm_backward(Device::cuda, dy, x, weight, inv_rms, dx, d_weight);
  if (d == 0) return;
  const int64_t row_blocks = (T + kRowBlock - 1) / kRowBlock;
  DeviceArray<double> partial(row_blocks * d, "rmsnorm_backward");
  if (T > 0) {
    rmsnorm_backward_rows<<<blocks_for(T, 1), kThreads, 0, stream()>>>(
        dy.as<const float>(), x.as<const float>(), weight.as<const float>(),
        inv_rms.as<const float>(), T, d, dx.as<float>());
    check_launch("rmsnorm_backward");
    rmsnorm_weight_partials<<<blocks_for(row_blocks * d), kThreads, 0, stream()>>>(
        dy.as<const float>(), x.as<const float>(), inv_rms.as<const float>(), T, d, row_blocks,
        partial.data());
    check_launch("rmsnorm_backward");
  }
  // With no rows d_weight is still written (zeros), as on the CPU.
  rmsnorm_weight_total<<<blocks_for(d), kThreads, 0, stream()>>>(partial.data(), d, row_blocks,
                                                                 d_weight.as<float>());
  check_launch("rmsnorm_backward");
}

void rope_apply(const TensorView& qkv, int64_t batch, int64_t heads, double base, bool inverse) {
  const AttentionShape s = attention_shape(
      batch, heads,
      pyswitch::detail::check_attention_sizes(Device::cuda, "rope_apply", qkv, batch, heads));
  PYSWITCH_CHECK_ARG(s.Dh % 2 == 0, "rope: the head dimension must be even, got ", s.Dh);
  const int64_t half = s.Dh / 2, rows = s.B * s.S;
  if (rows == 0 || half == 0) return;
  DeviceArray<float> cos_table(s.S * half, "rope_apply"), sin_table(s.S * half, "rope_apply");
  rope_table<<<blocks_for(s.S * half), kThreads, 0, stream()>>>(s.S, s.Dh, base, inverse,
                                                                cos_table.data(), sin_table.data());
  check_launch("rope_apply");
  rope_rotate<<<blocks_for(rows * 2 * s.H * half), kThreads, 0, stream()>>>(
      qkv.as<float>(), rows, s.S, s.H, s.Dh, cos_table.data(), sin_table.data());
  check_launch("rope_apply");
}

void attention_forward(const TensorView& qkv, int64_t batch, int64_t heads, const TensorView& out,
                       const TensorView& probs) {
  const AttentionShape s = attention_shape(
      batch, heads,
      pyswitch::detail::check_attention_forward(Device::cuda, qkv, batch, heads, out, probs));
  const int64_t query_rows = s.B * s.H * s.S;
  if (query_rows == 0) return;
  const float scale = attention_scale(s.Dh);
  attention_probs<<<blocks_for(query_rows, kWarpsPerBlock), kThreads, 0, stream()>>>(
      qkv.as<const float>(), s, scale, probs.as<float>());
  check_launch("attention_forward");
  if (out.numel() == 0) return;
  attention_out<<<blocks_for(out.numel()), kThreads, 0, stream()>>>(
      qkv.as<const float>(), probs.as<const float>(), s, out.as<float>());
  check_launch("attention_forward");
}

void attention_backward(const TensorView& d_out, const TensorView& qkv, const TensorView& probs,
                        int64_t batch, int64_t heads, const TensorView& d_qkv) {
  const AttentionShape s =
      attention_shape(batch, heads,
                      pyswitch::detail::check_attention_backward(Device::cuda, d_out, qkv, probs,
                                                                 batch, heads, d_qkv));
  if (d_qkv.numel() == 0) return;
  const int64_t query_rows = s.B * s.H * s.S, elements = s.B * s.S * s.H * s.Dh;
  const float scale = attention_scale(s.Dh);
  DeviceArray<float> ds(query_rows * s.S, "attention_backward");
  attention_score_grads<<<blocks_for(query_rows, kWarpsPerBlock), kThreads, 0, stream()>>>(
      d_out.as<const float>(), qkv.as<const float>(), probs.as<const float>(), s, ds.data());
  check_launch("attention_backward");
  attention_query_grads<<<blocks_for(elements), kThreads, 0, stream()>>>(
      qkv.as<const float>(), ds.data(), s, scale, d_qkv.as<float>());
  check_launch("attention_backward");
  attention_key_value_grads<<<blocks_for(elements), kThreads, 0, stream()>>>(
      d_out.as<const float>(), qkv.as<const float>(), probs.as<const float>(), ds.data(), s, scale,
      d_qkv.as<float>());
  check_launch("attention_backward");
}

void embedding_forward(const TensorView& table, const TensorView& tokens, const TensorView& out) {
  pyswitch::detail::check_embedding_forward(Device::cuda, table, tokens, out);
  const int64_t V = table.shape[0], d = table.shape[1], T = tokens.shape[0];
  if (T == 0) return;
  const OutOfRange bad = first_out_of_range("embedding_forward", tokens.as<const int32_t>(), T, V);
  PYSWITCH_CHECK_ARG(bad.index < 0, "embedding: token ", bad.index, " is ", bad.value,
                     ", outside the vocabulary [0, ", V, ")");
  if (d == 0) return;
  embedding_gather<<<blocks_for(T * d), kThreads, 0, stream()>>>(
      table.as<const float>(), tokens.as<const int32_t>(), T, d, out.as<float>());
  check_launch("embedding_forward");
}

void embedding_backward(const TensorView& d_out, const TensorView& tokens,
                        const TensorView& d_table) {
  pyswitch::detail::check_embedding_backward(Device::cuda, d_out, tokens, d_table);
  const int64_t V = d_table.shape[0], d = d_table.shape[1], T = tokens.shape[0];
  if (T == 0 || d == 0) return;
  // The tokens of each vocabulary row in token order, by a stable counting sort on the host;
  // tokens outside [0, V) are skipped, as the CPU's vocabulary ranges never contain them.
  std::vector<int32_t> host_tokens(static_cast<size_t>(T));
  check_cuda(cudaMemcpy(host_tokens.data(), tokens.data, host_tokens.size() * sizeof(int32_t),
                        cudaMemcpyDeviceToHost),
             "embedding_backward");
  std::vector<int64_t> count(static_cast<size_t>(V), 0);
  for (int32_t v : host_tokens) {
    if (v >= 0 && v < V) ++count[static_cast<size_t>(v)];
  }
  std::vector<int64_t> rows, offsets{0}, start(static_cast<size_t>(V), 0);
  for (int64_t v = 0; v < V; ++v) {
    if (count[static_cast<size_t>(v)] == 0) continue;
    start[static_cast<size_t>(v)] = offsets.back();
    rows.push_back(v);
    offsets.push_back(offsets.back() + count[static_cast<size_t>(v)]);
  }
  if (rows.empty()) return;
  std::vector<int64_t> order(static_cast<size_t>(offsets.back()));
  for (int64_t t = 0; t < T; ++t) {
    const int32_t v = host_tokens[static_cast<size_t>(t)];
    if (v >= 0 && v < V) order[static_cast<size_t>(start[static_cast<size_t>(v)]++)] = t;
  }
  const auto device_rows = DeviceArray<int64_t>::upload(rows, "embedding_backward");
  const auto device_offsets = DeviceArray<int64_t>::upload(offsets, "embedding_backward");
  const auto device_order = DeviceArray<int64_t>::upload(order, "embedding_backward");
  const int64_t used_rows = static_cast<int64_t>(rows.size());
  embedding_accumulate<<<blocks_for(used_rows, 1), kThreads, 0, stream()>>>(
      d_out.as<const float>(), device_rows.data(), device_offsets.data(), device_order.data(),
      used_rows, d, d_table.as<float>());
  check_launch("embedding_backward");
}

double cross_entropy(const TensorView& logits, const TensorView& targets, float grad_scale,
                     const TensorView& d_logits) {
  const auto [T, V] =
      pyswitch::detail::check_cross_entropy(Device::cuda, logits, targets, d_logits);
  if (T == 0) return 0.0;
  const int32_t* target_data = targets.as<const int32_t>();
  const OutOfRange bad = first_out_of_range("cross_entropy", target_data, T, V);
  PYSWITCH_CHECK_ARG(bad.index < 0, "cross_entropy: target ", bad.index, " is ", bad.value,
                     ", outside [0, ", V, ")");
  DeviceArray<float> row_max(T, "cross_entropy"), target_logit(T, "cross_entropy");
  DeviceArray<double> exp_sum(T, "cross_entropy");
  cross_entropy_rows<<<blocks_for(T, kWarpsPerBlock), kThreads, 0, stream()>>>(
      logits.as<const float>(), target_data, T, V, row_max.data(), exp_sum.data(),
      target_logit.data());
  check_launch("cross_entropy");
  // The loss is finished on the host with the host's log, in the CPU's order (per block of
  // kRowBlock rows, then block by block), so it is bit-identical whenever the device's exp sums
  // are.
  const std::vector<float> host_max = row_max.download("cross_entropy");
  const std::vector<double> host_sum = exp_sum.download("cross_entropy");
  const std::vector<float> host_target = target_logit.download("cross_entropy");
  std::vector<double> lse(static_cast<size_t>(T));
  double total = 0;
  for (int64_t b0 = 0; b0 < T; b0 += kRowBlock) {
    double loss = 0;
    for (int64_t t = b0; t < std::min(T, b0 + kRowBlock); ++t) {
      const size_t at = static_cast<size_t>(t);
      lse[at] = static_cast<double>(host_max[at]) + std::log(host_sum[at]);
      loss += lse[at] - host_target[at];
    }
    total += loss;
  }
  if (d_logits.data != nullptr) {
    const auto device_lse = DeviceArray<double>::upload(lse, "cross_entropy");
    cross_entropy_grads<<<blocks_for(T * V), kThreads, 0, stream()>>>(
        logits.as<const float>(), target_data, device_lse.data(), T, V, grad_scale,
        d_logits.as<float>());
    check_launch("cross_entropy");
  }
  return total;
}

}  // namespace pyswitch::cuda::ops
