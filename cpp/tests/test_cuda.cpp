// The CUDA backend's host side, in CUDA builds: discovery never throws, and without a device
// every entry point says so with DeviceError (this is what CI, which has no GPU, runs). With a
// device the table is complete and registered; the ops themselves are checked by the
// backend-ops test against the CPU reference.
#include <string>

#include "harness.hpp"
#include "pyswitch/backend.hpp"
#include "pyswitch/cuda/backend_cuda.hpp"
#include "pyswitch/error.hpp"

using namespace pyswitch;

TEST(cuda_discovery_never_throws) {
  const int count = cuda::device_count();
  CHECK(count >= 0);
  const std::string versions = cuda::versions();
  CHECK(versions.find("CUDA runtime 13.") == 0);
  CHECK(versions.find("NCCL 2.") != std::string::npos);
  bool threw = false;
  try {
    (void)cuda::device_info(count);  // one past the last device
  } catch (const DeviceError& e) {
    threw = count == 0 && std::string(e.what()) == "device_info: no CUDA device is visible";
  } catch (const InvalidArgument& e) {
    threw = count > 0 && std::string(e.what()).find("device_info: device must be in [0, ") == 0;
  }
  CHECK(threw);
}

TEST(cuda_backend_without_a_device_is_a_device_error) {
  if (cuda::device_count() > 0) {
    const BackendOps& table = cuda::backend();
    CHECK(table.device == Device::cuda);
    for (int i = 0; i < backend_op_count(); ++i) CHECK(backend_has_op(table, i));
    CHECK(&backend(Device::cuda) == &table);  // test_main registered it
    return;
  }
  bool threw = false;
  try {
    (void)cuda::backend();
  } catch (const DeviceError& e) {
    threw = std::string(e.what()).find("no CUDA device is visible") != std::string::npos;
  }
  CHECK(threw);
  threw = false;
  try {
    (void)cuda::register_backend();
  } catch (const DeviceError&) {
    threw = true;
  }
  CHECK(threw);
}
