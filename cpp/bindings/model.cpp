// pyswitch._core bindings: the SwitchLM language model, the optimizers (AdamW, Adafactor),
// global-norm clipping and the learning-rate schedule.
#include "common.hpp"

namespace pyswitch::bindings {

void bind_model(py::module_& m) {
  // ---- language model and optimizers -----------------------------------------------------------
  py::class_<PySwitchLM>(m, "SwitchLM")
      .def(py::init([](const model::SwitchLMConfig& config, comm::Communicator* communicator) {
             return std::make_unique<PySwitchLM>(config, communicator);
           }),
           py::arg("config"), py::arg("comm").none(true),
           // The model holds the communicator by pointer.
           py::keep_alive<1, 3>())
      .def("parameters",
           [](py::object self) {
             model::SwitchLM& lm = self.cast<PySwitchLM&>().layer;
             py::list out;
             for (const model::ParamRef& p : lm.parameters()) {
               out.append(py::make_tuple(p.name, master_view(self, p.weights, p.data, p.shape),
                                         live_view(self, p.grad, p.shape), p.expert, p.decay));
             }
             return out;
           })
      .def(
          "step",
          [](PySwitchLM& w, py::handle tokens_obj, bool training, bool backward,
             int64_t loss_tokens) {
            const TokenBatch batch = token_batch("SwitchLM.step", tokens_obj);
            const int32_t* ids = batch.tokens.data();
            const int64_t B = batch.rows, S = batch.S;
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
      .def_property_readonly("_copy_refreshes",
                             [](PySwitchLM& w) {
                               return locked_without_gil(w.mutex,
                                                         [&] { return w.layer.copy_refreshes(); });
                             })
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
         const optim::AdamWOptions& o, bool decay) {
        const char* where = "adamw_step";
        py::array p = inplace_f32(where, "param", param), a = inplace_f32(where, "m", m1),
                  b = inplace_f32(where, "v", m2);
        py::array g = float32_array(where, "grad", grad);
        if (g.size() != p.size() || a.size() != p.size() || b.size() != p.size()) {
          throw InvalidArgument(detail::concat(where, ": param, grad, m and v must have the same ",
                                               "size, got ", p.size(), ", ", g.size(), ", ",
                                               a.size(), ", ", b.size()));
        }
        float* pd = static_cast<float*>(p.mutable_data());
        const float* gd = static_cast<const float*>(g.data());
        float* ad = static_cast<float*>(a.mutable_data());
        float* bd = static_cast<float*>(b.mutable_data());
        const int64_t n = p.size();
        py::gil_scoped_release release;
        optim::adamw_step(pd, gd, ad, bd, n, step, lr, o, decay);
      },
      py::arg("param"), py::arg("grad"), py::arg("m"), py::arg("v"), py::kw_only(), py::arg("step"),
      py::arg("lr"), py::arg("options"), py::arg("decay"));
  m.def(
      "adafactor_step",
      [](py::handle param, py::handle grad, py::handle row, py::handle col, py::handle full,
         int64_t batches, int64_t rows, int64_t cols, int64_t step, double lr,
         const optim::AdafactorOptions& o) {
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
        float* pd = static_cast<float*>(p.mutable_data());
        const float* gd = static_cast<const float*>(g.data());
        float* rd = static_cast<float*>(r.mutable_data());
        float* cd = static_cast<float*>(c.mutable_data());
        float* fd = static_cast<float*>(f.mutable_data());
        py::gil_scoped_release release;
        optim::adafactor_step(pd, gd, rd, cd, fd, shape, step, lr, o);
      },
      py::arg("param"), py::arg("grad"), py::arg("row_state"), py::arg("col_state"),
      py::arg("full_state"), py::kw_only(), py::arg("batches"), py::arg("rows"), py::arg("cols"),
      py::arg("step"), py::arg("lr"), py::arg("options"));
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
        py::arg("warmup_steps"), py::arg("total_steps"), py::arg("decay"), py::kw_only(),
        py::arg("final_fraction") = 0.1);
}

}  // namespace pyswitch::bindings
