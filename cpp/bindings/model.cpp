// pyswitch._core bindings: the SwitchLM language model, the optimizers (AdamW, Adafactor),
// global-norm clipping and the learning-rate schedule.
#include "common.hpp"

namespace pyswitch::bindings {

void bind_model(py::module_& m) {
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
}

}  // namespace pyswitch::bindings
