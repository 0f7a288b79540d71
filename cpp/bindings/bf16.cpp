// pyswitch._core bindings: bfloat16 conversion (to_bfloat16 / to_float32, optionally into out=).
#include "common.hpp"

namespace pyswitch::bindings {

void bind_bf16(py::module_& m) {
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
}

}  // namespace pyswitch::bindings
