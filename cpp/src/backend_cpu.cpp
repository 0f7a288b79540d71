// The CPU backend table (the reference) and the registry of backend tables. Each entry checks
// its views, then calls the CPU implementation of the op (moe/, nn/, optim/, gemm.cpp), which
// picks the active ISA tier inside.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <new>
#include <string>
#include <utility>

#include "backend_views.hpp"
#include "gemm.hpp"
#include "parallel.hpp"
#include "pyswitch/backend.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/moe/switch_layer.hpp"
#include "pyswitch/nn/ops.hpp"

namespace pyswitch {
namespace {

// The CPU table's view checks (backend_views.hpp, shared with the other tables).
void require(const char* op, const char* arg, const TensorView& v,
             std::initializer_list<DType> dtypes, std::initializer_list<int64_t> shape) {
  detail::require_view(Device::cpu, op, arg, v, dtypes, shape);
}
using detail::require_same_dtype;
constexpr std::initializer_list<DType> kFloat32 = detail::kFloat32Only;
constexpr std::initializer_list<DType> kCompute = detail::kComputeTypes;

void* cpu_allocate(int64_t bytes) {
  PYSWITCH_CHECK_ARG(bytes >= 0, "allocate: bytes must be >= 0, got ", bytes);
  if (bytes == 0) return nullptr;
  const size_t rounded = (static_cast<size_t>(bytes) + 63) / 64 * 64;
  void* data = std::aligned_alloc(64, rounded);
  if (data == nullptr) {
    throw Error(detail::concat("allocate: out of memory for ", bytes, " bytes on the cpu"));
  }
  std::memset(data, 0, rounded);
  return data;
}

void cpu_release(void* data) {
  std::free(data);
}

void cpu_copy(const TensorView& src, const TensorView& dst) {
  PYSWITCH_CHECK_ARG(src.device == Device::cpu && dst.device == Device::cpu,
                     "copy: the cpu backend copies host buffers only");
  require_same_dtype("copy", "src", src, "dst", dst);
  PYSWITCH_CHECK_ARG(src.numel() == dst.numel(), "copy: src has ", src.numel(), " elements, dst ",
                     dst.numel());
  if (src.numel() > 0) std::memmove(dst.data, src.data, static_cast<size_t>(src.nbytes()));
}

void cpu_convert(const TensorView& src, const TensorView& dst) {
  detail::check_convert(Device::cpu, src, dst);
  moe::convert_activations(src.data, src.dtype, dst.data, dst.dtype, src.numel());
}

void cpu_add(const TensorView& a, const TensorView& b, const TensorView& out) {
  const int64_t n = detail::check_add(Device::cpu, a, b, out);
  constexpr int64_t kBlock = 4096;
  if (a.dtype == DType::float32 && b.dtype == DType::float32 && out.dtype == DType::float32) {
    // The residual adds: one pass, no staging copies (the same float32 sums as below).
    const float* as = a.as<const float>();
    const float* bs = b.as<const float>();
    float* os = out.as<float>();
    detail::parallel_for(detail::ceil_div(n, 4 * kBlock), [&](int64_t blk) {
      const int64_t end = std::min(n, (blk + 1) * 4 * kBlock);
      for (int64_t i = blk * 4 * kBlock; i < end; ++i) os[i] = as[i] + bs[i];
    });
    return;
  }
  // Blocks on the stack: no full-size float32 temporaries for bf16 operands.
  detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t blk) {
    const int64_t first = blk * kBlock, count = std::min(kBlock, n - first);
    float fa[kBlock], fb[kBlock];
    auto at = [first](const TensorView& v) {
      return static_cast<char*>(v.data) + first * dtype_size(v.dtype);
    };
    moe::convert_activations(at(a), a.dtype, fa, DType::float32, count);
    moe::convert_activations(at(b), b.dtype, fb, DType::float32, count);
    for (int64_t i = 0; i < count; ++i) fa[i] += fb[i];
    moe::convert_activations(fa, DType::float32, at(out), out.dtype, count);
  });
}

void cpu_multiply(const TensorView& x, const TensorView& factor) {
  const int64_t n = detail::check_multiply(Device::cpu, x, factor);
  constexpr int64_t kBlock = 1 << 14;
  float* xs = x.as<float>();
  const float* fs = factor.as<const float>();
  detail::parallel_for(detail::ceil_div(n, kBlock), [&](int64_t blk) {
    const int64_t end = std::min(n, (blk + 1) * kBlock);
    for (int64_t i = blk * kBlock; i < end; ++i) xs[i] *= fs[i];
  });
}

void cpu_route(const TensorView& logits, const moe::RouteOptions& options, moe::RoutingPlan& plan) {
  require("route", "logits", logits, kFloat32, {-1, -1});
  plan = moe::route(logits.as<const float>(), logits.shape[0], logits.shape[1], options);
}

void cpu_route_backward(const TensorView& logits, const moe::RoutingPlan& plan,
                        const TensorView& d_gate, double aux_coef, double z_coef,
                        const TensorView& d_logits) {
  detail::check_route_backward(Device::cpu, logits, plan, d_gate, d_logits);
  moe::route_backward(logits.as<const float>(), plan, d_gate.as<const float>(), aux_coef, z_coef,
                      d_logits.as<float>());
}

void cpu_softmax_rows(const TensorView& logits, const TensorView& probs) {
  detail::check_softmax_rows(Device::cpu, logits, probs);
  moe::softmax_rows(logits.as<const float>(), logits.shape[0], logits.shape[1], probs.as<float>());
}

void cpu_dispatch(const TensorView& x, const moe::DispatchLayout& layout,
                  const TensorView& buffer) {
  detail::check_layout_views(Device::cpu, "dispatch", "x", x, "buffer", buffer, layout);
  moe::dispatch(x.data, x.dtype, x.shape[1], layout, buffer.data);
}

void cpu_combine(const TensorView& expert_out, const moe::DispatchLayout& layout,
                 const TensorView& gate, const TensorView& y) {
  detail::check_combine(Device::cpu, expert_out, layout, gate, y);
  moe::combine(expert_out.data, y.dtype, y.shape[1], layout, gate.as<const float>(), y.data);
}

void cpu_combine_backward(const TensorView& dy, const TensorView& expert_out,
                          const moe::DispatchLayout& layout, const TensorView& gate,
                          const TensorView& d_expert_out, const TensorView& d_gate) {
  detail::check_combine_backward(Device::cpu, dy, expert_out, layout, gate, d_expert_out, d_gate);
  moe::combine_backward(dy.data, expert_out.data, dy.dtype, dy.shape[1], layout,
                        gate.as<const float>(), d_expert_out.data, d_gate.as<float>());
}

void cpu_dispatch_backward(const TensorView& d_buffer, const moe::DispatchLayout& layout,
                           const TensorView& dx) {
  detail::check_layout_views(Device::cpu, "dispatch_backward", "dx", dx, "d_buffer", d_buffer,
                             layout);
  moe::dispatch_backward(d_buffer.data, dx.dtype, dx.shape[1], layout, dx.data);
}

void cpu_experts_forward(const moe::ExpertShape& shape, const moe::ExpertParams& params,
                         const int64_t* offsets, const TensorView& x, const TensorView& y,
                         moe::ExpertCache* cache, const moe::DropoutSpec& dropout) {
  PYSWITCH_CHECK_ARG(offsets != nullptr, "experts_forward: offsets must not be null");
  const int64_t rows = offsets[shape.num_experts];
  require("experts_forward", "x", x, kCompute, {rows, shape.d_model});
  require("experts_forward", "y", y, kCompute, {rows, shape.d_model});
  require_same_dtype("experts_forward", "x", x, "y", y);
  moe::experts_forward(shape, params, offsets, x.dtype, x.data, y.data, cache, dropout);
}

void cpu_experts_backward(const moe::ExpertShape& shape, const moe::ExpertParams& params,
                          const int64_t* offsets, const TensorView& x, moe::ExpertCache& cache,
                          const TensorView& dy, const TensorView& dx,
                          const moe::ExpertGrads& grads) {
  PYSWITCH_CHECK_ARG(offsets != nullptr, "experts_backward: offsets must not be null");
  const int64_t rows = offsets[shape.num_experts];
  for (const auto& [name, view] :
       {std::pair<const char*, const TensorView*>{"x", &x}, {"dy", &dy}, {"dx", &dx}}) {
    require("experts_backward", name, *view, {cache.dtype}, {rows, shape.d_model});
  }
  moe::experts_backward(shape, params, offsets, x.data, cache, dy.data, dx.data, grads);
}

void cpu_gemm(const TensorView& a, bool trans_a, const TensorView& b, bool trans_b,
              const TensorView& c, float alpha, float beta) {
  const auto [M, N, K] = detail::require_gemm(Device::cpu, a, trans_a, b, trans_b, c, beta);
  detail::gemm(a.dtype, trans_a, trans_b, M, N, K, alpha, a.data, a.shape[1], b.data, b.shape[1],
               beta, c.as<float>(), N);
}

void cpu_rmsnorm_forward(const TensorView& x, const TensorView& weight, float eps,
                         const TensorView& y, const TensorView& inv_rms) {
  const auto [T, d] = detail::check_rmsnorm_forward(Device::cpu, x, weight, y, inv_rms);
  nn::rmsnorm_forward(x.as<const float>(), weight.as<const float>(), T, d, eps, y.as<float>(),
                      inv_rms.as<float>());
}

void cpu_rmsnorm_backward(const TensorView& dy, const TensorView& x, const TensorView& weight,
                          const TensorView& inv_rms, const TensorView& dx,
                          const TensorView& d_weight) {
  const auto [T, d] =
      detail::check_rmsnorm_backward(Device::cpu, dy, x, weight, inv_rms, dx, d_weight);
  nn::rmsnorm_backward(dy.as<const float>(), x.as<const float>(), weight.as<const float>(),
                       inv_rms.as<const float>(), T, d, dx.as<float>(), d_weight.as<float>());
}

void cpu_rope_apply(const TensorView& qkv, int64_t batch, int64_t heads, double base,
                    bool inverse) {
  const auto [S, Dh] = detail::check_attention_sizes(Device::cpu, "rope_apply", qkv, batch, heads);
  nn::rope_apply(qkv.as<float>(), batch, S, heads, Dh, base, inverse);
}

void cpu_attention_forward(const TensorView& qkv, int64_t batch, int64_t heads,
                           const TensorView& out, const TensorView& probs) {
  const auto [S, Dh] = detail::check_attention_forward(Device::cpu, qkv, batch, heads, out, probs);
  nn::attention_forward(qkv.as<const float>(), batch, S, heads, Dh, out.as<float>(),
                        probs.as<float>());
}

void cpu_attention_backward(const TensorView& d_out, const TensorView& qkv, const TensorView& probs,
                            int64_t batch, int64_t heads, const TensorView& d_qkv) {
  const auto [S, Dh] =
      detail::check_attention_backward(Device::cpu, d_out, qkv, probs, batch, heads, d_qkv);
  nn::attention_backward(d_out.as<const float>(), qkv.as<const float>(), probs.as<const float>(),
                         batch, S, heads, Dh, d_qkv.as<float>());
}

void cpu_embedding_forward(const TensorView& table, const TensorView& tokens,
                           const TensorView& out) {
  detail::check_embedding_forward(Device::cpu, table, tokens, out);
  nn::embedding_forward(table.as<const float>(), table.shape[0], table.shape[1],
                        tokens.as<const int32_t>(), tokens.shape[0], out.as<float>());
}

void cpu_embedding_backward(const TensorView& d_out, const TensorView& tokens,
                            const TensorView& d_table) {
  detail::check_embedding_backward(Device::cpu, d_out, tokens, d_table);
  nn::embedding_backward(d_out.as<const float>(), tokens.as<const int32_t>(), tokens.shape[0],
                         d_table.shape[0], d_table.shape[1], d_table.as<float>());
}

double cpu_cross_entropy(const TensorView& logits, const TensorView& targets, float grad_scale,
                         const TensorView& d_logits) {
  const auto [T, V] = detail::check_cross_entropy(Device::cpu, logits, targets, d_logits);
  float* d_out = d_logits.data != nullptr ? d_logits.as<float>() : nullptr;
  return nn::cross_entropy(logits.as<const float>(), targets.as<const int32_t>(), T, V, grad_scale,
                           d_out);
}

// The optional bf16 compute copy of an optimizer update: null data means none.
bf16* compute_copy_of(const char* op, const TensorView& copy, int64_t n) {
  return detail::check_compute_copy(Device::cpu, op, copy, n) ? copy.as<bf16>() : nullptr;
}

void cpu_adamw_update(const TensorView& param, const TensorView& grad, const TensorView& m,
                      const TensorView& v, int64_t step, double lr,
                      const optim::AdamWOptions& options, bool decay,
                      const TensorView& compute_copy) {
  const int64_t n = detail::check_adamw(Device::cpu, param, grad, m, v);
  optim::adamw_step(param.as<float>(), grad.as<const float>(), m.as<float>(), v.as<float>(), n,
                    step, lr, options, decay, compute_copy_of("adamw_update", compute_copy, n));
}

void cpu_adafactor_update(const TensorView& param, const TensorView& grad,
                          const TensorView& row_state, const TensorView& col_state,
                          const TensorView& full_state, const optim::AdafactorShape& shape,
                          int64_t step, double lr, const optim::AdafactorOptions& options,
                          const TensorView& compute_copy) {
  const int64_t n = shape.batches * shape.rows * shape.cols;
  detail::check_adafactor(Device::cpu, param, grad, n);
  auto state = [&](const char* name, const TensorView& view, int64_t expected) -> float* {
    return detail::check_adafactor_state(Device::cpu, name, view, expected) ? view.as<float>()
                                                                            : nullptr;
  };
  optim::adafactor_step(param.as<float>(), grad.as<const float>(),
                        state("row_state", row_state, shape.row_state()),
                        state("col_state", col_state, shape.col_state()),
                        state("full_state", full_state, shape.full_state()), shape, step, lr,
                        options, compute_copy_of("adafactor_update", compute_copy, n));
}

double cpu_sum_of_squares(const TensorView& x) {
  detail::check_float32_tensor(Device::cpu, "sum_of_squares", x);
  return optim::sum_of_squares(x.as<const float>(), x.numel());
}

void cpu_scale(const TensorView& x, float factor) {
  detail::check_float32_tensor(Device::cpu, "scale", x);
  optim::scale_in_place(x.as<float>(), x.numel(), factor);
}

BackendOps make_cpu_table() {
  BackendOps t;
  t.name = "cpu";
  t.device = Device::cpu;
  t.allocate = cpu_allocate;
  t.release = cpu_release;
  t.copy = cpu_copy;
  t.convert = cpu_convert;
  t.add = cpu_add;
  t.multiply = cpu_multiply;
  t.route = cpu_route;
  t.route_backward = cpu_route_backward;
  t.softmax_rows = cpu_softmax_rows;
  t.dispatch = cpu_dispatch;
  t.combine = cpu_combine;
  t.combine_backward = cpu_combine_backward;
  t.dispatch_backward = cpu_dispatch_backward;
  t.experts_forward = cpu_experts_forward;
  t.experts_backward = cpu_experts_backward;
  t.gemm = cpu_gemm;
  t.rmsnorm_forward = cpu_rmsnorm_forward;
  t.rmsnorm_backward = cpu_rmsnorm_backward;
  t.rope_apply = cpu_rope_apply;
  t.attention_forward = cpu_attention_forward;
  t.attention_backward = cpu_attention_backward;
  t.embedding_forward = cpu_embedding_forward;
  t.embedding_backward = cpu_embedding_backward;
  t.cross_entropy = cpu_cross_entropy;
  t.adamw_update = cpu_adamw_update;
  t.adafactor_update = cpu_adafactor_update;
  t.sum_of_squares = cpu_sum_of_squares;
  t.scale = cpu_scale;
  return t;
}

// Every op slot of BackendOps, in declaration order: the list register_backend checks and the
// backend-ops test walks. A new op is added here and in the struct.
template <class F>
void for_each_op(const BackendOps& t, F&& visit) {
  visit("allocate", t.allocate != nullptr);
  visit("release", t.release != nullptr);
  visit("copy", t.copy != nullptr);
  visit("convert", t.convert != nullptr);
  visit("add", t.add != nullptr);
  visit("multiply", t.multiply != nullptr);
  visit("route", t.route != nullptr);
  visit("route_backward", t.route_backward != nullptr);
  visit("softmax_rows", t.softmax_rows != nullptr);
  visit("dispatch", t.dispatch != nullptr);
  visit("combine", t.combine != nullptr);
  visit("combine_backward", t.combine_backward != nullptr);
  visit("dispatch_backward", t.dispatch_backward != nullptr);
  visit("experts_forward", t.experts_forward != nullptr);
  visit("experts_backward", t.experts_backward != nullptr);
  visit("gemm", t.gemm != nullptr);
  visit("rmsnorm_forward", t.rmsnorm_forward != nullptr);
  visit("rmsnorm_backward", t.rmsnorm_backward != nullptr);
  visit("rope_apply", t.rope_apply != nullptr);
  visit("attention_forward", t.attention_forward != nullptr);
  visit("attention_backward", t.attention_backward != nullptr);
  visit("embedding_forward", t.embedding_forward != nullptr);
  visit("embedding_backward", t.embedding_backward != nullptr);
  visit("cross_entropy", t.cross_entropy != nullptr);
  visit("adamw_update", t.adamw_update != nullptr);
  visit("adafactor_update", t.adafactor_update != nullptr);
  visit("sum_of_squares", t.sum_of_squares != nullptr);
  visit("scale", t.scale != nullptr);
}

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::atomic<const BackendOps*>& cuda_table() {
  static std::atomic<const BackendOps*> table{nullptr};
  return table;
}

}  // namespace

const BackendOps& cpu_backend() {
  static const BackendOps table = make_cpu_table();
  return table;
}

const BackendOps& backend(Device device) {
  if (device == Device::cpu) return cpu_backend();
  const BackendOps* table = cuda_table().load();
  if (table == nullptr) {
    throw DeviceError(
        "backend: no CUDA backend is loaded (this build or machine has no CUDA device); use "
        "device='cpu'");
  }
  return *table;
}

const BackendOps* register_backend(const BackendOps& table) {
  PYSWITCH_CHECK_ARG(table.device != Device::cpu,
                     "register_backend: the cpu table is the reference and cannot be replaced");
  for_each_op(table, [&](const char* op, bool present) {
    PYSWITCH_CHECK_ARG(present, "register_backend: table '", table.name ? table.name : "?",
                       "' has no '", op, "' op");
  });
  std::lock_guard<std::mutex> lock(registry_mutex());
  return cuda_table().exchange(&table);
}

Device parse_device(const std::string& where, const std::string& name) {
  if (name == "cpu") return Device::cpu;
  if (name == "cuda") return Device::cuda;
  throw InvalidArgument(where + ": device must be 'cpu' or 'cuda', got '" + name + "'");
}

const BackendOps& layer_backend(const char* where, Device device) {
  if (device == Device::cpu) return cpu_backend();
  const BackendOps* table = cuda_table().load();
  if (table == nullptr) {
    throw DeviceError(detail::concat(
        where,
        ": device 'cuda' is not available: no CUDA backend is loaded (pyswitch.cuda."
        "is_available() is False: no CUDA build, no driver or no GPU); use device='cpu'"));
  }
  return *table;
}

int backend_op_count() {
  int n = 0;
  for_each_op(cpu_backend(), [&](const char*, bool) { ++n; });
  return n;
}

const char* backend_op_name(int index) {
  int i = 0;
  const char* found = nullptr;
  for_each_op(cpu_backend(), [&](const char* op, bool) {
    if (i++ == index) found = op;
  });
  PYSWITCH_CHECK_ARG(found != nullptr, "backend_op_name: index must be in [0, ", backend_op_count(),
                     "), got ", index);
  return found;
}

bool backend_has_op(const BackendOps& table, int index) {
  int i = 0;
  bool present = false;
  for_each_op(table, [&](const char*, bool has) {
    if (i++ == index) present = has;
  });
  return present;
}

}  // namespace pyswitch
