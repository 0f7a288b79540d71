// Internal to the collectives backends: the call description every rank posts, the agreement
// check on it, and the rank-order reduction, shared so that thread ranks and MPI give the same
// answers and the same messages.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "pyswitch/comm/communicator.hpp"

namespace pyswitch::comm {

enum class Op {
  all_to_all,
  all_to_all_v,
  all_reduce,
  all_gather,
  reduce_scatter,
  broadcast,
  barrier
};

const char* op_name(Op op);

// What one rank posted for one call. The pointers are only read by the agreement check and the
// thread-rank backend (MPI fills the count arrays from a gathered descriptor).
struct Call {
  uint64_t seq = 0;
  Op op = Op::barrier;
  DType dtype = DType::float32;
  ReduceOp reduce = ReduceOp::sum;
  int64_t count = 0;
  int root = 0;
  int64_t check = 0;  // Communicator::set_next_call_check
  const void* send = nullptr;
  void* recv = nullptr;
  const int64_t* send_counts = nullptr;
  const int64_t* send_displs = nullptr;
  const int64_t* recv_counts = nullptr;
  const int64_t* recv_displs = nullptr;
};

// Empty when every rank posted the same call (op, dtype, count, reduce op, root; pairwise
// counts for all_to_all_v); else what differs, naming the ranks. Every rank computes it from the
// same posted calls, so all of them reach the same verdict.
std::string call_disagreement(const std::vector<Call>& calls);

// Argument checks every backend makes before posting a call (InvalidArgument).
void check_count(const char* where, int64_t count);
void check_mean(const char* where, DType dtype, ReduceOp op);
void check_v_counts(int size, const int64_t* send_counts, const int64_t* send_displs,
                    const int64_t* recv_counts, const int64_t* recv_displs);

// outputs[o][i] for i in [first, first + n) = reduction over r of sources[r][i], in rank order
// 0..W-1, accumulated in float32 (bfloat16 rounds once at the end) or wrapping integers.
void reduce_range(const std::vector<const void*>& sources, const std::vector<void*>& outputs,
                  int64_t first, int64_t n, DType dtype, ReduceOp op);

}  // namespace pyswitch::comm
