/// @file comm/mpi.hpp
/// The MPI backend: a Communicator over an MPI communicator, for runs of several processes or
/// machines under mpiexec. Built when CMake finds MPI (target pyswitch::mpi, which links the MPI
/// C library); the core library itself never needs MPI.
///
/// Semantics are those of comm/communicator.hpp, with the same results bit for bit as the
/// thread-rank backend (reductions run in rank order, bfloat16 accumulates in float32):
/// - Every call first gathers a small descriptor (sequence number, op, dtype, count, reduce op,
///   root, and the all_to_all_v counts of every rank) and checks it on every rank, so a mismatch
///   throws CommError on all of them before any payload moves.
/// - Every wait is a non-blocking MPI call polled against a deadline: CommTimeout after
///   timeout() seconds, never a hang. A rank that fails sends a short "poison" message to its
///   peers on a private communicator; a peer waiting in, or later entering, a call throws
///   CommError naming that rank and its reason.
/// - A call every rank has completed stands: a peer that fails right after its part of a call
///   does not fail that call here (the failure is reported by the next call), as with thread
///   ranks. A timeout is reported as CommTimeout on the rank that timed out and on the peers it
///   tells. MPI does not say which rank is missing, so timeout messages cannot name it.
/// - After a CommError or CommTimeout the communicator is unusable (MPI cannot cancel a started
///   collective), and MPI itself may be: end the job (for example MPI_Abort from the application,
///   or exit). The library never calls MPI_Abort, abort or exit itself. Until then MPI may still
///   write into the buffers of the failed call: keep them allocated (the Python API keeps its
///   arrays of failed MPI calls alive; this class never frees its own internal ones).
/// Counts are 64-bit (MPI-4 large-count calls where the library has them, else checked to fit
/// in int).
#pragma once

#include <mpi.h>

#include <memory>
#include <string>

#include "pyswitch/comm/communicator.hpp"

namespace pyswitch::comm {

class MPIComm final : public Communicator {
 public:
  /// Duplicates `comm` twice (payload and poison channels), so that pyswitch's messages never
  /// mix with the application's. Collective over `comm`: every rank constructs it. MPI must be
  /// initialised (thread level at least MPI_THREAD_SERIALIZED when other threads use MPI) and
  /// must outlive this object.
  /// @throws InvalidArgument for a timeout that is not finite and positive; Error when MPI is not
  ///   initialised or already finalised, or an MPI call fails.
  explicit MPIComm(MPI_Comm comm = MPI_COMM_WORLD, double timeout_seconds = 30.0);
  /// Frees the duplicated communicators, unless the group failed (then they are left to MPI's
  /// teardown: freeing them could wait on a peer that is gone). Never blocks on a peer.
  ~MPIComm() override;
  MPIComm(const MPIComm&) = delete;
  MPIComm& operator=(const MPIComm&) = delete;

  int rank() const override;
  int size() const override;
  double timeout() const override;
  bool poisoned() const;

  void all_to_all(const void* send, void* recv, int64_t count, DType dtype) override;
  void all_to_all_v(const void* send, const int64_t* send_counts, const int64_t* send_displs,
                    void* recv, const int64_t* recv_counts, const int64_t* recv_displs,
                    DType dtype) override;
  void all_reduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op) override;
  void all_gather(const void* send, void* recv, int64_t count, DType dtype) override;
  void reduce_scatter(const void* send, void* recv, int64_t count, DType dtype,
                      ReduceOp op) override;
  void broadcast(void* buffer, int64_t count, DType dtype, int root) override;
  void barrier() override;
  void poison(const std::string& reason) override;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

/// The MPI library's version string (MPI_Get_library_version), for build_info and logs.
std::string mpi_library_version();

}  // namespace pyswitch::comm
