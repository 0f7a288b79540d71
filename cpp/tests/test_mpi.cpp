// MPI backend in C++ (run under mpiexec -n 2 or more): collectives against plain loops, a
// mismatch raising on every rank, and the expert-parallel layer against a one-rank layer.
#include <mpi.h>

#include <cstring>
#include <vector>

#include "harness.hpp"
#include "pyswitch/comm/mpi.hpp"
#include "pyswitch/error.hpp"
#include "pyswitch/moe/switch_layer.hpp"

using namespace pyswitch;
using namespace pyswitch::comm;

namespace {
float value(int rank, int64_t i) {
  return static_cast<float>(100 * rank + i) * 0.5f;
}
}  // namespace

TEST(mpi_collectives_match_plain_loops) {
  MPIComm c(MPI_COMM_WORLD, 20.0);
  const int W = c.size(), r = c.rank();
  const int64_t n = 5;
  std::vector<float> x(static_cast<size_t>(n * W)), out(x.size());
  for (int64_t i = 0; i < n * W; ++i) x[static_cast<size_t>(i)] = value(r, i);
  c.all_reduce(x.data(), out.data(), n * W, DType::float32, ReduceOp::sum);
  for (int64_t i = 0; i < n * W; ++i) {
    float sum = 0;
    for (int q = 0; q < W; ++q) sum += value(q, i);  // rank order, as the backend promises
    CHECK_EQ(out[static_cast<size_t>(i)], sum);
  }
  c.all_to_all(x.data(), out.data(), n, DType::float32);
  for (int q = 0; q < W; ++q) {
    for (int64_t i = 0; i < n; ++i)
      CHECK_EQ(out[static_cast<size_t>(q * n + i)], value(q, r * n + i));
  }
  std::vector<float> part(static_cast<size_t>(n));
  c.reduce_scatter(x.data(), part.data(), n, DType::float32, ReduceOp::max);
  for (int64_t i = 0; i < n; ++i) CHECK_EQ(part[static_cast<size_t>(i)], value(W - 1, r * n + i));
  std::vector<float> b = x;
  c.broadcast(b.data(), n * W, DType::float32, W - 1);
  for (int64_t i = 0; i < n * W; ++i) CHECK_EQ(b[static_cast<size_t>(i)], value(W - 1, i));
  // all_to_all_v: rank r sends q + 1 elements to rank q.
  std::vector<int64_t> sc(W), sd(W), rc(W), rd(W);
  int64_t at = 0, rat = 0;
  for (int q = 0; q < W; ++q) {
    sc[q] = q + 1;
    sd[q] = at;
    at += sc[q];
    rc[q] = r + 1;
    rd[q] = rat;
    rat += rc[q];
  }
  std::vector<int64_t> send(static_cast<size_t>(at)), recv(static_cast<size_t>(rat));
  for (int64_t i = 0; i < at; ++i) send[static_cast<size_t>(i)] = 1000 * r + i;
  c.all_to_all_v(send.data(), sc.data(), sd.data(), recv.data(), rc.data(), rd.data(),
                 DType::int64);
  for (int q = 0; q < W; ++q) {
    int64_t first_for_me = 0;
    for (int p = 0; p < r; ++p) first_for_me += p + 1;
    for (int64_t i = 0; i < r + 1; ++i) {
      CHECK_EQ(recv[static_cast<size_t>(rd[q] + i)], 1000 * q + first_for_me + i);
    }
  }
  c.barrier();
}

TEST(mpi_mismatch_raises_on_every_rank) {
  MPIComm c(MPI_COMM_WORLD, 20.0);
  std::vector<float> x(4, 1.0f), out(4);
  bool raised = false;
  try {
    c.all_reduce(x.data(), out.data(), c.rank() == 0 ? 3 : 4, DType::float32, ReduceOp::sum);
  } catch (const CommError& e) {
    raised = std::strstr(e.what(), "disagree") != nullptr;
  }
  CHECK(raised);
  bool after = false;
  try {
    c.barrier();
  } catch (const CommError&) {
    after = true;
  }
  CHECK(after);
}

TEST(mpi_expert_parallel_equals_one_rank) {
  MPIComm c(MPI_COMM_WORLD, 20.0);
  const int W = c.size(), r = c.rank();
  const int64_t d = 8, f = 16, E = 2 * W, T = 24;
  moe::SwitchFFNOptions o;
  o.router.seed = 5;
  o.router.route.group_size = T;  // the one-rank layer routes each rank's tokens as a group
  moe::SwitchFFN one(d, f, E, o);
  moe::SwitchFFNOptions ep_options = o;
  ep_options.router.route.group_size = 0;
  moe::SwitchFFN ep(d, f, E, ep_options, &c);
  std::vector<float> x(static_cast<size_t>(W * T * d)), dy(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<float>((i * 7919) % 23) / 11.0f - 1.0f;
    dy[i] = static_cast<float>((i * 104729) % 19) / 9.0f - 1.0f;
  }
  std::vector<float> y_one(x.size()), dx_one(x.size()), y(T * d), dx(T * d);
  one.forward(x.data(), DType::float32, W * T, true, y_one.data());
  one.backward(dy.data(), dx_one.data());
  ep.forward(x.data() + r * T * d, DType::float32, T, true, y.data());
  ep.backward(dy.data() + r * T * d, dx.data());
  CHECK(std::memcmp(y.data(), y_one.data() + r * T * d, y.size() * sizeof(float)) == 0);
  CHECK(std::memcmp(dx.data(), dx_one.data() + r * T * d, dx.size() * sizeof(float)) == 0);
  CHECK_EQ(ep.aux_loss(), one.aux_loss());
  CHECK_EQ(ep.z_loss(), one.z_loss());
  const int64_t per_expert = d * f;
  CHECK(std::memcmp(ep.weights().w_in_grad(),
                    one.weights().w_in_grad() + ep.first_expert() * per_expert,
                    static_cast<size_t>(ep.local_experts() * per_expert) * sizeof(float)) == 0);
}

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
  const int status = harness::run_all(argc, argv);
  int worst = status;
  MPI_Allreduce(&status, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
