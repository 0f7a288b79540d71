// Entry point of the C++ unit tests: runs every registered case (or those matching argv[1]).
// In a CUDA build the CUDA table is registered first where a device is visible, so the
// backend-ops test runs every op on it against the CPU reference.
#include <cstdio>

#include "harness.hpp"
#ifdef PYSWITCH_TESTS_WITH_CUDA
#include "pyswitch/cuda/backend_cuda.hpp"
#endif

int main(int argc, char** argv) {
#ifdef PYSWITCH_TESTS_WITH_CUDA
  if (pyswitch::cuda::device_count() > 0) {
    pyswitch::cuda::register_backend();
    std::printf("CUDA backend registered: %s; %s\n", pyswitch::cuda::device_info(0).name.c_str(),
                pyswitch::cuda::versions().c_str());
  } else {
    std::printf("CUDA backend built, no CUDA device visible (%s): CPU tables only\n",
                pyswitch::cuda::versions().c_str());
  }
#endif
  return harness::run_all(argc, argv);
}
