/// @file cpu_isa.hpp
/// Run-time choice of CPU kernels: scalar (the reference), AVX2+FMA, AVX-512 with BF16.
/// The best ISA this CPU supports is chosen once, by CPUID/XGETBV; the environment variable
/// PYSWITCH_CPU_ISA=scalar|avx2|avx512_bf16 caps it, and set_cpu_isa() changes it for tests.
#pragma once

#include <string>
#include <vector>

namespace pyswitch {

enum class CpuIsa { scalar = 0, avx2 = 1, avx512_bf16 = 2 };

/// "scalar", "avx2" or "avx512_bf16".
const char* cpu_isa_name(CpuIsa isa);

/// Parses a name as above. Throws InvalidArgument for any other string.
CpuIsa parse_cpu_isa(const std::string& name);

/// Kernel sets compiled into this library (all three on x86-64).
std::vector<CpuIsa> compiled_cpu_isas();

/// Compiled kernel sets that this CPU and OS can run.
std::vector<CpuIsa> supported_cpu_isas();

/// The kernel set in use. Thread-safe.
CpuIsa active_cpu_isa();

/// Selects the kernel set; returns the previous one. Throws InvalidArgument when this CPU
/// cannot run it. Thread-safe, but calls in flight keep the table they started with.
CpuIsa set_cpu_isa(CpuIsa isa);

}  // namespace pyswitch
