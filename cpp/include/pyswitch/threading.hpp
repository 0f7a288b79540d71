/// @file threading.hpp
/// The core's intra-op thread pool (OpenMP; oneDNN, used only for comparison, shares it).
/// Its size is set_num_threads(n), else PYSWITCH_NUM_THREADS, else OMP_NUM_THREADS, else the
/// number of cores. Every kernel splits work into fixed-size blocks and combines partial
/// results in block order, so results are bit-identical for any thread count.
#pragma once

namespace pyswitch {

/// Threads used by each op. Thread-safe.
int get_num_threads();

/// Sets the threads used by ops started after the call. Throws InvalidArgument for n < 1.
void set_num_threads(int n);

}  // namespace pyswitch
