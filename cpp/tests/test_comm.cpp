// Thread-rank collectives in C++: results against plain loops, mismatch, timeout and poisoning.
#include <chrono>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "harness.hpp"
#include "pyswitch/comm/local.hpp"
#include "pyswitch/error.hpp"

using namespace pyswitch;
using namespace pyswitch::comm;

namespace {

// Runs body(comm) on every rank of a fresh group; returns how many ranks threw CommError.
int run_ranks(int world, double timeout, const std::function<void(Communicator&)>& body) {
  LocalGroup group(world, timeout);
  std::vector<std::thread> threads;
  std::vector<int> comm_errors(static_cast<size_t>(world), 0);
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(group.comm(r));
      } catch (const CommError&) {
        comm_errors[static_cast<size_t>(r)] = 1;
      } catch (const std::exception& e) {
        group.poison(e.what());
      }
    });
  }
  for (auto& t : threads) t.join();
  int total = 0;
  for (int e : comm_errors) total += e;
  return total;
}

}  // namespace

TEST(comm_collectives_match_plain_loops) {
  for (int world : {1, 2, 3, 4}) {
    std::vector<std::vector<float>> reduced(world), gathered(world), exchanged(world),
        scattered(world), broadcast(world);
    const int64_t n = 5;
    run_ranks(world, 10.0, [&](Communicator& c) {
      const int r = c.rank();
      std::vector<float> x(static_cast<size_t>(n * world));
      for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(100 * r + i) * 0.5f;
      std::vector<float> out(x.size());
      c.all_reduce(x.data(), out.data(), static_cast<int64_t>(x.size()), DType::float32,
                   ReduceOp::sum);
      reduced[r] = out;
      std::vector<float> g(static_cast<size_t>(n * world * world));
      c.all_gather(x.data(), g.data(), n * world, DType::float32);
      gathered[r] = g;
      c.all_to_all(x.data(), out.data(), n, DType::float32);
      exchanged[r] = out;
      std::vector<float> part(static_cast<size_t>(n));
      c.reduce_scatter(x.data(), part.data(), n, DType::float32, ReduceOp::max);
      scattered[r] = part;
      std::vector<float> b = x;
      c.broadcast(b.data(), static_cast<int64_t>(b.size()), DType::float32, world - 1);
      broadcast[r] = b;
      c.barrier();
    });
    auto value = [&](int rank, int64_t i) { return static_cast<float>(100 * rank + i) * 0.5f; };
    for (int r = 0; r < world; ++r) {
      for (int64_t i = 0; i < n * world; ++i) {
        float sum = 0;
        for (int q = 0; q < world; ++q) sum += value(q, i);
        CHECK_EQ(reduced[r][i], sum);
        CHECK_EQ(broadcast[r][i], value(world - 1, i));
      }
      for (int q = 0; q < world; ++q) {
        for (int64_t i = 0; i < n; ++i) {
          CHECK_EQ(exchanged[r][q * n + i], value(q, r * n + i));
          CHECK_EQ(gathered[r][q * n * world + i], value(q, i));
        }
      }
      for (int64_t i = 0; i < n; ++i) CHECK_EQ(scattered[r][i], value(world - 1, r * n + i));
    }
  }
}

TEST(comm_mismatch_timeout_and_failure_raise_on_every_rank) {
  // Different ops: every rank throws.
  CHECK_EQ(run_ranks(3, 5.0,
                     [](Communicator& c) {
                       float x = 1, y = 0;
                       if (c.rank() == 1) {
                         c.all_gather(&x, &y, 1, DType::float32);
                       } else {
                         c.all_reduce(&x, &y, 1, DType::float32, ReduceOp::sum);
                       }
                     }),
           3);
  // A rank that never arrives: the others time out within the bound.
  const auto start = std::chrono::steady_clock::now();
  CHECK_EQ(run_ranks(2, 0.5,
                     [](Communicator& c) {
                       if (c.rank() == 0) {
                         std::this_thread::sleep_for(std::chrono::milliseconds(900));
                       }
                       c.barrier();
                     }),
           2);
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(waited < 0.9 + 2.0);
  // A rank that fails outside a collective: the others are released with CommError.
  CHECK_EQ(run_ranks(3, 30.0,
                     [](Communicator& c) {
                       if (c.rank() == 2) throw std::runtime_error("rank 2 broke");
                       c.barrier();
                     }),
           2);
}
