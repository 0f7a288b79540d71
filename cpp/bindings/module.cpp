// pyswitch._core: the pybind11 bindings, the only file that includes pybind11. It turns NumPy
// arrays into checked pointers, releases the GIL around compute, and maps C++ errors onto
// Python exceptions; all semantics live in the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "pyswitch/bf16.hpp"
#include "pyswitch/build_info.hpp"
#include "pyswitch/comm/local.hpp"
#include "pyswitch/cpu_isa.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/log.hpp"
#include "pyswitch/matmul.hpp"
#include "pyswitch/model/switch_lm.hpp"
#include "pyswitch/moe/dispatch.hpp"
#include "pyswitch/moe/router.hpp"
#include "pyswitch/moe/switch_layer.hpp"
#include "pyswitch/optim/optim.hpp"
#include "pyswitch/threading.hpp"

namespace py = pybind11;
using namespace pyswitch;

namespace {

// ml_dtypes.bfloat16, looked up once at import.
py::dtype& bfloat16_dtype() {
  static py::dtype dtype = py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
  return dtype;
}

std::string shape_of(const py::array& a) {
  std::ostringstream out;
  out << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) out << (i ? ", " : "") << a.shape(i);
  out << (a.ndim() == 1 ? ",)" : ")");
  return out.str();
}

std::string dtype_of(const py::array& a) {
  return py::str(a.dtype()).cast<std::string>();
}

// Any object -> C-contiguous array, dtype untouched (the dtype check follows). Non-contiguous
// and negative-stride views are copied here, so the core only ever sees dense row-major data.
py::array as_contiguous(const char* where, const char* name, const py::handle& obj) {
  if (!py::isinstance<py::array>(obj)) {
    throw TypeMismatch(detail::concat(where, ": ", name, " must be a numpy array, got ",
                                      py::str(py::type::of(obj)).cast<std::string>()));
  }
  return py::array::ensure(obj, py::array::c_style);
}

bool is_float32(const py::array& a) {
  return a.dtype().is(py::dtype::of<float>()) || a.dtype().equal(py::dtype::of<float>());
}
bool is_bfloat16(const py::array& a) {
  return a.dtype().equal(bfloat16_dtype());
}

py::array float32_array(const char* where, const char* name, const py::handle& obj) {
  py::array a = as_contiguous(where, name, obj);
  if (!is_float32(a)) {
    throw TypeMismatch(detail::concat(where, ": ", name, " must be float32, got ", dtype_of(a),
                                      " (convert with .astype(np.float32))"));
  }
  return a;
}

void require_ndim(const char* where, const char* name, const py::array& a, int ndim,
                  const char* dims) {
  if (a.ndim() != ndim) {
    throw InvalidArgument(detail::concat(where, ": ", name, " must be ", ndim, "-D ", dims,
                                         ", got shape ", shape_of(a)));
  }
}

template <typename T>
py::array view_of(std::vector<int64_t> shape, const T* data, py::handle owner, bool writeable) {
  py::array out(py::dtype::of<T>(), shape, {}, data, owner);
  if (!writeable) out.attr("setflags")(py::arg("write") = false);
  return out;
}

// Lock order: a pyswitch mutex is never held while waiting for the GIL. A thread in compute
// holds its object's mutex without the GIL and needs the GIL back before it can return to
// Python; if another thread blocked on that mutex while holding the GIL, each would wait for
// the other forever. So every locked region goes through this one helper: release the GIL,
// then lock; on the way out (return or throw) unlock, then re-take the GIL. `fn` runs without
// the GIL, so it touches no Python object: it works on C++ values and pointers taken before,
// and what it returns (by value, copied under the lock) becomes Python objects only after.
template <typename Fn>
auto locked_without_gil(std::mutex& mutex, Fn&& fn) {
  py::gil_scoped_release release;
  std::lock_guard<std::mutex> lock(mutex);
  return fn();
}

// Owns the Router and serialises calls from Python threads (through locked_without_gil).
struct PyRouter {
  PyRouter(int64_t d_model, int64_t num_experts, const moe::RouterOptions& options)
      : router(d_model, num_experts, options) {}
  moe::Router router;
  std::mutex mutex;
};

moe::RouteOptions route_options(int64_t k, std::optional<double> capacity_factor,
                                int64_t min_capacity, std::optional<int64_t> group_size,
                                const std::string& priority, const std::string& rounding,
                                bool normalize_gates) {
  moe::RouteOptions o;
  o.k = k;
  o.capacity_factor = capacity_factor;
  o.min_capacity = min_capacity;
  if (group_size) {
    PYSWITCH_CHECK_ARG(*group_size >= 1, "route: group_size must be positive (or None), got ",
                       *group_size);
    o.group_size = *group_size;
  }
  o.priority = moe::parse_priority(priority);
  o.capacity_rounding = moe::parse_capacity_rounding(rounding);
  o.normalize_gates = normalize_gates;
  return o;
}

// float32 or bfloat16, as DType; TypeError otherwise.
DType activation_dtype(const char* where, const char* name, const py::array& a) {
  if (is_float32(a)) return DType::float32;
  if (is_bfloat16(a)) return DType::bfloat16;
  throw TypeMismatch(
      detail::concat(where, ": ", name, " must be float32 or bfloat16, got ", dtype_of(a)));
}

py::array new_activation(DType dtype, std::vector<py::ssize_t> shape) {
  return dtype == DType::float32 ? py::array(py::dtype::of<float>(), shape)
                                 : py::array(bfloat16_dtype(), shape);
}

// An activation array that takes over `data` without a copy: for outputs whose dtype or size
// is only known under a lock, where no NumPy array can be made.
py::array adopt_activation(DType dtype, std::vector<py::ssize_t> shape,
                           std::unique_ptr<char[]> data) {
  py::capsule owner(data.get(), [](void* p) { delete[] static_cast<char*>(p); });
  char* raw = data.release();  // the capsule frees it from here on
  return py::array(dtype == DType::float32 ? py::dtype::of<float>() : bfloat16_dtype(), shape, {},
                   raw, owner);
}

// Shape of a dispatch buffer: (E, G*C, d) for the padded layout, (rows, d) for the packed one.
std::vector<py::ssize_t> buffer_shape(const moe::DispatchLayout& layout, int64_t d) {
  if (layout.packed)
    return {static_cast<py::ssize_t>(layout.total_rows), static_cast<py::ssize_t>(d)};
  const int64_t per_expert = layout.num_experts ? layout.total_rows / layout.num_experts : 0;
  return {static_cast<py::ssize_t>(layout.num_experts), static_cast<py::ssize_t>(per_expert),
          static_cast<py::ssize_t>(d)};
}

// A dispatch buffer argument: rows must match the layout; returns d_model.
int64_t check_buffer(const char* where, const char* name, const py::array& a,
                     const moe::DispatchLayout& layout) {
  const auto expect = buffer_shape(layout, a.ndim() ? a.shape(a.ndim() - 1) : 0);
  bool ok = a.ndim() == static_cast<py::ssize_t>(expect.size());
  for (size_t i = 0; ok && i + 1 < expect.size(); ++i) ok = a.shape(i) == expect[i];
  if (!ok || a.shape(a.ndim() - 1) < 1) {
    std::ostringstream want;
    want << "(";
    for (size_t i = 0; i + 1 < expect.size(); ++i) want << expect[i] << ", ";
    want << "d_model)";
    throw InvalidArgument(detail::concat(where, ": ", name, " must have shape ", want.str(),
                                         " for this layout, got ", shape_of(a)));
  }
  return a.shape(a.ndim() - 1);
}

void check_tokens(const char* where, const char* name, const py::array& a,
                  const moe::DispatchLayout& layout, int64_t d) {
  if (a.ndim() != 2 || a.shape(0) != layout.num_tokens || (d > 0 && a.shape(1) != d) ||
      a.shape(1) < 1) {
    throw InvalidArgument(detail::concat(where, ": ", name, " must have shape (", layout.num_tokens,
                                         ", ", d > 0 ? std::to_string(d) : "d_model", "), got ",
                                         shape_of(a)));
  }
}

void check_gate(const char* where, const py::array& gate, const moe::DispatchLayout& layout) {
  if (gate.ndim() != 2 || gate.shape(0) != layout.num_tokens || gate.shape(1) != layout.k) {
    throw InvalidArgument(detail::concat(where, ": gate must have shape (", layout.num_tokens, ", ",
                                         layout.k, "), got ", shape_of(gate)));
  }
}

// Owns a layer and serialises calls from Python threads (through locked_without_gil).
template <typename Layer>
struct Locked {
  template <typename... Args>
  explicit Locked(Args&&... args) : layer(std::forward<Args>(args)...) {}
  Layer layer;
  std::mutex mutex;
};
using PySwitchFFN = Locked<moe::SwitchFFN>;
using PyDenseFFN = Locked<moe::DenseFFN>;

// A float32 array that an op updates in place: never a silent copy.
py::array inplace_f32(const char* where, const char* name, const py::handle& obj) {
  if (!py::isinstance<py::array>(obj)) {
    throw TypeMismatch(detail::concat(where, ": ", name, " must be a numpy array, got ",
                                      py::str(py::type::of(obj)).cast<std::string>()));
  }
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (!is_float32(a)) {
    throw TypeMismatch(detail::concat(where, ": ", name, " must be float32, got ", dtype_of(a)));
  }
  if (!(a.flags() & py::array::c_style) || !a.writeable()) {
    throw InvalidArgument(detail::concat(where, ": ", name,
                                         " must be a writeable C-contiguous array (it is updated "
                                         "in place), got a view that is not"));
  }
  return a;
}

using PySwitchLM = Locked<model::SwitchLM>;

DType parse_dtype(const std::string& where, const std::string& name) {
  if (name == "float32") return DType::float32;
  if (name == "bfloat16") return DType::bfloat16;
  throw InvalidArgument(where + ": dtype must be 'float32' or 'bfloat16', got '" + name + "'");
}

// forward(x) of a layer with a d_model: checks x, runs with the GIL released, returns y.
template <typename Wrapper>
py::array layer_forward(const char* where, Wrapper& w, py::handle x_obj, bool training) {
  py::array x = as_contiguous(where, "x", x_obj);
  const DType dtype = activation_dtype(where, "x", x);
  if (x.ndim() != 2 || x.shape(1) != w.layer.d_model()) {
    throw InvalidArgument(detail::concat(where, ": x must have shape (tokens, ", w.layer.d_model(),
                                         "), got ", shape_of(x)));
  }
  py::array y = new_activation(dtype, {x.shape(0), x.shape(1)});
  const void* in = x.data();
  void* out = y.mutable_data();
  const int64_t T = x.shape(0);
  locked_without_gil(w.mutex, [&] { w.layer.forward(in, dtype, T, training, out); });
  return y;
}

template <typename Wrapper>
py::array layer_backward(const char* where, Wrapper& w, py::handle dy_obj) {
  py::array dy = as_contiguous(where, "dy", dy_obj);
  const DType dtype = activation_dtype(where, "dy", dy);
  // dx is made from dy's shape before the lock; the checks against the forward run under it,
  // with the messages' Python parts taken here.
  const std::string dy_dtype = dtype_of(dy), dy_shape = shape_of(dy);
  const bool is_2d = dy.ndim() == 2;
  py::array dx = is_2d ? new_activation(dtype, {dy.shape(0), dy.shape(1)}) : py::array();
  const int64_t rows = is_2d ? dy.shape(0) : -1, cols = is_2d ? dy.shape(1) : -1;
  const void* in = dy.data();
  void* out = is_2d ? dx.mutable_data() : nullptr;
  locked_without_gil(w.mutex, [&] {
    PYSWITCH_CHECK_STATE(w.layer.has_forward(), where,
                         ": no forward pass to differentiate; call forward(x) first");
    if (dtype != w.layer.forward_dtype()) {
      throw TypeMismatch(detail::concat(where, ": dy must have the dtype of the forward's x (",
                                        dtype_name(w.layer.forward_dtype()), "), got ", dy_dtype));
    }
    if (!is_2d || rows != w.layer.forward_tokens() || cols != w.layer.d_model()) {
      throw InvalidArgument(detail::concat(where, ": dy must have shape (",
                                           w.layer.forward_tokens(), ", ", w.layer.d_model(),
                                           ") like the forward's output, got ", dy_shape));
    }
    w.layer.backward(in, out);
  });
  return dx;
}

// A live float32 view of a layer's parameter or gradient (null pointer: None).
py::object live_view(py::handle owner, float* data, std::vector<int64_t> shape) {
  if (!data) return py::none();
  return view_of(std::move(shape), data, owner, true);
}

// Adds w_in, w_out and, when present, w_gate, b_in, b_out (or their gradients) as live views.
// `lead` is the leading shape: {E} for a Switch layer, {} for a dense one.
void add_expert_tensors(py::dict& out, py::handle owner, moe::ExpertWeights& w, bool grads,
                        std::vector<int64_t> lead, int64_t d, int64_t f) {
  auto shape = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> full = lead;
    full.insert(full.end(), tail);
    return full;
  };
  out["w_in"] = live_view(owner, grads ? w.w_in_grad() : w.w_in(), shape({d, f}));
  out["w_out"] = live_view(owner, grads ? w.w_out_grad() : w.w_out(), shape({f, d}));
  if (w.w_gate()) {
    out["w_gate"] = live_view(owner, grads ? w.w_gate_grad() : w.w_gate(), shape({d, f}));
  }
  if (w.b_in()) {
    out["b_in"] = live_view(owner, grads ? w.b_in_grad() : w.b_in(), shape({f}));
    out["b_out"] = live_view(owner, grads ? w.b_out_grad() : w.b_out(), shape({d}));
  }
}

// ---- collectives helpers ------------------------------------------------------------------
comm::CommDType comm_dtype_of(const char* where, const char* name, const py::array& a) {
  if (is_float32(a)) return comm::CommDType::float32;
  if (is_bfloat16(a)) return comm::CommDType::bfloat16;
  if (a.dtype().equal(py::dtype::of<int32_t>())) return comm::CommDType::int32;
  if (a.dtype().equal(py::dtype::of<int64_t>())) return comm::CommDType::int64;
  throw TypeMismatch(detail::concat(
      where, ": ", name, " must be float32, bfloat16, int32 or int64, got ", dtype_of(a)));
}

// A C-contiguous buffer argument of `dtype` holding at least `elements` elements.
void require_buffer(const char* where, const char* name, const py::array& a, comm::CommDType dtype,
                    int64_t elements, bool writeable) {
  if (comm_dtype_of(where, name, a) != dtype) {
    throw TypeMismatch(detail::concat(where, ": ", name, " must be ", comm::comm_dtype_name(dtype),
                                      ", got ", dtype_of(a)));
  }
  if (!(a.flags() & py::array::c_style) || (writeable && !a.writeable())) {
    throw InvalidArgument(detail::concat(where, ": ", name, " must be a ",
                                         writeable ? "writeable " : "", "C-contiguous array"));
  }
  if (a.size() < elements) {
    throw InvalidArgument(detail::concat(where, ": ", name, " must hold at least ", elements,
                                         " elements, got ", a.size()));
  }
}

comm::ReduceOp parse_reduce_op(const char* where, const std::string& name) {
  if (name == "sum") return comm::ReduceOp::sum;
  if (name == "max") return comm::ReduceOp::max;
  if (name == "min") return comm::ReduceOp::min;
  if (name == "mean") return comm::ReduceOp::mean;
  throw InvalidArgument(
      detail::concat(where, ": op must be 'sum', 'max', 'min' or 'mean', got '", name, "'"));
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyswitch C++ core (internal; use the pyswitch package)";

  // Error classes: pyswitch.Error(RuntimeError) and its subclasses.
  static py::exception<Error> error_class(m, "Error", PyExc_RuntimeError);
  static py::exception<CommError> comm_error_class(m, "CommError", error_class.ptr());
  static py::exception<CommTimeout> comm_timeout_class(m, "CommTimeout", comm_error_class.ptr());
  static py::exception<CheckpointError> checkpoint_error_class(m, "CheckpointError",
                                                               error_class.ptr());
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const TypeMismatch& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const CommTimeout& e) {
      py::set_error(comm_timeout_class, e.what());
    } catch (const CommError& e) {
      py::set_error(comm_error_class, e.what());
    } catch (const CheckpointError& e) {
      py::set_error(checkpoint_error_class, e.what());
    } catch (const Error& e) {
      py::set_error(error_class, e.what());
    }
  });

  bfloat16_dtype();  // fail at import, not at first use, if ml_dtypes is missing

  m.def("build_info", []() {
    const BuildInfo info = pyswitch::build_info();
    py::dict d;
    d["version"] = info.version;
    py::list compiled, supported;
    for (CpuIsa isa : compiled_cpu_isas()) compiled.append(cpu_isa_name(isa));
    for (CpuIsa isa : supported_cpu_isas()) supported.append(cpu_isa_name(isa));
    d["compiled_isas"] = compiled;
    d["supported_isas"] = supported;
    d["active_isa"] = cpu_isa_name(active_cpu_isa());
    d["blas"] = info.blas;
    py::dict gemm;
    gemm["float32"] = info.gemm_float32;
    gemm["bfloat16"] = info.gemm_bfloat16;
    d["gemm"] = gemm;
    d["mpi"] = info.mpi;
    d["cuda"] = info.cuda;
    d["checkpoint_hashes"] = info.checkpoint_hashes;
    d["num_threads"] = get_num_threads();
    d["compiler"] = info.compiler;
    return d;
  });
  // The core's log sink stays its default (stderr) in Python: calling into Python from the
  // threads that log (thread ranks, OpenMP workers) could deadlock on the GIL. Only the level is
  // exposed.
  m.def("set_log_level", [](const std::string& name) { set_log_level(parse_log_level(name)); });
  m.def("log_level", []() { return std::string(log_level_name(pyswitch::log_level())); });
  m.def("cpu_isa", []() { return std::string(cpu_isa_name(active_cpu_isa())); });
  m.def("set_cpu_isa", [](const std::string& name) {
    return std::string(cpu_isa_name(set_cpu_isa(parse_cpu_isa(name))));
  });
  m.def("supported_isas", []() {
    std::vector<std::string> out;
    for (CpuIsa isa : supported_cpu_isas()) out.emplace_back(cpu_isa_name(isa));
    return out;
  });
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads);

  // ---- bfloat16 ------------------------------------------------------------------------------
  // to_bfloat16 / to_float32, optionally into a caller's C-contiguous array of the right dtype
  // and shape (no allocation, no page faults: what a training loop reuses step after step).
  auto convert = [](const char* where, py::handle obj, py::object out_obj, bool to_bf16) {
    py::array src = as_contiguous(where, "a", obj);
    if (to_bf16 ? !is_float32(src) : !is_bfloat16(src)) {
      throw TypeMismatch(detail::concat(where, ": a must be ", to_bf16 ? "float32" : "bfloat16",
                                        ", got ", dtype_of(src)));
    }
    std::vector<py::ssize_t> shape(src.shape(), src.shape() + src.ndim());
    py::array dst;
    if (out_obj.is_none()) {
      dst = to_bf16 ? py::array(bfloat16_dtype(), shape) : py::array(py::dtype::of<float>(), shape);
    } else {
      if (!py::isinstance<py::array>(out_obj)) {
        throw TypeMismatch(detail::concat(where, ": out must be a numpy array or None, got ",
                                          py::str(py::type::of(out_obj)).cast<std::string>()));
      }
      dst = out_obj.cast<py::array>();
      if (to_bf16 ? !is_bfloat16(dst) : !is_float32(dst)) {
        throw TypeMismatch(detail::concat(where, ": out must be ", to_bf16 ? "bfloat16" : "float32",
                                          ", got ", dtype_of(dst)));
      }
      const bool same_shape =
          dst.ndim() == src.ndim() && std::equal(shape.begin(), shape.end(), dst.shape());
      if (!same_shape || !(dst.flags() & py::array::c_style) || !dst.writeable()) {
        throw InvalidArgument(detail::concat(where,
                                             ": out must be a writeable C-contiguous array "
                                             "of shape ",
                                             shape_of(src), ", got ", shape_of(dst)));
      }
      const char* s_begin = static_cast<const char*>(src.data());
      const char* d_begin = static_cast<const char*>(dst.data());
      if (s_begin < d_begin + dst.nbytes() && d_begin < s_begin + src.nbytes()) {
        throw InvalidArgument(detail::concat(where, ": out must not overlap a"));
      }
    }
    const void* in = src.data();
    void* out = dst.mutable_data();
    const int64_t n = src.size();
    {
      py::gil_scoped_release release;
      if (to_bf16) {
        convert_f32_to_bf16(static_cast<const float*>(in), static_cast<bf16*>(out), n);
      } else {
        convert_bf16_to_f32(static_cast<const bf16*>(in), static_cast<float*>(out), n);
      }
    }
    return dst;
  };
  m.def(
      "to_bfloat16",
      [convert](py::handle a, py::object out) { return convert("to_bfloat16", a, out, true); },
      py::arg("a"), py::arg("out") = py::none());
  m.def(
      "to_float32",
      [convert](py::handle a, py::object out) { return convert("to_float32", a, out, false); },
      py::arg("a"), py::arg("out") = py::none());

  // ---- routing -------------------------------------------------------------------------------
  py::class_<moe::RoutingPlan>(m, "RoutingPlan")
      .def_readonly("num_tokens", &moe::RoutingPlan::num_tokens)
      .def_readonly("num_experts", &moe::RoutingPlan::num_experts)
      .def_readonly("k", &moe::RoutingPlan::k)
      .def_readonly("group_size", &moe::RoutingPlan::group_size)
      .def_readonly("num_groups", &moe::RoutingPlan::num_groups)
      .def_readonly("capacity", &moe::RoutingPlan::capacity)
      .def_readonly("dropped", &moe::RoutingPlan::dropped)
      .def_readonly("aux_loss", &moe::RoutingPlan::aux_loss)
      .def_readonly("z_loss", &moe::RoutingPlan::z_loss)
      .def_property_readonly("expert_index",
                             [](py::object self) {
                               auto& p = self.cast<moe::RoutingPlan&>();
                               return view_of(std::vector<int64_t>{p.num_tokens, p.k},
                                              p.expert_index.data(), self, false);
                             })
      .def_property_readonly("gate",
                             [](py::object self) {
                               auto& p = self.cast<moe::RoutingPlan&>();
                               return view_of(std::vector<int64_t>{p.num_tokens, p.k},
                                              p.gate.data(), self, false);
                             })
      .def_property_readonly("slot",
                             [](py::object self) {
                               auto& p = self.cast<moe::RoutingPlan&>();
                               return view_of(std::vector<int64_t>{p.num_tokens, p.k},
                                              p.slot.data(), self, false);
                             })
      .def_property_readonly("tokens_per_expert",
                             [](py::object self) {
                               auto& p = self.cast<moe::RoutingPlan&>();
                               return view_of(std::vector<int64_t>{p.num_experts},
                                              p.tokens_per_expert.data(), self, false);
                             })
      .def_property_readonly("group_tokens_per_expert", [](py::object self) {
        auto& p = self.cast<moe::RoutingPlan&>();
        return view_of(std::vector<int64_t>{p.num_groups, p.num_experts},
                       p.group_expert_count.data(), self, false);
      });

  m.def(
      "route",
      [](py::handle logits_obj, int64_t k, std::optional<double> capacity_factor,
         int64_t min_capacity, std::optional<int64_t> group_size, const std::string& priority,
         const std::string& capacity_rounding, bool normalize_gates) {
        py::array logits = float32_array("route", "logits", logits_obj);
        require_ndim("route", "logits", logits, 2, "(tokens, experts)");
        const moe::RouteOptions o = route_options(k, capacity_factor, min_capacity, group_size,
                                                  priority, capacity_rounding, normalize_gates);
        const float* data = static_cast<const float*>(logits.data());
        const int64_t T = logits.shape(0), E = logits.shape(1);
        py::gil_scoped_release release;
        return moe::route(data, T, E, o);
      },
      py::arg("logits"), py::arg("k"), py::arg("capacity_factor"), py::arg("min_capacity"),
      py::arg("group_size"), py::arg("priority"), py::arg("capacity_rounding"),
      py::arg("normalize_gates"));

  py::class_<moe::ExpertChoicePlan>(m, "ExpertChoicePlan")
      .def_readonly("num_tokens", &moe::ExpertChoicePlan::num_tokens)
      .def_readonly("num_experts", &moe::ExpertChoicePlan::num_experts)
      .def_readonly("group_size", &moe::ExpertChoicePlan::group_size)
      .def_readonly("num_groups", &moe::ExpertChoicePlan::num_groups)
      .def_readonly("capacity", &moe::ExpertChoicePlan::capacity)
      .def_readonly("z_loss", &moe::ExpertChoicePlan::z_loss)
      .def_property_readonly("token_index",
                             [](py::object self) {
                               auto& p = self.cast<moe::ExpertChoicePlan&>();
                               return view_of(
                                   std::vector<int64_t>{p.num_experts, p.num_groups * p.capacity},
                                   p.token_index.data(), self, false);
                             })
      .def_property_readonly("gate",
                             [](py::object self) {
                               auto& p = self.cast<moe::ExpertChoicePlan&>();
                               return view_of(
                                   std::vector<int64_t>{p.num_experts, p.num_groups * p.capacity},
                                   p.gate.data(), self, false);
                             })
      .def_property_readonly("experts_per_token", [](py::object self) {
        auto& p = self.cast<moe::ExpertChoicePlan&>();
        return view_of(std::vector<int64_t>{p.num_tokens}, p.experts_per_token.data(), self, false);
      });

  m.def(
      "route_expert_choice",
      [](py::handle logits_obj, double capacity_factor, std::optional<int64_t> group_size) {
        py::array logits = float32_array("route_expert_choice", "logits", logits_obj);
        require_ndim("route_expert_choice", "logits", logits, 2, "(tokens, experts)");
        if (group_size) {
          PYSWITCH_CHECK_ARG(*group_size >= 1,
                             "route_expert_choice: group_size must be positive (or None), got ",
                             *group_size);
        }
        const float* data = static_cast<const float*>(logits.data());
        const int64_t T = logits.shape(0), E = logits.shape(1);
        py::gil_scoped_release release;
        return moe::route_expert_choice(data, T, E, capacity_factor, group_size.value_or(0));
      },
      py::arg("logits"), py::arg("capacity_factor"), py::arg("group_size"));

  py::class_<PyRouter>(m, "Router")
      .def(py::init([](int64_t d_model, int64_t num_experts, int64_t k,
                       std::optional<double> capacity_factor,
                       std::optional<double> eval_capacity_factor, int64_t min_capacity,
                       std::optional<int64_t> group_size, const std::string& priority,
                       const std::string& capacity_rounding, bool normalize_gates,
                       double jitter_eps, double init_scale, uint64_t seed) {
             moe::RouterOptions o;
             o.route = route_options(k, capacity_factor, min_capacity, group_size, priority,
                                     capacity_rounding, normalize_gates);
             o.eval_capacity_factor = eval_capacity_factor;
             o.jitter_eps = jitter_eps;
             o.init_scale = init_scale;
             o.seed = seed;
             return std::make_unique<PyRouter>(d_model, num_experts, o);
           }),
           py::arg("d_model"), py::arg("num_experts"), py::arg("k"), py::arg("capacity_factor"),
           py::arg("eval_capacity_factor"), py::arg("min_capacity"), py::arg("group_size"),
           py::arg("priority"), py::arg("capacity_rounding"), py::arg("normalize_gates"),
           py::arg("jitter_eps"), py::arg("init_scale"), py::arg("seed"))
      .def_property_readonly("d_model", [](PyRouter& r) { return r.router.d_model(); })
      .def_property_readonly("num_experts", [](PyRouter& r) { return r.router.num_experts(); })
      .def_property_readonly("weight",
                             [](py::object self) {
                               auto& r = self.cast<PyRouter&>();
                               return view_of(
                                   std::vector<int64_t>{r.router.d_model(), r.router.num_experts()},
                                   r.router.weight(), self, true);
                             })
      .def_property_readonly("weight_grad",
                             [](py::object self) {
                               auto& r = self.cast<PyRouter&>();
                               return view_of(
                                   std::vector<int64_t>{r.router.d_model(), r.router.num_experts()},
                                   r.router.weight_grad(), self, true);
                             })
      .def_property_readonly("last_logits",
                             [](PyRouter& r) {
                               const std::vector<float> logits = locked_without_gil(r.mutex, [&] {
                                 PYSWITCH_CHECK_STATE(r.router.has_forward(),
                                                      "Router.last_logits: no forward pass yet");
                                 return r.router.last_logits();
                               });
                               const int64_t E = r.router.num_experts();
                               py::array_t<float> out({static_cast<int64_t>(logits.size()) / E, E});
                               std::copy(logits.begin(), logits.end(), out.mutable_data());
                               return out;
                             })
      .def(
          "forward",
          [](PyRouter& r, py::handle x_obj, bool training) {
            py::array x = as_contiguous("Router.forward", "x", x_obj);
            DType dtype;
            if (is_float32(x)) {
              dtype = DType::float32;
            } else if (is_bfloat16(x)) {
              dtype = DType::bfloat16;
            } else {
              throw TypeMismatch(detail::concat(
                  "Router.forward: x must be float32 or bfloat16, got ", dtype_of(x)));
            }
            require_ndim("Router.forward", "x", x, 2, "(tokens, d_model)");
            if (x.shape(1) != r.router.d_model()) {
              throw InvalidArgument(detail::concat("Router.forward: x must have shape (tokens, ",
                                                   r.router.d_model(), "), got ", shape_of(x)));
            }
            const void* data = x.data();
            const int64_t T = x.shape(0);
            // Returned by value: copied under the lock, as the router reuses its plan.
            return locked_without_gil(r.mutex,
                                      [&] { return r.router.forward(data, dtype, T, training); });
          },
          py::arg("x"), py::arg("training"))
      .def(
          "backward",
          [](PyRouter& r, py::handle d_gate_obj, double aux_coef, double z_coef) {
            py::array d_gate = float32_array("Router.backward", "d_gate", d_gate_obj);
            const std::string d_gate_shape = shape_of(d_gate);
            const bool is_2d = d_gate.ndim() == 2;
            const int64_t rows = is_2d ? d_gate.shape(0) : -1, cols = is_2d ? d_gate.shape(1) : -1;
            const float* dg = static_cast<const float*>(d_gate.data());
            const int64_t d = r.router.d_model();
            // dx's dtype and rows are the forward's, known only under the lock: it is written
            // into a plain buffer there and becomes an array (no copy) after.
            DType dx_dtype = DType::float32;
            int64_t T = 0;
            std::unique_ptr<char[]> dx;
            locked_without_gil(r.mutex, [&] {
              PYSWITCH_CHECK_STATE(r.router.has_forward(),
                                   "Router.backward: no forward pass to differentiate; call "
                                   "forward(x) first");
              const moe::RoutingPlan& plan_ref = r.router.forward_plan();
              if (!is_2d || rows != plan_ref.num_tokens || cols != plan_ref.k) {
                throw InvalidArgument(detail::concat("Router.backward: d_gate must have shape (",
                                                     plan_ref.num_tokens, ", ", plan_ref.k,
                                                     ") like plan.gate, got ", d_gate_shape));
              }
              dx_dtype = r.router.forward_dtype();
              T = plan_ref.num_tokens;
              dx.reset(new char[static_cast<size_t>(T * d * dtype_size(dx_dtype))]);
              r.router.backward(dg, aux_coef, z_coef, dx.get());
            });
            return adopt_activation(dx_dtype,
                                    {static_cast<py::ssize_t>(T), static_cast<py::ssize_t>(d)},
                                    std::move(dx));
          },
          py::arg("d_gate"), py::arg("aux_loss_coef"), py::arg("z_loss_coef"));

  // ---- dispatch and combine --------------------------------------------------------------
  py::class_<moe::DispatchLayout>(m, "DispatchLayout")
      .def(py::init([](const moe::RoutingPlan& plan, bool packed) {
             py::gil_scoped_release release;
             return moe::make_dispatch_layout(plan, packed);
           }),
           py::arg("plan"), py::arg("packed"))
      .def_readonly("num_tokens", &moe::DispatchLayout::num_tokens)
      .def_readonly("num_experts", &moe::DispatchLayout::num_experts)
      .def_readonly("k", &moe::DispatchLayout::k)
      .def_readonly("total_rows", &moe::DispatchLayout::total_rows)
      .def_readonly("packed", &moe::DispatchLayout::packed)
      .def_property_readonly("expert_offset",
                             [](py::object self) {
                               auto& l = self.cast<moe::DispatchLayout&>();
                               return view_of(std::vector<int64_t>{l.num_experts + 1},
                                              l.expert_offset.data(), self, false);
                             })
      .def_property_readonly("assignment_row",
                             [](py::object self) {
                               auto& l = self.cast<moe::DispatchLayout&>();
                               return view_of(std::vector<int64_t>{l.num_tokens, l.k},
                                              l.assignment_row.data(), self, false);
                             })
      .def_property_readonly("row_token", [](py::object self) {
        auto& l = self.cast<moe::DispatchLayout&>();
        return view_of(std::vector<int64_t>{l.total_rows}, l.row_token.data(), self, false);
      });

  m.def(
      "dispatch",
      [](py::handle x_obj, const moe::DispatchLayout& layout) {
        py::array x = as_contiguous("dispatch", "x", x_obj);
        const DType dtype = activation_dtype("dispatch", "x", x);
        check_tokens("dispatch", "x", x, layout, 0);
        const int64_t d = x.shape(1);
        py::array out = new_activation(dtype, buffer_shape(layout, d));
        const void* in = x.data();
        void* buffer = out.mutable_data();
        py::gil_scoped_release release;
        moe::dispatch(in, dtype, d, layout, buffer);
        return out;
      },
      py::arg("x"), py::arg("layout"));
  m.def(
      "combine",
      [](py::handle out_obj, py::handle gate_obj, const moe::DispatchLayout& layout) {
        py::array expert_out = as_contiguous("combine", "expert_out", out_obj);
        const DType dtype = activation_dtype("combine", "expert_out", expert_out);
        const int64_t d = check_buffer("combine", "expert_out", expert_out, layout);
        py::array gate = float32_array("combine", "gate", gate_obj);
        check_gate("combine", gate, layout);
        py::array y = new_activation(
            dtype, {static_cast<py::ssize_t>(layout.num_tokens), static_cast<py::ssize_t>(d)});
        const void* in = expert_out.data();
        const float* g = static_cast<const float*>(gate.data());
        void* y_data = y.mutable_data();
        py::gil_scoped_release release;
        moe::combine(in, dtype, d, layout, g, y_data);
        return y;
      },
      py::arg("expert_out"), py::arg("gate"), py::arg("layout"));
  m.def(
      "combine_backward",
      [](py::handle dy_obj, py::handle out_obj, py::handle gate_obj,
         const moe::DispatchLayout& layout) {
        py::array expert_out = as_contiguous("combine_backward", "expert_out", out_obj);
        const DType dtype = activation_dtype("combine_backward", "expert_out", expert_out);
        const int64_t d = check_buffer("combine_backward", "expert_out", expert_out, layout);
        py::array dy = as_contiguous("combine_backward", "dy", dy_obj);
        if (activation_dtype("combine_backward", "dy", dy) != dtype) {
          throw TypeMismatch(
              detail::concat("combine_backward: dy must have the dtype of expert_out (",
                             dtype_name(dtype), "), got ", dtype_of(dy)));
        }
        check_tokens("combine_backward", "dy", dy, layout, d);
        py::array gate = float32_array("combine_backward", "gate", gate_obj);
        check_gate("combine_backward", gate, layout);
        py::array d_out = new_activation(dtype, buffer_shape(layout, d));
        py::array_t<float> d_gate({layout.num_tokens, layout.k});
        const void* dy_data = dy.data();
        const void* out_data = expert_out.data();
        const float* g = static_cast<const float*>(gate.data());
        void* d_out_data = d_out.mutable_data();
        float* d_gate_data = d_gate.mutable_data();
        {
          py::gil_scoped_release release;
          moe::combine_backward(dy_data, out_data, dtype, d, layout, g, d_out_data, d_gate_data);
        }
        return py::make_tuple(d_out, d_gate);
      },
      py::arg("dy"), py::arg("expert_out"), py::arg("gate"), py::arg("layout"));
  m.def(
      "dispatch_backward",
      [](py::handle grad_obj, const moe::DispatchLayout& layout) {
        py::array grad = as_contiguous("dispatch_backward", "d_buffer", grad_obj);
        const DType dtype = activation_dtype("dispatch_backward", "d_buffer", grad);
        const int64_t d = check_buffer("dispatch_backward", "d_buffer", grad, layout);
        py::array dx = new_activation(
            dtype, {static_cast<py::ssize_t>(layout.num_tokens), static_cast<py::ssize_t>(d)});
        const void* in = grad.data();
        void* out = dx.mutable_data();
        py::gil_scoped_release release;
        moe::dispatch_backward(in, dtype, d, layout, out);
        return dx;
      },
      py::arg("d_buffer"), py::arg("layout"));

  // ---- layers ------------------------------------------------------------------------------
  m.def(
      "matmul",
      [](py::handle a_obj, py::handle b_obj, const std::string& library) {
        if (library != "pyswitch" && library != "onednn") {
          throw InvalidArgument(detail::concat(
              "matmul: library must be 'pyswitch' or 'onednn', got '", library, "'"));
        }
        py::array a = as_contiguous("matmul", "a", a_obj);
        py::array b = as_contiguous("matmul", "b", b_obj);
        const DType dtype = activation_dtype("matmul", "a", a);
        if (activation_dtype("matmul", "b", b) != dtype) {
          throw TypeMismatch(detail::concat("matmul: b must have the dtype of a (",
                                            dtype_name(dtype), "), got ", dtype_of(b)));
        }
        if (a.ndim() != 2 || b.ndim() != 2 || a.shape(1) != b.shape(0)) {
          throw InvalidArgument(
              detail::concat("matmul: a (M, K) and b (K, N) must be 2-D with "
                             "matching K, got ",
                             shape_of(a), " and ", shape_of(b)));
        }
        const int64_t M = a.shape(0), K = a.shape(1), N = b.shape(1);
        py::array_t<float> c({M, N});
        const void* a_data = a.data();
        const void* b_data = b.data();
        float* c_data = c.mutable_data();
        py::gil_scoped_release release;
        if (library == "onednn") {
          pyswitch::matmul_onednn(dtype, M, N, K, a_data, b_data, c_data);
        } else {
          pyswitch::matmul(dtype, M, N, K, a_data, b_data, c_data);
        }
        return c;
      },
      py::arg("a"), py::arg("b"), py::arg("library") = "pyswitch");

  py::class_<moe::SwitchStats>(m, "SwitchStats")
      .def_readonly("drop_fraction", &moe::SwitchStats::drop_fraction)
      .def_readonly("router_entropy", &moe::SwitchStats::router_entropy)
      .def_property_readonly("tokens_per_expert", [](const moe::SwitchStats& s) {
        py::array_t<int64_t> out(static_cast<py::ssize_t>(s.tokens_per_expert.size()));
        std::copy(s.tokens_per_expert.begin(), s.tokens_per_expert.end(), out.mutable_data());
        return out;
      });

  py::class_<PySwitchFFN>(m, "SwitchFFN")
      .def(py::init([](int64_t d_model, int64_t d_ff, int64_t num_experts, int64_t k,
                       std::optional<double> capacity_factor,
                       std::optional<double> eval_capacity_factor, int64_t min_capacity,
                       std::optional<int64_t> group_size, const std::string& priority,
                       const std::string& capacity_rounding, bool normalize_gates,
                       const std::string& activation, bool use_bias, double expert_dropout,
                       const std::string& dtype, double aux_loss_coef, double z_loss_coef,
                       double jitter_eps, double init_scale, uint64_t seed,
                       comm::Communicator* communicator) {
             moe::SwitchFFNOptions o;
             o.router.route = route_options(k, capacity_factor, min_capacity, group_size, priority,
                                            capacity_rounding, normalize_gates);
             o.router.eval_capacity_factor = eval_capacity_factor;
             o.router.jitter_eps = jitter_eps;
             o.router.init_scale = init_scale;
             o.router.seed = seed;
             o.activation = moe::parse_activation(activation);
             o.use_bias = use_bias;
             o.expert_dropout = expert_dropout;
             o.dtype = parse_dtype("SwitchFFN", dtype);
             o.aux_loss_coef = aux_loss_coef;
             o.z_loss_coef = z_loss_coef;
             return std::make_unique<PySwitchFFN>(d_model, d_ff, num_experts, o, communicator);
           }),
           py::arg("d_model"), py::arg("d_ff"), py::arg("num_experts"), py::arg("k"),
           py::arg("capacity_factor"), py::arg("eval_capacity_factor"), py::arg("min_capacity"),
           py::arg("group_size"), py::arg("priority"), py::arg("capacity_rounding"),
           py::arg("normalize_gates"), py::arg("activation"), py::arg("use_bias"),
           py::arg("expert_dropout"), py::arg("dtype"), py::arg("aux_loss_coef"),
           py::arg("z_loss_coef"), py::arg("jitter_eps"), py::arg("init_scale"), py::arg("seed"),
           py::arg("comm").none(true),
           // The layer holds the communicator (and through it its group) by pointer.
           py::keep_alive<1, 22>())
      .def("tensors",
           [](py::object self, bool grads) {
             moe::SwitchFFN& l = self.cast<PySwitchFFN&>().layer;
             const int64_t E = l.num_experts(), d = l.d_model();
             py::dict out;
             out["router"] =
                 live_view(self, grads ? l.router_weight_grad() : l.router_weight(), {d, E});
             add_expert_tensors(out, self, l.weights(), grads, {l.local_experts()}, d, l.d_ff());
             return out;
           })
      .def("forward",
           [](PySwitchFFN& w, py::handle x, bool training) {
             return layer_forward("SwitchFFN.forward", w, x, training);
           })
      .def("backward", [](PySwitchFFN& w,
                          py::handle dy) { return layer_backward("SwitchFFN.backward", w, dy); })
      .def_property_readonly("aux_loss",
                             [](PySwitchFFN& w) {
                               return locked_without_gil(w.mutex, [&] {
                                 return w.layer.has_forward() ? w.layer.aux_loss() : 0.0;
                               });
                             })
      .def_property_readonly("z_loss",
                             [](PySwitchFFN& w) {
                               return locked_without_gil(w.mutex, [&] {
                                 return w.layer.has_forward() ? w.layer.z_loss() : 0.0;
                               });
                             })
      .def_property_readonly("last_plan",
                             [](PySwitchFFN& w) -> py::object {
                               auto plan = locked_without_gil(w.mutex, [&] {
                                 std::optional<moe::RoutingPlan> copy;
                                 if (w.layer.has_forward()) copy = w.layer.plan();
                                 return copy;
                               });
                               if (!plan) return py::none();
                               return py::cast(std::move(*plan));
                             })
      .def_property_readonly("first_expert", [](PySwitchFFN& w) { return w.layer.first_expert(); })
      .def_property_readonly("local_experts",
                             [](PySwitchFFN& w) { return w.layer.local_experts(); })
      .def("stats", [](PySwitchFFN& w) {
        return locked_without_gil(w.mutex, [&] {
          PYSWITCH_CHECK_STATE(w.layer.has_forward(), "SwitchFFN.stats: no forward pass yet");
          return w.layer.stats();
        });
      });

  py::class_<PyDenseFFN>(m, "DenseFFN")
      .def(py::init([](int64_t d_model, int64_t d_ff, const std::string& activation, bool use_bias,
                       double dropout, const std::string& dtype, double init_scale, uint64_t seed) {
             moe::DenseFFNOptions o;
             o.activation = moe::parse_activation(activation);
             o.use_bias = use_bias;
             o.dropout = dropout;
             o.dtype = parse_dtype("DenseFFN", dtype);
             o.init_scale = init_scale;
             o.seed = seed;
             return std::make_unique<PyDenseFFN>(d_model, d_ff, o);
           }),
           py::arg("d_model"), py::arg("d_ff"), py::arg("activation"), py::arg("use_bias"),
           py::arg("dropout"), py::arg("dtype"), py::arg("init_scale"), py::arg("seed"))
      .def("tensors",
           [](py::object self, bool grads) {
             moe::DenseFFN& l = self.cast<PyDenseFFN&>().layer;
             py::dict out;
             add_expert_tensors(out, self, l.weights(), grads, {}, l.d_model(), l.d_ff());
             return out;
           })
      .def("forward",
           [](PyDenseFFN& w, py::handle x, bool training) {
             return layer_forward("DenseFFN.forward", w, x, training);
           })
      .def("backward",
           [](PyDenseFFN& w, py::handle dy) { return layer_backward("DenseFFN.backward", w, dy); });

  // ---- language model and optimizers -----------------------------------------------------------
  py::class_<PySwitchLM>(m, "SwitchLM")
      .def(py::init([](int64_t vocab_size, int64_t d_model, int64_t num_layers, int64_t num_heads,
                       int64_t d_ff, int64_t num_experts, int64_t k,
                       std::optional<double> capacity_factor,
                       std::optional<double> eval_capacity_factor, int64_t expert_every,
                       const std::string& dtype, double aux_loss_coef, double z_loss_coef,
                       double jitter_eps, double init_scale, double rope_base, double norm_eps,
                       uint64_t seed, comm::Communicator* communicator) {
             model::SwitchLMConfig c;
             c.vocab_size = vocab_size;
             c.d_model = d_model;
             c.num_layers = num_layers;
             c.num_heads = num_heads;
             c.d_ff = d_ff;
             c.num_experts = num_experts;
             c.k = k;
             c.capacity_factor = capacity_factor;
             c.eval_capacity_factor = eval_capacity_factor;
             c.expert_every = expert_every;
             c.dtype = parse_dtype("SwitchLM", dtype);
             c.aux_loss_coef = aux_loss_coef;
             c.z_loss_coef = z_loss_coef;
             c.jitter_eps = jitter_eps;
             c.init_scale = init_scale;
             c.rope_base = rope_base;
             c.norm_eps = norm_eps;
             c.seed = seed;
             return std::make_unique<PySwitchLM>(c, communicator);
           }),
           py::arg("vocab_size"), py::arg("d_model"), py::arg("num_layers"), py::arg("num_heads"),
           py::arg("d_ff"), py::arg("num_experts"), py::arg("k"), py::arg("capacity_factor"),
           py::arg("eval_capacity_factor"), py::arg("expert_every"), py::arg("dtype"),
           py::arg("aux_loss_coef"), py::arg("z_loss_coef"), py::arg("jitter_eps"),
           py::arg("init_scale"), py::arg("rope_base"), py::arg("norm_eps"), py::arg("seed"),
           py::arg("comm").none(true), py::keep_alive<1, 20>())
      .def("parameters",
           [](py::object self) {
             model::SwitchLM& lm = self.cast<PySwitchLM&>().layer;
             py::list out;
             for (const model::ParamRef& p : lm.parameters()) {
               out.append(py::make_tuple(p.name, live_view(self, p.data, p.shape),
                                         live_view(self, p.grad, p.shape), p.expert, p.decay));
             }
             return out;
           })
      .def(
          "step",
          [](PySwitchLM& w, py::handle tokens_obj, bool training, bool backward,
             int64_t loss_tokens) {
            py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens =
                as_contiguous("SwitchLM.step", "tokens", tokens_obj);
            if (tokens.ndim() != 2 || tokens.shape(1) < 2) {
              throw InvalidArgument(detail::concat(
                  "SwitchLM.step: tokens must have shape (batch, seq_len + 1) with seq_len >= 1, "
                  "got ",
                  shape_of(tokens)));
            }
            const int64_t B = tokens.shape(0), S = tokens.shape(1) - 1;
            const int32_t* ids = tokens.data();
            const model::LossParts loss = locked_without_gil(
                w.mutex, [&] { return w.layer.step(ids, B, S, training, backward, loss_tokens); });
            py::dict out;
            out["ce"] = loss.ce;
            out["aux"] = loss.aux;
            out["z"] = loss.z;
            out["total"] = loss.total;
            out["tokens"] = loss.tokens;
            return out;
          },
          py::arg("tokens"), py::arg("training"), py::arg("backward"), py::arg("loss_tokens"))
      .def("logits",
           [](PySwitchLM& w, py::handle tokens_obj) {
             py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens =
                 as_contiguous("SwitchLM.logits", "tokens", tokens_obj);
             require_ndim("SwitchLM.logits", "tokens", tokens, 2, "(batch, seq_len)");
             const int64_t B = tokens.shape(0), S = tokens.shape(1);
             const int64_t V = w.layer.config().vocab_size;
             py::array_t<float> out({B, S, V});
             float* dst = out.mutable_data();
             const int32_t* ids = tokens.data();
             locked_without_gil(w.mutex, [&] { w.layer.logits(ids, B, S, dst); });
             return out;
           })
      .def("switch_stats",
           [](PySwitchLM& w) {
             return locked_without_gil(w.mutex, [&] { return w.layer.switch_stats(); });
           })
      .def_property_readonly("num_parameters",
                             [](PySwitchLM& w) { return w.layer.num_parameters(); })
      .def("is_switch_layer", [](PySwitchLM& w, int64_t l) { return w.layer.is_switch_layer(l); })
      .def_property(
          "training_steps",
          [](PySwitchLM& w) {
            return locked_without_gil(w.mutex, [&] { return w.layer.training_steps(); });
          },
          [](PySwitchLM& w, uint64_t steps) {
            locked_without_gil(w.mutex, [&] { w.layer.set_training_steps(steps); });
          });

  m.def(
      "adamw_step",
      [](py::handle param, py::handle grad, py::handle m1, py::handle m2, int64_t step, double lr,
         double beta1, double beta2, double eps, double weight_decay, bool decay) {
        const char* where = "adamw_step";
        py::array p = inplace_f32(where, "param", param), a = inplace_f32(where, "m", m1),
                  b = inplace_f32(where, "v", m2);
        py::array g = float32_array(where, "grad", grad);
        if (g.size() != p.size() || a.size() != p.size() || b.size() != p.size()) {
          throw InvalidArgument(detail::concat(where, ": param, grad, m and v must have the same ",
                                               "size, got ", p.size(), ", ", g.size(), ", ",
                                               a.size(), ", ", b.size()));
        }
        optim::AdamWOptions o{beta1, beta2, eps, weight_decay};
        float* pd = static_cast<float*>(p.mutable_data());
        const float* gd = static_cast<const float*>(g.data());
        float* ad = static_cast<float*>(a.mutable_data());
        float* bd = static_cast<float*>(b.mutable_data());
        const int64_t n = p.size();
        py::gil_scoped_release release;
        optim::adamw_step(pd, gd, ad, bd, n, step, lr, o, decay);
      },
      py::arg("param"), py::arg("grad"), py::arg("m"), py::arg("v"), py::arg("step"), py::arg("lr"),
      py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("decay"));
  m.def(
      "adafactor_step",
      [](py::handle param, py::handle grad, py::handle row, py::handle col, py::handle full,
         int64_t batches, int64_t rows, int64_t cols, int64_t step, double lr, double decay_rate,
         double eps, double clip_threshold, double weight_decay) {
        const char* where = "adafactor_step";
        optim::AdafactorShape shape{batches, rows, cols};
        py::array p = inplace_f32(where, "param", param);
        py::array g = float32_array(where, "grad", grad);
        py::array r = inplace_f32(where, "row_state", row),
                  c = inplace_f32(where, "col_state", col),
                  f = inplace_f32(where, "full_state", full);
        if (p.size() != batches * rows * cols || g.size() != p.size() ||
            r.size() != shape.row_state() || c.size() != shape.col_state() ||
            f.size() != shape.full_state()) {
          throw InvalidArgument(detail::concat(where, ": sizes do not match the shape (", batches,
                                               ", ", rows, ", ", cols, ")"));
        }
        optim::AdafactorOptions o{decay_rate, eps, clip_threshold, weight_decay};
        float* pd = static_cast<float*>(p.mutable_data());
        const float* gd = static_cast<const float*>(g.data());
        float* rd = static_cast<float*>(r.mutable_data());
        float* cd = static_cast<float*>(c.mutable_data());
        float* fd = static_cast<float*>(f.mutable_data());
        py::gil_scoped_release release;
        optim::adafactor_step(pd, gd, rd, cd, fd, shape, step, lr, o);
      },
      py::arg("param"), py::arg("grad"), py::arg("row_state"), py::arg("col_state"),
      py::arg("full_state"), py::arg("batches"), py::arg("rows"), py::arg("cols"), py::arg("step"),
      py::arg("lr"), py::arg("decay_rate"), py::arg("eps"), py::arg("clip_threshold"),
      py::arg("weight_decay"));
  m.def("clip_by_global_norm", [](py::list arrays, double max_norm) {
    std::vector<std::pair<float*, int64_t>> tensors;
    std::vector<py::array> keep;
    for (py::handle h : arrays) {
      keep.push_back(inplace_f32("clip_by_global_norm", "grads", h));
      tensors.emplace_back(static_cast<float*>(keep.back().mutable_data()), keep.back().size());
    }
    py::gil_scoped_release release;
    return optim::clip_by_global_norm(tensors, max_norm);
  });
  m.def("learning_rate", &optim::learning_rate, py::arg("step"), py::arg("peak"),
        py::arg("warmup_steps"), py::arg("total_steps"), py::arg("decay"),
        py::arg("final_fraction") = 0.1);

  // ---- collectives ---------------------------------------------------------------------------
  py::class_<comm::Communicator>(m, "Communicator")
      .def_property_readonly("rank", &comm::Communicator::rank)
      .def_property_readonly("size", &comm::Communicator::size)
      .def_property_readonly("timeout", &comm::Communicator::timeout)
      .def("poison", &comm::Communicator::poison, py::arg("reason"))
      .def("set_next_call_check", &comm::Communicator::set_next_call_check, py::arg("value"))
      .def("all_to_all",
           [](comm::Communicator& c, py::array send, py::array recv, int64_t count) {
             const auto dt = comm_dtype_of("all_to_all", "x", send);
             require_buffer("all_to_all", "x", send, dt, count * c.size(), false);
             require_buffer("all_to_all", "out", recv, dt, count * c.size(), true);
             py::gil_scoped_release release;
             c.all_to_all(send.data(), recv.mutable_data(), count, dt);
           })
      .def("all_to_all_v",
           [](comm::Communicator& c, py::array send, std::vector<int64_t> send_counts,
              std::vector<int64_t> send_displs, py::array recv, std::vector<int64_t> recv_counts,
              std::vector<int64_t> recv_displs) {
             const auto dt = comm_dtype_of("all_to_all_v", "x", send);
             const size_t W = static_cast<size_t>(c.size());
             if (send_counts.size() != W || send_displs.size() != W || recv_counts.size() != W ||
                 recv_displs.size() != W) {
               throw InvalidArgument(detail::concat(
                   "all_to_all_v: counts and displacements must have ", W, " entries"));
             }
             require_buffer("all_to_all_v", "x", send, dt, 0, false);
             require_buffer("all_to_all_v", "out", recv, dt, 0, true);
             // Every block must lie inside its array (checked without overflow).
             auto check_blocks = [&](const char* name, const std::vector<int64_t>& counts,
                                     const std::vector<int64_t>& displs, int64_t size) {
               for (size_t q = 0; q < W; ++q) {
                 if (counts[q] < 0 || displs[q] < 0 || displs[q] > size ||
                     counts[q] > size - displs[q]) {
                   throw InvalidArgument(detail::concat(
                       "all_to_all_v: block ", q, " of ", name, " (count ", counts[q],
                       ", displacement ", displs[q], ") does not fit its ", size, " elements"));
                 }
               }
             };
             check_blocks("x", send_counts, send_displs, send.size());
             check_blocks("out", recv_counts, recv_displs, recv.size());
             py::gil_scoped_release release;
             c.all_to_all_v(send.data(), send_counts.data(), send_displs.data(),
                            recv.mutable_data(), recv_counts.data(), recv_displs.data(), dt);
           })
      .def(
          "all_to_all_v_rows",
          // The whole row exchange of pyswitch.comm.Communicator.all_to_all_v in one call (the
          // Python wrapper validates x and the counts): the row counts travel first, carrying
          // `check` (dtype and trailing shape), then the output is allocated and the rows move.
          [](comm::Communicator& c, py::array x, py::array_t<int64_t, py::array::c_style> rows,
             int64_t per_row, int64_t check, py::object out_obj) {
            const auto dt = comm_dtype_of("all_to_all_v", "x", x);
            const int W = c.size();
            if (rows.ndim() != 1 || rows.shape(0) != W) {
              throw InvalidArgument(
                  detail::concat("all_to_all_v: send_counts must have ", W, " entries"));
            }
            // After a failed call MPI may still write into its buffers (see comm/mpi.hpp):
            // buffers of a failed exchange are left allocated on purpose.
            auto send_rows_owner =
                std::make_unique<std::vector<int64_t>>(rows.data(), rows.data() + W);
            auto recv_rows_owner = std::make_unique<std::vector<int64_t>>(W);
            std::vector<int64_t>& send_rows = *send_rows_owner;
            std::vector<int64_t>& recv_rows = *recv_rows_owner;
            {
              py::gil_scoped_release release;
              c.set_next_call_check(check);
              // Reported under the name of the call the user made.
              try {
                c.all_to_all(send_rows.data(), recv_rows.data(), 1, comm::CommDType::int64);
              } catch (const CommTimeout& e) {
                send_rows_owner.release();
                recv_rows_owner.release();
                throw CommTimeout(std::string("all_to_all_v: ") + e.what());
              } catch (const CommError& e) {
                send_rows_owner.release();
                recv_rows_owner.release();
                throw CommError(std::string("all_to_all_v: ") + e.what());
              }
            }
            std::vector<int64_t> send_counts(W), send_displs(W), recv_counts(W), recv_displs(W);
            const int64_t sent = comm::packed_row_blocks(send_rows.data(), W, per_row,
                                                         send_counts.data(), send_displs.data());
            comm::packed_row_blocks(recv_rows.data(), W, per_row, recv_counts.data(),
                                    recv_displs.data());
            PYSWITCH_CHECK_ARG(sent <= x.size(), "all_to_all_v: send_counts add up to ", sent,
                               " elements but x holds ", x.size());
            std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
            shape[0] = std::accumulate(recv_rows.begin(), recv_rows.end(), int64_t{0});
            // A caller's buffer is used when it fits (checked by the Python wrapper: dtype,
            // trailing shape, contiguity); it cannot be refused collectively here, so a buffer
            // that is too small just means a new array.
            std::optional<py::array> out;
            if (!out_obj.is_none()) {
              py::array given = py::reinterpret_borrow<py::array>(out_obj);
              if (given.ndim() >= 1 && given.shape(0) >= shape[0]) {
                py::slice first_rows(0, static_cast<py::ssize_t>(shape[0]), 1);
                out = py::reinterpret_borrow<py::array>(
                    given[py::make_tuple(first_rows, py::ellipsis())]);
              }
            }
            if (!out) out = py::array(x.dtype(), shape);
            const void* send = x.data();
            void* recv = out->mutable_data();
            try {
              py::gil_scoped_release release;
              c.all_to_all_v(send, send_counts.data(), send_displs.data(), recv, recv_counts.data(),
                             recv_displs.data(), dt);
            } catch (const CommError&) {
              out->inc_ref();  // the output and the input stay allocated (see above)
              x.inc_ref();
              throw;
            }
            py::array_t<int64_t> recv_rows_array(W);
            std::copy(recv_rows.begin(), recv_rows.end(), recv_rows_array.mutable_data());
            return py::make_tuple(*out, recv_rows_array);
          },
          py::arg("x"), py::arg("send_rows"), py::arg("per_row"), py::arg("check"),
          py::arg("out") = py::none())
      .def("all_reduce",
           [](comm::Communicator& c, py::array send, py::array recv, int64_t count,
              const std::string& op) {
             const auto dt = comm_dtype_of("all_reduce", "x", send);
             const auto rop = parse_reduce_op("all_reduce", op);
             require_buffer("all_reduce", "x", send, dt, count, false);
             require_buffer("all_reduce", "out", recv, dt, count, true);
             py::gil_scoped_release release;
             c.all_reduce(send.data(), recv.mutable_data(), count, dt, rop);
           })
      .def("all_gather",
           [](comm::Communicator& c, py::array send, py::array recv, int64_t count) {
             const auto dt = comm_dtype_of("all_gather", "x", send);
             require_buffer("all_gather", "x", send, dt, count, false);
             require_buffer("all_gather", "out", recv, dt, count * c.size(), true);
             py::gil_scoped_release release;
             c.all_gather(send.data(), recv.mutable_data(), count, dt);
           })
      .def("reduce_scatter",
           [](comm::Communicator& c, py::array send, py::array recv, int64_t count,
              const std::string& op) {
             const auto dt = comm_dtype_of("reduce_scatter", "x", send);
             const auto rop = parse_reduce_op("reduce_scatter", op);
             require_buffer("reduce_scatter", "x", send, dt, count * c.size(), false);
             require_buffer("reduce_scatter", "out", recv, dt, count, true);
             py::gil_scoped_release release;
             c.reduce_scatter(send.data(), recv.mutable_data(), count, dt, rop);
           })
      .def("broadcast",
           [](comm::Communicator& c, py::array buffer, int64_t count, int root) {
             const auto dt = comm_dtype_of("broadcast", "x", buffer);
             require_buffer("broadcast", "x", buffer, dt, count, true);
             py::gil_scoped_release release;
             c.broadcast(buffer.mutable_data(), count, dt, root);
           })
      .def("barrier", [](comm::Communicator& c) {
        py::gil_scoped_release release;
        c.barrier();
      });

  py::class_<comm::LocalGroup>(m, "LocalGroup")
      .def(py::init<int, double>(), py::arg("world_size"), py::arg("timeout"))
      .def_property_readonly("size", &comm::LocalGroup::size)
      .def("comm", &comm::LocalGroup::comm, py::return_value_policy::reference_internal)
      .def("poison", &comm::LocalGroup::poison)
      .def_property_readonly("poisoned", &comm::LocalGroup::poisoned);
}
