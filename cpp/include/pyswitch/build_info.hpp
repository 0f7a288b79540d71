/// @file build_info.hpp
/// What this build of the pyswitch core contains: version, kernels, GEMM library, MPI, CUDA,
/// checkpoint hashing.
#pragma once

#include <string>

namespace pyswitch {

struct BuildInfo {
  std::string version;             ///< "x.y.z", from CMake's project(VERSION)
  std::string blas;                ///< what runs the GEMMs, and the comparison library's version
  std::string gemm_float32;        ///< the GEMM path float32 layers use now (active CPU tier)
  std::string gemm_bfloat16;       ///< the GEMM path bfloat16 layers use now (active CPU tier)
  bool mpi = false;                ///< built with the MPI backend (the pyswitch::mpi library)
  bool cuda = false;               ///< built with CUDA kernels
  bool checkpoint_hashes = false;  ///< load_checkpoint verifies SHA-256 (built with OpenSSL)
  std::string compiler;            ///< compiler id and version
};

/// Thread-safe; never throws. The gemm_* fields describe the active ISA at the time of the call.
BuildInfo build_info();

}  // namespace pyswitch
