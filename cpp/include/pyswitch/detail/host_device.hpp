/// @file host_device.hpp
/// PYSWITCH_HD marks a function that is compiled for the host and, under nvcc, also for the
/// device. The arithmetic the CPU reference and the CUDA kernels must share bit for bit (the
/// router's exp, Philox, bf16 rounding, capacity and layout index math) is written once with it,
/// so the host-side unit tests that run in every CI job test the device code too.
#pragma once

#if defined(__CUDACC__)
#define PYSWITCH_HD __host__ __device__
#else
#define PYSWITCH_HD
#endif
