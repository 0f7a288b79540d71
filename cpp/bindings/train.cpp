// pyswitch._core bindings: the Trainer (one training step in one call; its options are bound in
// options.cpp).
#include "common.hpp"
#include "pyswitch/model/trainer.hpp"

namespace pyswitch::bindings {
namespace {

// The trainer and the model it steps: a step locks the model's mutex, so Python threads cannot
// run the model and its trainer at once.
struct PyTrainer {
  PyTrainer(PySwitchLM& lm, const model::TrainerOptions& options)
      : model(lm), trainer(lm.layer, options) {}
  PySwitchLM& model;
  model::Trainer trainer;
};

py::dict step_stats_dict(const model::StepStats& s) {
  py::dict out;
  out["ce"] = s.ce;
  out["aux"] = s.aux;
  out["z"] = s.z;
  out["grad_norm"] = s.grad_norm;
  out["lr"] = s.lr;
  out["updated"] = s.updated;
  py::list stats;
  for (const moe::SwitchStats& layer : s.switch_stats) {
    py::dict d;
    d["tokens_per_expert"] = py::array_t<int64_t>(
        static_cast<py::ssize_t>(layer.tokens_per_expert.size()), layer.tokens_per_expert.data());
    d["drop_fraction"] = layer.drop_fraction;
    d["router_entropy"] = layer.router_entropy;
    stats.append(d);
  }
  out["stats"] = stats;
  return out;
}

}  // namespace

void bind_train(py::module_& m) {
  py::class_<PyTrainer>(m, "Trainer")
      .def(py::init([](PySwitchLM& lm, const model::TrainerOptions& options) {
             return std::make_unique<PyTrainer>(lm, options);
           }),
           py::arg("model"), py::arg("options"), py::keep_alive<1, 2>())
      .def(
          "step",
          [](PyTrainer& t, py::handle tokens_obj, int64_t step, int64_t total_steps,
             int64_t loss_tokens) {
            const TokenBatch batch = token_batch("Trainer.step", tokens_obj);
            const int32_t* ids = batch.tokens.data();
            const int64_t rows = batch.rows, S = batch.S;
            const model::StepStats stats = locked_without_gil(t.model.mutex, [&] {
              return t.trainer.step(ids, rows, S, step, total_steps, loss_tokens);
            });
            return step_stats_dict(stats);
          },
          py::arg("tokens"), py::arg("step"), py::arg("total_steps"), py::arg("loss_tokens"))
      .def("state",
           [](py::object self) {
             PyTrainer& t = self.cast<PyTrainer&>();
             py::list out;
             for (const model::StateRef& s : t.trainer.state()) {
               // An unused Adafactor accumulator has no storage: an empty array, not None.
               py::object view = s.data ? live_view(self, s.data, s.shape)
                                        : py::object(py::array_t<float>(s.shape));
               out.append(py::make_tuple(s.name, view, s.expert));
             }
             return out;
           })
      .def_property(
          "optimizer_steps",
          [](PyTrainer& t) {
            return locked_without_gil(t.model.mutex, [&] { return t.trainer.optimizer_steps(); });
          },
          [](PyTrainer& t, int64_t steps) {
            locked_without_gil(t.model.mutex, [&] { t.trainer.set_optimizer_steps(steps); });
          });
}

}  // namespace pyswitch::bindings
