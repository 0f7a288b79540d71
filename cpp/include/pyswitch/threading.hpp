/// @file threading.hpp
/// The core's intra-op thread pool (OpenMP; oneDNN, used only for comparison, shares it).
/// Its size is set_num_threads(n), else PYSWITCH_NUM_THREADS, else OMP_NUM_THREADS, else the
/// number of cores. Every kernel splits work into fixed-size blocks and combines partial
/// results in block order, so results are bit-identical for any thread count.
#pragma once

namespace pyswitch {

/// Threads used by each op started from the calling thread: its share (set_thread_share) if
/// it has one, else the process-wide setting. Thread-safe.
int get_num_threads();

/// Sets the process-wide threads per op, for ops started after the call. Throws InvalidArgument
/// for n < 1.
void set_num_threads(int n);

/// Gives the calling thread its own share of the pool: ops it starts use `n` threads, whatever
/// the process-wide setting; 0 removes the share. Thread ranks of one process use this to split
/// the pool instead of each running a full team: pyswitch.comm.LocalGroup gives rank r of W
/// floor(P / W) threads, plus one for the first P mod W ranks (at least 1), where P is
/// get_num_threads() when the group starts. Results do not depend on it (every kernel is
/// thread-count independent). Throws InvalidArgument for n < 0.
void set_thread_share(int n);

}  // namespace pyswitch
