// The expert-parallel exchange layout (index math) and the row exchanges built on it; the layer
// that drives them is switch_layer.cpp.
#include "pyswitch/moe/ep_exchange.hpp"

#include <cstring>
#include <string>

#include "parallel.hpp"
#include "pyswitch/error.hpp"

namespace pyswitch::moe {
namespace {

// The per-rank element counts and displacements of a packed row exchange, both ways.
struct RowBlocks {
  std::vector<int64_t> send_counts, send_displs, recv_counts, recv_displs;
  int64_t send_elements = 0;
};

RowBlocks make_row_blocks(const int64_t* send_rows, const int64_t* recv_rows, int W,
                          int64_t row_elements) {
  RowBlocks b;
  b.send_counts.resize(W);
  b.send_displs.resize(W);
  b.recv_counts.resize(W);
  b.recv_displs.resize(W);
  b.send_elements = comm::packed_row_blocks(send_rows, W, row_elements, b.send_counts.data(),
                                            b.send_displs.data());
  comm::packed_row_blocks(recv_rows, W, row_elements, b.recv_counts.data(), b.recv_displs.data());
  return b;
}

void move_blocks(comm::Communicator& c, const void* send, void* recv, const RowBlocks& b,
                 DType dtype) {
  c.all_to_all_v(send, b.send_counts.data(), b.send_displs.data(), recv, b.recv_counts.data(),
                 b.recv_displs.data(), dtype);
}

}  // namespace

EpLayout make_ep_layout(const int64_t* counts, int W, int rank, int64_t E) {
  PYSWITCH_CHECK_ARG(W >= 1, "make_ep_layout: world_size must be >= 1, got ", W);
  PYSWITCH_CHECK_ARG(rank >= 0 && rank < W, "make_ep_layout: rank must be in [0, ", W, "), got ",
                     rank);
  PYSWITCH_CHECK_ARG(E >= 1 && E % W == 0, "make_ep_layout: num_experts must be a positive ",
                     "multiple of world_size=", W, ", got ", E);
  EpLayout x;
  x.world_size = W;
  x.num_experts = E;
  x.local_experts = E / W;
  x.first_expert = rank * x.local_experts;
  const int64_t E_local = x.local_experts;
  x.counts.assign(counts, counts + W * E);
  for (size_t i = 0; i < x.counts.size(); ++i) {
    PYSWITCH_CHECK_ARG(x.counts[i] >= 0, "make_ep_layout: rank ", i / E, " routed ", x.counts[i],
                       " rows to expert ", i % E);
  }

  // Rank w's row of counts covers experts 0..E-1; the block for rank v is its E_local experts.
  auto rows_of = [&](int w, int64_t e) { return x.counts[w * E + e]; };
  x.send_rows.assign(W, 0);
  x.recv_rows.assign(W, 0);
  x.local_offsets.assign(E_local + 1, 0);
  for (int w = 0; w < W; ++w) {
    for (int64_t e = 0; e < E_local; ++e) {
      x.send_rows[w] += rows_of(rank, w * E_local + e);
      const int64_t rows = rows_of(w, x.first_expert + e);
      x.recv_rows[w] += rows;
      x.local_offsets[e + 1] += rows;
    }
  }
  for (int64_t e = 0; e < E_local; ++e) x.local_offsets[e + 1] += x.local_offsets[e];
  // Where this rank's experts begin in the one-rank buffer: the expert-dropout draws are indexed
  // by that row, so that EP draws what one rank would.
  for (int w = 0; w < W; ++w) {
    for (int64_t e = 0; e < x.first_expert; ++e) x.first_row += rows_of(w, e);
  }
  return x;
}

void permute_rows(const EpLayout& x, int64_t row_bytes, const void* from, void* to,
                  bool to_expert_major) {
  // Each (rank, expert) pair is one contiguous block on both sides, so the permutation is a list
  // of block copies, planned serially and copied in parallel.
  struct Block {
    int64_t wire_row, expert_row, rows;
  };
  std::vector<Block> blocks;
  std::vector<int64_t> expert_at(x.local_offsets.begin(), x.local_offsets.end() - 1);
  int64_t wire_row = 0;
  for (int w = 0; w < x.world_size; ++w) {
    for (int64_t e = 0; e < x.local_experts; ++e) {
      const int64_t rows = x.counts[w * x.num_experts + x.first_expert + e];
      if (rows > 0) blocks.push_back({wire_row, expert_at[e], rows});
      wire_row += rows;
      expert_at[e] += rows;
    }
  }
  const char* src = static_cast<const char*>(from);
  char* dst = static_cast<char*>(to);
  detail::parallel_for(static_cast<int64_t>(blocks.size()), [&](int64_t i) {
    const Block& b = blocks[i];
    const int64_t from_row = to_expert_major ? b.wire_row : b.expert_row;
    const int64_t to_row = to_expert_major ? b.expert_row : b.wire_row;
    std::memcpy(dst + to_row * row_bytes, src + from_row * row_bytes, b.rows * row_bytes);
  });
}

void all_to_all_v_packed(comm::Communicator& c, const void* send, const int64_t* send_rows,
                         void* recv, const int64_t* recv_rows, int64_t row_elements, DType dtype) {
  move_blocks(c, send, recv, make_row_blocks(send_rows, recv_rows, c.size(), row_elements), dtype);
}

void exchange_rows(comm::Communicator& c, const EpLayout& x, int64_t row_elements, DType dtype,
                   const void* send, void* recv, bool to_owners) {
  const std::vector<int64_t>& out_rows = to_owners ? x.send_rows : x.recv_rows;
  const std::vector<int64_t>& in_rows = to_owners ? x.recv_rows : x.send_rows;
  all_to_all_v_packed(c, send, out_rows.data(), recv, in_rows.data(), row_elements, dtype);
}

void* all_to_all_v_rows(comm::Communicator& c, const void* send, const int64_t* send_rows,
                        int64_t row_elements, DType dtype, int64_t* recv_rows,
                        const std::function<void*(int64_t, int64_t)>& allocate) {
  // The counts step is an implementation detail of the caller's all_to_all_v: its failures are
  // reported under that name.
  try {
    c.all_to_all(send_rows, recv_rows, 1, DType::int64);
  } catch (const CommTimeout& e) {
    throw CommTimeout(std::string("all_to_all_v: ") + e.what());
  } catch (const CommError& e) {
    throw CommError(std::string("all_to_all_v: ") + e.what());
  }
  const int W = c.size();
  const RowBlocks blocks = make_row_blocks(send_rows, recv_rows, W, row_elements);
  int64_t received = 0;
  for (int w = 0; w < W; ++w) received += recv_rows[w];
  void* recv = allocate(received, blocks.send_elements);
  move_blocks(c, send, recv, blocks, dtype);
  return recv;
}

}  // namespace pyswitch::moe
