// pybind11 module pyswitch._cuda: the CUDA backend (cuda/backend_cuda.hpp). Kept apart from _core
// so that `import pyswitch` never needs the CUDA runtime, cuBLAS or NCCL; pyswitch.cuda imports
// it on demand and hands its op table to _core (_core._install_backend), where the layers and
// route() find it through pyswitch::backend(Device::cuda).
#include <pybind11/pybind11.h>

#include "pyswitch/cuda/backend_cuda.hpp"
#include "pyswitch/error.hpp"

namespace py = pybind11;
using namespace pyswitch;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "pyswitch CUDA backend (internal; use pyswitch.cuda)";
  py::module_ core = py::module_::import("pyswitch._core");
  // Errors raised here map onto _core's classes (pyswitch.DeviceError, ...), not new ones.
  static py::object device_error = core.attr("DeviceError");
  static py::object error = core.attr("Error");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const DeviceError& e) {
      py::set_error(device_error, e.what());
    } catch (const Error& e) {
      py::set_error(error, e.what());
    }
  });

  m.def("device_count", &cuda::device_count,
        "Number of visible CUDA devices; 0 without a driver or GPU (never raises).");
  m.def(
      "device_info",
      [](int device) {
        const cuda::DeviceInfo info = cuda::device_info(device);
        py::dict d;
        d["name"] = info.name;
        d["compute_capability"] = py::make_tuple(info.major, info.minor);
        d["memory_bytes"] = info.memory_bytes;
        return d;
      },
      py::arg("device") = 0);
  m.def("versions", &cuda::versions);
  m.def(
      "backend_capsule",
      []() {
        // The table outlives the module's users (a function-local static), so the capsule
        // carries a plain pointer and no destructor.
        return py::capsule(static_cast<const void*>(&cuda::backend()), "pyswitch.BackendOps");
      },
      "The CUDA op table for _core._install_backend; raises DeviceError without a device.");
}
