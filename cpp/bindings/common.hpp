// Internal to the bindings: shared helpers for turning NumPy arrays into checked pointers and
// back, the GIL/mutex rule (locked_without_gil) and the wrappers that own core objects. Every
// bindings/*.cpp includes it; nothing outside cpp/bindings/ does.
#pragma once

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

#include "dlpack.hpp"
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
#include "pyswitch/table_buffer.hpp"
#include "pyswitch/threading.hpp"

namespace py = pybind11;

namespace pyswitch::bindings {

using namespace pyswitch;

// ml_dtypes.bfloat16, looked up once at import.
inline py::dtype& bfloat16_dtype() {
  static py::dtype dtype = py::dtype::from_args(py::module_::import("ml_dtypes").attr("bfloat16"));
  return dtype;
}

inline std::string shape_of(const py::array& a) {
  std::ostringstream out;
  out << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) out << (i ? ", " : "") << a.shape(i);
  out << (a.ndim() == 1 ? ",)" : ")");
  return out.str();
}

inline std::string dtype_of(const py::array& a) {
  return py::str(a.dtype()).cast<std::string>();
}

// Any object -> C-contiguous array, dtype untouched (the dtype check follows). Non-contiguous
// and negative-stride views are copied here, so the core only ever sees dense row-major data.
inline py::array as_contiguous(const char* where, const char* name, const py::handle& obj) {
  if (!py::isinstance<py::array>(obj)) {
    throw TypeMismatch(detail::concat(where, ": ", name, " must be a numpy array, got ",
                                      py::str(py::type::of(obj)).cast<std::string>()));
  }
  return py::array::ensure(obj, py::array::c_style);
}

inline bool is_float32(const py::array& a) {
  return a.dtype().is(py::dtype::of<float>()) || a.dtype().equal(py::dtype::of<float>());
}
inline bool is_bfloat16(const py::array& a) {
  return a.dtype().equal(bfloat16_dtype());
}

inline py::array float32_array(const char* where, const char* name, const py::handle& obj) {
  py::array a = as_contiguous(where, name, obj);
  if (!is_float32(a)) {
    throw TypeMismatch(detail::concat(where, ": ", name, " must be float32, got ", dtype_of(a),
                                      " (convert with .astype(np.float32))"));
  }
  return a;
}

inline void require_ndim(const char* where, const char* name, const py::array& a, int ndim,
                         const char* dims) {
  if (a.ndim() != ndim) {
    throw InvalidArgument(detail::concat(where, ": ", name, " must be ", ndim, "-D ", dims,
                                         ", got shape ", shape_of(a)));
  }
}

template <typename T>
inline py::array view_of(std::vector<int64_t> shape, const T* data, py::handle owner,
                         bool writeable) {
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
inline auto locked_without_gil(std::mutex& mutex, Fn&& fn) {
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

// float32 or bfloat16, as DType; TypeError otherwise.
inline DType activation_dtype(const char* where, const char* name, const py::array& a) {
  if (is_float32(a)) return DType::float32;
  if (is_bfloat16(a)) return DType::bfloat16;
  throw TypeMismatch(
      detail::concat(where, ": ", name, " must be float32 or bfloat16, got ", dtype_of(a)));
}

// Written out for all four, so that an integer DType cannot turn into a bfloat16 array.
inline py::dtype numpy_dtype(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return py::dtype::of<float>();
    case DType::bfloat16:
      return bfloat16_dtype();
    case DType::int32:
      return py::dtype::of<int32_t>();
    case DType::int64:
      return py::dtype::of<int64_t>();
  }
  throw InvalidArgument(detail::concat("numpy_dtype: unknown DType ", static_cast<int>(dtype)));
}

inline py::array new_activation(DType dtype, std::vector<py::ssize_t> shape) {
  return py::array(numpy_dtype(dtype), shape);
}

// An activation array that takes over `data` without a copy: for outputs whose dtype or size
// is only known under a lock, where no NumPy array can be made.
inline py::array adopt_activation(DType dtype, std::vector<py::ssize_t> shape,
                                  std::unique_ptr<char[]> data) {
  py::capsule owner(data.get(), [](void* p) { delete[] static_cast<char*>(p); });
  char* raw = data.release();  // the capsule frees it from here on
  return py::array(numpy_dtype(dtype), shape, {}, raw, owner);
}

// Shape of a dispatch buffer: (E, G*C, d) for the padded layout, (rows, d) for the packed one.
inline std::vector<py::ssize_t> buffer_shape(const moe::DispatchLayout& layout, int64_t d) {
  if (layout.packed)
    return {static_cast<py::ssize_t>(layout.total_rows), static_cast<py::ssize_t>(d)};
  const int64_t per_expert = layout.num_experts ? layout.total_rows / layout.num_experts : 0;
  return {static_cast<py::ssize_t>(layout.num_experts), static_cast<py::ssize_t>(per_expert),
          static_cast<py::ssize_t>(d)};
}

// A dispatch buffer argument: rows must match the layout; returns d_model.
inline int64_t check_buffer(const char* where, const char* name, const py::array& a,
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

inline void check_tokens(const char* where, const char* name, const py::array& a,
                         const moe::DispatchLayout& layout, int64_t d) {
  if (a.ndim() != 2 || a.shape(0) != layout.num_tokens || (d > 0 && a.shape(1) != d) ||
      a.shape(1) < 1) {
    throw InvalidArgument(detail::concat(where, ": ", name, " must have shape (", layout.num_tokens,
                                         ", ", d > 0 ? std::to_string(d) : "d_model", "), got ",
                                         shape_of(a)));
  }
}

inline void check_gate(const char* where, const py::array& gate,
                       const moe::DispatchLayout& layout) {
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
inline py::array inplace_f32(const char* where, const char* name, const py::handle& obj) {
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

// A training batch: tokens (batch, seq_len + 1) int32 (inputs [:, :S], targets [:, 1:]).
struct TokenBatch {
  py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens;
  int64_t rows = 0, S = 0;
};

inline TokenBatch token_batch(const char* where, py::handle obj) {
  TokenBatch batch{as_contiguous(where, "tokens", obj)};
  if (batch.tokens.ndim() != 2 || batch.tokens.shape(1) < 2) {
    throw InvalidArgument(detail::concat(
        where, ": tokens must have shape (batch, seq_len + 1) with seq_len >= 1, got ",
        shape_of(batch.tokens)));
  }
  batch.rows = batch.tokens.shape(0);
  batch.S = batch.tokens.shape(1) - 1;
  return batch;
}

inline DType parse_dtype(const std::string& where, const std::string& name) {
  if (name == "float32") return DType::float32;
  if (name == "bfloat16") return DType::bfloat16;
  throw InvalidArgument(where + ": dtype must be 'float32' or 'bfloat16', got '" + name + "'");
}

// forward(x) of a layer with a d_model: checks x, runs with the GIL released, returns y.
// Runs step(in, out) with `count` elements of host input and output. A layer on a device takes
// device pointers: its input is copied over and its output back here, at the edge.
template <typename Step>
void on_layer_device(Device device, DType dtype, int64_t count, const void* in, void* out,
                     Step&& step) {
  if (device == Device::cpu) {
    step(in, out);
    return;
  }
  const BackendOps& ops = backend(device);
  TableBuffer in_dev(ops, dtype, count), out_dev(ops, dtype, count);
  in_dev.upload(in);
  step(in_dev.data(), out_dev.data());
  out_dev.download(out);
}

template <typename Wrapper>
inline py::array layer_forward(const char* where, Wrapper& w, py::handle x_obj, bool training) {
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
  locked_without_gil(w.mutex, [&] {
    on_layer_device(
        w.layer.device(), dtype, T * w.layer.d_model(), in, out,
        [&](const void* x_dev, void* y_dev) { w.layer.forward(x_dev, dtype, T, training, y_dev); });
  });
  return y;
}

template <typename Wrapper>
inline py::array layer_backward(const char* where, Wrapper& w, py::handle dy_obj) {
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
    on_layer_device(w.layer.device(), dtype, rows * cols, in, out,
                    [&](const void* dy_dev, void* dx_dev) { w.layer.backward(dy_dev, dx_dev); });
  });
  return dx;
}

// The device-array path: forward/backward on CUDA arrays borrowed through DLPack (dlpack.hpp),
// with no copy. `out` is written in place.
template <typename Wrapper>
inline void layer_step_on_device(const char* where, Wrapper& w, py::handle in_obj,
                                 py::handle out_obj, bool backward, bool training) {
  PYSWITCH_CHECK_ARG(w.layer.device() != Device::cpu, where,
                     ": device arrays need a device='cuda' layer; this one runs on the cpu (use ",
                     backward ? "backward(dy)" : "forward(x)", " with NumPy arrays)");
  const char* in_name = backward ? "dy" : "x";
  const char* out_name = backward ? "dx" : "y";
  const BorrowedDeviceArray in = borrow_cuda_array(where, in_name, in_obj);
  const BorrowedDeviceArray out = borrow_cuda_array(where, out_name, out_obj);
  const int64_t d = w.layer.d_model();
  if (in.shape.size() != 2 || in.shape[1] != d || out.shape != in.shape) {
    throw InvalidArgument(detail::concat(where, ": ", in_name, " and ", out_name,
                                         " must both have shape (tokens, ", d, ")"));
  }
  if (out.dtype != in.dtype) {
    throw TypeMismatch(detail::concat(where, ": ", out_name, " must have the dtype of ", in_name,
                                      " (", dtype_name(in.dtype), "), got ",
                                      dtype_name(out.dtype)));
  }
  const int64_t T = in.shape[0];
  locked_without_gil(w.mutex, [&] {
    if (!backward) {
      w.layer.forward(in.data, in.dtype, T, training, out.data);
      return;
    }
    PYSWITCH_CHECK_STATE(w.layer.has_forward(), where,
                         ": no forward pass to differentiate; call forward first");
    if (in.dtype != w.layer.forward_dtype() || T != w.layer.forward_tokens()) {
      throw InvalidArgument(detail::concat(where, ": dy must be (", w.layer.forward_tokens(), ", ",
                                           d, ") of ", dtype_name(w.layer.forward_dtype()),
                                           " like the forward's output"));
    }
    w.layer.backward(in.data, out.data);
  });
}

// A live float32 view of a layer's parameter or gradient (null pointer: None). A tensor in
// device memory cannot be viewed from NumPy: it comes back as a read-only host copy.
inline py::object live_view(py::handle owner, float* data, std::vector<int64_t> shape,
                            Device device = Device::cpu) {
  if (!data) return py::none();
  if (device == Device::cpu) return view_of(std::move(shape), data, owner, true);
  py::array_t<float> copy(shape);
  const int64_t n = static_cast<int64_t>(copy.size());
  if (n > 0) {
    backend(device).copy(TensorView::contiguous(data, DType::float32, {n}, device),
                         TensorView::contiguous(copy.mutable_data(), DType::float32, {n}));
  }
  copy.attr("flags").attr("writeable") = false;
  return std::move(copy);
}

// A live view of a float32 master that has a bf16 compute copy (`weights`, null: none). Its
// base is a token capsule that holds the owner and counts as one live view of `weights` until
// it is freed; NumPy gives every view derived from this one (slices of slices too) the token as
// base, so the count drops only when the last array that can write the master is gone. While
// it is above zero every forward re-rounds the copy; dropping it marks the copy stale.
inline py::object master_view(py::handle owner, moe::ExpertWeights* weights, float* data,
                              std::vector<int64_t> shape) {
  if (!data) return py::none();
  if (weights != nullptr && weights->device() != Device::cpu) {
    return live_view(owner, data, std::move(shape), weights->device());
  }
  if (weights == nullptr || !weights->has_compute_copy()) {
    return live_view(owner, data, std::move(shape));
  }
  struct Token {
    py::object owner;
    moe::ExpertWeights* weights;
  };
  auto token = std::make_unique<Token>(Token{py::reinterpret_borrow<py::object>(owner), weights});
  py::capsule base(token.get(), "pyswitch.master_view", [](void* p) {
    std::unique_ptr<Token> t(static_cast<Token*>(p));
    t->weights->remove_live_view();  // before the owner (and with it the weights) may go
  });
  token.release();
  weights->add_live_view();
  return view_of(std::move(shape), data, base, true);
}

// Adds w_in, w_out and, when present, w_gate, b_in, b_out (or their gradients) as live views.
// `lead` is the leading shape: {E} for a Switch layer, {} for a dense one.
inline void add_expert_tensors(py::dict& out, py::handle owner, moe::ExpertWeights& w, bool grads,
                               std::vector<int64_t> lead, int64_t d, int64_t f) {
  auto shape = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> full = lead;
    full.insert(full.end(), tail);
    return full;
  };
  const Device device = w.device();
  if (grads) {
    out["w_in"] = live_view(owner, w.w_in_grad(), shape({d, f}), device);
    out["w_out"] = live_view(owner, w.w_out_grad(), shape({f, d}), device);
    if (w.w_gate_grad()) out["w_gate"] = live_view(owner, w.w_gate_grad(), shape({d, f}), device);
  } else {
    out["w_in"] = master_view(owner, &w, w.w_in(), shape({d, f}));
    out["w_out"] = master_view(owner, &w, w.w_out(), shape({f, d}));
    if (w.w_gate()) out["w_gate"] = master_view(owner, &w, w.w_gate(), shape({d, f}));
  }
  if (w.b_in()) {
    out["b_in"] = live_view(owner, grads ? w.b_in_grad() : w.b_in(), shape({f}), device);
    out["b_out"] = live_view(owner, grads ? w.b_out_grad() : w.b_out(), shape({d}), device);
  }
}

// ---- collectives helpers ------------------------------------------------------------------
inline DType buffer_dtype_of(const char* where, const char* name, const py::array& a) {
  if (is_float32(a)) return DType::float32;
  if (is_bfloat16(a)) return DType::bfloat16;
  if (a.dtype().equal(py::dtype::of<int32_t>())) return DType::int32;
  if (a.dtype().equal(py::dtype::of<int64_t>())) return DType::int64;
  throw TypeMismatch(detail::concat(
      where, ": ", name, " must be float32, bfloat16, int32 or int64, got ", dtype_of(a)));
}

// A C-contiguous buffer argument of `dtype` holding at least `elements` elements.
inline void require_buffer(const char* where, const char* name, const py::array& a, DType dtype,
                           int64_t elements, bool writeable) {
  if (buffer_dtype_of(where, name, a) != dtype) {
    throw TypeMismatch(
        detail::concat(where, ": ", name, " must be ", dtype_name(dtype), ", got ", dtype_of(a)));
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

inline comm::ReduceOp parse_reduce_op(const char* where, const std::string& name) {
  if (name == "sum") return comm::ReduceOp::sum;
  if (name == "max") return comm::ReduceOp::max;
  if (name == "min") return comm::ReduceOp::min;
  if (name == "mean") return comm::ReduceOp::mean;
  throw InvalidArgument(
      detail::concat(where, ": op must be 'sum', 'max', 'min' or 'mean', got '", name, "'"));
}

// One binder per area, called in this order by PYBIND11_MODULE (module.cpp).
void bind_bf16(py::module_& m);
void bind_moe(py::module_& m);
void bind_layers(py::module_& m);
void bind_model(py::module_& m);
void bind_train(py::module_& m);
void bind_options(py::module_& m);
void bind_comm(py::module_& m);

}  // namespace pyswitch::bindings
