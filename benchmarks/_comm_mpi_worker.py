"""MPI half of bench_comm, run by it under ``mpiexec -n 2`` (not a benchmark on its own).

Each rank times, on the same NumPy buffers and back to back in the same process:
- pyswitch ``MPIComm.all_to_all_v`` (which exchanges the row counts, then the rows) against
  mpi4py ``Alltoall`` of the counts + ``Alltoallv`` of the rows (the same work by hand);
- pyswitch ``MPIComm.all_reduce`` (sum, rank-order deterministic) against mpi4py ``Allreduce``;
- the expert-parallel SwitchFFN training step (forward + backward) on W ranks against one rank
  running the layer on the global batch (every rank uses one thread).
Rank 0 writes the medians (the slower rank's time per sample) as JSON to argv[1].
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from mpi4py import MPI

import pyswitch
from pyswitch.comm import MPIComm


def timed(world, fn, repeat, warmup):
    """Median over samples of the slowest rank's seconds for fn()."""
    samples = []
    for i in range(warmup + repeat):
        world.Barrier()
        t0 = time.perf_counter()
        fn()
        dt = world.allreduce(time.perf_counter() - t0, op=MPI.MAX)
        if i >= warmup:
            samples.append(dt)
    return float(np.median(samples))


def collective_rows(world, comm, nbytes, repeat, warmup):
    """pyswitch against mpi4py for all_to_all_v and all_reduce on nbytes per rank."""
    W = comm.size
    n = nbytes // 4
    x = np.full(n, comm.rank + 1, np.float32)
    counts = np.full(W, n // W, np.int64)
    counts[-1] += n - counts.sum()
    displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.empty_like(x)
    rcounts = np.empty_like(counts)

    def mpi4py_a2av():
        world.Alltoall(counts, rcounts)
        rdispls = np.concatenate([[0], np.cumsum(rcounts)[:-1]])
        world.Alltoallv([x, (counts, displs), MPI.FLOAT], [out, (rcounts, rdispls), MPI.FLOAT])

    def mpi4py_allreduce():
        world.Allreduce(x, out, op=MPI.SUM)

    cases = {
        "all_to_all_v": (lambda: comm.all_to_all_v(x, counts), mpi4py_a2av),
        "all_reduce": (lambda: comm.all_reduce(x), mpi4py_allreduce),
    }
    rows = []
    for op, (ours, theirs) in cases.items():
        t_theirs = timed(world, theirs, repeat, warmup)
        t_ours = timed(world, ours, repeat, warmup)
        rows.append(
            {"op": op, "bytes_per_rank": nbytes, "pyswitch_s": t_ours, "mpi4py_s": t_theirs}
        )
    return rows


def main() -> int:
    out_path, quick = sys.argv[1], "--quick" in sys.argv
    pyswitch.set_num_threads(1)  # one core per rank: 2 ranks on 2 cores
    world = MPI.COMM_WORLD
    comm = MPIComm(timeout=120)
    W = comm.size
    sizes = [64 << 10, 1 << 20, 16 << 20] if quick else [64 << 10, 1 << 20, 16 << 20, 64 << 20]
    if W == 1:
        sizes = []  # the collectives rows are for 2 ranks; W = 1 only times the layer
    repeat, warmup = (5, 2) if quick else (21, 5)
    rows = [r for nbytes in sizes for r in collective_rows(world, comm, nbytes, repeat, warmup)]

    # Expert-parallel step time: W ranks with T tokens each, against one rank (one core, like
    # each rank here) running the layer with all experts on the global batch of W * T tokens.
    T, d, f, E = (1024, 256, 1024, 8) if quick else (4096, 512, 2048, 8)
    rng = np.random.default_rng(7)
    x_all = rng.standard_normal((W * T, d)).astype(np.float32)
    dy_all = rng.standard_normal((W * T, d)).astype(np.float32)
    mine = slice(comm.rank * T, (comm.rank + 1) * T)
    layer_ep = pyswitch.SwitchFFN(d, f, E, comm=comm, seed=1)
    layer_one = pyswitch.SwitchFFN(d, f, E, seed=1, group_size=T)

    def step(layer, x, dy):
        layer.forward(x, training=True)
        layer.backward(dy)

    ep_repeat, ep_warmup = (3, 1) if quick else (7, 2)
    t_one = timed(world, lambda: step(layer_one, x_all, dy_all), ep_repeat, ep_warmup)
    t_ep = timed(world, lambda: step(layer_ep, x_all[mine], dy_all[mine]), ep_repeat, ep_warmup)
    ep = {
        "tokens_per_rank": T,
        "d_model": d,
        "d_ff": f,
        "experts": E,
        "world": W,
        "ep_step_s": t_ep,
        "one_rank_global_batch_step_s": t_one,
    }
    if comm.rank == 0:
        with open(out_path, "w") as fh:
            library = MPI.Get_library_version().splitlines()[0]
            json.dump(
                {"world": W, "library": library, "collectives": rows, "expert_parallel": ep}, fh
            )
    comm.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
