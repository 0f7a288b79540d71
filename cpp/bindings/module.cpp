// pyswitch._core: the module's entry point. It registers the error classes and the runtime
// queries (build info, logging, CPU kernels, threads), then each area's bindings (bf16.cpp,
// moe.cpp, layers.cpp, model.cpp, comm.cpp). cpp/bindings/ is the only folder that includes
// pybind11: it turns NumPy arrays into checked pointers, releases the GIL around compute, and
// maps C++ errors onto Python exceptions; all semantics live in the core.
#include "common.hpp"

using namespace pyswitch;
using namespace pyswitch::bindings;

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyswitch C++ core (internal; use the pyswitch package)";

  // Error classes: pyswitch.Error(RuntimeError) and its subclasses.
  static py::exception<Error> error_class(m, "Error", PyExc_RuntimeError);
  static py::exception<CommError> comm_error_class(m, "CommError", error_class.ptr());
  static py::exception<CommTimeout> comm_timeout_class(m, "CommTimeout", comm_error_class.ptr());
  static py::exception<CheckpointError> checkpoint_error_class(m, "CheckpointError",
                                                               error_class.ptr());
  static py::exception<DeviceError> device_error_class(m, "DeviceError", error_class.ptr());
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
    } catch (const DeviceError& e) {
      py::set_error(device_error_class, e.what());
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
  // pyswitch.cuda hands the CUDA module's op table over here, so the layers and route() of this
  // module (which has its own registry) find it.
  m.def("_install_backend", [](py::capsule table) {
    PYSWITCH_CHECK_ARG(std::string(table.name() ? table.name() : "") == "pyswitch.BackendOps",
                       "_install_backend: expected a pyswitch.BackendOps capsule, got '",
                       table.name() ? table.name() : "", "'");
    register_backend(*static_cast<const BackendOps*>(table.get_pointer()));
  });
  m.def("_has_backend", [](const std::string& device) {
    try {
      (void)backend(parse_device("_has_backend", device));
      return true;
    } catch (const DeviceError&) {
      return false;
    }
  });
  m.def("get_num_threads", &get_num_threads);
  m.def("set_num_threads", &set_num_threads);
  m.def("set_thread_share", &set_thread_share, py::arg("n"));

  bind_options(m);
  bind_bf16(m);
  bind_moe(m);
  bind_layers(m);
  bind_model(m);
  bind_train(m);
  bind_comm(m);
}
