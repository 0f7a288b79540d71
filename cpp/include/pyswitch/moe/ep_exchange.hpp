/// @file moe/ep_exchange.hpp
/// The expert-parallel exchange layout: which rows go to which rank and where they land, as
/// plain index math (testable without a communicator), plus the row exchanges built on it.
/// Not the routing (router.hpp) nor the layer (switch_layer.hpp).
///
/// Terms. W ranks hold E experts, E % W == 0, rank r owning experts [r*E/W, (r+1)*E/W). Every
/// rank's packed dispatch buffer holds its rows expert by expert (all E experts). The "wire"
/// buffer of rank r holds, from each rank w in rank order, w's rows for r's experts in expert
/// order: what one all_to_all_v of the packed buffers delivers. The "expert-major" buffer holds
/// r's experts one after another, and inside each expert the rows rank by rank: the order of a
/// one-rank layer whose groups come in rank order (SPEC section 3), which keeps EP bit-identical.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "pyswitch/comm/communicator.hpp"
#include "pyswitch/tensor.hpp"

namespace pyswitch::moe {

/// The layout of one exchange, the same on every rank except for the rank-relative fields.
struct EpLayout {
  int world_size = 1;                  ///< W
  int64_t num_experts = 0;             ///< E, all ranks together
  int64_t local_experts = 0;           ///< E / W
  int64_t first_expert = 0;            ///< rank * E / W
  std::vector<int64_t> counts;         ///< (W, E): rows rank w routed to expert e (after capacity)
  std::vector<int64_t> send_rows;      ///< (W): rows this rank sends to rank w (its packed buffer)
  std::vector<int64_t> recv_rows;      ///< (W): rows this rank receives from rank w (its wire)
  std::vector<int64_t> local_offsets;  ///< (E/W + 1): expert e's rows start here, expert-major
  int64_t first_row = 0;  ///< rows of experts before first_expert in the one-rank buffer
};

/// Builds the layout from every rank's per-expert row counts: counts (W, E) int64, row w is rank
/// w's (all ranks pass the same array, e.g. from an all_gather). Pure index math, thread-safe.
/// Throws InvalidArgument for W < 1, rank outside [0, W), E < 1, E % W != 0 or a negative count.
EpLayout make_ep_layout(const int64_t* counts, int world_size, int rank, int64_t num_experts);

/// Moves whole rows of row_bytes bytes between the wire order (from rank to rank) and the
/// expert-major order of `layout`: to_expert_major = true reads `from` as wire and writes `to`
/// expert-major, false the reverse. Both buffers hold local_offsets.back() rows, do not overlap
/// and are owned by the caller. Multi-threaded, deterministic (rows are only copied).
void permute_rows(const EpLayout& layout, int64_t row_bytes, const void* from, void* to,
                  bool to_expert_major);

/// One all_to_all_v of rows of row_elements elements of dtype, packed in rank order on both
/// sides: send holds sum(send_rows) rows, block w going to rank w; recv receives sum(recv_rows)
/// rows, block w from rank w. send_rows, recv_rows: (W). Collective (every rank calls it, with
/// counts that agree pairwise). Throws InvalidArgument for a negative row count, CommError /
/// CommTimeout as the communicator does.
void all_to_all_v_packed(comm::Communicator& comm, const void* send, const int64_t* send_rows,
                         void* recv, const int64_t* recv_rows, int64_t row_elements, DType dtype);

/// The layer's exchange on `layout`: to_owners = true sends this rank's packed buffer (rows for
/// every expert) and receives its experts' rows in wire order; false sends the wire back and
/// receives the packed buffer. Collective; errors as all_to_all_v_packed.
void exchange_rows(comm::Communicator& comm, const EpLayout& layout, int64_t row_elements,
                   DType dtype, const void* send, void* recv, bool to_owners);

/// Counts, then rows: for receivers that do not know what comes. The row counts travel first
/// (one int64 all_to_all, carrying the communicator's next call check, if set); then
/// allocate(received rows, elements sent) returns the receive buffer (that many rows, owned by
/// the caller; the second argument lets the caller check its send buffer before any row moves)
/// and the rows move as in all_to_all_v_packed. send_rows (W) and recv_rows (W, written) are
/// the caller's. A CommError or CommTimeout of the counts step is rethrown with the prefix
/// "all_to_all_v: ", the name of the call the caller made. After a CommError the MPI backend may
/// still write into recv_rows and the receive buffer: a caller that frees memory on failure
/// must leak them instead. Collective. Throws InvalidArgument for a negative row count (after
/// the counts step). Returns the receive buffer.
void* all_to_all_v_rows(comm::Communicator& comm, const void* send, const int64_t* send_rows,
                        int64_t row_elements, DType dtype, int64_t* recv_rows,
                        const std::function<void*(int64_t, int64_t)>& allocate);

}  // namespace pyswitch::moe
