// Run-time CPU feature detection and the active kernel table.
#include "pyswitch/cpu_isa.hpp"

#include <atomic>
#include <cstdlib>
#include <string>

#include "cpu/kernels.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/log.hpp"

namespace pyswitch {
namespace {

// __builtin_cpu_supports checks CPUID and, through XGETBV, that the OS saves the AVX and
// AVX-512 register state.
bool cpu_can_run(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::scalar:
      return true;
    case CpuIsa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case CpuIsa::avx512_bf16:
      return cpu_can_run(CpuIsa::avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }
  return false;
}

CpuIsa initial_isa() {
  CpuIsa best = CpuIsa::scalar;
  for (CpuIsa isa : supported_cpu_isas()) best = isa;
  const char* cap = std::getenv("PYSWITCH_CPU_ISA");
  if (cap && *cap) {
    CpuIsa wanted = CpuIsa::scalar;
    try {
      wanted = parse_cpu_isa(cap);
    } catch (const InvalidArgument& e) {
      // An unknown value must not break import; build_info shows what is active.
      log_message(LogLevel::warning, std::string("PYSWITCH_CPU_ISA ignored: ") + e.what() +
                                         "; using " + cpu_isa_name(best));
      return best;
    }
    if (static_cast<int>(wanted) < static_cast<int>(best)) {
      best = wanted;
    } else if (wanted != best) {
      log_message(LogLevel::warning, std::string("PYSWITCH_CPU_ISA=") + cap +
                                         " is not supported by this CPU; using " +
                                         cpu_isa_name(best));
    }
  }
  log_message(LogLevel::debug, std::string("CPU kernels: ") + cpu_isa_name(best));
  return best;
}

std::atomic<CpuIsa>& active() {
  static std::atomic<CpuIsa> isa{initial_isa()};
  return isa;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::scalar:
      return "scalar";
    case CpuIsa::avx2:
      return "avx2";
    case CpuIsa::avx512_bf16:
      return "avx512_bf16";
  }
  return "unknown";
}

CpuIsa parse_cpu_isa(const std::string& name) {
  for (CpuIsa isa : compiled_cpu_isas()) {
    if (name == cpu_isa_name(isa)) return isa;
  }
  throw InvalidArgument("cpu isa must be one of 'scalar', 'avx2', 'avx512_bf16', got '" + name +
                        "'");
}

std::vector<CpuIsa> compiled_cpu_isas() {
  return {CpuIsa::scalar, CpuIsa::avx2, CpuIsa::avx512_bf16};
}

std::vector<CpuIsa> supported_cpu_isas() {
  std::vector<CpuIsa> out;
  for (CpuIsa isa : compiled_cpu_isas()) {
    if (cpu_can_run(isa)) out.push_back(isa);
  }
  return out;
}

CpuIsa active_cpu_isa() {
  return active().load();
}

CpuIsa set_cpu_isa(CpuIsa isa) {
  PYSWITCH_CHECK_ARG(cpu_can_run(isa), "set_cpu_isa: this CPU cannot run '", cpu_isa_name(isa),
                     "'");
  return active().exchange(isa);
}

namespace cpu {

const KernelTable& kernels_for(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::avx512_bf16:
      return avx512_bf16::table;
    case CpuIsa::avx2:
      return avx2::table;
    case CpuIsa::scalar:
      break;
  }
  return scalar::table;
}

const KernelTable& active_kernels() {
  return kernels_for(active_cpu_isa());
}

}  // namespace cpu
}  // namespace pyswitch
