/// @file backend_cuda.hpp
/// The CUDA backend: a BackendOps table (backend.hpp) whose ops run on NVIDIA GPUs through
/// hand-written kernels and cuBLAS, checked op for op against the CPU reference by
/// cpp/tests/test_backend_ops.cpp. Present in the SDK as the `cuda` component
/// (find_package(pyswitch COMPONENTS cuda) -> pyswitch::cuda) when the SDK was built with CUDA.
///
/// Device and stream: every op runs on the calling thread's current CUDA device, on the legacy
/// default stream, so ops are ordered with each other and with cudaMemcpy. Ops that return host
/// results (route's plan, cross_entropy's loss, sum_of_squares) synchronise. Views passed to the
/// table must carry Device::cuda (device memory from its `allocate`, or any cudaMalloc'd
/// buffer); `copy` moves between host and device.
///
/// Determinism: no float atomics anywhere; every reduction runs in a fixed order, so the same
/// inputs give bitwise-identical outputs run to run on one GPU model (docs/cuda.md).
///
/// Thread-safety: the table is immutable; ops may be called from several threads (each thread
/// gets its own cuBLAS handle). Errors: InvalidArgument for bad views (as the CPU table),
/// DeviceError for CUDA or cuBLAS failures and when no device is present.
#pragma once

#include <cstdint>
#include <string>

#include "pyswitch/backend.hpp"

namespace pyswitch::cuda {

/// Number of CUDA devices visible to this process; 0 (never an exception) without a driver or
/// a GPU.
int device_count();

/// What one device is: name, compute capability and memory. Throws DeviceError when no device
/// is visible and InvalidArgument for an index outside [0, device_count()).
struct DeviceInfo {
  std::string name;
  int major = 0, minor = 0;
  int64_t memory_bytes = 0;
};
DeviceInfo device_info(int device);

/// "CUDA runtime 13.0, driver 13.0, cuBLAS 130101, NCCL 2.30.7" (driver "none" without one).
std::string versions();

/// The CUDA table. Throws DeviceError when no CUDA device is visible.
const BackendOps& backend();

/// backend(), installed as the table for Device::cuda (pyswitch::register_backend). Returns the
/// table it replaced, or null. Throws DeviceError when no CUDA device is visible.
const BackendOps* register_backend();

}  // namespace pyswitch::cuda
