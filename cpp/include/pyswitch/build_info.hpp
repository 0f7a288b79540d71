/// @file build_info.hpp
/// What this build of the pyswitch core contains: version, kernels, GEMM library, MPI, CUDA,
/// checkpoint hashing.
#pragma once

#include <string>

namespace pyswitch {

struct BuildInfo {
  std::string version;             ///< "x.y.z", from CMake's project(VERSION)
  std::string blas;                ///< the GEMM library and its version, e.g. "oneDNN 3.2.0 (OMP)"
  bool mpi = false;                ///< built with the MPI backend (the pyswitch::mpi library)
  bool cuda = false;               ///< built with CUDA kernels
  bool checkpoint_hashes = false;  ///< load_checkpoint verifies SHA-256 (built with OpenSSL)
  std::string compiler;            ///< compiler id and version
};

/// Thread-safe; never throws.
BuildInfo build_info();

}  // namespace pyswitch
