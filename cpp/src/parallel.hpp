// Internal: parallel loops over fixed blocks on the core's OpenMP pool. Blocks are fixed by
// the caller, never by the thread count, which keeps every result thread-count independent.
#pragma once

#include <omp.h>

#include <cstdint>
#include <exception>
#include <mutex>

#include "pyswitch/threading.hpp"

namespace pyswitch::detail {

// Calls body(block) for block in [0, num_blocks) on up to get_num_threads() threads. An
// exception thrown by a body is rethrown here (the first one by block order is not promised;
// callers that need "first bad row" semantics record it themselves).
template <typename Body>
void parallel_for(int64_t num_blocks, Body&& body) {
  if (num_blocks <= 0) return;
  const int threads = get_num_threads();
  if (threads <= 1 || num_blocks == 1 || omp_in_parallel()) {
    for (int64_t b = 0; b < num_blocks; ++b) body(b);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
// Dynamic scheduling balances uneven blocks (experts differ in size); which thread runs a
// block never changes what the block computes.
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t b = 0; b < num_blocks; ++b) {
    try {
      body(b);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
}

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

}  // namespace pyswitch::detail
