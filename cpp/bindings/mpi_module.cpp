// pybind11 module pyswitch._mpi: the MPI backend (comm/mpi.hpp) as a pyswitch._core.Communicator.
// Kept apart from _core so that `import pyswitch` never needs libmpi; the collectives themselves
// are bound once, on the base class, in module.cpp.
#include <pybind11/pybind11.h>

#include "pyswitch/comm/mpi.hpp"
#include "pyswitch/error.hpp"

namespace py = pybind11;
using namespace pyswitch;

PYBIND11_MODULE(_mpi, m) {
  m.doc() = "pyswitch MPI backend (internal; use pyswitch.comm.MPIComm)";
  // Registers the Communicator base class and the exception translators.
  py::module_::import("pyswitch._core");

  py::class_<comm::MPIComm, comm::Communicator>(m, "MPIComm")
      .def(py::init([](int64_t fortran_handle, double timeout) {
             // mpi4py hands communicators over as Fortran handles (Comm.py2f()), the one
             // representation every MPI implementation can convert back (MPI_Comm_f2c).
             MPI_Comm handle = MPI_Comm_f2c(static_cast<MPI_Fint>(fortran_handle));
             py::gil_scoped_release release;
             return std::make_unique<comm::MPIComm>(handle, timeout);
           }),
           py::arg("fortran_handle"), py::arg("timeout"))
      .def_property_readonly("poisoned", &comm::MPIComm::poisoned);

  m.def("library_version", &comm::mpi_library_version);
  m.def("world_fortran_handle",
        []() { return static_cast<int64_t>(MPI_Comm_c2f(MPI_COMM_WORLD)); });
}
