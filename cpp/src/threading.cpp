// The size of the core's intra-op thread pool: explicit setting, else environment, else cores;
// and a calling thread's own share of it (thread ranks).
#include "pyswitch/threading.hpp"

#include <omp.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "pyswitch/error.hpp"

namespace pyswitch {
namespace {

int threads_from_environment() {
  for (const char* name : {"PYSWITCH_NUM_THREADS", "OMP_NUM_THREADS"}) {
    const char* value = std::getenv(name);
    if (value && *value) {
      char* end = nullptr;
      const long n = std::strtol(value, &end, 10);
      if (end != value && n >= 1 && n <= 4096) return static_cast<int>(n);
    }
  }
  return omp_get_num_procs();
}

std::atomic<int>& thread_setting() {
  static std::atomic<int> setting{threads_from_environment()};
  return setting;
}

// The calling thread's share of the pool; 0: none (the process-wide setting applies).
thread_local int thread_share = 0;

}  // namespace

int get_num_threads() {
  return thread_share > 0 ? thread_share : thread_setting().load(std::memory_order_relaxed);
}

void set_num_threads(int n) {
  PYSWITCH_CHECK_ARG(n >= 1, "set_num_threads: n must be >= 1, got ", n);
  thread_setting().store(n, std::memory_order_relaxed);
}

void set_thread_share(int n) {
  PYSWITCH_CHECK_ARG(n >= 0, "set_thread_share: n must be >= 0 (0 removes the share), got ", n);
  thread_share = n;
}

}  // namespace pyswitch
