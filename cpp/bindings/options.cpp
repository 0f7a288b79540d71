// pyswitch._core bindings: the core's options structs, bound by field name (RouteOptions,
// RouterOptions, SwitchFFNOptions, DenseFFNOptions, SwitchLMConfig, AdamWOptions,
// AdafactorOptions, TrainerOptions). Enums and dtypes read and write as their names; the values
// are checked where the core uses them (the constructors), so each fact has one check.
#include "common.hpp"
#include "pyswitch/model/trainer.hpp"

namespace pyswitch::bindings {
namespace {

const char* priority_name(moe::Priority p) {
  return p == moe::Priority::position ? "position" : "batch_prioritized";
}
const char* rounding_name(moe::CapacityRounding r) {
  return r == moe::CapacityRounding::floor ? "floor" : "ceil";
}
const char* activation_name(moe::Activation a) {
  switch (a) {
    case moe::Activation::relu:
      return "relu";
    case moe::Activation::gelu:
      return "gelu";
    case moe::Activation::geglu:
      return "geglu";
  }
  return "?";
}

// A field of type DType, as "float32" / "bfloat16".
template <typename Options>
void def_dtype(py::class_<Options>& cls, const char* where, DType Options::*field) {
  cls.def_property(
      "dtype", [field](const Options& o) { return std::string(dtype_name(o.*field)); },
      [field, where](Options& o, const std::string& name) { o.*field = parse_dtype(where, name); });
}

// A field of type Device, as "cpu" / "cuda".
template <typename Options>
void def_device(py::class_<Options>& cls, const char* where, Device Options::*field) {
  cls.def_property(
      "device", [field](const Options& o) { return std::string(device_name(o.*field)); },
      [field, where](Options& o, const std::string& name) {
        o.*field = parse_device(where, name);
      });
}

// A field of type Activation, as its name.
template <typename Options>
void def_activation(py::class_<Options>& cls, moe::Activation Options::*field) {
  cls.def_property(
      "activation", [field](const Options& o) { return std::string(activation_name(o.*field)); },
      [field](Options& o, const std::string& name) { o.*field = moe::parse_activation(name); });
}

// Every field as a keyword of the constructor: Options(k=2, capacity_factor=None, ...).
template <typename Options>
void def_keyword_init(py::class_<Options>& cls) {
  cls.def(py::init([](const py::kwargs& fields) {
    auto options = std::make_unique<Options>();
    py::object self = py::cast(options.get(), py::return_value_policy::reference);
    for (const auto& [key, value] : fields) {
      const std::string name = py::str(key);
      if (!py::hasattr(self, name.c_str()) || name.rfind("_", 0) == 0) {
        throw InvalidArgument(
            detail::concat(py::str(py::type::of(self).attr("__name__")).cast<std::string>(),
                           ": unknown field '", name, "'"));
      }
      self.attr(name.c_str()) = value;
    }
    return options;
  }));
}

}  // namespace

void bind_options(py::module_& m) {
  py::class_<moe::RouteOptions> route(m, "RouteOptions");
  def_keyword_init(route);
  route.def_readwrite("k", &moe::RouteOptions::k)
      .def_readwrite("capacity_factor", &moe::RouteOptions::capacity_factor)
      .def_readwrite("min_capacity", &moe::RouteOptions::min_capacity)
      // None (one group) is stored as 0, as in the C++ struct.
      .def_property(
          "group_size",
          [](const moe::RouteOptions& o) -> std::optional<int64_t> {
            if (o.group_size == 0) return std::nullopt;
            return o.group_size;
          },
          [](moe::RouteOptions& o, std::optional<int64_t> size) {
            PYSWITCH_CHECK_ARG(!size || *size >= 1,
                               "RouteOptions: group_size must be positive (or None), got ",
                               size.value_or(0));
            o.group_size = size.value_or(0);
          })
      .def_property(
          "priority", [](const moe::RouteOptions& o) { return priority_name(o.priority); },
          [](moe::RouteOptions& o, const std::string& name) {
            o.priority = moe::parse_priority(name);
          })
      .def_property(
          "capacity_rounding",
          [](const moe::RouteOptions& o) { return rounding_name(o.capacity_rounding); },
          [](moe::RouteOptions& o, const std::string& name) {
            o.capacity_rounding = moe::parse_capacity_rounding(name);
          })
      .def_readwrite("normalize_gates", &moe::RouteOptions::normalize_gates);

  py::class_<moe::RouterOptions> router(m, "RouterOptions");
  def_keyword_init(router);
  router.def_readwrite("route", &moe::RouterOptions::route)
      .def_readwrite("eval_capacity_factor", &moe::RouterOptions::eval_capacity_factor)
      .def_readwrite("jitter_eps", &moe::RouterOptions::jitter_eps)
      .def_readwrite("init_scale", &moe::RouterOptions::init_scale)
      .def_readwrite("seed", &moe::RouterOptions::seed);

  py::class_<moe::SwitchFFNOptions> switch_ffn(m, "SwitchFFNOptions");
  def_keyword_init(switch_ffn);
  switch_ffn.def_readwrite("router", &moe::SwitchFFNOptions::router)
      .def_readwrite("use_bias", &moe::SwitchFFNOptions::use_bias)
      .def_readwrite("expert_dropout", &moe::SwitchFFNOptions::expert_dropout)
      .def_readwrite("aux_loss_coef", &moe::SwitchFFNOptions::aux_loss_coef)
      .def_readwrite("z_loss_coef", &moe::SwitchFFNOptions::z_loss_coef);
  def_activation(switch_ffn, &moe::SwitchFFNOptions::activation);
  def_dtype(switch_ffn, "SwitchFFN", &moe::SwitchFFNOptions::dtype);
  def_device(switch_ffn, "SwitchFFN", &moe::SwitchFFNOptions::device);

  py::class_<moe::DenseFFNOptions> dense_ffn(m, "DenseFFNOptions");
  def_keyword_init(dense_ffn);
  dense_ffn.def_readwrite("use_bias", &moe::DenseFFNOptions::use_bias)
      .def_readwrite("dropout", &moe::DenseFFNOptions::dropout)
      .def_readwrite("init_scale", &moe::DenseFFNOptions::init_scale)
      .def_readwrite("seed", &moe::DenseFFNOptions::seed);
  def_activation(dense_ffn, &moe::DenseFFNOptions::activation);
  def_dtype(dense_ffn, "DenseFFN", &moe::DenseFFNOptions::dtype);
  def_device(dense_ffn, "DenseFFN", &moe::DenseFFNOptions::device);

  using model::SwitchLMConfig;
  py::class_<SwitchLMConfig> lm(m, "SwitchLMConfig");
  def_keyword_init(lm);
  lm.def_readwrite("vocab_size", &SwitchLMConfig::vocab_size)
      .def_readwrite("d_model", &SwitchLMConfig::d_model)
      .def_readwrite("num_layers", &SwitchLMConfig::num_layers)
      .def_readwrite("num_heads", &SwitchLMConfig::num_heads)
      .def_readwrite("d_ff", &SwitchLMConfig::d_ff)
      .def_readwrite("num_experts", &SwitchLMConfig::num_experts)
      .def_readwrite("k", &SwitchLMConfig::k)
      .def_readwrite("capacity_factor", &SwitchLMConfig::capacity_factor)
      .def_readwrite("eval_capacity_factor", &SwitchLMConfig::eval_capacity_factor)
      .def_readwrite("expert_every", &SwitchLMConfig::expert_every)
      .def_readwrite("aux_loss_coef", &SwitchLMConfig::aux_loss_coef)
      .def_readwrite("z_loss_coef", &SwitchLMConfig::z_loss_coef)
      .def_readwrite("jitter_eps", &SwitchLMConfig::jitter_eps)
      .def_readwrite("init_scale", &SwitchLMConfig::init_scale)
      .def_readwrite("rope_base", &SwitchLMConfig::rope_base)
      .def_readwrite("norm_eps", &SwitchLMConfig::norm_eps)
      .def_readwrite("seed", &SwitchLMConfig::seed);
  def_dtype(lm, "SwitchLM", &SwitchLMConfig::dtype);
  def_device(lm, "SwitchLM", &SwitchLMConfig::device);

  py::class_<optim::AdamWOptions> adamw(m, "AdamWOptions");
  def_keyword_init(adamw);
  adamw.def_readwrite("beta1", &optim::AdamWOptions::beta1)
      .def_readwrite("beta2", &optim::AdamWOptions::beta2)
      .def_readwrite("eps", &optim::AdamWOptions::eps)
      .def_readwrite("weight_decay", &optim::AdamWOptions::weight_decay);

  py::class_<optim::AdafactorOptions> adafactor(m, "AdafactorOptions");
  def_keyword_init(adafactor);
  adafactor.def_readwrite("decay_rate", &optim::AdafactorOptions::decay_rate)
      .def_readwrite("eps", &optim::AdafactorOptions::eps)
      .def_readwrite("clip_threshold", &optim::AdafactorOptions::clip_threshold)
      .def_readwrite("weight_decay", &optim::AdafactorOptions::weight_decay);

  using model::TrainerOptions;
  py::class_<TrainerOptions> trainer(m, "TrainerOptions");
  def_keyword_init(trainer);
  trainer.def_readwrite("optimizer", &TrainerOptions::optimizer)
      .def_readwrite("peak_lr", &TrainerOptions::peak_lr)
      .def_readwrite("warmup_steps", &TrainerOptions::warmup_steps)
      .def_readwrite("decay", &TrainerOptions::decay)
      .def_readwrite("final_fraction", &TrainerOptions::final_fraction)
      .def_readwrite("clip", &TrainerOptions::clip)
      .def_readwrite("weight_decay", &TrainerOptions::weight_decay)
      .def_readwrite("adamw", &TrainerOptions::adamw)
      .def_readwrite("adafactor", &TrainerOptions::adafactor);
}

}  // namespace pyswitch::bindings
