"""Benchmark: pyswitch collectives, 2 ranks, and the expert-parallel layer.

1. Thread ranks (LocalGroup) vs memcpy. Per-rank bandwidth = bytes each rank sends
   (all_to_all_v) or reduces (all_reduce) per second, into a reused output (out=). Baseline,
   same process and sizes: 2 threads each copying the same bytes at the same time (np.copyto),
   the least the ranks' shares of either collective must do together (read + write every byte,
   sharing the memory bandwidth as the ranks do).
2. MPI backend (MPIComm) vs mpi4py on the same buffers, both in the same 2 processes under
   mpiexec (benchmarks/_comm_mpi_worker.py): all_to_all_v against mpi4py Alltoall (the counts)
   + Alltoallv (the rows), all_reduce (sum) against mpi4py Allreduce. Ratio = mpi4py time /
   pyswitch time (> 1: pyswitch faster).
3. Expert-parallel SwitchFFN training step (forward + backward, one thread per rank) on W = 1
   and 2 MPI ranks with T tokens per rank, against one rank running the layer with all experts
   on the global batch of W * T tokens: the speed-up of spreading the experts.
Sections 2 and 3 need mpiexec, mpi4py and pyswitch's MPI backend (pip install 'pyswitch[mpi]');
without them they are skipped with a note.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

try:
    import _common as common
except ImportError:  # run as a module from the repository root
    from benchmarks import _common as common

NAME = "bench_comm"
GOAL_VS_MEMCPY = 0.8
GOAL_VS_MPI4PY = 0.95
WORKER = Path(__file__).resolve().parent / "_comm_mpi_worker.py"


def run_mpi_worker(ranks: int, quick: bool, tmp: Path):
    """The worker's JSON from `mpiexec -n ranks`, or (None, reason)."""
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        return None, "mpiexec not found (pip install 'pyswitch[mpi]')"
    try:
        import mpi4py  # noqa: F401

        from pyswitch import _mpi  # noqa: F401
    except ImportError as exc:
        return None, f"MPI backend not available ({exc})"
    out = tmp / f"mpi_{ranks}.json"
    import pyswitch

    # The workers import the same pyswitch as this process (a source tree or an installation).
    where = str(Path(pyswitch.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (where, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", UCX_LOG_LEVEL="error", PYTHONPATH=path)
    cmd = [mpiexec, "-n", str(ranks), sys.executable, str(WORKER), str(out)]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0 or not out.exists():
        return None, f"mpiexec -n {ranks} failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(out.read_text()), None


def time_collective(ps, world, nbytes, op, repeat, warmup):
    """Median seconds per call on the slower rank, every rank calling `op` back to back into a
    reused output buffer (as a training loop would)."""
    n = nbytes // 4

    def fn(comm):
        x = np.full(n, comm.rank + 1, np.float32)
        out = np.empty_like(x)
        counts = [n // comm.size] * comm.size
        counts[-1] += n - sum(counts)
        samples = []
        for i in range(warmup + repeat):
            comm.barrier()
            t0 = time.perf_counter()
            if op == "all_to_all_v":
                comm.all_to_all_v(x, counts, out=out)
            else:
                comm.all_reduce(x, out=out)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        return float(np.median(samples))

    return max(ps.comm.LocalGroup(world).run(fn))


def time_concurrent_memcpy(world, nbytes, repeat, warmup):
    """Median seconds for `world` threads each copying nbytes at the same time (np.copyto
    releases the GIL): the memory traffic of one collective call, without the collective. Each
    thread times its own copy after a common start; a sample is the slowest thread's time."""
    n = nbytes // 4
    srcs = [np.ones(n, np.float32) for _ in range(world)]
    dsts = [np.empty(n, np.float32) for _ in range(world)]
    start, done = threading.Barrier(world + 1), threading.Barrier(world + 1)
    times = [0.0] * world
    stop = False

    def worker(i):
        while True:
            start.wait()
            if stop:
                return
            t0 = time.perf_counter()
            np.copyto(dsts[i], srcs[i])
            times[i] = time.perf_counter() - t0
            done.wait()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(world)]
    for t in threads:
        t.start()
    samples = []
    for i in range(warmup + repeat):
        start.wait()
        done.wait()
        if i >= warmup:
            samples.append(max(times))
    stop = True
    start.wait()
    for t in threads:
        t.join()
    return float(np.median(samples))


def main(argv=None) -> int:
    args = common.make_parser(NAME, __doc__).parse_args(argv)
    threads = common.set_threads(args.threads)
    ps = common.try_import_pyswitch()
    if ps is None:
        print(f"pyswitch not importable ({common.pyswitch_import_error()})")
        return 1
    info = common.machine_info()
    print(__doc__.strip())
    print(common.format_machine(info))
    world = 2
    sizes = [64 << 10, 1 << 20, 16 << 20] if args.quick else [64 << 10, 1 << 20, 16 << 20, 64 << 20]
    repeat, warmup = (3, 1) if args.quick else (11, 3)
    rows, results = [], []
    for nbytes in sizes:
        memcpy = time_concurrent_memcpy(world, nbytes, repeat, warmup)
        for op in ("all_to_all_v", "all_reduce"):
            t = time_collective(ps, world, nbytes, op, repeat, warmup)
            gbps, base = nbytes / t / 1e9, nbytes / memcpy / 1e9
            ratio = gbps / base
            goal = "met" if ratio >= GOAL_VS_MEMCPY else "MISSED"
            rows.append(
                [
                    f"{op} {nbytes >> 10} KiB",
                    f"{gbps:.2f}",
                    f"{base:.2f}",
                    f"{ratio:.2f}x",
                    f">={GOAL_VS_MEMCPY}x memcpy: {goal}",
                ]
            )
            results.append(
                {
                    "op": op,
                    "bytes_per_rank": nbytes,
                    "seconds": t,
                    "gb_per_s": gbps,
                    "memcpy_gb_per_s": base,
                    "ratio": ratio,
                    "goal_ratio": GOAL_VS_MEMCPY,
                }
            )
    headers = ["case (2 thread ranks)", "pyswitch GB/s", "memcpy GB/s", "ratio", "goal"]
    print()
    common.print_table(headers, rows)

    notes, mpi_results, ep_results = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        two, why = run_mpi_worker(2, args.quick, Path(tmp))
        one, why_one = run_mpi_worker(1, args.quick, Path(tmp)) if two else (None, why)
    if two is None:
        notes.append(f"MPI sections skipped: {why}")
    else:
        mpi_rows = []
        for r in two["collectives"]:
            ratio = r["mpi4py_s"] / r["pyswitch_s"]
            nbytes = r["bytes_per_rank"]
            goal = "met" if ratio >= GOAL_VS_MPI4PY else "MISSED"
            mpi_rows.append(
                [
                    f"{r['op']} {nbytes >> 10} KiB",
                    f"{nbytes / r['pyswitch_s'] / 1e9:.2f}",
                    f"{nbytes / r['mpi4py_s'] / 1e9:.2f}",
                    f"{ratio:.2f}x",
                    f">={GOAL_VS_MPI4PY}x mpi4py: {goal}",
                ]
            )
            mpi_results.append(dict(r, ratio_vs_mpi4py=ratio, goal_ratio=GOAL_VS_MPI4PY))
        print(f"\nMPI backend, 2 processes ({two['library']}):")
        common.print_table(
            ["case (2 MPI ranks)", "pyswitch GB/s", "mpi4py GB/s", "ratio", "goal"], mpi_rows
        )
        ep_rows = []
        for run in (one, two):
            if run is None:
                continue
            e = run["expert_parallel"]
            speedup = e["one_rank_global_batch_step_s"] / e["ep_step_s"]
            ep_rows.append(
                [
                    f"W={e['world']}: {e['tokens_per_rank']} tok/rank, E={e['experts']}",
                    f"{e['ep_step_s'] * 1e3:.1f}",
                    f"{e['one_rank_global_batch_step_s'] * 1e3:.1f}",
                    f"{speedup:.2f}x",
                ]
            )
            ep_results.append(dict(e, speedup=speedup))
        print(
            "\nExpert-parallel SwitchFFN step (fwd + bwd, fp32, d_model "
            f"{two['expert_parallel']['d_model']}, d_ff {two['expert_parallel']['d_ff']}):"
        )
        common.print_table(["case", "EP step ms", "1 rank, global batch ms", "speed-up"], ep_rows)
    path = common.write_json(
        NAME,
        {
            "machine": info,
            "threads": threads,
            "world_size": world,
            "baseline": "np.copyto memcpy, 2 threads at once, same bytes per thread",
            "results": results,
            "mpi_baseline": "mpi4py Alltoall(counts) + Alltoallv / Allreduce, same processes",
            "mpi_results": mpi_results,
            "expert_parallel_baseline": "one rank, all experts, the global batch, one thread",
            "expert_parallel": ep_results,
        },
        args.json,
    )
    common.print_run_summary(info, rows, notes, [])
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
