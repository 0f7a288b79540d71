// The collectives' shared pieces: the op names, the call agreement check, the rank-order
// reduction.
#include "comm/common.hpp"

#include <algorithm>

#include "pyswitch/bf16.hpp"
#include "pyswitch/error.hpp"

namespace pyswitch::comm {
namespace {

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

}  // namespace

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

int64_t packed_row_blocks(const int64_t* rows, int size, int64_t row_elements, int64_t* counts,
                          int64_t* displs) {
  int64_t at = 0;
  for (int w = 0; w < size; ++w) {
    PYSWITCH_CHECK_ARG(rows[w] >= 0, "all_to_all_v: row count ", w, " is negative (", rows[w], ")");
    counts[w] = rows[w] * row_elements;
    displs[w] = at;
    at += counts[w];
  }
  return at;
}

void check_count(const char* where, int64_t count) {
  PYSWITCH_CHECK_ARG(count >= 0, where, ": count must be >= 0, got ", count);
}

void check_mean(const char* where, DType dtype, ReduceOp op) {
  PYSWITCH_CHECK_ARG(!(op == ReduceOp::mean && !is_floating(dtype)), where,
                     ": op 'mean' needs a floating dtype, got ", dtype_name(dtype));
}

void check_v_counts(int size, const int64_t* send_counts, const int64_t* send_displs,
                    const int64_t* recv_counts, const int64_t* recv_displs) {
  for (int q = 0; q < size; ++q) {
    PYSWITCH_CHECK_ARG(
        send_counts[q] >= 0 && recv_counts[q] >= 0 && send_displs[q] >= 0 && recv_displs[q] >= 0,
        "all_to_all_v: counts and displacements must be >= 0, got send_counts[", q,
        "]=", send_counts[q], " recv_counts[", q, "]=", recv_counts[q]);
  }
}

std::string call_disagreement(const std::vector<Call>& calls) {
  const int world_size = static_cast<int>(calls.size());
  const Call& first = calls[0];
  for (int r = 0; r < world_size; ++r) {
    const Call& c = calls[static_cast<size_t>(r)];
    std::string problem;
    if (c.seq != first.seq) {
      problem =
          detail::concat("rank 0 is at call ", first.seq, " but rank ", r, " is at call ", c.seq);
    } else if (c.op != first.op) {
      problem = detail::concat("rank 0 called ", op_name(first.op), " but rank ", r, " called ",
                               op_name(c.op));
    } else if (c.dtype != first.dtype) {
      problem = detail::concat("rank 0 passed ", dtype_name(first.dtype), " but rank ", r,
                               " passed ", dtype_name(c.dtype));
    } else if (c.op != Op::all_to_all_v && c.count != first.count) {
      problem = detail::concat("rank 0 passed count ", first.count, " but rank ", r,
                               " passed count ", c.count);
    } else if (c.reduce != first.reduce && (c.op == Op::all_reduce || c.op == Op::reduce_scatter)) {
      problem = detail::concat("rank 0 passed op ", reduce_op_name(first.reduce), " but rank ", r,
                               " passed op ", reduce_op_name(c.reduce));
    } else if (c.root != first.root && c.op == Op::broadcast) {
      problem = detail::concat("rank 0 passed root ", first.root, " but rank ", r, " passed root ",
                               c.root);
    } else if (c.check != first.check) {
      problem = detail::concat("rank 0 and rank ", r, " passed arrays of different shapes (shape ",
                               "fingerprints ", first.check, " and ", c.check, ")");
    } else if (c.op == Op::all_to_all_v) {
      for (int q = 0; q < world_size && problem.empty(); ++q) {
        const int64_t sent = c.send_counts[q];
        const int64_t expected = calls[static_cast<size_t>(q)].recv_counts[r];
        if (sent != expected) {
          problem = detail::concat("rank ", r, " sends ", sent, " elements to rank ", q,
                                   ", which expects ", expected);
        }
      }
    }
    if (!problem.empty()) return problem;
  }
  return {};
}

void reduce_range(const std::vector<const void*>& sources, const std::vector<void*>& outputs,
                  int64_t first, int64_t n, DType dtype, ReduceOp op) {
  const int W = static_cast<int>(sources.size());
  constexpr int64_t kBlock = 1024;
  float acc_f[kBlock];
  int64_t acc_i[kBlock];
  for (int64_t b = first; b < first + n; b += kBlock) {
    const int64_t m = std::min(kBlock, first + n - b);
    switch (dtype) {
      case DType::float32:
      case DType::bfloat16: {
        // Branches outside the element loops, so that the compiler vectorises them.
        auto load = [&](int r, float* dst) {
          if (dtype == DType::float32) {
            std::copy_n(static_cast<const float*>(sources[r]) + b, m, dst);
          } else {
            const bf16* src = static_cast<const bf16*>(sources[r]) + b;
            for (int64_t i = 0; i < m; ++i) dst[i] = bf16_to_float(src[i]);
          }
        };
        float next[kBlock];
        load(0, acc_f);
        for (int r = 1; r < W; ++r) {
          load(r, next);
          if (op == ReduceOp::max) {
            for (int64_t i = 0; i < m; ++i) acc_f[i] = combine(acc_f[i], next[i], ReduceOp::max);
          } else if (op == ReduceOp::min) {
            for (int64_t i = 0; i < m; ++i) acc_f[i] = combine(acc_f[i], next[i], ReduceOp::min);
          } else {
            for (int64_t i = 0; i < m; ++i) acc_f[i] += next[i];
          }
        }
        if (op == ReduceOp::mean) {
          const float ranks = static_cast<float>(W);
          for (int64_t i = 0; i < m; ++i) acc_f[i] = acc_f[i] / ranks;
        }
        for (void* out : outputs) {
          if (dtype == DType::float32) {
            std::copy_n(acc_f, m, static_cast<float*>(out) + b);
          } else {
            bf16* dst = static_cast<bf16*>(out) + b;
            for (int64_t i = 0; i < m; ++i) dst[i] = float_to_bf16(acc_f[i]);
          }
        }
        break;
      }
      case DType::int32:
      case DType::int64: {
        auto load = [&](int r, int64_t i) -> int64_t {
          return dtype == DType::int32 ? static_cast<const int32_t*>(sources[r])[i]
                                       : static_cast<const int64_t*>(sources[r])[i];
        };
        for (int64_t i = 0; i < m; ++i) acc_i[i] = load(0, b + i);
        for (int r = 1; r < W; ++r) {
          for (int64_t i = 0; i < m; ++i) {
            const int64_t v = load(r, b + i);
            if (op == ReduceOp::sum) {
              acc_i[i] = dtype == DType::int32
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
            if (dtype == DType::int32) {
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

}  // namespace pyswitch::comm
