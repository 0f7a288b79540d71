// The CUDA grouped expert FFN: experts_forward and experts_backward over a packed expert buffer
// (moe/expert.hpp), the CPU's moe/expert.cpp step for step. float32 GEMMs run on gemm.cu's
// FMA-chain kernel, which keeps the CPU GEMM's per-element chain (so float32 matches the CPU bit
// for bit); bfloat16 GEMMs run on cuBLAS tensor cores with float32 accumulation and float32
// results, per expert or as one strided-batched call when every expert has the same rows (the
// padded layout). Activations, biases, dropout and bf16 roundings are elementwise kernels with the
// CPU's float expressions; bias gradients are column sums in the CPU's row order. Nothing uses
// atomics. The forward keeps what the backward needs on the device, in the cache's device_state.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "cuda/kernel_utils.cuh"
#include "cuda/ops.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/moe/activation_math.hpp"

namespace pyswitch::cuda::ops {
namespace {

using namespace detail;  // kernel_utils.cuh and common.cuh
using moe::Activation;

using moe::activation_math::gelu;
using moe::activation_math::gelu_grad;

// Inverted dropout as the CPU draws it: element `index` of the hidden activation takes word
// index % 4 of Philox block index / 4. rate and keep_scale are the CPU's float casts.
struct Dropout {
  bool on = false;
  uint64_t seed = 0, stream = 0;
  int64_t first_row = 0;
  float rate = 0.0f, keep_scale = 1.0f;
};
Dropout dropout_of(const moe::DropoutSpec& spec) {
  Dropout d;
  d.on = spec.rate > 0.0;
  d.seed = spec.seed;
  d.stream = spec.stream;
  d.first_row = spec.first_row;
  d.rate = static_cast<float>(spec.rate);
  d.keep_scale = static_cast<float>(1.0 / (1.0 - spec.rate));
  return d;
}
__device__ inline float dropout_scale(const Dropout& s, int64_t index) {
  return moe::activation_math::dropout_multiplier(s.seed, s.stream, index, s.rate, s.keep_scale);
}

// The expert owning buffer row r: offsets[e] <= r < offsets[e + 1] (empty experts skipped).
__device__ inline int64_t expert_of(const int64_t* offsets, int64_t num_experts, int64_t r) {
  int64_t lo = 0, hi = num_experts;
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= r) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

__global__ void round_to_bf16_kernel(const float* src, int64_t n, bf16* dst) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = float_to_bf16(src[i]);
  }
}

// pre += b_in; hidden = act(pre) (gelu(pre) * linear for geglu), times the dropout scale;
// hidden is kept in float32 or, for bf16 compute, only rounded (the GEMM operand and what the
// backward reads).
struct ActivationArgs {
  float* pre;
  const float* linear;
  const float* b_in;
  const int64_t* offsets;
  float* hidden;
  bf16* hidden_bf16;
  int64_t num_experts, rows, f;
  Activation activation;
  Dropout dropout;
};
__global__ void activation_kernel(ActivationArgs a) {
  const int64_t j = this_col();
  if (j >= a.f) return;
  for (int64_t r = first_row(); r < a.rows; r += row_step()) {
    const int64_t i = r * a.f + j;
    float p = a.pre[i];
    if (a.b_in) {
      p += a.b_in[expert_of(a.offsets, a.num_experts, r) * a.f + j];
      a.pre[i] = p;
    }
    float h;
    if (a.activation == Activation::geglu) {
      h = gelu(p) * a.linear[i];
    } else if (a.activation == Activation::gelu) {
      h = gelu(p);
    } else {
      h = p > 0.0f ? p : 0.0f;
    }
    if (a.dropout.on) h *= dropout_scale(a.dropout, (a.dropout.first_row + r) * a.f + j);
    if (a.hidden_bf16) {
      a.hidden_bf16[i] = float_to_bf16(h);
    } else {
      a.hidden[i] = h;
    }
  }
}

// out (rows, d) of T = acc (float32) + b_out of the row's expert (when given): the forward's
// output epilogue, and the bf16 rounding of the backward's dx. acc may alias out.
template <class T>
__global__ void output_kernel(const float* acc, const float* b_out, const int64_t* offsets,
                              int64_t num_experts, int64_t rows, int64_t d, T* out) {
  const int64_t j = this_col();
  if (j >= d) return;
  for (int64_t r = first_row(); r < rows; r += row_step()) {
    float v = acc[r * d + j];
    if (b_out) v += b_out[expert_of(offsets, num_experts, r) * d + j];
    store_from_float(out, r * d + j, v);
  }
}

// d_pre holds d_hidden on entry: through dropout and the activation's derivative, in place.
// d_linear (geglu) and the bf16 GEMM operands are written where given.
struct ActivationGradArgs {
  float* d_pre;
  float* d_linear;
  bf16* d_pre_bf16;
  bf16* d_linear_bf16;
  const float* pre;
  const float* linear;
  int64_t rows, f;
  Activation activation;
  Dropout dropout;
};
__global__ void activation_grad_kernel(ActivationGradArgs a) {
  const int64_t j = this_col();
  if (j >= a.f) return;
  for (int64_t r = first_row(); r < a.rows; r += row_step()) {
    const int64_t i = r * a.f + j;
    float dp = a.d_pre[i];
    if (a.dropout.on) dp *= dropout_scale(a.dropout, (a.dropout.first_row + r) * a.f + j);
    const float p = a.pre[i];
    if (a.activation == Activation::geglu) {
      const float dl = dp * gelu(p);
      dp = dp * a.linear[i] * gelu_grad(p);
      if (a.d_linear) a.d_linear[i] = dl;
      if (a.d_linear_bf16) a.d_linear_bf16[i] = float_to_bf16(dl);
    } else if (a.activation == Activation::gelu) {
      dp *= gelu_grad(p);
    } else {
      dp = p > 0.0f ? dp : 0.0f;
    }
    a.d_pre[i] = dp;
    if (a.d_pre_bf16) a.d_pre_bf16[i] = float_to_bf16(dp);
  }
}

// out (E, width) = per expert, the float32 column sums of src over the expert's rows, from +0
// in row order (the CPU's bias gradients); 0 for an empty expert.
template <class T>
__global__ void column_sums_kernel(const T* src, const int64_t* offsets, int64_t num_experts,
                                   int64_t width, float* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < num_experts * width; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i / width, j = i % width;
    float acc = 0.0f;
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) acc += load_as_float(src, r * width + j);
    out[i] = acc;
  }
}

template <class T>
void column_sums(const char* op, const T* src, const int64_t* offsets, int64_t num_experts,
                 int64_t width, float* out) {
  column_sums_kernel<T>
      <<<detail::blocks_for(num_experts * width), detail::kThreads, 0, detail::stream()>>>(
          src, offsets, num_experts, width, out);
  check_launch(op);
}

// ---- per-expert GEMMs ----------------------------------------------------------------------

// A row-major operand of the per-expert GEMMs: expert e's matrix starts at element
// offsets[e] * per_row + e * per_expert (activations advance by buffer rows, weights by
// expert) and has leading dimension ld.
struct Matrix {
  const void* base;
  int64_t ld, per_row, per_expert;
};

// Activation-shaped operands (rows of `width` elements) and weight-shaped ones (one matrix of
// `size` elements per expert, rows of `ld`).
Matrix rows_of(const void* base, int64_t width) {
  return {base, width, width, 0};
}
Matrix weights_of(const void* base, int64_t ld, int64_t size) {
  return {base, ld, 0, size};
}

// An extent that is the expert's row count.
constexpr int64_t kRows = -1;

// The experts of one op call: row offsets on the host and on the device.
struct Experts {
  const char* op;
  DType dtype;  // of the GEMM operands A and B; C is always float32
  const int64_t* offsets;
  const int64_t* offsets_dev;
  int64_t count;
};

// float32: the CPU's GEMM contract exactly, per expert (gemm.cuh): every element is the CPU's
// value bit for bit. An expert without rows still gets its call where K is its row count, so
// that its C is the empty product (zero), as on the CPU.
void chain_gemms(const Experts& x, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                 const Matrix& a, const Matrix& b, float beta, const Matrix& c) {
  for (int64_t e = 0; e < x.count; ++e) {
    const int64_t first = x.offsets[e], rows = x.offsets[e + 1] - first;
    const int64_t m = M == kRows ? rows : M, n = N == kRows ? rows : N, k = K == kRows ? rows : K;
    if (m == 0 || n == 0) continue;
    PYSWITCH_CHECK_STATE(c.ld == n, x.op, ": an expert GEMM's C must be dense (ld ", c.ld, " for ",
                         n, " columns)");
    auto at = [&](const Matrix& mat) {
      return static_cast<const float*>(mat.base) + first * mat.per_row + e * mat.per_expert;
    };
    sgemm_fma_chain(trans_a, trans_b, m, n, k, 1.0f, at(a), a.ld, at(b), b.ld, beta == 1.0f,
                    const_cast<float*>(at(c)));
  }
}

// bfloat16: cuBLAS (tensor cores) with float32 compute and float32 C, per expert, or one
// strided-batched call when every expert has the same rows (the padded layout). Row-major
// C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T. An expert without rows gets no call;
// where its K is its row count and beta is 0 its C is zeroed (the CPU's empty product).
void cublas_gemms(const Experts& x, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                  const Matrix& a, const Matrix& b, float beta, const Matrix& c) {
  const cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const float alpha = 1.0f;
  const cublasHandle_t handle = detail::cublas_handle();
  const int64_t E = x.count;
  auto at = [](const Matrix& m, int64_t first, int64_t e, int64_t size) {
    return static_cast<const char*>(m.base) + (first * m.per_row + e * m.per_expert) * size;
  };
  auto c_at = [&](int64_t first, int64_t e) {
    return static_cast<float*>(const_cast<void*>(static_cast<const void*>(at(c, first, e, 4))));
  };
  const int64_t in = 2;  // bytes per bf16 operand element
  const int64_t n0 = x.offsets[1] - x.offsets[0];
  bool uniform = E > 1 && n0 > 0;
  for (int64_t e = 1; uniform && e < E; ++e) uniform = x.offsets[e + 1] - x.offsets[e] == n0;
  if (uniform) {
    const int64_t m = M == kRows ? n0 : M, n = N == kRows ? n0 : N, k = K == kRows ? n0 : K;
    auto stride = [n0](const Matrix& mat) { return n0 * mat.per_row + mat.per_expert; };
    check_cublas(cublasGemmStridedBatchedEx_64(
                     handle, op_b, op_a, n, m, k, &alpha, at(b, 0, 0, in), CUDA_R_16BF, b.ld,
                     stride(b), at(a, 0, 0, in), CUDA_R_16BF, a.ld, stride(a), &beta, c_at(0, 0),
                     CUDA_R_32F, c.ld, stride(c), E, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                 x.op);
    return;
  }
  for (int64_t e = 0; e < E; ++e) {
    const int64_t first = x.offsets[e], rows = x.offsets[e + 1] - first;
    const int64_t m = M == kRows ? rows : M, n = N == kRows ? rows : N, k = K == kRows ? rows : K;
    if (rows == 0) {
      if (K == kRows && beta == 0.0f) {
        check_cuda(
            cudaMemset2DAsync(c_at(first, e), static_cast<size_t>(c.ld) * 4, 0,
                              static_cast<size_t>(n) * 4, static_cast<size_t>(m), detail::stream()),
            x.op);
      }
      continue;
    }
    check_cublas(
        cublasGemmEx_64(handle, op_b, op_a, n, m, k, &alpha, at(b, first, e, in), CUDA_R_16BF, b.ld,
                        at(a, first, e, in), CUDA_R_16BF, a.ld, &beta, c_at(first, e), CUDA_R_32F,
                        c.ld, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        x.op);
  }
}

// For every expert: C (M, N) float32 = op(A) op(B) + beta * C, row-major; an extent may be
// kRows. beta is 0 or 1.
void expert_gemms(const Experts& x, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K,
                  const Matrix& a, const Matrix& b, float beta, const Matrix& c) {
  if (x.dtype == DType::float32) {
    chain_gemms(x, trans_a, trans_b, M, N, K, a, b, beta, c);
  } else {
    cublas_gemms(x, trans_a, trans_b, M, N, K, a, b, beta, c);
  }
}

// ---- what the forward keeps for the backward -----------------------------------------------

struct SavedActivations {
  DType dtype = DType::float32;
  Activation activation = Activation::relu;
  int64_t rows = 0, d_ff = 0;
  DeviceArray<float> pre, linear;  // (rows, d_ff) pre-activations (linear: geglu)
  DeviceArray<float> hidden;       // (rows, d_ff) after activation and dropout (float32 only)
  DeviceArray<bf16> hidden_bf16;   // the same rounded (bf16 compute only)
  // The bf16 weights the forward used: the caller's copy or these, rounded by the forward.
  DeviceArray<bf16> w_in, w_gate, w_out;
  const bf16* w_in_used = nullptr;
  const bf16* w_gate_used = nullptr;
  const bf16* w_out_used = nullptr;
};

// The op's experts; `device` receives the offsets (the elementwise and bias kernels read them
// there).
Experts experts_of(const char* op, DType dtype, const int64_t* offsets, int64_t num_experts,
                   DeviceArray<int64_t>& device) {
  device =
      DeviceArray<int64_t>::upload(std::vector<int64_t>(offsets, offsets + num_experts + 1), op);
  return {op, dtype, offsets, device.data(), num_experts};
}

const bf16* round_weights(const float* src, int64_t n, DeviceArray<bf16>& out) {
  out = DeviceArray<bf16>(n, "experts_forward");
  round_to_bf16_kernel<<<detail::blocks_for(n), detail::kThreads, 0, detail::stream()>>>(
      src, n, out.data());
  check_launch("experts_forward");
  return out.data();
}

}  // namespace

void experts_forward(const moe::ExpertShape& shape, const moe::ExpertParams& params,
                     const int64_t* offsets, const TensorView& x, const TensorView& y,
                     moe::ExpertCache* cache, const moe::DropoutSpec& dropout) {
  const char* op = "experts_forward";
  moe::validate_experts(op, shape, params, offsets);
  const int64_t E = shape.num_experts, d = shape.d_model, f = shape.d_ff;
  const int64_t rows = offsets[E];
  require(op, "x", x, kComputeTypes, {rows, d});
  require(op, "y", y, kComputeTypes, {rows, d});
  require_same_dtype(op, "x", x, "y", y);
  PYSWITCH_CHECK_ARG(dropout.rate >= 0.0 && dropout.rate < 1.0,
                     "experts_forward: dropout rate must be in [0, 1), got ", dropout.rate);
  const DType dtype = x.dtype;
  const bool geglu = shape.activation == Activation::geglu;
  const bool bf16_compute = dtype == DType::bfloat16;
  // A failed forward leaves no saved state behind, and the old one is freed before the new one
  // is allocated.
  if (cache) cache->device_state.reset();

  auto saved = std::make_shared<SavedActivations>();
  SavedActivations& s = *saved;
  s.dtype = dtype;
  s.activation = shape.activation;
  s.rows = rows;
  s.d_ff = f;
  const moe::DropoutSpec spec = cache ? dropout : moe::DropoutSpec{};
  if (rows > 0) {
    const void* w_in = params.w_in;
    const void* w_gate = params.w_gate;
    const void* w_out = params.w_out;
    if (bf16_compute) {
      if (params.w_in_bf16 && params.w_out_bf16 && (!geglu || params.w_gate_bf16)) {
        s.w_in_used = params.w_in_bf16;
        s.w_out_used = params.w_out_bf16;
        s.w_gate_used = geglu ? params.w_gate_bf16 : nullptr;
      } else {
        s.w_in_used = round_weights(params.w_in, E * d * f, s.w_in);
        s.w_out_used = round_weights(params.w_out, E * f * d, s.w_out);
        s.w_gate_used = geglu ? round_weights(params.w_gate, E * d * f, s.w_gate) : nullptr;
      }
      w_in = s.w_in_used;
      w_gate = s.w_gate_used;
      w_out = s.w_out_used;
    }
    s.pre = DeviceArray<float>(rows * f, op);
    if (geglu) s.linear = DeviceArray<float>(rows * f, op);
    if (bf16_compute) {
      s.hidden_bf16 = DeviceArray<bf16>(rows * f, op);
    } else {
      s.hidden = DeviceArray<float>(rows * f, op);
    }
    DeviceArray<int64_t> offsets_dev;
    const Experts g = experts_of(op, dtype, offsets, E, offsets_dev);
    const Matrix x_rows = rows_of(x.data, d);
    expert_gemms(g, false, false, kRows, f, d, x_rows, weights_of(w_in, f, d * f), 0.0f,
                 rows_of(s.pre.data(), f));
    if (geglu) {
      expert_gemms(g, false, false, kRows, f, d, x_rows, weights_of(w_gate, f, d * f), 0.0f,
                   rows_of(s.linear.data(), f));
    }
    ActivationArgs act;
    act.pre = s.pre.data();
    act.linear = s.linear.data();
    act.b_in = params.b_in;
    act.offsets = offsets_dev.data();
    act.hidden = s.hidden.data();
    act.hidden_bf16 = s.hidden_bf16.data();
    act.num_experts = E;
    act.rows = rows;
    act.f = f;
    act.activation = shape.activation;
    act.dropout = dropout_of(spec);
    const RowGrid hidden_grid = row_grid(rows, f);
    activation_kernel<<<hidden_grid.grid, hidden_grid.block, 0, detail::stream()>>>(act);
    check_launch(op);

    // y in float32: straight into y; bf16 through a float32 block rounded once, as the CPU.
    DeviceArray<float> y_acc(bf16_compute ? rows * d : 0, op);
    float* acc = bf16_compute ? y_acc.data() : y.as<float>();
    const void* hidden = bf16_compute ? static_cast<const void*>(s.hidden_bf16.data())
                                      : static_cast<const void*>(s.hidden.data());
    expert_gemms(g, false, false, kRows, d, f, rows_of(hidden, f), weights_of(w_out, d, f * d),
                 0.0f, rows_of(acc, d));
    if (bf16_compute || params.b_out) {
      const RowGrid out_grid = row_grid(rows, d);
      if (bf16_compute) {
        output_kernel<bf16><<<out_grid.grid, out_grid.block, 0, detail::stream()>>>(
            acc, params.b_out, offsets_dev.data(), E, rows, d, y.as<bf16>());
      } else {
        output_kernel<float><<<out_grid.grid, out_grid.block, 0, detail::stream()>>>(
            acc, params.b_out, offsets_dev.data(), E, rows, d, y.as<float>());
      }
      check_launch(op);
    }
  }
  if (cache) {
    // The host-side fields stay empty, so a CPU backward refuses this cache.
    cache->dtype = dtype;
    cache->dropout = spec;
    cache->pre.clear();
    cache->linear.clear();
    cache->hidden.clear();
    cache->hidden_bf16.clear();
    cache->w_in.clear();
    cache->w_gate.clear();
    cache->w_out.clear();
    cache->w_in_used = cache->w_gate_used = cache->w_out_used = nullptr;
    cache->device_state = std::move(saved);
  }
}

void experts_backward(const moe::ExpertShape& shape, const moe::ExpertParams& params,
                      const int64_t* offsets, const TensorView& x, moe::ExpertCache& cache,
                      const TensorView& dy, const TensorView& dx, const moe::ExpertGrads& grads) {
  const char* op = "experts_backward";
  moe::validate_experts(op, shape, params, offsets);
  const int64_t E = shape.num_experts, d = shape.d_model, f = shape.d_ff;
  const int64_t rows = offsets[E];
  for (const auto& [name, view] :
       {std::pair<const char*, const TensorView*>{"x", &x}, {"dy", &dy}, {"dx", &dx}}) {
    require(op, name, *view, {cache.dtype}, {rows, d});
  }
  PYSWITCH_CHECK_ARG(grads.w_in != nullptr && grads.w_out != nullptr &&
                         (grads.w_gate != nullptr) == (params.w_gate != nullptr) &&
                         (grads.b_in != nullptr) == (params.b_in != nullptr) &&
                         (grads.b_out != nullptr) == (params.b_out != nullptr),
                     "experts_backward: gradient pointers must be given exactly for the parameters "
                     "present (w_in, w_out, and w_gate / b_in / b_out when the layer has them)");
  const auto* saved = static_cast<const SavedActivations*>(cache.device_state.get());
  // A cache the CPU filled since (its host activations are set) is not this device's.
  PYSWITCH_CHECK_ARG(saved && cache.hidden.empty() && saved->rows == rows && saved->d_ff == f &&
                         saved->activation == shape.activation && saved->dtype == cache.dtype,
                     "experts_backward: the cache does not come from a forward over these ", rows,
                     " rows");
  const SavedActivations& s = *saved;
  const DType dtype = cache.dtype;
  const bool geglu = shape.activation == Activation::geglu;
  const bool bf16_compute = dtype == DType::bfloat16;
  DeviceArray<int64_t> offsets_dev;
  const Experts g = experts_of(op, dtype, offsets, E, offsets_dev);

  // float32 d_pre (the bias gradient and, in float32, the GEMM operand), bf16 operand copies.
  DeviceArray<float> d_pre(rows * f, op);
  DeviceArray<float> d_linear(geglu && !bf16_compute ? rows * f : 0, op);
  DeviceArray<bf16> d_pre_bf16(bf16_compute ? rows * f : 0, op);
  DeviceArray<bf16> d_linear_bf16(geglu && bf16_compute ? rows * f : 0, op);
  const void* d_pre_operand = bf16_compute ? static_cast<const void*>(d_pre_bf16.data())
                                           : static_cast<const void*>(d_pre.data());
  const void* d_linear_operand = bf16_compute ? static_cast<const void*>(d_linear_bf16.data())
                                              : static_cast<const void*>(d_linear.data());
  const void* w_in = bf16_compute ? static_cast<const void*>(s.w_in_used) : params.w_in;
  const void* w_gate = bf16_compute ? static_cast<const void*>(s.w_gate_used) : params.w_gate;
  const void* w_out = bf16_compute ? static_cast<const void*>(s.w_out_used) : params.w_out;
  const void* hidden = bf16_compute ? static_cast<const void*>(s.hidden_bf16.data())
                                    : static_cast<const void*>(s.hidden.data());
  const Matrix x_rows = rows_of(x.data, d), dy_rows = rows_of(dy.data, d);

  if (rows > 0) {
    // d_hidden = dy W_out^T, then through dropout and the activation.
    expert_gemms(g, false, true, kRows, f, d, dy_rows, weights_of(w_out, d, f * d), 0.0f,
                 rows_of(d_pre.data(), f));
    ActivationGradArgs act;
    act.d_pre = d_pre.data();
    act.d_linear = d_linear.data();
    act.d_pre_bf16 = d_pre_bf16.data();
    act.d_linear_bf16 = d_linear_bf16.data();
    act.pre = s.pre.data();
    act.linear = s.linear.data();
    act.rows = rows;
    act.f = f;
    act.activation = shape.activation;
    act.dropout = dropout_of(cache.dropout);
    const RowGrid hidden_grid = row_grid(rows, f);
    activation_grad_kernel<<<hidden_grid.grid, hidden_grid.block, 0, detail::stream()>>>(act);
    check_launch(op);

    // dx = d_pre W_in^T (+ d_linear W_gate^T, added to the first product as the CPU's beta 1).
    DeviceArray<float> dx_acc(bf16_compute ? rows * d : 0, op);
    float* acc = bf16_compute ? dx_acc.data() : dx.as<float>();
    expert_gemms(g, false, true, kRows, d, f, rows_of(d_pre_operand, f), weights_of(w_in, f, d * f),
                 0.0f, rows_of(acc, d));
    if (geglu) {
      expert_gemms(g, false, true, kRows, d, f, rows_of(d_linear_operand, f),
                   weights_of(w_gate, f, d * f), 1.0f, rows_of(acc, d));
    }
    if (bf16_compute) {
      const RowGrid out_grid = row_grid(rows, d);
      output_kernel<bf16><<<out_grid.grid, out_grid.block, 0, detail::stream()>>>(
          acc, nullptr, nullptr, E, rows, d, dx.as<bf16>());
      check_launch(op);
    }
  }

  // Weight gradients, written: dW_in[e] = x_e^T d_pre_e (W_gate's with d_linear),
  // dW_out[e] = hidden_e^T dy_e; zero for an expert without rows.
  expert_gemms(g, true, false, d, f, kRows, x_rows, rows_of(d_pre_operand, f), 0.0f,
               weights_of(grads.w_in, f, d * f));
  if (geglu) {
    expert_gemms(g, true, false, d, f, kRows, x_rows, rows_of(d_linear_operand, f), 0.0f,
                 weights_of(grads.w_gate, f, d * f));
  }
  expert_gemms(g, true, false, f, d, kRows, rows_of(hidden, f), dy_rows, 0.0f,
               weights_of(grads.w_out, d, f * d));

  if (grads.b_in) column_sums<float>(op, d_pre.data(), offsets_dev.data(), E, f, grads.b_in);
  if (grads.b_out) {
    if (bf16_compute) {
      column_sums<bf16>(op, dy.as<const bf16>(), offsets_dev.data(), E, d, grads.b_out);
    } else {
      column_sums<float>(op, dy.as<const float>(), offsets_dev.data(), E, d, grads.b_out);
    }
  }
}

}  // namespace pyswitch::cuda::ops
