// What this build contains, for pyswitch.build_info() and C++ hosts.
#include "pyswitch/build_info.hpp"

#include <string>

#include "gemm.hpp"

namespace pyswitch {

BuildInfo build_info() {
  BuildInfo info;
  info.version = PYSWITCH_VERSION;
  info.blas = std::string("pyswitch GEMM kernel (per-ISA; oneDNN ") + PYSWITCH_DNNL_VERSION +
              " (OpenMP) for comparison)";
  info.gemm_float32 = detail::gemm_path(DType::float32);
  info.gemm_bfloat16 = detail::gemm_path(DType::bfloat16);
#ifdef PYSWITCH_HAVE_MPI
  info.mpi = true;
#endif
#ifdef PYSWITCH_HAVE_OPENSSL
  info.checkpoint_hashes = true;
#endif
#ifdef PYSWITCH_HAVE_CUDA
  info.cuda = true;
#endif
#if defined(__clang__)
  info.compiler = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info.compiler = std::string("gcc ") + __VERSION__;
#endif
  return info;
}

}  // namespace pyswitch
