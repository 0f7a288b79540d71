// Thread-rank collectives: a two-phase rendezvous per call (post + check, then compute and
// wait until every rank is done reading), with timeouts and group poisoning.
#include "pyswitch/comm/local.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "comm/common.hpp"
#include "pyswitch/bf16.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/log.hpp"

namespace pyswitch::comm {

class LocalGroupState {
 public:
  LocalGroupState(int world_size, double timeout)
      : world_size_(world_size),
        timeout_(timeout),
        calls_(static_cast<size_t>(world_size)),
        posted_(static_cast<size_t>(world_size), 0),
        done_(static_cast<size_t>(world_size), 0) {}

  int size() const { return world_size_; }
  double timeout() const { return timeout_; }

  void poison(const std::string& reason) {
    bool first = false;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!poisoned_) {
        poisoned_ = true;
        poison_reason_ = reason;
        first = true;
      }
      cv_.notify_all();
    }
    // Outside the lock: a host's log callback must never run while the group's mutex is held.
    if (first) log_message(LogLevel::info, "thread-rank group poisoned: " + reason);
  }
  bool poisoned() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return poisoned_;
  }

  // Runs one collective for `rank`: rendezvous, check, compute(calls), wait for all readers.
  template <typename Compute>
  void run(int rank, Call call, Compute&& compute) {
    std::unique_lock<std::mutex> lock(mutex_);
    throw_if_poisoned(call, rank);
    calls_[static_cast<size_t>(rank)] = call;
    posted_[static_cast<size_t>(rank)] = call.seq;
    cv_.notify_all();
    wait_all(lock, posted_, call, rank, "to enter");
    check_agreement(call, rank);
    lock.unlock();
    try {
      compute(calls_);
    } catch (const std::exception& e) {
      poison(detail::concat(op_name(call.op), " (call ", call.seq, ") failed on rank ", rank, ": ",
                            e.what()));
      throw;
    }
    lock.lock();
    done_[static_cast<size_t>(rank)] = call.seq;
    cv_.notify_all();
    wait_all(lock, done_, call, rank, "to finish");
  }

 private:
  [[noreturn]] void fail(const Call& call, int rank, const std::string& what, bool timeout) {
    const std::string message = detail::concat(op_name(call.op), " (call ", call.seq, ", rank ",
                                               rank, " of ", world_size_, "): ", what);
    if (!poisoned_) {
      poisoned_ = true;
      poison_reason_ = message;
      poisoned_by_timeout_ = timeout;
    }
    cv_.notify_all();
    if (timeout) throw CommTimeout(message);
    throw CommError(message);
  }

  void throw_if_poisoned(const Call& call, int rank) {
    if (poisoned_) {
      throw CommError(detail::concat(op_name(call.op), " (call ", call.seq, ", rank ", rank, " of ",
                                     world_size_, "): the group has failed: ", poison_reason_));
    }
  }

  void wait_all(std::unique_lock<std::mutex>& lock, const std::vector<uint64_t>& stage,
                const Call& call, int rank, const char* what) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(timeout_));
    auto everyone_there = [&] {
      return std::all_of(stage.begin(), stage.end(), [&](uint64_t s) { return s >= call.seq; });
    };
    // Peers usually arrive within microseconds: poll briefly before sleeping on the condition
    // variable, whose wake-up costs tens of microseconds on every call.
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    while (!poisoned_ && !everyone_there() && std::chrono::steady_clock::now() < spin_until) {
      lock.unlock();
      std::this_thread::yield();
      lock.lock();
    }
    const bool ok = cv_.wait_until(lock, deadline, [&] { return poisoned_ || everyone_there(); });
    // A call every rank has reached stands, even if the group failed a moment later.
    if (everyone_there()) return;
    if (!ok) {
      std::ostringstream missing;
      for (int r = 0; r < world_size_; ++r) {
        if (stage[static_cast<size_t>(r)] < call.seq) missing << (missing.tellp() ? ", " : "") << r;
      }
      fail(call, rank,
           detail::concat("timed out after ", timeout_, " s waiting for rank(s) ", missing.str(),
                          " ", what),
           /*timeout=*/true);
    }
    // Woken by a failure elsewhere: a timeout stays a timeout for every rank that was waiting.
    const std::string message =
        detail::concat(op_name(call.op), " (call ", call.seq, ", rank ", rank, " of ", world_size_,
                       "): the group has failed: ", poison_reason_);
    if (poisoned_by_timeout_) throw CommTimeout(message);
    throw CommError(message);
  }

  // Every rank checks every posted call against rank 0's, so all ranks throw together.
  void check_agreement(const Call& mine, int rank) {
    const std::string problem = call_disagreement(calls_);
    if (!problem.empty()) fail(mine, rank, problem, false);
  }

  const int world_size_;
  const double timeout_;
  mutable std::mutex mutex_;
  std::condition_variable cv_;
  std::vector<Call> calls_;
  std::vector<uint64_t> posted_, done_;
  bool poisoned_ = false;
  bool poisoned_by_timeout_ = false;
  std::string poison_reason_;
};

namespace {

class LocalComm final : public Communicator {
 public:
  LocalComm(std::shared_ptr<LocalGroupState> state, int rank)
      : state_(std::move(state)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return state_->size(); }
  double timeout() const override { return state_->timeout(); }
  void poison(const std::string& reason) override { state_->poison(reason); }

  void all_to_all(const void* send, void* recv, int64_t count, DType dtype) override {
    check_count("all_to_all", count);
    const int64_t bytes = count * dtype_size(dtype);
    Call c = make(Op::all_to_all, dtype, count);
    c.send = send;
    c.recv = recv;
    state_->run(rank_, c, [&](const std::vector<Call>& calls) {
      for (int q = 0; q < size(); ++q) {
        std::memcpy(static_cast<char*>(recv) + q * bytes,
                    static_cast<const char*>(calls[static_cast<size_t>(q)].send) + rank_ * bytes,
                    static_cast<size_t>(bytes));
      }
    });
  }

  void all_to_all_v(const void* send, const int64_t* send_counts, const int64_t* send_displs,
                    void* recv, const int64_t* recv_counts, const int64_t* recv_displs,
                    DType dtype) override {
    check_v_counts(size(), send_counts, send_displs, recv_counts, recv_displs);
    const int64_t es = dtype_size(dtype);
    Call c = make(Op::all_to_all_v, dtype, 0);
    c.send = send;
    c.recv = recv;
    c.send_counts = send_counts;
    c.send_displs = send_displs;
    c.recv_counts = recv_counts;
    c.recv_displs = recv_displs;
    state_->run(rank_, c, [&](const std::vector<Call>& calls) {
      for (int q = 0; q < size(); ++q) {
        const Call& peer = calls[static_cast<size_t>(q)];
        std::memcpy(static_cast<char*>(recv) + recv_displs[q] * es,
                    static_cast<const char*>(peer.send) + peer.send_displs[rank_] * es,
                    static_cast<size_t>(recv_counts[q] * es));
      }
    });
  }

  void all_reduce(const void* send, void* recv, int64_t count, DType dtype, ReduceOp op) override {
    check_count("all_reduce", count);
    check_mean("all_reduce", dtype, op);
    Call c = make(Op::all_reduce, dtype, count);
    c.send = send;
    c.recv = recv;
    c.reduce = op;
    state_->run(rank_, c, [&](const std::vector<Call>& calls) {
      // Rank r reduces chunk r of every element range and writes it to every rank's output;
      // each chunk reads all its inputs before writing, so in-place calls are safe.
      std::vector<const void*> sources;
      std::vector<void*> outputs;
      for (const Call& peer : calls) {
        sources.push_back(peer.send);
        outputs.push_back(peer.recv);
      }
      const int64_t chunk = (count + size() - 1) / size();
      const int64_t first = std::min(count, rank_ * chunk);
      const int64_t n = std::min(count, first + chunk) - first;
      reduce_range(sources, outputs, first, n, dtype, op);
    });
  }

  void all_gather(const void* send, void* recv, int64_t count, DType dtype) override {
    check_count("all_gather", count);
    const int64_t bytes = count * dtype_size(dtype);
    Call c = make(Op::all_gather, dtype, count);
    c.send = send;
    c.recv = recv;
    state_->run(rank_, c, [&](const std::vector<Call>& calls) {
      for (int q = 0; q < size(); ++q) {
        std::memcpy(static_cast<char*>(recv) + q * bytes, calls[static_cast<size_t>(q)].send,
                    static_cast<size_t>(bytes));
      }
    });
  }

  void reduce_scatter(const void* send, void* recv, int64_t count, DType dtype,
                      ReduceOp op) override {
    check_count("reduce_scatter", count);
    check_mean("reduce_scatter", dtype, op);
    const int64_t es = dtype_size(dtype);
    Call c = make(Op::reduce_scatter, dtype, count);
    c.send = send;
    c.recv = recv;
    c.reduce = op;
    state_->run(rank_, c, [&](const std::vector<Call>& calls) {
      std::vector<const void*> sources;
      for (const Call& peer : calls) {
        sources.push_back(static_cast<const char*>(peer.send) + rank_ * count * es);
      }
      reduce_range(sources, {recv}, 0, count, dtype, op);
    });
  }

  void broadcast(void* buffer, int64_t count, DType dtype, int root) override {
    check_count("broadcast", count);
    PYSWITCH_CHECK_ARG(root >= 0 && root < size(), "broadcast: root must be in [0, ", size(),
                       "), got ", root);
    Call c = make(Op::broadcast, dtype, count);
    c.recv = buffer;
    c.root = root;
    state_->run(rank_, c, [&](const std::vector<Call>& calls) {
      if (rank_ != root) {
        std::memcpy(buffer, calls[static_cast<size_t>(root)].recv,
                    static_cast<size_t>(count * dtype_size(dtype)));
      }
    });
  }

  void barrier() override {
    state_->run(rank_, make(Op::barrier, DType::float32, 0), [](const std::vector<Call>&) {});
  }

 private:
  Call make(Op op, DType dtype, int64_t count) {
    Call c;
    c.seq = ++seq_;
    c.op = op;
    c.dtype = dtype;
    c.count = count;
    c.check = take_call_check();
    return c;
  }
  std::shared_ptr<LocalGroupState> state_;
  int rank_;
  uint64_t seq_ = 0;
};

}  // namespace

struct LocalGroupComms {
  std::vector<std::unique_ptr<LocalComm>> comms;
};

LocalGroup::LocalGroup(int world_size, double timeout_seconds) {
  PYSWITCH_CHECK_ARG(world_size >= 1, "LocalGroup: world_size must be >= 1, got ", world_size);
  PYSWITCH_CHECK_ARG(std::isfinite(timeout_seconds) && timeout_seconds > 0,
                     "LocalGroup: timeout must be finite and > 0 seconds, got ", timeout_seconds);
  state_ = std::make_shared<LocalGroupState>(world_size, timeout_seconds);
  comms_ = std::make_unique<LocalGroupComms>();
  for (int r = 0; r < world_size; ++r) {
    comms_->comms.push_back(std::make_unique<LocalComm>(state_, r));
  }
}

LocalGroup::~LocalGroup() = default;

int LocalGroup::size() const {
  return state_->size();
}

Communicator& LocalGroup::comm(int rank) {
  PYSWITCH_CHECK_ARG(rank >= 0 && rank < size(), "LocalGroup.comm: rank must be in [0, ", size(),
                     "), got ", rank);
  return *comms_->comms[static_cast<size_t>(rank)];
}

void LocalGroup::poison(const std::string& reason) {
  state_->poison(reason);
}
bool LocalGroup::poisoned() const {
  return state_->poisoned();
}

}  // namespace pyswitch::comm
