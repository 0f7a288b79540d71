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

#include "pyswitch/bf16.hpp"
#include "pyswitch/error.hpp"

namespace pyswitch::comm {

int64_t comm_dtype_size(CommDType dtype) {
  switch (dtype) {
    case CommDType::float32:
    case CommDType::int32:
      return 4;
    case CommDType::bfloat16:
      return 2;
    case CommDType::int64:
      return 8;
  }
  return 0;
}

const char* comm_dtype_name(CommDType dtype) {
  switch (dtype) {
    case CommDType::float32:
      return "float32";
    case CommDType::bfloat16:
      return "bfloat16";
    case CommDType::int32:
      return "int32";
    case CommDType::int64:
      return "int64";
  }
  return "unknown";
}

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
      return "sum";
    case ReduceOp::max:
      return "max";
    case ReduceOp::min:
      return "min";
    case ReduceOp::mean:
      return "mean";
  }
  return "unknown";
}

namespace {

enum class Op {
  all_to_all,
  all_to_all_v,
  all_reduce,
  all_gather,
  reduce_scatter,
  broadcast,
  barrier
};

const char* op_name(Op op) {
  switch (op) {
    case Op::all_to_all:
      return "all_to_all";
    case Op::all_to_all_v:
      return "all_to_all_v";
    case Op::all_reduce:
      return "all_reduce";
    case Op::all_gather:
      return "all_gather";
    case Op::reduce_scatter:
      return "reduce_scatter";
    case Op::broadcast:
      return "broadcast";
    case Op::barrier:
      return "barrier";
  }
  return "unknown";
}

// What one rank posted for one call.
struct Call {
  uint64_t seq = 0;
  Op op = Op::barrier;
  CommDType dtype = CommDType::float32;
  ReduceOp reduce = ReduceOp::sum;
  int64_t count = 0;
  int root = 0;
  const void* send = nullptr;
  void* recv = nullptr;
  const int64_t* send_counts = nullptr;
  const int64_t* send_displs = nullptr;
  const int64_t* recv_counts = nullptr;
  const int64_t* recv_displs = nullptr;
};

// Reduction of element i of every rank's buffer, in rank order, accumulated in T.
template <typename T>
T combine(T a, T b, ReduceOp op) {
  switch (op) {
    case ReduceOp::max:
      return b > a ? b : a;
    case ReduceOp::min:
      return b < a ? b : a;
    default:
      return a + b;
  }
}

// Integers wrap around (two's complement) instead of overflowing into undefined behaviour.
template <typename T, typename U>
T add_wrapping(T a, T b) {
  return static_cast<T>(static_cast<U>(a) + static_cast<U>(b));
}

// dst[i] for i in [first, first + n) = reduction over ranks of sources[r][i].
void reduce_range(const std::vector<const void*>& sources, const std::vector<void*>& outputs,
                  int64_t first, int64_t n, CommDType dtype, ReduceOp op) {
  const int W = static_cast<int>(sources.size());
  constexpr int64_t kBlock = 1024;
  float acc_f[kBlock];
  int64_t acc_i[kBlock];
  for (int64_t b = first; b < first + n; b += kBlock) {
    const int64_t m = std::min(kBlock, first + n - b);
    switch (dtype) {
      case CommDType::float32:
      case CommDType::bfloat16: {
        auto load = [&](int r, int64_t i) {
          return dtype == CommDType::float32
                     ? static_cast<const float*>(sources[r])[i]
                     : bf16_to_float(static_cast<const bf16*>(sources[r])[i]);
        };
        for (int64_t i = 0; i < m; ++i) acc_f[i] = load(0, b + i);
        for (int r = 1; r < W; ++r) {
          for (int64_t i = 0; i < m; ++i) acc_f[i] = combine(acc_f[i], load(r, b + i), op);
        }
        if (op == ReduceOp::mean) {
          for (int64_t i = 0; i < m; ++i) acc_f[i] = acc_f[i] / static_cast<float>(W);
        }
        for (void* out : outputs) {
          for (int64_t i = 0; i < m; ++i) {
            if (dtype == CommDType::float32) {
              static_cast<float*>(out)[b + i] = acc_f[i];
            } else {
              static_cast<bf16*>(out)[b + i] = float_to_bf16(acc_f[i]);
            }
          }
        }
        break;
      }
      case CommDType::int32:
      case CommDType::int64: {
        auto load = [&](int r, int64_t i) -> int64_t {
          return dtype == CommDType::int32 ? static_cast<const int32_t*>(sources[r])[i]
                                           : static_cast<const int64_t*>(sources[r])[i];
        };
        for (int64_t i = 0; i < m; ++i) acc_i[i] = load(0, b + i);
        for (int r = 1; r < W; ++r) {
          for (int64_t i = 0; i < m; ++i) {
            const int64_t v = load(r, b + i);
            if (op == ReduceOp::sum) {
              acc_i[i] = dtype == CommDType::int32
                             ? add_wrapping<int32_t, uint32_t>(static_cast<int32_t>(acc_i[i]),
                                                               static_cast<int32_t>(v))
                             : add_wrapping<int64_t, uint64_t>(acc_i[i], v);
            } else {
              acc_i[i] = combine(acc_i[i], v, op);
            }
          }
        }
        for (void* out : outputs) {
          for (int64_t i = 0; i < m; ++i) {
            if (dtype == CommDType::int32) {
              static_cast<int32_t*>(out)[b + i] = static_cast<int32_t>(acc_i[i]);
            } else {
              static_cast<int64_t*>(out)[b + i] = acc_i[i];
            }
          }
        }
        break;
      }
    }
  }
}

}  // namespace

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
    std::lock_guard<std::mutex> lock(mutex_);
    if (!poisoned_) {
      poisoned_ = true;
      poison_reason_ = reason;
    }
    cv_.notify_all();
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
    const Call& first = calls_[0];
    for (int r = 0; r < world_size_; ++r) {
      const Call& c = calls_[static_cast<size_t>(r)];
      std::string problem;
      if (c.op != first.op) {
        problem = detail::concat("rank 0 called ", op_name(first.op), " but rank ", r, " called ",
                                 op_name(c.op));
      } else if (c.dtype != first.dtype) {
        problem = detail::concat("rank 0 passed ", comm_dtype_name(first.dtype), " but rank ", r,
                                 " passed ", comm_dtype_name(c.dtype));
      } else if (c.op != Op::all_to_all_v && c.count != first.count) {
        problem = detail::concat("rank 0 passed count ", first.count, " but rank ", r,
                                 " passed count ", c.count);
      } else if (c.reduce != first.reduce &&
                 (c.op == Op::all_reduce || c.op == Op::reduce_scatter)) {
        problem = detail::concat("rank 0 passed op ", reduce_op_name(first.reduce), " but rank ", r,
                                 " passed op ", reduce_op_name(c.reduce));
      } else if (c.root != first.root && c.op == Op::broadcast) {
        problem = detail::concat("rank 0 passed root ", first.root, " but rank ", r,
                                 " passed root ", c.root);
      } else if (c.op == Op::all_to_all_v) {
        for (int q = 0; q < world_size_ && problem.empty(); ++q) {
          const int64_t sent = c.send_counts[q];
          const int64_t expected = calls_[static_cast<size_t>(q)].recv_counts[r];
          if (sent != expected) {
            problem = detail::concat("rank ", r, " sends ", sent, " elements to rank ", q,
                                     ", which expects ", expected);
          }
        }
      }
      if (!problem.empty()) fail(mine, rank, problem, false);
    }
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

  void all_to_all(const void* send, void* recv, int64_t count, CommDType dtype) override {
    check_count("all_to_all", count);
    const int64_t bytes = count * comm_dtype_size(dtype);
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
                    CommDType dtype) override {
    for (int q = 0; q < size(); ++q) {
      PYSWITCH_CHECK_ARG(
          send_counts[q] >= 0 && recv_counts[q] >= 0 && send_displs[q] >= 0 && recv_displs[q] >= 0,
          "all_to_all_v: counts and displacements must be >= 0, got send_counts[", q,
          "]=", send_counts[q], " recv_counts[", q, "]=", recv_counts[q]);
    }
    const int64_t es = comm_dtype_size(dtype);
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

  void all_reduce(const void* send, void* recv, int64_t count, CommDType dtype,
                  ReduceOp op) override {
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

  void all_gather(const void* send, void* recv, int64_t count, CommDType dtype) override {
    check_count("all_gather", count);
    const int64_t bytes = count * comm_dtype_size(dtype);
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

  void reduce_scatter(const void* send, void* recv, int64_t count, CommDType dtype,
                      ReduceOp op) override {
    check_count("reduce_scatter", count);
    check_mean("reduce_scatter", dtype, op);
    const int64_t es = comm_dtype_size(dtype);
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

  void broadcast(void* buffer, int64_t count, CommDType dtype, int root) override {
    check_count("broadcast", count);
    PYSWITCH_CHECK_ARG(root >= 0 && root < size(), "broadcast: root must be in [0, ", size(),
                       "), got ", root);
    Call c = make(Op::broadcast, dtype, count);
    c.recv = buffer;
    c.root = root;
    state_->run(rank_, c, [&](const std::vector<Call>& calls) {
      if (rank_ != root) {
        std::memcpy(buffer, calls[static_cast<size_t>(root)].recv,
                    static_cast<size_t>(count * comm_dtype_size(dtype)));
      }
    });
  }

  void barrier() override {
    state_->run(rank_, make(Op::barrier, CommDType::float32, 0), [](const std::vector<Call>&) {});
  }

 private:
  Call make(Op op, CommDType dtype, int64_t count) {
    Call c;
    c.seq = ++seq_;
    c.op = op;
    c.dtype = dtype;
    c.count = count;
    return c;
  }
  static void check_count(const char* where, int64_t count) {
    PYSWITCH_CHECK_ARG(count >= 0, where, ": count must be >= 0, got ", count);
  }
  static void check_mean(const char* where, CommDType dtype, ReduceOp op) {
    PYSWITCH_CHECK_ARG(
        !(op == ReduceOp::mean && (dtype == CommDType::int32 || dtype == CommDType::int64)), where,
        ": op 'mean' needs a floating dtype, got ", comm_dtype_name(dtype));
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
