// The MPI backend: every call gathers and checks a descriptor, then moves the payload with a
// non-blocking MPI collective polled against a deadline and a poison channel.
#include "pyswitch/comm/mpi.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <thread>
#include <vector>

#include "comm/common.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/log.hpp"

namespace pyswitch::comm {
namespace {

constexpr int kPoisonTag = 7;
constexpr int kPoisonBytes = 1024;
constexpr int kHeaderWords = 7;  // seq, op, dtype, count, reduce op, root, check

MPI_Datatype mpi_type(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return MPI_FLOAT;
    case DType::bfloat16:
      return MPI_UINT16_T;  // moved as bits; reductions are done here, not by MPI
    case DType::int32:
      return MPI_INT32_T;
    case DType::int64:
      return MPI_INT64_T;
  }
  return MPI_DATATYPE_NULL;
}

std::string mpi_error_text(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS)
    return "MPI error " + std::to_string(code);
  return std::string(text, static_cast<size_t>(length));
}

void check_mpi(int code, const char* call) {
  if (code != MPI_SUCCESS) {
    throw CommError(detail::concat(call, " failed: ", mpi_error_text(code)));
  }
}

#if MPI_VERSION >= 4
// MPI-4 large-count calls take MPI_Count counts and MPI_Aint displacements.
using Count = MPI_Count;
using Displ = MPI_Aint;
#define PYSWITCH_MPI_C(name) name##_c
Count to_count(int64_t n, const char*) {
  return static_cast<Count>(n);
}
#else
using Count = int;
using Displ = int;
#define PYSWITCH_MPI_C(name) name
Count to_count(int64_t n, const char* where) {
  PYSWITCH_CHECK_ARG(n <= INT_MAX, where, ": ", n,
                     " elements is more than this MPI library (before MPI-4) can move in one call");
  return static_cast<Count>(n);
}
#endif

bool mpi_usable() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

}  // namespace

std::string mpi_library_version() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING];
  int length = 0;
  MPI_Get_library_version(text, &length);
  std::string version(text, static_cast<size_t>(length));
  const size_t line_end = version.find('\n');
  return line_end == std::string::npos ? version : version.substr(0, line_end);
}

struct MPIComm::State {
  MPI_Comm data = MPI_COMM_NULL;
  MPI_Comm control = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
  double timeout = 30.0;
  uint64_t seq = 0;
  bool poisoned = false;
  bool by_timeout = false;
  bool told_peers = false;
  uint64_t completed = 0;       // the last call this rank completed
  uint64_t peer_completed = 0;  // the last call the rank that poisoned the group completed
  std::string reason;
  MPI_Request control_recv = MPI_REQUEST_NULL;
  std::vector<char> control_buffer = std::vector<char>(kPoisonBytes, 0);
  std::vector<MPI_Request> poison_sends;
  std::string poison_text;  // the buffer of poison_sends, alive until they complete
  std::vector<int64_t> descriptor, gathered;
  std::vector<char> scratch;

  std::string where(const Call& call) const {
    return detail::concat(op_name(call.op), " (call ", call.seq, ", rank ", rank, " of ", size,
                          ")");
  }

  // Tells every peer that this rank failed. Non-blocking: the messages are small, and their
  // requests are only tested later, never waited on. The first byte says whether the failure
  // was a timeout, so that peers report it as one too.
  void tell_peers(const std::string& text, bool timeout) {
    if (told_peers || size == 1) return;
    told_peers = true;
    // "<T|E><last call this rank completed>:<text>"
    poison_text = detail::concat(timeout ? "T" : "E", completed, ":rank ", rank, ": ", text);
    poison_text.resize(std::min<size_t>(poison_text.size(), kPoisonBytes - 1));
    for (int peer = 0; peer < size; ++peer) {
      if (peer == rank) continue;
      MPI_Request request;
      if (MPI_Isend(poison_text.c_str(), static_cast<int>(poison_text.size() + 1), MPI_CHAR, peer,
                    kPoisonTag, control, &request) == MPI_SUCCESS) {
        poison_sends.push_back(request);
      }
    }
  }

  // A request given up while MPI may still write into this object's buffers: they are moved
  // aside and never freed, so that a late write cannot land in reused memory. (The caller's
  // own buffers of that call are the caller's to keep; see the header.)
  void abandon_buffers() {
    static std::vector<std::vector<int64_t>>* kept_words = new std::vector<std::vector<int64_t>>();
    static std::vector<std::vector<char>>* kept_bytes = new std::vector<std::vector<char>>();
    log_message(LogLevel::warning,
                "MPI communicator: a call was abandoned while MPI may still use its buffers; "
                "they are kept (not freed) until the process ends");
    kept_words->push_back(std::move(descriptor));
    kept_words->push_back(std::move(gathered));
    kept_bytes->push_back(std::move(scratch));
    descriptor.clear();
    gathered.clear();
    scratch.clear();
  }

  [[noreturn]] void fail(const Call& call, const std::string& what, bool timeout, bool tell,
                         bool pending) {
    const std::string message = detail::concat(where(call), ": ", what);
    if (!poisoned) {
      poisoned = true;
      by_timeout = timeout;
      reason = message;
      log_message(LogLevel::info, "MPI communicator failed: " + message);
    }
    if (tell) tell_peers(message, timeout);
    if (pending) abandon_buffers();
    if (timeout) throw CommTimeout(message);
    throw CommError(message);
  }

  // Whether a peer's report of a failure has arrived (or this rank already failed).
  bool poison_arrived() {
    if (!poisoned && control_recv != MPI_REQUEST_NULL) {
      int arrived = 0;
      MPI_Status status;
      check_mpi(MPI_Test(&control_recv, &arrived, &status), "MPI_Test");
      if (arrived) {
        control_buffer.back() = '\0';
        poisoned = true;
        by_timeout = control_buffer[0] == 'T';
        char* rest = nullptr;
        peer_completed = std::strtoull(control_buffer.data() + 1, &rest, 10);
        reason = rest && *rest == ':' ? rest + 1 : control_buffer.data() + 1;
      }
    }
    return poisoned;
  }

  [[noreturn]] void throw_poisoned(const Call& call, bool pending) {
    const std::string message = detail::concat(where(call), ": the group has failed: ", reason);
    if (pending) abandon_buffers();
    if (by_timeout) throw CommTimeout(message);
    throw CommError(message);
  }

  void check_poison(const Call& call) {
    if (poison_arrived()) throw_poisoned(call, false);
  }

  // Polls `request` until it completes, a peer reports a failure, or the deadline passes.
  void wait(MPI_Request& request, const Call& call, const char* stage) {
    const auto start = std::chrono::steady_clock::now();
    const auto deadline = start + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                      std::chrono::duration<double>(timeout));
    for (int polls = 0;; ++polls) {
      int done = 0;
      const int code = MPI_Test(&request, &done, MPI_STATUS_IGNORE);
      if (code != MPI_SUCCESS) {
        fail(call, "MPI_Test failed: " + mpi_error_text(code), false, true, true);
      }
      if (done) {
        // A request can also complete against a peer's request that the peer has given up
        // on (it failed in this very call): that is no success.
        if (poison_arrived() && peer_completed < call.seq) throw_poisoned(call, false);
        return;
      }
      if (poison_arrived()) {
        // A peer that failed after completing this call (its own work failed, not the call)
        // must not fail it here: a call every rank has reached stands, as with thread ranks.
        // Give the request a moment to complete; the next call reports the failure.
        if (peer_completed >= call.seq) {
          const auto grace = std::chrono::steady_clock::now() + std::chrono::milliseconds(500);
          while (std::chrono::steady_clock::now() < std::min(grace, deadline)) {
            if (MPI_Test(&request, &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && done) return;
            std::this_thread::yield();
          }
        }
        throw_poisoned(call, true);
      }
      // Peers usually arrive within microseconds; after that, give the core to them (ranks are
      // often oversubscribed on small machines) and look at the clock less often.
      if (polls > 200) {
        std::this_thread::yield();
        if (polls % 64 == 0 && std::chrono::steady_clock::now() >= deadline) {
          fail(call,
               detail::concat("timed out after ", timeout, " s waiting for the other ranks ", stage,
                              " (MPI does not say which rank is missing)"),
               true, true, true);
        }
      }
    }
  }

  // Every call starts here: the same-sized gather on every rank, whatever the op, so that any
  // disagreement is seen by all ranks in the same data.
  void agree(const Call& call) {
    // Calls run one after another: reaching this one means the previous one completed.
    completed = call.seq - 1;
    check_poison(call);
    const int W = size;
    const int words = kHeaderWords + 2 * W;
    descriptor.assign(static_cast<size_t>(words), 0);
    descriptor[0] = static_cast<int64_t>(call.seq);
    descriptor[1] = static_cast<int64_t>(call.op);
    descriptor[2] = static_cast<int64_t>(call.dtype);
    descriptor[3] = call.count;
    descriptor[4] = static_cast<int64_t>(call.reduce);
    descriptor[5] = call.root;
    descriptor[6] = call.check;
    if (call.op == Op::all_to_all_v) {
      std::copy_n(call.send_counts, W, descriptor.begin() + kHeaderWords);
      std::copy_n(call.recv_counts, W, descriptor.begin() + kHeaderWords + W);
    }
    gathered.assign(static_cast<size_t>(words) * static_cast<size_t>(W), 0);
    MPI_Request request;
    const int code = MPI_Iallgather(descriptor.data(), words, MPI_INT64_T, gathered.data(), words,
                                    MPI_INT64_T, data, &request);
    if (code != MPI_SUCCESS) {
      fail(call, "MPI_Iallgather failed: " + mpi_error_text(code), false, true, false);
    }
    wait(request, call, "to enter the call");
    std::vector<Call> calls(static_cast<size_t>(W));
    for (int r = 0; r < W; ++r) {
      const int64_t* d = gathered.data() + static_cast<size_t>(r) * static_cast<size_t>(words);
      Call& c = calls[static_cast<size_t>(r)];
      c.seq = static_cast<uint64_t>(d[0]);
      c.op = static_cast<Op>(d[1]);
      c.dtype = static_cast<DType>(d[2]);
      c.count = d[3];
      c.reduce = static_cast<ReduceOp>(d[4]);
      c.root = static_cast<int>(d[5]);
      c.check = d[6];
      c.send_counts = d + kHeaderWords;
      c.recv_counts = d + kHeaderWords + W;
    }
    const std::string problem = call_disagreement(calls);
    // Every rank saw the same descriptors and reaches the same verdict: no need to tell peers.
    if (!problem.empty()) fail(call, "ranks disagree on the call: " + problem, false, false, false);
  }

  // Starts a payload operation (`code` is what the MPI call returned) and waits for it.
  void finish(int code, MPI_Request& request, const Call& call, const char* mpi_call) {
    if (code != MPI_SUCCESS) {
      fail(call, detail::concat(mpi_call, " failed: ", mpi_error_text(code)), false, true, false);
    }
    wait(request, call, "to finish the call");
  }
};

MPIComm::MPIComm(MPI_Comm comm, double timeout_seconds) : state_(std::make_unique<State>()) {
  PYSWITCH_CHECK_ARG(std::isfinite(timeout_seconds) && timeout_seconds > 0,
                     "MPIComm: timeout must be finite and > 0 seconds, got ", timeout_seconds);
  PYSWITCH_CHECK_STATE(mpi_usable(),
                       "MPIComm: MPI is not initialised (or already finalised); initialise it "
                       "first (MPI_Init_thread, or import mpi4py.MPI)");
  PYSWITCH_CHECK_ARG(comm != MPI_COMM_NULL,
                     "MPIComm: comm must be a valid communicator, got "
                     "MPI_COMM_NULL");
  State& s = *state_;
  s.timeout = timeout_seconds;
  check_mpi(MPI_Comm_dup(comm, &s.data), "MPI_Comm_dup");
  check_mpi(MPI_Comm_dup(comm, &s.control), "MPI_Comm_dup");
  check_mpi(MPI_Comm_set_errhandler(s.data, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  check_mpi(MPI_Comm_set_errhandler(s.control, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  check_mpi(MPI_Comm_rank(s.data, &s.rank), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(s.data, &s.size), "MPI_Comm_size");
  check_mpi(MPI_Irecv(s.control_buffer.data(), kPoisonBytes, MPI_CHAR, MPI_ANY_SOURCE, kPoisonTag,
                      s.control, &s.control_recv),
            "MPI_Irecv");
}

MPIComm::~MPIComm() {
  State& s = *state_;
  if (!mpi_usable()) return;
  for (MPI_Request& request : s.poison_sends) {
    int done = 0;
    MPI_Test(&request, &done, MPI_STATUS_IGNORE);
    if (!done) MPI_Request_free(&request);  // a peer that never reads it must not block us
  }
  if (s.poisoned) return;  // see the header: the communicators are left to MPI's teardown
  if (s.control_recv != MPI_REQUEST_NULL) {
    MPI_Cancel(&s.control_recv);
    MPI_Wait(&s.control_recv, MPI_STATUS_IGNORE);  // local: a cancelled receive completes
  }
  MPI_Comm_free(&s.control);
  MPI_Comm_free(&s.data);
}

int MPIComm::rank() const {
  return state_->rank;
}
int MPIComm::size() const {
  return state_->size;
}
double MPIComm::timeout() const {
  return state_->timeout;
}
bool MPIComm::poisoned() const {
  return state_->poisoned;
}

void MPIComm::poison(const std::string& reason) {
  State& s = *state_;
  if (!s.poisoned) {
    s.poisoned = true;
    s.reason = detail::concat("rank ", s.rank, ": ", reason);
  }
  s.completed = s.seq;  // every call made so far has returned (or failed and told the peers)
  s.tell_peers(reason, false);
}

namespace {
Call make_call(uint64_t& seq, Op op, DType dtype, int64_t count, int64_t check) {
  Call c;
  c.seq = ++seq;
  c.op = op;
  c.dtype = dtype;
  c.count = count;
  c.check = check;
  return c;
}
}  // namespace

void MPIComm::all_to_all(const void* send, void* recv, int64_t count, DType dtype) {
  check_count("all_to_all", count);
  State& s = *state_;
  const Call call = make_call(s.seq, Op::all_to_all, dtype, count, take_call_check());
  s.agree(call);
  MPI_Request request;
  const Count n = to_count(count, "all_to_all");
  s.finish(PYSWITCH_MPI_C(MPI_Ialltoall)(send, n, mpi_type(dtype), recv, n, mpi_type(dtype), s.data,
                                         &request),
           request, call, "MPI_Ialltoall");
}

void MPIComm::all_to_all_v(const void* send, const int64_t* send_counts, const int64_t* send_displs,
                           void* recv, const int64_t* recv_counts, const int64_t* recv_displs,
                           DType dtype) {
  State& s = *state_;
  check_v_counts(s.size, send_counts, send_displs, recv_counts, recv_displs);
  Call call = make_call(s.seq, Op::all_to_all_v, dtype, 0, take_call_check());
  call.send_counts = send_counts;
  call.recv_counts = recv_counts;
  s.agree(call);
  std::vector<Count> sc(s.size), rc(s.size);
  std::vector<Displ> sd(s.size), rd(s.size);
  for (int q = 0; q < s.size; ++q) {
    sc[q] = to_count(send_counts[q], "all_to_all_v");
    rc[q] = to_count(recv_counts[q], "all_to_all_v");
    sd[q] = static_cast<Displ>(to_count(send_displs[q], "all_to_all_v"));
    rd[q] = static_cast<Displ>(to_count(recv_displs[q], "all_to_all_v"));
  }
  MPI_Request request;
  s.finish(PYSWITCH_MPI_C(MPI_Ialltoallv)(send, sc.data(), sd.data(), mpi_type(dtype), recv,
                                          rc.data(), rd.data(), mpi_type(dtype), s.data, &request),
           request, call, "MPI_Ialltoallv");
}

void MPIComm::all_reduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op) {
  check_count("all_reduce", count);
  check_mean("all_reduce", dtype, op);
  State& s = *state_;
  Call call = make_call(s.seq, Op::all_reduce, dtype, count, take_call_check());
  call.reduce = op;
  s.agree(call);
  // Reduce-scatter then all-gather, by blocks in the thread-rank backend's partition: rank q
  // reduces block q over the ranks in rank order, so every element is reduced exactly as there.
  const int W = s.size, me = s.rank;
  const int64_t es = dtype_size(dtype);
  const int64_t chunk = (count + W - 1) / W;
  std::vector<Count> block_count(W), mine_count(W);
  std::vector<Displ> block_first(W), mine_first(W);
  for (int q = 0; q < W; ++q) {
    const int64_t first = std::min(count, q * chunk);
    block_first[q] = static_cast<Displ>(first);
    block_count[q] = to_count(std::min(count, first + chunk) - first, "all_reduce");
  }
  const int64_t mine = static_cast<int64_t>(block_count[me]);
  for (int q = 0; q < W; ++q) {
    mine_count[q] = static_cast<Count>(mine);
    mine_first[q] = static_cast<Displ>(q * mine);
  }
  s.scratch.resize(static_cast<size_t>(W * mine * es));
  MPI_Request request;
  s.finish(PYSWITCH_MPI_C(MPI_Ialltoallv)(send, block_count.data(), block_first.data(),
                                          mpi_type(dtype), s.scratch.data(), mine_count.data(),
                                          mine_first.data(), mpi_type(dtype), s.data, &request),
           request, call, "MPI_Ialltoallv");
  std::vector<const void*> sources(W);
  for (int q = 0; q < W; ++q) sources[q] = s.scratch.data() + q * mine * es;
  char* out = static_cast<char*>(recv);
  reduce_range(sources, {out + static_cast<int64_t>(block_first[me]) * es}, 0, mine, dtype, op);
  s.finish(
      PYSWITCH_MPI_C(MPI_Iallgatherv)(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, recv, block_count.data(),
                                      block_first.data(), mpi_type(dtype), s.data, &request),
      request, call, "MPI_Iallgatherv");
}

void MPIComm::all_gather(const void* send, void* recv, int64_t count, DType dtype) {
  check_count("all_gather", count);
  State& s = *state_;
  const Call call = make_call(s.seq, Op::all_gather, dtype, count, take_call_check());
  s.agree(call);
  MPI_Request request;
  const Count n = to_count(count, "all_gather");
  s.finish(PYSWITCH_MPI_C(MPI_Iallgather)(send, n, mpi_type(dtype), recv, n, mpi_type(dtype),
                                          s.data, &request),
           request, call, "MPI_Iallgather");
}

void MPIComm::reduce_scatter(const void* send, void* recv, int64_t count, DType dtype,
                             ReduceOp op) {
  check_count("reduce_scatter", count);
  check_mean("reduce_scatter", dtype, op);
  State& s = *state_;
  Call call = make_call(s.seq, Op::reduce_scatter, dtype, count, take_call_check());
  call.reduce = op;
  s.agree(call);
  const int W = s.size;
  const int64_t es = dtype_size(dtype);
  s.scratch.resize(static_cast<size_t>(W * count * es));
  MPI_Request request;
  const Count n = to_count(count, "reduce_scatter");
  s.finish(PYSWITCH_MPI_C(MPI_Ialltoall)(send, n, mpi_type(dtype), s.scratch.data(), n,
                                         mpi_type(dtype), s.data, &request),
           request, call, "MPI_Ialltoall");
  std::vector<const void*> sources(W);
  for (int q = 0; q < W; ++q) sources[q] = s.scratch.data() + q * count * es;
  reduce_range(sources, {recv}, 0, count, dtype, op);
}

void MPIComm::broadcast(void* buffer, int64_t count, DType dtype, int root) {
  check_count("broadcast", count);
  State& s = *state_;
  PYSWITCH_CHECK_ARG(root >= 0 && root < s.size, "broadcast: root must be in [0, ", s.size,
                     "), got ", root);
  Call call = make_call(s.seq, Op::broadcast, dtype, count, take_call_check());
  call.root = root;
  s.agree(call);
  MPI_Request request;
  s.finish(PYSWITCH_MPI_C(MPI_Ibcast)(buffer, to_count(count, "broadcast"), mpi_type(dtype), root,
                                      s.data, &request),
           request, call, "MPI_Ibcast");
}

void MPIComm::barrier() {
  State& s = *state_;
  // The descriptor gather completes on a rank only once every rank has entered: a barrier.
  s.agree(make_call(s.seq, Op::barrier, DType::float32, 0, take_call_check()));
}

}  // namespace pyswitch::comm
