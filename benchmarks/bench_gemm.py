"""GEMM benchmark: pyswitch's own kernel (the one every layer uses) against oneDNN, NumPy's BLAS
and torch.mm, same process, same operands, on the shapes a Switch layer runs.

pyswitch.matmul computes every element as one float32 FMA chain over k, which makes a row's
bits independent of M, threads and CPU tier (docs/determinism.md); the baselines promise none
of that. Each row: GFLOP/s (median) and pyswitch's ratio to each baseline. bf16 operands are
widened exactly and accumulate in float32; NumPy has no bf16 GEMM, and oneDNN has none below
AVX-512 ('-').
"""

from __future__ import annotations

import sys

import _common as common
import numpy as np

NAME = "bench_gemm"
HEADERS = (
    "shape (M, K) @ (K, N)",
    "dtype",
    "tier",
    "pyswitch",
    "oneDNN",
    "NumPy",
    "torch",
    "vs oneDNN",
    "vs NumPy",
    "vs torch",
    "busy",
)


def shapes(quick: bool):
    """(what, M, K, N): one expert's rows at E=64, T=8192 (160 rows), the whole batch, a weight
    gradient, and the attention-sized products."""
    if quick:
        return [("expert rows", 160, 512, 2048), ("small", 64, 64, 64)]
    return [
        ("expert rows, x @ W_in", 160, 512, 2048),
        ("expert rows, h @ W_out", 160, 2048, 512),
        ("batch, x @ W_in", 8192, 512, 2048),
        ("weight grad, x^T @ dh", 512, 8192, 2048),
        ("attention, q @ k^T", 64, 64, 256),
        ("square 2048", 2048, 2048, 2048),
    ]


def bench(ps, torch, quick: bool):
    import ml_dtypes

    rng = np.random.default_rng(0)
    rows, problems, notes = [], [], []
    tier = common.cpu_tier(ps)["label"]
    for what, M, K, N in shapes(quick):
        for dtype in ("float32", "bfloat16"):
            a = rng.standard_normal((M, K), dtype=np.float32)
            b = rng.standard_normal((K, N), dtype=np.float32)
            if dtype == "bfloat16":
                a, b = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
            fns = {"pyswitch": lambda a=a, b=b: ps.matmul(a, b)}
            try:
                ps.matmul(a[:1], b, library="onednn")
                fns["oneDNN"] = lambda a=a, b=b: ps.matmul(a, b, library="onednn")
            except ps.Error:
                pass  # no bf16 matmul in oneDNN below AVX-512
            if dtype == "float32":
                fns["NumPy"] = lambda a=a, b=b: a @ b
            torch_here = common.torch_for(torch, dtype)
            if torch_here is None and torch is not None and common.TORCH_BF16_SKIPPED not in notes:
                notes.append(common.TORCH_BF16_SKIPPED)
            if torch_here is not None:
                ta = (
                    torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
                    if dtype != "float32"
                    else torch.from_numpy(a)
                )
                tb = (
                    torch.from_numpy(b.view(np.uint16)).view(torch.bfloat16)
                    if dtype != "float32"
                    else torch.from_numpy(b)
                )
                fns["torch"] = lambda ta=ta, tb=tb: torch.mm(ta, tb)
            # Agreement before timing: every implementation within float32 rounding of float64.
            exact = a.astype(np.float64) @ b.astype(np.float64)
            bound = (
                2
                * K
                * np.finfo(np.float32).eps
                * (np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64)))
            )
            for name, fn in fns.items():
                got = fn()
                got = got.float().numpy() if hasattr(got, "numpy") else np.asarray(got, np.float64)
                if name == "torch" and dtype == "bfloat16":
                    continue  # torch rounds its bf16 output; not comparable at this bound
                if not np.all(np.abs(got - exact) <= bound + 1e-30):
                    problems.append(f"{what} {dtype}: {name} is off the float64 reference")
            repeat = 3 if quick else 7
            timed = common.time_many(fns, warmup=2, repeat=repeat)
            flops = 2.0 * M * K * N
            gf = {n: flops / t["median_s"] / 1e9 for n, t in timed.items()}
            busy = max(t["other_load"] or 0.0 for t in timed.values())
            ratio = {
                n: gf["pyswitch"] / gf[n] if n in gf else None for n in ("oneDNN", "NumPy", "torch")
            }
            rows.append(
                [
                    f"{what} ({M}, {K}) @ ({K}, {N})",
                    dtype,
                    tier,
                    gf["pyswitch"],
                    gf.get("oneDNN"),
                    gf.get("NumPy"),
                    gf.get("torch"),
                    ratio["oneDNN"],
                    ratio["NumPy"],
                    ratio["torch"],
                    f"{busy:.0%}{'!' if busy > common.BUSY_WARN else ''}",
                ]
            )
    return rows, problems, notes


def main(argv=None) -> int:
    args = common.make_parser(NAME, __doc__).parse_args(argv)
    threads = common.set_threads(args.threads)
    ps = common.try_import_pyswitch()
    if ps is None:
        print(f"pyswitch not importable: {common.pyswitch_import_error()}")
        return 1
    torch = common.try_import_torch()
    info = common.machine_info()
    print(__doc__.strip())
    print(common.format_machine(info))
    print(f"threads  : {threads}")
    if torch is None:
        print(f"torch not importable ({common.torch_import_error()}): skipping the torch baseline")
    rows, problems, notes = bench(ps, torch, args.quick)
    print("\nGFLOP/s (median); 'vs' columns: pyswitch GFLOP/s / baseline GFLOP/s")
    common.print_table(HEADERS, rows, align="lllrrrrrrrr")
    common.print_run_summary(info, rows, notes, problems, busy_warn=common.BUSY_WARN)
    out = common.write_json(
        NAME,
        {
            "quick": args.quick,
            "threads": threads,
            "machine": info,
            "headers": HEADERS,
            "rows": rows,
            "problems": problems,
        },
        args.json,
    )
    print(f"wrote {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
