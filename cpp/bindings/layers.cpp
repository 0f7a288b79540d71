// pyswitch._core bindings: matmul, and the SwitchFFN and DenseFFN layers (forward, backward,
// live parameter and gradient views, statistics).
#include "common.hpp"

namespace pyswitch::bindings {

void bind_layers(py::module_& m) {
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
      .def(py::init([](int64_t d_model, int64_t d_ff, int64_t num_experts,
                       const moe::SwitchFFNOptions& options, comm::Communicator* communicator) {
             return std::make_unique<PySwitchFFN>(d_model, d_ff, num_experts, options,
                                                  communicator);
           }),
           py::arg("d_model"), py::arg("d_ff"), py::arg("num_experts"), py::arg("options"),
           py::arg("comm").none(true),
           // The layer holds the communicator (and through it its group) by pointer.
           py::keep_alive<1, 6>())
      .def("tensors",
           [](py::object self, bool grads) {
             moe::SwitchFFN& l = self.cast<PySwitchFFN&>().layer;
             const int64_t E = l.num_experts(), d = l.d_model();
             py::dict out;
             out["router"] = live_view(self, grads ? l.router_weight_grad() : l.router_weight(),
                                       {d, E}, l.device());
             add_expert_tensors(out, self, l.weights(), grads, {l.local_experts()}, d, l.d_ff());
             return out;
           })
      .def("forward",
           [](PySwitchFFN& w, py::handle x, bool training) {
             return layer_forward("SwitchFFN.forward", w, x, training);
           })
      .def("backward", [](PySwitchFFN& w,
                          py::handle dy) { return layer_backward("SwitchFFN.backward", w, dy); })
      .def(
          "forward_into",
          [](PySwitchFFN& w, py::handle x, py::handle y, bool training) {
            layer_step_on_device("SwitchFFN.forward_into", w, x, y, false, training);
          },
          py::arg("x"), py::arg("y"), py::arg("training") = false)
      .def(
          "backward_into",
          [](PySwitchFFN& w, py::handle dy, py::handle dx) {
            layer_step_on_device("SwitchFFN.backward_into", w, dy, dx, true, false);
          },
          py::arg("dy"), py::arg("dx"))
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
      // Re-roundings of the bf16 compute copy so far (tests and benchmarks).
      .def_property_readonly("_copy_refreshes",
                             [](PySwitchFFN& w) {
                               return locked_without_gil(
                                   w.mutex, [&] { return w.layer.weights().copy_refreshes(); });
                             })
      .def_property_readonly("local_experts",
                             [](PySwitchFFN& w) { return w.layer.local_experts(); })
      .def("stats", [](PySwitchFFN& w) {
        return locked_without_gil(w.mutex, [&] {
          PYSWITCH_CHECK_STATE(w.layer.has_forward(), "SwitchFFN.stats: no forward pass yet");
          return w.layer.stats();
        });
      });

  py::class_<PyDenseFFN>(m, "DenseFFN")
      .def(py::init<int64_t, int64_t, const moe::DenseFFNOptions&>(), py::arg("d_model"),
           py::arg("d_ff"), py::arg("options"))
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
           [](PyDenseFFN& w, py::handle dy) { return layer_backward("DenseFFN.backward", w, dy); })
      .def(
          "forward_into",
          [](PyDenseFFN& w, py::handle x, py::handle y, bool training) {
            layer_step_on_device("DenseFFN.forward_into", w, x, y, false, training);
          },
          py::arg("x"), py::arg("y"), py::arg("training") = false)
      .def(
          "backward_into",
          [](PyDenseFFN& w, py::handle dy, py::handle dx) {
            layer_step_on_device("DenseFFN.backward_into", w, dy, dx, true, false);
          },
          py::arg("dy"), py::arg("dx"))
      .def_property_readonly("_copy_refreshes", [](PyDenseFFN& w) {
        return locked_without_gil(w.mutex, [&] { return w.layer.weights().copy_refreshes(); });
      });
}

}  // namespace pyswitch::bindings
