// The backend-ops test (after ggml's test-backend-ops): every op of the backend table, over a
// family of shapes and dtypes with the edge cases (no tokens, one row, odd sizes, every token
// to one expert, dropless, empty experts), runs on every registered backend and, for the CPU,
// on every ISA tier this machine can run; each result is compared with the CPU table at the
// scalar tier (the reference). Tolerances are per op: across CPU tiers every op is promised
// bit-identical (docs/determinism.md), so the CPU tolerance is 0 everywhere; `device_tolerance`
// is the bound another backend (CUDA) is held to, as a relative error on float outputs (index
// outputs must always match exactly).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "harness.hpp"
#include "pyswitch/backend.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/cpu_isa.hpp"
#ifdef PYSWITCH_TESTS_WITH_CUDA
#include "pyswitch/cuda/backend_cuda.hpp"
#endif
#include "pyswitch/error.hpp"
#include "test_data.hpp"

using namespace pyswitch;

namespace {

// A host array with its dtype and shape: inputs are made on the host and uploaded to the
// backend under test; outputs are read back into these.
struct HostTensor {
  DType dtype = DType::float32;
  std::vector<int64_t> shape;
  std::vector<char> bytes;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
  static HostTensor zeros(DType dtype, std::vector<int64_t> shape) {
    HostTensor h{dtype, std::move(shape), {}};
    h.bytes.assign(static_cast<size_t>(h.numel() * dtype_size(dtype)), 0);
    return h;
  }
  static HostTensor f32(std::vector<int64_t> shape, const std::vector<float>& values) {
    HostTensor h = zeros(DType::float32, std::move(shape));
    if (!values.empty()) std::memcpy(h.bytes.data(), values.data(), h.bytes.size());
    return h;
  }
  // The same values rounded to bf16 when dtype is bfloat16.
  static HostTensor of(DType dtype, std::vector<int64_t> shape, const std::vector<float>& values) {
    if (dtype == DType::float32) return f32(std::move(shape), values);
    HostTensor h = zeros(DType::bfloat16, std::move(shape));
    convert_f32_to_bf16(values.data(), reinterpret_cast<bf16*>(h.bytes.data()), h.numel());
    return h;
  }
  double value(int64_t i) const {
    switch (dtype) {
      case DType::float32:
        return reinterpret_cast<const float*>(bytes.data())[i];
      case DType::bfloat16:
        return bf16_to_float(reinterpret_cast<const bf16*>(bytes.data())[i]);
      default:
        return static_cast<double>(reinterpret_cast<const int32_t*>(bytes.data())[i]);
    }
  }
};

// Buffers of one run on one backend: uploaded inputs and outputs to read back.
class DeviceArena {
 public:
  explicit DeviceArena(const BackendOps& ops) : ops_(ops) {}
  ~DeviceArena() {
    for (void* p : owned_) ops_.release(p);
  }
  TensorView upload(const HostTensor& h) {
    TensorView v = view_of(h);
    if (h.numel() > 0) {
      TensorView host = v;
      host.data = const_cast<char*>(h.bytes.data());
      host.device = Device::cpu;
      ops_.copy(host, v);
    }
    return v;
  }
  HostTensor download(const TensorView& v, const std::vector<int64_t>& shape) {
    HostTensor h = HostTensor::zeros(v.dtype, shape);
    if (h.numel() > 0) {
      TensorView host = v;
      host.data = h.bytes.data();
      host.device = Device::cpu;
      ops_.copy(v, host);
    }
    return h;
  }

 private:
  TensorView view_of(const HostTensor& h) {
    void* data = ops_.allocate(static_cast<int64_t>(h.bytes.size()));
    if (data) owned_.push_back(data);
    TensorView v;
    v.data = data;
    v.dtype = h.dtype;
    v.device = ops_.device;
    v.ndim = static_cast<int>(h.shape.size());
    int64_t stride = 1;
    for (int i = v.ndim - 1; i >= 0; --i) {
      v.shape[i] = h.shape[static_cast<size_t>(i)];
      v.strides[i] = stride;
      stride *= v.shape[i];
    }
    return v;
  }
  const BackendOps& ops_;
  std::vector<void*> owned_;
};

// The named outputs of one op case, read back to the host. Plans and layouts are host
// structures, so their index arrays are stored as int32/int64 tensors here.
using Outputs = std::vector<std::pair<std::string, HostTensor>>;

HostTensor ints32(const std::vector<int32_t>& v) {
  HostTensor h = HostTensor::zeros(DType::int32, {static_cast<int64_t>(v.size())});
  if (!v.empty()) std::memcpy(h.bytes.data(), v.data(), h.bytes.size());
  return h;
}
HostTensor doubles_as_f32(std::initializer_list<double> v) {
  // Losses are doubles; stored bitwise as pairs of floats so a byte compare is exact.
  HostTensor h = HostTensor::zeros(DType::float32, {static_cast<int64_t>(v.size() * 2)});
  std::memcpy(h.bytes.data(), std::data(v), h.bytes.size());
  return h;
}
HostTensor int64s_as_i32(const std::vector<int64_t>& v) {
  HostTensor h = HostTensor::zeros(DType::int32, {static_cast<int64_t>(v.size() * 2)});
  if (!v.empty()) std::memcpy(h.bytes.data(), v.data(), h.bytes.size());
  return h;
}

struct OpCase {
  std::string op;    // the table slot this case exercises
  std::string name;  // shape / dtype family
  double device_tolerance;
  std::function<Outputs(const BackendOps&, DeviceArena&)> run;
};

std::vector<float> logits_for(int64_t T, int64_t E, uint32_t seed, bool one_expert) {
  std::vector<float> l = normal_vector(static_cast<size_t>(T * E), seed, 2.0f);
  if (one_expert) {
    for (int64_t t = 0; t < T; ++t) l[static_cast<size_t>(t * E + E - 1)] += 100.0f;
  }
  // Exact ties, to pin the lower-index rule on every backend.
  if (T > 1 && E > 1) l[static_cast<size_t>(E)] = l[static_cast<size_t>(E + 1)];
  return l;
}

struct RouteFamily {
  const char* name;
  int64_t T, E;
  moe::RouteOptions options;
  bool one_expert;
};

std::vector<RouteFamily> route_families() {
  moe::RouteOptions top1;
  moe::RouteOptions top2 = top1;
  top2.k = 2;
  top2.normalize_gates = true;
  moe::RouteOptions dropless = top1;
  dropless.capacity_factor = std::nullopt;
  moe::RouteOptions batch = top2;
  batch.priority = moe::Priority::batch_prioritized;
  batch.group_size = 8;
  batch.capacity_factor = 1.0;
  batch.min_capacity = 1;
  moe::RouteOptions tight = top1;
  tight.capacity_factor = 0.5;
  tight.min_capacity = 0;
  tight.capacity_rounding = moe::CapacityRounding::ceil;
  return {{"T1_E1", 1, 1, top1, false},
          {"T1_E4", 1, 4, top1, false},
          {"T37_E5_top2", 37, 5, top2, false},
          {"T64_E8_one_expert", 64, 8, top1, true},
          {"T50_E6_dropless", 50, 6, dropless, false},
          {"T40_E4_batch_prio_groups", 40, 4, batch, false},
          {"T33_E3_tight_capacity", 33, 3, tight, false}};
}

// A plan for T = 0: the layout of a rank with no tokens.
moe::RoutingPlan empty_plan(int64_t E, int64_t k) {
  moe::RoutingPlan p;
  p.num_experts = E;
  p.k = k;
  p.group_expert_count.clear();
  p.tokens_per_expert.assign(static_cast<size_t>(E), 0);
  return p;
}

Outputs plan_outputs(const moe::RoutingPlan& p) {
  return {{"expert_index", ints32(p.expert_index)},
          {"gate", HostTensor::f32({static_cast<int64_t>(p.gate.size())}, p.gate)},
          {"slot", ints32(p.slot)},
          {"tokens_per_expert", int64s_as_i32(p.tokens_per_expert)},
          {"counts", int64s_as_i32({p.capacity, p.dropped, p.num_groups})},
          {"losses", doubles_as_f32({p.aux_loss, p.z_loss, p.aux_sum, p.z_sum})}};
}

void add_routing_cases(std::vector<OpCase>& cases) {
  for (const RouteFamily& f : route_families()) {
    const auto logits = logits_for(f.T, f.E, 11, f.one_expert);
    cases.push_back({"route", f.name, 0.0, [=](const BackendOps& ops, DeviceArena& a) {
                       moe::RoutingPlan plan;
                       ops.route(a.upload(HostTensor::f32({f.T, f.E}, logits)), f.options, plan);
                       return plan_outputs(plan);
                     }});
    cases.push_back({"route_backward", f.name, 1e-5, [=](const BackendOps& ops, DeviceArena& a) {
                       const TensorView l = a.upload(HostTensor::f32({f.T, f.E}, logits));
                       moe::RoutingPlan plan;
                       ops.route(l, f.options, plan);
                       const auto d_gate = normal_vector(static_cast<size_t>(f.T * plan.k), 12);
                       TensorView dl = a.upload(HostTensor::zeros(DType::float32, {f.T, f.E}));
                       ops.route_backward(l, plan, a.upload(HostTensor::f32({f.T, plan.k}, d_gate)),
                                          1e-2, 1e-3, dl);
                       return Outputs{{"d_logits", a.download(dl, {f.T, f.E})}};
                     }});
    cases.push_back({"softmax_rows", f.name, 1e-6, [=](const BackendOps& ops, DeviceArena& a) {
                       TensorView probs = a.upload(HostTensor::zeros(DType::float32, {f.T, f.E}));
                       ops.softmax_rows(a.upload(HostTensor::f32({f.T, f.E}, logits)), probs);
                       return Outputs{{"probs", a.download(probs, {f.T, f.E})}};
                     }});
  }
}

// dispatch, combine and their backward over layouts of the route families, plus T = 0.
void add_dispatch_cases(std::vector<OpCase>& cases) {
  struct Family {
    std::string name;
    moe::RoutingPlan plan;
  };
  std::vector<Family> families;
  for (const RouteFamily& f : route_families()) {
    const auto logits = logits_for(f.T, f.E, 21, f.one_expert);
    families.push_back({f.name, moe::route(logits.data(), f.T, f.E, f.options)});
  }
  families.push_back({"T0_E4", empty_plan(4, 1)});
  for (const Family& fam : families) {
    for (DType dtype : {DType::float32, DType::bfloat16}) {
      for (bool packed : {true, false}) {
        const moe::DispatchLayout layout = moe::make_dispatch_layout(fam.plan, packed);
        const int64_t T = layout.num_tokens, R = layout.total_rows, k = layout.k, d = 13;
        const std::string name = fam.name + "_" + dtype_name(dtype) + (packed ? "_packed" : "");
        const auto x = normal_vector(static_cast<size_t>(T * d), 31);
        const auto rows = normal_vector(static_cast<size_t>(R * d), 32);
        const auto dy = normal_vector(static_cast<size_t>(T * d), 33);
        const std::vector<float> gate = fam.plan.gate;
        const double tol = dtype == DType::bfloat16 ? 1e-2 : 1e-6;
        cases.push_back({"dispatch", name, 0.0, [=](const BackendOps& ops, DeviceArena& a) {
                           TensorView buf = a.upload(HostTensor::zeros(dtype, {R, d}));
                           ops.dispatch(a.upload(HostTensor::of(dtype, {T, d}, x)), layout, buf);
                           return Outputs{{"buffer", a.download(buf, {R, d})}};
                         }});
        cases.push_back({"combine", name, tol, [=](const BackendOps& ops, DeviceArena& a) {
                           TensorView y = a.upload(HostTensor::zeros(dtype, {T, d}));
                           ops.combine(a.upload(HostTensor::of(dtype, {R, d}, rows)), layout,
                                       a.upload(HostTensor::f32({T, k}, gate)), y);
                           return Outputs{{"y", a.download(y, {T, d})}};
                         }});
        cases.push_back({"combine_backward", name, tol, [=](const BackendOps& ops, DeviceArena& a) {
                           TensorView d_rows = a.upload(HostTensor::zeros(dtype, {R, d}));
                           TensorView d_gate = a.upload(HostTensor::zeros(DType::float32, {T, k}));
                           ops.combine_backward(a.upload(HostTensor::of(dtype, {T, d}, dy)),
                                                a.upload(HostTensor::of(dtype, {R, d}, rows)),
                                                layout, a.upload(HostTensor::f32({T, k}, gate)),
                                                d_rows, d_gate);
                           return Outputs{{"d_expert_out", a.download(d_rows, {R, d})},
                                          {"d_gate", a.download(d_gate, {T, k})}};
                         }});
        cases.push_back(
            {"dispatch_backward", name, tol, [=](const BackendOps& ops, DeviceArena& a) {
               TensorView dx = a.upload(HostTensor::zeros(dtype, {T, d}));
               ops.dispatch_backward(a.upload(HostTensor::of(dtype, {R, d}, rows)), layout, dx);
               return Outputs{{"dx", a.download(dx, {T, d})}};
             }});
      }
    }
  }
}

// Expert FFNs: every activation, with and without biases and dropout, empty experts, one row,
// all rows in one expert, both compute dtypes.
void add_expert_cases(std::vector<OpCase>& cases) {
  struct Family {
    const char* name;
    std::vector<int64_t> counts;
    int64_t d, f;
  };
  const std::vector<Family> families = {{"one_row", {1}, 8, 16},
                                        {"odd_with_empty", {3, 0, 5, 1}, 7, 9},
                                        {"all_in_one", {0, 0, 40}, 16, 24},
                                        {"no_rows", {0, 0}, 8, 8}};
  for (const Family& fam : families) {
    for (auto act : {moe::Activation::relu, moe::Activation::gelu, moe::Activation::geglu}) {
      for (DType dtype : {DType::float32, DType::bfloat16}) {
        for (bool extras : {false, true}) {  // biases and dropout together
          const int64_t E = static_cast<int64_t>(fam.counts.size()), d = fam.d, f = fam.f;
          std::vector<int64_t> offsets{0};
          for (int64_t c : fam.counts) offsets.push_back(offsets.back() + c);
          const int64_t R = offsets.back();
          const moe::ExpertShape shape{E, d, f, act};
          const std::string name = std::string(fam.name) + "_" +
                                   (act == moe::Activation::relu   ? "relu"
                                    : act == moe::Activation::gelu ? "gelu"
                                                                   : "geglu") +
                                   "_" + dtype_name(dtype) + (extras ? "_bias_dropout" : "");
          auto w = [&](uint32_t seed, int64_t n) {
            return normal_vector(static_cast<size_t>(n), seed, 0.3f);
          };
          const auto w_in = w(41, E * d * f), w_gate = w(42, E * d * f), w_out = w(43, E * f * d);
          const auto b_in = w(44, E * f), b_out = w(45, E * d);
          const auto x = w(46, R * d), dy = w(47, R * d);
          const moe::DropoutSpec dropout{extras ? 0.25 : 0.0, 7, 3, 5};
          const bool geglu = act == moe::Activation::geglu;
          // The weights live in the arena: device pointers when the table is a device's.
          auto params = [=](DeviceArena& a) {
            auto upload = [&a](const std::vector<float>& v) {
              return a.upload(HostTensor::f32({static_cast<int64_t>(v.size())}, v))
                  .as<const float>();
            };
            moe::ExpertParams p;
            p.w_in = upload(w_in);
            p.w_gate = geglu ? upload(w_gate) : nullptr;
            p.w_out = upload(w_out);
            p.b_in = extras ? upload(b_in) : nullptr;
            p.b_out = extras ? upload(b_out) : nullptr;
            return p;
          };
          const double tol = dtype == DType::bfloat16 ? 2e-2 : 1e-5;
          cases.push_back(
              {"experts_forward", name, tol, [=](const BackendOps& ops, DeviceArena& a) {
                 TensorView y = a.upload(HostTensor::zeros(dtype, {R, d}));
                 moe::ExpertCache cache;
                 ops.experts_forward(shape, params(a), offsets.data(),
                                     a.upload(HostTensor::of(dtype, {R, d}, x)), y, &cache,
                                     dropout);
                 return Outputs{{"y", a.download(y, {R, d})}};
               }});
          cases.push_back(
              {"experts_backward", name, tol, [=](const BackendOps& ops, DeviceArena& a) {
                 const moe::ExpertParams p = params(a);
                 const TensorView xv = a.upload(HostTensor::of(dtype, {R, d}, x));
                 TensorView y = a.upload(HostTensor::zeros(dtype, {R, d}));
                 moe::ExpertCache cache;
                 ops.experts_forward(shape, p, offsets.data(), xv, y, &cache, dropout);
                 TensorView dx = a.upload(HostTensor::zeros(dtype, {R, d}));
                 // Zero-filled arena buffers: the op writes every gradient element.
                 auto grad = [&a](int64_t n) {
                   return a.upload(HostTensor::zeros(DType::float32, {n}));
                 };
                 const TensorView g_in = grad(E * d * f), g_gate = grad(E * d * f),
                                  g_out = grad(E * f * d), g_bin = grad(E * f),
                                  g_bout = grad(E * d);
                 moe::ExpertGrads g;
                 g.w_in = g_in.as<float>();
                 g.w_gate = geglu ? g_gate.as<float>() : nullptr;
                 g.w_out = g_out.as<float>();
                 g.b_in = extras ? g_bin.as<float>() : nullptr;
                 g.b_out = extras ? g_bout.as<float>() : nullptr;
                 ops.experts_backward(shape, p, offsets.data(), xv, cache,
                                      a.upload(HostTensor::of(dtype, {R, d}, dy)), dx, g);
                 Outputs out{{"dx", a.download(dx, {R, d})},
                             {"d_w_in", a.download(g_in, {E * d * f})},
                             {"d_w_out", a.download(g_out, {E * f * d})}};
                 if (geglu) out.push_back({"d_w_gate", a.download(g_gate, {E * d * f})});
                 if (extras) {
                   out.push_back({"d_b_in", a.download(g_bin, {E * f})});
                   out.push_back({"d_b_out", a.download(g_bout, {E * d})});
                 }
                 return out;
               }});
        }
      }
    }
  }
}

void add_gemm_cases(std::vector<OpCase>& cases) {
  struct Size {
    int64_t M, N, K;
  };
  for (Size s :
       // The last one is large enough for a device's tiled kernel (others take skinny paths).
       {Size{1, 1, 1}, Size{0, 5, 3}, Size{7, 13, 5}, Size{33, 65, 17}, Size{130, 20, 300},
        Size{1100, 520, 33}}) {
    for (DType dtype : {DType::float32, DType::bfloat16}) {
      for (int trans = 0; trans < 4; ++trans) {
        for (float beta : {0.0f, 1.0f}) {
          const bool ta = trans & 1, tb = trans & 2;
          const std::string name = std::to_string(s.M) + "x" + std::to_string(s.N) + "x" +
                                   std::to_string(s.K) + "_" + dtype_name(dtype) +
                                   (ta ? "_ta" : "") + (tb ? "_tb" : "") + (beta ? "_beta1" : "");
          const auto av = normal_vector(static_cast<size_t>(s.M * s.K), 51);
          const auto bv = normal_vector(static_cast<size_t>(s.K * s.N), 52);
          const auto cv = normal_vector(static_cast<size_t>(s.M * s.N), 53);
          const double tol = dtype == DType::bfloat16 ? 1e-2 : 1e-5;
          cases.push_back(
              {"gemm", name, tol, [=](const BackendOps& ops, DeviceArena& ar) {
                 const TensorView a = ar.upload(HostTensor::of(
                     dtype, ta ? std::vector<int64_t>{s.K, s.M} : std::vector<int64_t>{s.M, s.K},
                     av));
                 const TensorView b = ar.upload(HostTensor::of(
                     dtype, tb ? std::vector<int64_t>{s.N, s.K} : std::vector<int64_t>{s.K, s.N},
                     bv));
                 TensorView c = ar.upload(HostTensor::f32({s.M, s.N}, cv));
                 ops.gemm(a, ta, b, tb, c, 0.75f, beta);
                 return Outputs{{"c", ar.download(c, {s.M, s.N})}};
               }});
        }
      }
    }
  }
}

void add_nn_and_optim_cases(std::vector<OpCase>& cases) {
  for (auto [T, d] : {std::pair<int64_t, int64_t>{0, 8}, {1, 1}, {5, 37}, {64, 128}}) {
    const std::string name = "T" + std::to_string(T) + "_d" + std::to_string(d);
    const auto x = normal_vector(static_cast<size_t>(T * d), 61);
    const auto w = normal_vector(static_cast<size_t>(d), 62);
    const auto dy = normal_vector(static_cast<size_t>(T * d), 63);
    cases.push_back({"rmsnorm_forward", name, 1e-6, [=](const BackendOps& ops, DeviceArena& a) {
                       TensorView y = a.upload(HostTensor::zeros(DType::float32, {T, d}));
                       TensorView r = a.upload(HostTensor::zeros(DType::float32, {T}));
                       ops.rmsnorm_forward(a.upload(HostTensor::f32({T, d}, x)),
                                           a.upload(HostTensor::f32({d}, w)), 1e-6f, y, r);
                       return Outputs{{"y", a.download(y, {T, d})},
                                      {"inv_rms", a.download(r, {T})}};
                     }});
    cases.push_back(
        {"rmsnorm_backward", name, 1e-5, [=](const BackendOps& ops, DeviceArena& a) {
           const TensorView xv = a.upload(HostTensor::f32({T, d}, x));
           const TensorView wv = a.upload(HostTensor::f32({d}, w));
           TensorView y = a.upload(HostTensor::zeros(DType::float32, {T, d}));
           TensorView r = a.upload(HostTensor::zeros(DType::float32, {T}));
           ops.rmsnorm_forward(xv, wv, 1e-6f, y, r);
           TensorView dx = a.upload(HostTensor::zeros(DType::float32, {T, d}));
           TensorView dw = a.upload(HostTensor::zeros(DType::float32, {d}));
           ops.rmsnorm_backward(a.upload(HostTensor::f32({T, d}, dy)), xv, wv, r, dx, dw);
           return Outputs{{"dx", a.download(dx, {T, d})}, {"d_weight", a.download(dw, {d})}};
         }});
  }
  struct Attn {
    int64_t B, S, H, Dh;
  };
  for (Attn at : {Attn{1, 1, 1, 2}, Attn{2, 5, 3, 4}, Attn{1, 33, 2, 8}}) {
    const int64_t rows = at.B * at.S, cols = 3 * at.H * at.Dh, width = at.H * at.Dh;
    const std::string name = "B" + std::to_string(at.B) + "_S" + std::to_string(at.S) + "_H" +
                             std::to_string(at.H) + "_Dh" + std::to_string(at.Dh);
    const auto qkv = normal_vector(static_cast<size_t>(rows * cols), 65);
    const auto d_out = normal_vector(static_cast<size_t>(rows * width), 66);
    const std::vector<int64_t> probs_shape{at.B, at.H, at.S, at.S};
    for (bool inverse : {false, true}) {
      cases.push_back({"rope_apply", name + (inverse ? "_inverse" : ""), 1e-6,
                       [=](const BackendOps& ops, DeviceArena& a) {
                         TensorView q = a.upload(HostTensor::f32({rows, cols}, qkv));
                         ops.rope_apply(q, at.B, at.H, 10000.0, inverse);
                         return Outputs{{"qkv", a.download(q, {rows, cols})}};
                       }});
    }
    auto forward = [=](const BackendOps& ops, DeviceArena& a, TensorView& q, TensorView& out,
                       TensorView& probs) {
      q = a.upload(HostTensor::f32({rows, cols}, qkv));
      out = a.upload(HostTensor::zeros(DType::float32, {rows, width}));
      probs = a.upload(HostTensor::zeros(DType::float32, probs_shape));
      ops.attention_forward(q, at.B, at.H, out, probs);
    };
    cases.push_back({"attention_forward", name, 1e-5, [=](const BackendOps& ops, DeviceArena& a) {
                       TensorView q, out, probs;
                       forward(ops, a, q, out, probs);
                       return Outputs{{"out", a.download(out, {rows, width})},
                                      {"probs", a.download(probs, probs_shape)}};
                     }});
    cases.push_back({"attention_backward", name, 1e-5, [=](const BackendOps& ops, DeviceArena& a) {
                       TensorView q, out, probs;
                       forward(ops, a, q, out, probs);
                       TensorView dq = a.upload(HostTensor::zeros(DType::float32, {rows, cols}));
                       ops.attention_backward(a.upload(HostTensor::f32({rows, width}, d_out)), q,
                                              probs, at.B, at.H, dq);
                       return Outputs{{"d_qkv", a.download(dq, {rows, cols})}};
                     }});
  }
  for (auto [T, V] : {std::pair<int64_t, int64_t>{0, 3}, {1, 1}, {9, 5}}) {
    const int64_t d = 7;
    const std::string name = "T" + std::to_string(T) + "_V" + std::to_string(V);
    const auto table = normal_vector(static_cast<size_t>(V * d), 67);
    const auto d_out = normal_vector(static_cast<size_t>(T * d), 68);
    std::vector<int32_t> tokens(static_cast<size_t>(T));
    // Repeated tokens: the backward accumulates several rows into one.
    for (int64_t t = 0; t < T; ++t)
      tokens[static_cast<size_t>(t)] = static_cast<int32_t>((t * 3) % V);
    cases.push_back({"embedding_forward", name, 0.0, [=](const BackendOps& ops, DeviceArena& a) {
                       TensorView out = a.upload(HostTensor::zeros(DType::float32, {T, d}));
                       ops.embedding_forward(a.upload(HostTensor::f32({V, d}, table)),
                                             a.upload(ints32(tokens)), out);
                       return Outputs{{"out", a.download(out, {T, d})}};
                     }});
    cases.push_back({"embedding_backward", name, 1e-6, [=](const BackendOps& ops, DeviceArena& a) {
                       TensorView dt =
                           a.upload(HostTensor::f32({V, d}, table));  // accumulated into
                       ops.embedding_backward(a.upload(HostTensor::f32({T, d}, d_out)),
                                              a.upload(ints32(tokens)), dt);
                       return Outputs{{"d_table", a.download(dt, {V, d})}};
                     }});
  }
  for (auto [T, V] : {std::pair<int64_t, int64_t>{1, 2}, {7, 33}, {40, 257}}) {
    const std::string name = "T" + std::to_string(T) + "_V" + std::to_string(V);
    const auto logits = normal_vector(static_cast<size_t>(T * V), 71, 3.0f);
    std::vector<int32_t> targets(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t)
      targets[static_cast<size_t>(t)] = static_cast<int32_t>((t * 7) % V);
    cases.push_back(
        {"cross_entropy", name, 1e-6, [=](const BackendOps& ops, DeviceArena& a) {
           TensorView dl = a.upload(HostTensor::zeros(DType::float32, {T, V}));
           const double loss = ops.cross_entropy(a.upload(HostTensor::f32({T, V}, logits)),
                                                 a.upload(ints32(targets)), 0.5f, dl);
           return Outputs{{"loss", doubles_as_f32({loss})}, {"d_logits", a.download(dl, {T, V})}};
         }});
  }
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{37}, int64_t{4099}}) {
    const std::string name = "n" + std::to_string(n);
    const auto p = normal_vector(static_cast<size_t>(n), 81),
               g = normal_vector(static_cast<size_t>(n), 82);
    auto m = normal_vector(static_cast<size_t>(n), 83, 0.1f),
         v = normal_vector(static_cast<size_t>(n), 84, 0.1f);
    for (float& e : v) e = e * e;
    for (bool decay : {false, true}) {
      cases.push_back({"adamw_update", name + (decay ? "_decay" : ""), 1e-6,
                       [=](const BackendOps& ops, DeviceArena& a) {
                         TensorView pv = a.upload(HostTensor::f32({n}, p));
                         TensorView mv = a.upload(HostTensor::f32({n}, m));
                         TensorView vv = a.upload(HostTensor::f32({n}, v));
                         // With decay, also the fused bf16 compute copy.
                         TensorView copy = decay ? a.upload(HostTensor::zeros(DType::bfloat16, {n}))
                                                 : TensorView{};
                         ops.adamw_update(pv, a.upload(HostTensor::f32({n}, g)), mv, vv, 3, 1e-2,
                                          {}, decay, copy);
                         Outputs out{{"param", a.download(pv, {n})},
                                     {"m", a.download(mv, {n})},
                                     {"v", a.download(vv, {n})}};
                         if (decay) out.push_back({"compute_copy", a.download(copy, {n})});
                         return out;
                       }});
    }
    cases.push_back(
        {"sum_of_squares", name, 1e-12, [=](const BackendOps& ops, DeviceArena& a) {
           return Outputs{
               {"sum", doubles_as_f32({ops.sum_of_squares(a.upload(HostTensor::f32({n}, p)))})}};
         }});
    cases.push_back({"scale", name, 0.0, [=](const BackendOps& ops, DeviceArena& a) {
                       TensorView pv = a.upload(HostTensor::f32({n}, p));
                       ops.scale(pv, 0.3f);
                       return Outputs{{"x", a.download(pv, {n})}};
                     }});
  }
  for (optim::AdafactorShape s : {optim::AdafactorShape{1, 1, 5}, optim::AdafactorShape{2, 3, 4},
                                  optim::AdafactorShape{1, 17, 33}}) {
    const int64_t n = s.batches * s.rows * s.cols;
    const std::string name = std::to_string(s.batches) + "x" + std::to_string(s.rows) + "x" +
                             std::to_string(s.cols) + (s.factored() ? "_factored" : "_full");
    const auto p = normal_vector(static_cast<size_t>(n), 91),
               g = normal_vector(static_cast<size_t>(n), 92);
    cases.push_back({"adafactor_update", name, 1e-5, [=](const BackendOps& ops, DeviceArena& a) {
                       TensorView pv = a.upload(HostTensor::f32({n}, p));
                       TensorView rv = a.upload(HostTensor::zeros(DType::float32, {s.row_state()}));
                       TensorView cv = a.upload(HostTensor::zeros(DType::float32, {s.col_state()}));
                       TensorView fv =
                           a.upload(HostTensor::zeros(DType::float32, {s.full_state()}));
                       const TensorView gv = a.upload(HostTensor::f32({n}, g));
                       TensorView copy = a.upload(HostTensor::zeros(DType::bfloat16, {n}));
                       for (int64_t step = 1; step <= 2; ++step) {
                         ops.adafactor_update(pv, gv, rv, cv, fv, s, step, 1e-2, {}, copy);
                       }
                       return Outputs{{"param", a.download(pv, {n})},
                                      {"row", a.download(rv, {s.row_state()})},
                                      {"col", a.download(cv, {s.col_state()})},
                                      {"full", a.download(fv, {s.full_state()})},
                                      {"compute_copy", a.download(copy, {n})}};
                     }});
  }
}

void add_convert_cases(std::vector<OpCase>& cases) {
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{17}, int64_t{1000}}) {
    std::vector<float> v = normal_vector(static_cast<size_t>(n), 101, 10.0f);
    // The rounding edge cases: NaN, infinities, a tie to even, the largest finite value
    // (rounds to infinity), a subnormal.
    const float specials[] = {NAN, INFINITY, -INFINITY, 1.00390625f, 3.3895314e38f, 1e-40f};
    for (size_t i = 0; i < v.size() && i < 6; ++i) v[i] = specials[i];
    for (DType from : {DType::float32, DType::bfloat16}) {
      for (DType to : {DType::float32, DType::bfloat16}) {
        const std::string name =
            "n" + std::to_string(n) + "_" + dtype_name(from) + "_to_" + dtype_name(to);
        cases.push_back({"convert", name, 0.0, [=](const BackendOps& ops, DeviceArena& a) {
                           TensorView out = a.upload(HostTensor::zeros(to, {n}));
                           ops.convert(a.upload(HostTensor::of(from, {n}, v)), out);
                           return Outputs{{"out", a.download(out, {n})}};
                         }});
      }
    }
  }
}

void add_elementwise_cases(std::vector<OpCase>& cases) {
  for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{4097}}) {
    const auto a = normal_vector(static_cast<size_t>(n), 111);
    const auto b = normal_vector(static_cast<size_t>(n), 112);
    for (DType ta : {DType::float32, DType::bfloat16}) {
      for (DType tout : {DType::float32, DType::bfloat16}) {
        const std::string name =
            "n" + std::to_string(n) + "_" + dtype_name(ta) + "+float32_to_" + dtype_name(tout);
        cases.push_back({"add", name, 1e-6, [=](const BackendOps& ops, DeviceArena& ar) {
                           TensorView out = ar.upload(HostTensor::zeros(tout, {n}));
                           ops.add(ar.upload(HostTensor::of(ta, {n}, a)),
                                   ar.upload(HostTensor::f32({n}, b)), out);
                           return Outputs{{"out", ar.download(out, {n})}};
                         }});
      }
    }
    cases.push_back(
        {"multiply", "n" + std::to_string(n), 0.0, [=](const BackendOps& ops, DeviceArena& ar) {
           TensorView x = ar.upload(HostTensor::f32({n}, a));
           ops.multiply(x, ar.upload(HostTensor::f32({n}, b)));
           return Outputs{{"x", ar.download(x, {n})}};
         }});
  }
}

std::vector<OpCase> all_cases() {
  std::vector<OpCase> cases;
  add_convert_cases(cases);
  add_elementwise_cases(cases);
  add_routing_cases(cases);
  add_dispatch_cases(cases);
  add_expert_cases(cases);
  add_gemm_cases(cases);
  add_nn_and_optim_cases(cases);
  return cases;
}

// The largest relative difference between two outputs (NaN matching NaN counts as equal), or
// infinity when shapes or dtypes differ. Index outputs (int32) must match exactly.
double max_rel_diff(const HostTensor& got, const HostTensor& want, bool* bitwise) {
  *bitwise = got.dtype == want.dtype && got.bytes == want.bytes;
  if (got.dtype != want.dtype || got.shape != want.shape) return INFINITY;
  if (*bitwise) return 0.0;
  if (got.dtype == DType::int32) return INFINITY;
  double worst = 0;
  for (int64_t i = 0; i < got.numel(); ++i) {
    const double g = got.value(i), w = want.value(i);
    if (std::isnan(g) && std::isnan(w)) continue;
    if (g == w) continue;
    const double rel = std::fabs(g - w) / std::max(1e-3, std::fabs(w));
    worst = std::max(worst, std::isfinite(rel) ? rel : INFINITY);
  }
  return worst;
}

struct Target {
  const BackendOps* ops;
  CpuIsa isa;  // the CPU tier (for the CPU table; the host tier for others)
  std::string label;
};

// Whether test_main registered a CUDA table: a CUDA build on a machine with a device.
bool cuda_table_expected() {
#ifdef PYSWITCH_TESTS_WITH_CUDA
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

std::vector<Target> targets() {
  std::vector<Target> out;
  for (CpuIsa isa : supported_cpu_isas()) {
    out.push_back({&cpu_backend(), isa, std::string("cpu/") + cpu_isa_name(isa)});
  }
  try {
    out.push_back({&backend(Device::cuda), active_cpu_isa(), "cuda"});
  } catch (const DeviceError&) {
    // No CUDA backend loaded here: the CPU tiers are the backends.
  }
  return out;
}

}  // namespace

TEST(backend_ops_every_op_has_cases) {
  const std::vector<OpCase> cases = all_cases();
  for (int i = 0; i < backend_op_count(); ++i) {
    const std::string op = backend_op_name(i);
    if (op == "allocate" || op == "release" || op == "copy") continue;  // used by every case
    bool covered = false;
    for (const OpCase& c : cases) covered = covered || c.op == op;
    if (!covered) std::printf("  op '%s' has no backend-ops case\n", op.c_str());
    CHECK(covered);
    CHECK(backend_has_op(cpu_backend(), i));
  }
}

TEST(backend_ops_match_the_cpu_reference) {
  const CpuIsa saved = active_cpu_isa();
  const std::vector<OpCase> cases = all_cases();
  // The reference: the CPU table at the scalar tier.
  set_cpu_isa(CpuIsa::scalar);
  std::vector<Outputs> reference;
  for (const OpCase& c : cases) {
    DeviceArena arena(cpu_backend());
    reference.push_back(c.run(cpu_backend(), arena));
  }
  struct Summary {
    int cases = 0, failed = 0;
    double worst = 0;
  };
  for (const Target& target : targets()) {
    set_cpu_isa(target.isa);
    const bool on_cpu = target.ops->device == Device::cpu;
    std::vector<std::pair<std::string, Summary>> per_op;
    for (size_t i = 0; i < cases.size(); ++i) {
      const OpCase& c = cases[i];
      const double tolerance = on_cpu ? 0.0 : c.device_tolerance;
      DeviceArena arena(*target.ops);
      Outputs got;
      try {
        got = c.run(*target.ops, arena);
      } catch (const std::exception& e) {
        std::printf("  %s %s/%s: threw %s\n", target.label.c_str(), c.op.c_str(), c.name.c_str(),
                    e.what());
        got.clear();
      }
      if (per_op.empty() || per_op.back().first != c.op) per_op.push_back({c.op, {}});
      Summary& s = per_op.back().second;
      ++s.cases;
      bool ok = got.size() == reference[i].size();
      for (size_t o = 0; ok && o < got.size(); ++o) {
        bool bitwise = false;
        const double diff = max_rel_diff(got[o].second, reference[i][o].second, &bitwise);
        s.worst = std::max(s.worst, diff);
        if (bitwise || diff <= tolerance) continue;
        ok = false;
        std::printf(
            "  %s %s/%s: output '%s' differs from the reference (max rel diff %.3g, "
            "tolerance %.3g)\n",
            target.label.c_str(), c.op.c_str(), c.name.c_str(), got[o].first.c_str(), diff,
            tolerance);
      }
      if (!ok) ++s.failed;
      CHECK(ok);
    }
    // Merge repeated op runs (cases of one op are not always adjacent) and print a table.
    std::printf("  %-12s %-18s %6s %6s %10s\n", "backend", "op", "cases", "failed", "max diff");
    for (size_t a = 0; a < per_op.size(); ++a) {
      if (per_op[a].second.cases == 0) continue;
      for (size_t b = a + 1; b < per_op.size(); ++b) {
        if (per_op[b].first != per_op[a].first) continue;
        per_op[a].second.cases += per_op[b].second.cases;
        per_op[a].second.failed += per_op[b].second.failed;
        per_op[a].second.worst = std::max(per_op[a].second.worst, per_op[b].second.worst);
        per_op[b].second.cases = 0;
      }
      std::printf("  %-12s %-18s %6d %6d %10.3g\n", target.label.c_str(), per_op[a].first.c_str(),
                  per_op[a].second.cases, per_op[a].second.failed, per_op[a].second.worst);
    }
  }
  set_cpu_isa(saved);
}

TEST(backend_ops_reject_bad_views) {
  const BackendOps& ops = cpu_backend();
  std::vector<float> logits(12, 0.0f);
  moe::RoutingPlan plan;
  bool threw = false;
  try {
    ops.route(TensorView::contiguous(logits.data(), DType::float32, {12}), {}, plan);
  } catch (const InvalidArgument& e) {
    threw = std::string(e.what()).find("route: logits must be 2-D") != std::string::npos;
  }
  CHECK(threw);
  threw = false;
  try {
    TensorView v = TensorView::contiguous(logits.data(), DType::float32, {3, 4});
    v.device = Device::cuda;
    ops.route(v, {}, plan);
  } catch (const InvalidArgument& e) {
    threw = std::string(e.what()).find("must be on the cpu") != std::string::npos;
  }
  CHECK(threw);
  threw = false;
  try {
    (void)backend(Device::cuda);
  } catch (const DeviceError&) {
    threw = true;
  }
  CHECK(threw == !cuda_table_expected());
}

TEST(backend_ops_layers_refuse_a_device_they_cannot_run_on) {
  CHECK(&layer_backend("SwitchFFN", Device::cpu) == &cpu_backend());
  bool threw = false;
  try {
    CHECK(layer_backend("SwitchFFN", Device::cuda).device == Device::cuda);
  } catch (const DeviceError& e) {
    threw = std::string(e.what()).find("SwitchFFN: device 'cuda' is not available") == 0;
  }
  CHECK(threw == !cuda_table_expected());
  CHECK(parse_device("x", "cpu") == Device::cpu);
  CHECK(parse_device("x", "cuda") == Device::cuda);
  threw = false;
  try {
    (void)parse_device("SwitchFFN", "gpu");
  } catch (const InvalidArgument& e) {
    threw = std::string(e.what()) == "SwitchFFN: device must be 'cpu' or 'cuda', got 'gpu'";
  }
  CHECK(threw);
}
