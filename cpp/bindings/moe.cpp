// pyswitch._core bindings: routing plans, route() and expert-choice routing, the Router layer,
// and dispatch/combine with their backward passes.
#include "common.hpp"

namespace pyswitch::bindings {

void bind_moe(py::module_& m) {
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
      [](py::handle logits_obj, const moe::RouteOptions& options, const std::string& device_name) {
        const Device device = parse_device("route", device_name);
        if (device != Device::cpu && py::hasattr(logits_obj, "__dlpack__") &&
            !py::isinstance<py::array>(logits_obj)) {
          // The device-array path: logits already on the GPU are routed in place.
          const BorrowedDeviceArray logits = borrow_cuda_array("route", "logits", logits_obj);
          if (logits.dtype != DType::float32 || logits.shape.size() != 2) {
            throw TypeMismatch("route: device logits must be 2-D float32 (tokens, experts)");
          }
          const TensorView view = TensorView::contiguous(
              logits.data, DType::float32, {logits.shape[0], logits.shape[1]}, device);
          py::gil_scoped_release release;
          moe::RoutingPlan plan;
          backend(device).route(view, options, plan);
          return plan;
        }
        py::array logits = float32_array("route", "logits", logits_obj);
        require_ndim("route", "logits", logits, 2, "(tokens, experts)");
        const float* data = static_cast<const float*>(logits.data());
        const int64_t T = logits.shape(0), E = logits.shape(1);
        py::gil_scoped_release release;
        if (device == Device::cpu) return moe::route(data, T, E, options);
        // On a device the logits are copied over and the plan (a host structure) comes back.
        const BackendOps& ops = backend(device);
        TableBuffer on_device(ops, DType::float32, T * E);
        on_device.upload(data);
        moe::RoutingPlan plan;
        ops.route(on_device.view({T, E}), options, plan);
        return plan;
      },
      py::arg("logits"), py::arg("options"), py::arg("device") = "cpu");

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
      .def(py::init<int64_t, int64_t, const moe::RouterOptions&>(), py::arg("d_model"),
           py::arg("num_experts"), py::arg("options"))
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
                                 const TableBuffer& buffer = r.router.last_logits();
                                 std::vector<float> host(static_cast<size_t>(buffer.size()));
                                 buffer.download(host.data());
                                 return host;
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
}

}  // namespace pyswitch::bindings
