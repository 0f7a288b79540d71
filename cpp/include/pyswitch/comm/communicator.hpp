/// @file comm/communicator.hpp
/// The collective-communication interface that carries expert and data parallelism: MPI/NCCL
/// names in snake_case. Backends: thread ranks in one process (comm/local.hpp) and MPI
/// (comm/mpi.hpp).
///
/// Rules for every call (as in MPI): every rank of the group calls every collective, in the
/// same order, with matching op, dtype and sizes, including ranks with nothing to send. Each
/// call carries (sequence number, op, dtype, sizes); a mismatch makes every rank throw
/// CommError at that call. Every wait has a timeout (CommTimeout). A rank that fails inside a
/// call poisons the group: the others throw CommError naming the op, the sequence number and
/// the ranks, and so does any later call. Argument errors (InvalidArgument: a negative count, a
/// bad root, "mean" on integers) are thrown before the call is posted and do not poison the
/// group, so that when every rank makes the same mistake the communicator stays usable; when
/// only one rank does, its peers wait for the timeout unless the caller poisons the group (the
/// Python `run` helpers do). Counts are in elements and 64-bit. Buffers are owned by the caller
/// and must stay valid until the call returns.
#pragma once

#include <cstdint>
#include <string>

#include "pyswitch/tensor.hpp"

namespace pyswitch::comm {

/// Collectives take pyswitch::DType (tensor.hpp): all four element types.
enum class ReduceOp { sum = 0, max = 1, min = 2, mean = 3 };

const char* reduce_op_name(ReduceOp op);

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// Seconds every blocking wait may take before CommTimeout.
  virtual double timeout() const = 0;

  /// send: size * count elements, block r for rank r. recv: size * count elements, block r from
  /// rank r. send and recv must not overlap.
  virtual void all_to_all(const void* send, void* recv, int64_t count, DType dtype) = 0;

  /// Rank-varying blocks: this rank sends send_counts[r] elements starting at send + send_displs[r]
  /// to rank r, and receives recv_counts[r] elements at recv + recv_displs[r] from rank r. The
  /// count arrays have size() entries; each pair of ranks must agree (my send_counts[r] equals
  /// rank r's recv_counts[me]), checked before any payload moves. No overlap of send and recv.
  virtual void all_to_all_v(const void* send, const int64_t* send_counts,
                            const int64_t* send_displs, void* recv, const int64_t* recv_counts,
                            const int64_t* recv_displs, DType dtype) = 0;

  /// recv (count) = op over ranks of send (count), reduced in rank order 0..size-1 for every
  /// element (bit-identical on every rank); bfloat16 accumulates in float32 and rounds once.
  /// In place allowed (send == recv). mean: float types only (sum / size).
  virtual void all_reduce(const void* send, void* recv, int64_t count, DType dtype,
                          ReduceOp op) = 0;

  /// recv (size * count): block r is rank r's send (count). No overlap.
  virtual void all_gather(const void* send, void* recv, int64_t count, DType dtype) = 0;

  /// send (size * count); recv (count) = block `rank()` of the all_reduce of send. No overlap.
  virtual void reduce_scatter(const void* send, void* recv, int64_t count, DType dtype,
                              ReduceOp op) = 0;

  /// buffer (count): root's contents are copied to every other rank's buffer.
  virtual void broadcast(void* buffer, int64_t count, DType dtype, int root) = 0;

  virtual void barrier() = 0;

  /// Marks the group failed, as when this rank's work fails outside a collective: peers waiting
  /// in, or later entering, a collective throw CommError whose message includes `reason`, and so
  /// does this rank's next call. Never blocks; the first reason is kept.
  virtual void poison(const std::string& reason) = 0;

  /// A value every rank must pass identically for its next collective, checked with the op,
  /// dtype and counts (a mismatch throws CommError on every rank): for what the element counts
  /// do not pin down, such as the shape of the arrays (the Python API passes a fingerprint of
  /// it). Cleared by that call; 0 when not set.
  void set_next_call_check(int64_t value) { next_call_check_ = value; }

 protected:
  /// For backends: the check value of the call being made, which clears it.
  int64_t take_call_check() {
    const int64_t value = next_call_check_;
    next_call_check_ = 0;
    return value;
  }

 private:
  int64_t next_call_check_ = 0;
};

/// The counts and displacements of an all_to_all_v that moves whole rows of `row_elements`
/// elements, packed in rank order: block w is rows[w] * row_elements elements at the running
/// offset. rows, counts, displs: `size` entries (counts and displs written). Returns the total
/// number of elements. Throws InvalidArgument for a negative row count.
int64_t packed_row_blocks(const int64_t* rows, int size, int64_t row_elements, int64_t* counts,
                          int64_t* displs);

}  // namespace pyswitch::comm
