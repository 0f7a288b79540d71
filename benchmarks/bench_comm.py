"""Benchmark: pyswitch thread-rank collectives (LocalGroup) vs memcpy bandwidth, 2 ranks.

Per-rank bandwidth = bytes each rank sends (all_to_all_v) or reduces (all_reduce) per second.
Baseline, same process and sizes: one thread's memcpy of the same bytes (np.copyto), which is
the work a rank's share of either collective needs at the least (read + write every byte).
The MPI backend and the expert-parallel layer come with the rest of issue 4; their rows are
not in this table yet.
"""

from __future__ import annotations

import time

import numpy as np

try:
    import _common as common
except ImportError:  # run as a module from the repository root
    from benchmarks import _common as common

NAME = "bench_comm"
GOAL_VS_MEMCPY = 0.8


def time_collective(ps, world, nbytes, op, repeat, warmup):
    """Median seconds per call on rank 0, every rank calling `op` back to back."""
    n = nbytes // 4

    def fn(comm):
        x = np.full(n, comm.rank + 1, np.float32)
        counts = [n // comm.size] * comm.size
        counts[-1] += n - sum(counts)
        samples = []
        for i in range(warmup + repeat):
            comm.barrier()
            t0 = time.perf_counter()
            if op == "all_to_all_v":
                comm.all_to_all_v(x, counts)
            else:
                comm.all_reduce(x)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        return float(np.median(samples))

    return max(ps.comm.LocalGroup(world).run(fn))


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
        src = np.ones(nbytes // 4, np.float32)
        dst = np.empty_like(src)
        memcpy = common.time_many(
            {"memcpy": lambda d=dst, s=src: np.copyto(d, s)}, warmup=warmup, repeat=repeat
        )["memcpy"]["median_s"]
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
    path = common.write_json(
        NAME,
        {
            "machine": info,
            "threads": threads,
            "world_size": world,
            "baseline": "np.copyto memcpy, one thread, same bytes",
            "results": results,
        },
        args.json,
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
