// The expert-parallel exchange layout against a plainly written reference: every rank's rows
// tagged, moved as the all_to_all_v would move them, and compared with the one-rank buffer.
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "harness.hpp"
#include "pyswitch/comm/local.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/moe/ep_exchange.hpp"

using namespace pyswitch;
using namespace pyswitch::moe;

namespace {

// A row is identified by (source rank, expert, index within that rank's rows for the expert),
// written into its bytes so that a misplaced row shows.
struct Tag {
  int64_t rank, expert, index;
  bool operator==(const Tag& o) const {
    return rank == o.rank && expert == o.expert && index == o.index;
  }
};

struct Case {
  int W;
  int64_t E;
  std::vector<int64_t> counts;  // (W, E)
};

int64_t count_at(const Case& c, int64_t w, int64_t e) {
  return c.counts[w * c.E + e];
}

// Rank w's packed dispatch buffer: its rows expert by expert.
std::vector<Tag> packed_buffer(const Case& c, int64_t w) {
  std::vector<Tag> rows;
  for (int64_t e = 0; e < c.E; ++e) {
    for (int64_t i = 0; i < count_at(c, w, e); ++i) rows.push_back({w, e, i});
  }
  return rows;
}

// The one-rank layer's buffer over the groups in rank order: expert by expert, rank by rank.
std::vector<Tag> one_rank_buffer(const Case& c) {
  std::vector<Tag> rows;
  for (int64_t e = 0; e < c.E; ++e) {
    for (int64_t w = 0; w < c.W; ++w) {
      for (int64_t i = 0; i < count_at(c, w, e); ++i) rows.push_back({w, e, i});
    }
  }
  return rows;
}

// Rank r's wire: from every rank in rank order, its rows for r's experts.
std::vector<Tag> wire_buffer(const Case& c, int64_t r) {
  const int64_t El = c.E / c.W;
  std::vector<Tag> rows;
  for (int64_t w = 0; w < c.W; ++w) {
    for (const Tag& t : packed_buffer(c, w)) {
      if (t.expert >= r * El && t.expert < (r + 1) * El) rows.push_back(t);
    }
  }
  return rows;
}

constexpr int64_t kRowInts = 3;
std::vector<int32_t> encode(const std::vector<Tag>& rows) {
  std::vector<int32_t> out;
  for (const Tag& t : rows) {
    out.push_back(static_cast<int32_t>(t.rank));
    out.push_back(static_cast<int32_t>(t.expert));
    out.push_back(static_cast<int32_t>(t.index));
  }
  return out;
}

void check_case(const Case& c) {
  const int64_t El = c.E / c.W;
  const std::vector<Tag> one_rank = one_rank_buffer(c);
  std::vector<EpLayout> layouts;
  for (int r = 0; r < c.W; ++r) layouts.push_back(make_ep_layout(c.counts.data(), c.W, r, c.E));
  for (int r = 0; r < c.W; ++r) {
    const EpLayout& x = layouts[r];
    CHECK_EQ(x.world_size, c.W);
    CHECK_EQ(x.local_experts, El);
    CHECK_EQ(x.first_expert, r * El);
    CHECK(x.counts == c.counts);
    // What r sends to w is w's experts' share of r's packed buffer, and w expects exactly that.
    for (int w = 0; w < c.W; ++w) {
      int64_t to_w = 0;
      for (const Tag& t : packed_buffer(c, r)) to_w += t.expert / El == w;
      CHECK_EQ(x.send_rows[w], to_w);
      CHECK_EQ(x.recv_rows[w], layouts[w].send_rows[r]);
    }
    const std::vector<Tag> wire = wire_buffer(c, r);
    int64_t received = 0;
    for (int64_t n : x.recv_rows) received += n;
    CHECK_EQ(received, static_cast<int64_t>(wire.size()));
    CHECK_EQ(x.local_offsets.back(), static_cast<int64_t>(wire.size()));

    // The expert-major buffer is the one-rank buffer's slice for r's experts, from first_row.
    int64_t first_row = 0;
    while (first_row < static_cast<int64_t>(one_rank.size()) &&
           one_rank[first_row].expert < r * El) {
      ++first_row;
    }
    CHECK_EQ(x.first_row, first_row);
    const std::vector<Tag> expert_major(one_rank.begin() + first_row,
                                        one_rank.begin() + first_row + wire.size());
    for (int64_t e = 0; e <= El; ++e) {
      int64_t before = 0;
      for (const Tag& t : expert_major) before += t.expert < r * El + e;
      CHECK_EQ(x.local_offsets[e], before);
    }

    const std::vector<int32_t> wire_bytes = encode(wire), expert_bytes = encode(expert_major);
    std::vector<int32_t> permuted(wire_bytes.size(), -1), back(wire_bytes.size(), -1);
    permute_rows(x, kRowInts * sizeof(int32_t), wire_bytes.data(), permuted.data(), true);
    CHECK(permuted == expert_bytes);
    permute_rows(x, kRowInts * sizeof(int32_t), permuted.data(), back.data(), false);
    CHECK(back == wire_bytes);
  }
}

}  // namespace

TEST(ep_exchange_layout_cases) {
  check_case({1, 1, {5}});
  check_case({1, 3, {0, 4, 1}});
  check_case({2, 2, {3, 0, 0, 2}});
  check_case({2, 4, {1, 0, 2, 3, 0, 0, 4, 1}});
  check_case({3,
              6,
              {2, 0, 1, 0, 0, 3,  //
               0, 0, 0, 0, 0, 0,  // a rank without rows
               1, 1, 0, 2, 0, 4}});
  check_case({4, 4, std::vector<int64_t>(16, 0)});           // nobody routed anything
  check_case({2, 6, {0, 0, 0, 5, 1, 2, 0, 0, 0, 0, 0, 7}});  // rank 0's experts get nothing
}

TEST(ep_exchange_layout_random) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 200; ++trial) {
    Case c;
    c.W = 1 + static_cast<int>(rng() % 4);
    c.E = c.W * (1 + static_cast<int64_t>(rng() % 4));
    for (int64_t i = 0; i < c.W * c.E; ++i) {
      c.counts.push_back(rng() % 3 == 0 ? 0 : static_cast<int64_t>(rng() % 6));
    }
    check_case(c);
  }
}

TEST(ep_exchange_layout_errors) {
  const std::vector<int64_t> counts = {1, 2, 3, 4, 5, 6};
  CHECK_THROWS(InvalidArgument, make_ep_layout(counts.data(), 0, 0, 6), "world_size");
  CHECK_THROWS(InvalidArgument, make_ep_layout(counts.data(), 2, 2, 3), "rank");
  CHECK_THROWS(InvalidArgument, make_ep_layout(counts.data(), 2, 0, 3), "multiple");
  const std::vector<int64_t> negative = {1, 2, 3, -1};
  CHECK_THROWS(InvalidArgument, make_ep_layout(negative.data(), 2, 0, 2), "routed -1 rows");
}

// Counts then rows on thread ranks: each rank sends rank-dependent rows; what arrives is the
// senders' blocks in rank order.
TEST(ep_exchange_all_to_all_v_rows) {
  const int W = 3;
  const int64_t row = 2;
  comm::LocalGroup group(W, 10.0);
  std::vector<std::vector<int64_t>> got(W), got_rows(W);
  std::vector<std::thread> threads;
  auto rows_to = [](int from, int to) { return static_cast<int64_t>((from + 2 * to) % 3); };
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      std::vector<int64_t> send_rows(W), send;
      for (int w = 0; w < W; ++w) {
        send_rows[w] = rows_to(r, w);
        for (int64_t i = 0; i < send_rows[w] * row; ++i) send.push_back(100 * r + 10 * w + i);
      }
      got_rows[r].resize(W);
      all_to_all_v_rows(group.comm(r), send.data(), send_rows.data(), row, DType::int64,
                        got_rows[r].data(), [&](int64_t received, int64_t sent) -> void* {
                          CHECK_EQ(sent, static_cast<int64_t>(send.size()));
                          got[r].resize(received * row);
                          return got[r].data();
                        });
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    std::vector<int64_t> expected, expected_rows;
    for (int w = 0; w < W; ++w) {
      expected_rows.push_back(rows_to(w, r));
      for (int64_t i = 0; i < rows_to(w, r) * row; ++i) expected.push_back(100 * w + 10 * r + i);
    }
    CHECK(got_rows[r] == expected_rows);
    CHECK(got[r] == expected);
  }
}

TEST(ep_exchange_all_to_all_v_rows_names_the_call) {
  comm::LocalGroup group(2, 10.0);
  group.poison("a peer failed");
  int64_t send_rows[2] = {0, 0}, recv_rows[2];
  CHECK_THROWS(CommError,
               all_to_all_v_rows(group.comm(0), nullptr, send_rows, 1, DType::float32, recv_rows,
                                 [](int64_t, int64_t) -> void* { return nullptr; }),
               "all_to_all_v: ");
}
