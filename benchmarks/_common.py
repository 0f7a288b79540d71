"""Shared helpers for the pyswitch benchmarks: timing, machine description, tables, JSON, CLI."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
# Share of the CPUs used by other processes above which timings are flagged as unreliable. Not
# lower: kernel threads doing work this process caused (page reclaim, memory monitoring) count
# as "other" and reach ~10% in the allocation-heavy benchmarks on a 2-CPU machine; a concurrent
# single-threaded job is 1/CPUs.
BUSY_WARN = 0.2


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _proc_stat_busy_s() -> float | None:
    """CPU-seconds spent busy by all CPUs since boot (from /proc/stat), None if unavailable."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        busy = sum(vals[:8]) - idle  # guest time is already counted in user
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class OtherLoad:
    """Context manager measuring how busy *other* processes kept the CPUs meanwhile.

    ``fraction`` (after exit) = (all CPUs' busy time - this process's CPU time) / (CPUs * wall
    time), clipped to [0, 1]; None where /proc/stat is unavailable. On a small machine a
    concurrent build or test run makes (multi-threaded) timings meaningless; this flags it.
    The resolution is the kernel tick (~10 ms), so it is meaningful over blocks of ~0.1 s and up.
    """

    def __init__(self):
        self.fraction: float | None = None

    def __enter__(self):
        self._busy0 = _proc_stat_busy_s()
        self._own0 = sum(os.times()[:2])
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t0
        busy1 = _proc_stat_busy_s()
        own = sum(os.times()[:2]) - self._own0
        if self._busy0 is None or busy1 is None or wall <= 0:
            return False
        ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        others = (busy1 - self._busy0) - own
        self.fraction = max(0.0, min(1.0, others / (max(ncpu or 1, 1) * wall)))
        return False


def time_many(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 2,
    repeat: int = 10,
    interleave: bool = False,
    min_sample_s: float = 0.005,
    max_number: int = 1000,
) -> dict[str, dict]:
    """Time several callables; report each one's median over ``repeat`` samples.

    Each callable gets ``warmup`` untimed calls right before its ``repeat`` timed samples (so
    caches, page mappings and thread pools are in its steady state, not left over from another
    implementation). With ``interleave=True`` the samples are instead taken round-robin
    (a, b, c, a, b, c, ...) after all warmups, which spreads slow drifts in machine load over
    all of them, but lets one library's idle threads and freed memory disturb the next call.
    Each sample runs the callable ``number`` times back to back, with ``number`` chosen once
    (from the last warmup call) so that a sample lasts at least ``min_sample_s`` (very fast calls
    are otherwise dominated by timer overhead); the reported times are per call. The garbage
    collector is disabled while timing (as ``timeit`` does). Whatever a callable allocates is
    part of its time.

    Returns, per name: ``{"median_s", "min_s", "max_s", "mean_s", "samples_s", "number",
    "repeat", "warmup", "other_load"}``; ``other_load`` is the fraction of the CPUs that other
    processes used while that callable was timed (see ``OtherLoad``; with ``interleave`` it is
    the whole block's).
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")

    def warm(fn):
        last = None
        for _ in range(max(warmup, 1)):
            t0 = time.perf_counter()
            fn()
            last = time.perf_counter() - t0
        if last is not None and last < min_sample_s:
            return int(min(max_number, max(1, min_sample_s / max(last, 1e-9))))
        return 1

    def sample(fn, number):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number

    numbers: dict[str, int] = {}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    loads: dict[str, float | None] = {}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        if interleave:
            for name, fn in fns.items():
                numbers[name] = warm(fn)
            with OtherLoad() as load:
                for _ in range(repeat):
                    for name, fn in fns.items():
                        samples[name].append(sample(fn, numbers[name]))
            loads = dict.fromkeys(fns, load.fraction)
        else:
            for name, fn in fns.items():
                numbers[name] = warm(fn)
                with OtherLoad() as load:
                    samples[name] = [sample(fn, numbers[name]) for _ in range(repeat)]
                loads[name] = load.fraction
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: {
            "median_s": statistics.median(ss),
            "min_s": min(ss),
            "max_s": max(ss),
            "mean_s": statistics.fmean(ss),
            "samples_s": ss,
            "number": numbers[name],
            "repeat": repeat,
            "warmup": warmup,
            "other_load": loads[name],
        }
        for name, ss in samples.items()
    }


def time_call(fn: Callable[[], Any], *, warmup: int = 2, repeat: int = 10, **kw) -> dict:
    """Time one callable (see ``time_many``): warmups, then repeats; median etc."""
    return time_many({"fn": fn}, warmup=warmup, repeat=repeat, **kw)["fn"]


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = (
        "avx2",
        "fma",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512_bf16",
        "amx_bf16",
        "asimd",
        "sve",
    )
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    present = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in present]
    except OSError:
        pass
    return []


def cpu_busy_fraction(interval: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat), None if unknown.

    Measured while this process sleeps, so it is the load from *other* processes: on a small
    machine a concurrent build or test run makes multi-threaded timings meaningless.
    """

    def snap():
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals), idle

    try:
        t0, i0 = snap()
        time.sleep(interval)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    total = t1 - t0
    return None if total <= 0 else max(0.0, min(1.0, 1.0 - (i1 - i0) / total))


def cpu_tier(ps=None) -> dict:
    """The CPU tier a run measures: pyswitch's active kernels and the caps set on each library.

    ``label`` is what the tables print, e.g. ``"avx2 (capped: PYSWITCH_CPU_ISA=avx2,
    ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2)"`` or ``"avx2 (native)"``.
    """
    caps = {
        name: os.environ[name]
        for name in ("PYSWITCH_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
        if os.environ.get(name)
    }
    active = None
    if ps is not None:
        try:
            active = ps.cpu_isa()
        except Exception:
            active = None
    best = None
    if ps is not None:
        try:
            best = list(ps.supported_isas())[-1]
        except Exception:
            best = None
    capped = ", ".join(f"{k}={v}" for k, v in caps.items())
    label = f"{active or '?'} ({'capped: ' + capped if caps else 'native'})"
    return {"pyswitch_active": active, "pyswitch_best": best, "caps": caps, "label": label}


def machine_info() -> dict:
    """Describe the machine and the software under test (for the JSON output and the header)."""
    info: dict[str, Any] = {
        "cpu_busy_before_run": cpu_busy_fraction(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["usable_cpus"] = os.cpu_count()
    try:
        import numpy as np

        info["numpy"] = np.__version__
        try:
            cfg = np.show_config(mode="dicts")
            blas = cfg.get("Build Dependencies", {}).get("blas", {})
            info["numpy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
        except Exception:  # older NumPy: no mode="dicts"
            pass
    except ImportError:
        info["numpy"] = None
    try:
        import ml_dtypes

        info["ml_dtypes"] = ml_dtypes.__version__
    except ImportError:
        info["ml_dtypes"] = None
    torch = try_import_torch()
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
    else:
        info["torch"] = None
    ps = try_import_pyswitch()
    info["tier"] = cpu_tier(ps)
    if ps is not None:
        try:
            info["pyswitch"] = dict(ps.build_info())
            info["pyswitch_path"] = str(Path(ps.__file__).resolve().parent)
        except Exception as exc:  # report, don't die: the header is informational
            info["pyswitch"] = {"error": repr(exc)}
    else:
        info["pyswitch"] = None
    return info


def format_machine(info: dict) -> str:
    lines = [
        f"cpu      : {info.get('cpu_model')} ({info.get('usable_cpus')} usable / "
        f"{info.get('logical_cpus')} logical; {' '.join(info.get('cpu_flags', []))})",
        f"python   : {info.get('python')}  numpy {info.get('numpy')} "
        f"({info.get('numpy_blas', '?')})"
        f"  ml_dtypes {info.get('ml_dtypes')}  torch {info.get('torch') or 'not installed'}",
    ]
    tier = info.get("tier") or {}
    if tier:
        lines.append(f"tier     : {tier.get('label')}")
    busy = info.get("cpu_busy_before_run")
    if busy is not None and busy > BUSY_WARN:
        lines.append(
            f"WARNING  : {busy:.0%} of the CPUs were busy with other processes before this run; "
            "timings (multi-threaded ones above all) will be unreliable"
        )
    ps = info.get("pyswitch")
    if ps is None:
        lines.append("pyswitch : not importable")
    else:
        keys = ("version", "active_isa", "compiled_isas", "blas", "num_threads", "mpi", "cuda")
        parts = [f"{k}={ps[k]}" for k in keys if k in ps]
        parts += [f"{k}={v}" for k, v in ps.items() if k not in keys]
        lines.append("pyswitch : " + "  ".join(parts))
        if info.get("pyswitch_path"):
            lines.append(f"           from {info['pyswitch_path']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Optional imports
# --------------------------------------------------------------------------------------------

_TORCH_ERR: str | None = None


def try_import_torch():
    """Return the ``torch`` module, or None (the reason is in ``torch_import_error()``)."""
    global _TORCH_ERR
    try:
        import torch

        return torch
    except Exception as exc:  # ImportError, or a broken install
        _TORCH_ERR = repr(exc)
        return None


TORCH_BF16_SKIPPED = (
    "torch's CPU bf16 matmul has no fast kernel on a CPU without AVX512_BF16 or AMX (measured "
    "here: about 1 GFLOP/s, 100x below its float32); its bfloat16 baselines are left out"
)


def torch_bf16_is_fast() -> bool:
    """Whether torch's CPU bf16 matmul has a native kernel here (AVX512_BF16 or AMX).

    Without one, torch falls back to a reference loop about 100x slower than its float32 GEMM;
    timing it would take hours and compare pyswitch with a path nobody would use. The bf16
    baselines are skipped there (and say so).
    """
    return any(f in _cpu_flags() for f in ("avx512_bf16", "amx_bf16"))


def torch_for(torch, dtype: str):
    """``torch`` for a baseline in ``dtype``, or None where that baseline is skipped."""
    if torch is not None and dtype == "bfloat16" and not torch_bf16_is_fast():
        return None
    return torch


def torch_import_error() -> str | None:
    return _TORCH_ERR


_PYSWITCH_ERR: str | None = None


def try_import_pyswitch():
    """Return the ``pyswitch`` module, or None (the reason is in ``pyswitch_import_error()``)."""
    global _PYSWITCH_ERR
    try:
        import pyswitch
    except ModuleNotFoundError as exc:
        if exc.name != "pyswitch" or str(REPO_ROOT) in sys.path:
            _PYSWITCH_ERR = repr(exc)
            return None
        # not installed: fall back to an in-place build in this checkout (installed copies win,
        # since the repo root goes to the end of sys.path)
        sys.path.append(str(REPO_ROOT))
        return try_import_pyswitch()
    except Exception as exc:
        _PYSWITCH_ERR = repr(exc)
        return None
    if not hasattr(pyswitch, "route"):
        # e.g. an unbuilt source tree imported as a namespace package from the repo root
        _PYSWITCH_ERR = (
            f"pyswitch at {list(getattr(pyswitch, '__path__', []))} has no 'route' (not built?)"
        )
        return None
    return pyswitch


def pyswitch_import_error() -> str | None:
    return _PYSWITCH_ERR


# --------------------------------------------------------------------------------------------
# Command line and threads
# --------------------------------------------------------------------------------------------


def make_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The standard benchmark CLI: ``--quick``, ``--threads N``, ``--json PATH``."""
    p = argparse.ArgumentParser(prog=f"{name}.py", description=description)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes and fewer repeats (CI smoke runs; numbers are not representative)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        metavar="N",
        help="threads for pyswitch (pyswitch.set_num_threads) and torch (torch.set_num_threads); "
        "default 2. NumPy's BLAS thread pool is left as it is (set OPENBLAS_NUM_THREADS / "
        "OMP_NUM_THREADS / MKL_NUM_THREADS in the environment to change it)",
    )
    p.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help=f"where to write the results (default: benchmarks/results/{name}.json)",
    )
    return p


def set_threads(n: int) -> dict:
    """Set pyswitch's and torch's thread counts to ``n``; NumPy's BLAS threads are left as they are.

    Returns what was set, for the JSON output.
    """
    if n < 1:
        raise ValueError("--threads must be >= 1")
    done: dict[str, Any] = {"requested": n, "numpy_blas": "unchanged (environment)"}
    ps = try_import_pyswitch()
    if ps is not None and hasattr(ps, "set_num_threads"):
        ps.set_num_threads(n)
        done["pyswitch"] = n
    torch = try_import_torch()
    if torch is not None:
        torch.set_num_threads(n)
        done["torch"] = torch.get_num_threads()
    return done


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_cell(v: Any) -> str:
    """How a table cell is shown: None as '-', floats with 3 significant digits."""
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a != 0 and (a >= 1e6 or a < 1e-3):
            return f"{v:.3e}"
        return f"{v:.3g}" if a < 100 else f"{v:,.0f}"
    return str(v)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None
) -> str:
    """Plain-text table with aligned columns.

    ``align`` is one character per column, ``l`` or ``r``; by default the first column is
    left-aligned and the others right-aligned. Floats are shown with 3 significant digits.
    """
    cells = [[format_cell(v) for v in row] for row in rows]
    ncol = len(headers)
    if align is None:
        align = "l" + "r" * (ncol - 1)
    if len(align) != ncol:
        raise ValueError("align must have one character per column")
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) != ncol:
            raise ValueError("row length does not match headers")
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))

    def line(vals):
        out = [
            v.rjust(widths[i]) if align[i] == "r" else v.ljust(widths[i])
            for i, v in enumerate(vals)
        ]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), sep] + [line(r) for r in cells])


def print_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None, file=None
) -> None:
    print(format_table(headers, rows, align), file=file or sys.stdout, flush=True)


def _json_default(o: Any):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def write_json(name: str, data: dict, path: str | os.PathLike | None = None) -> Path:
    """Write ``data`` as JSON to ``path`` (default ``benchmarks/results/<name>.json``)."""
    out = Path(path) if path else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv,
        **data,
    }
    with open(out, "w") as f:
        json.dump(payload, f, indent=2, default=_json_default)
        f.write("\n")
    return out


def print_run_summary(info: dict, rows, notes, problems, busy_warn: float = 0.15) -> None:
    """The closing lines every benchmark prints: load warnings, notes, disagreements."""
    busy = info.get("cpu_busy_before_run")
    if busy is not None and busy > busy_warn:
        print(f"\nWARNING: other processes kept {busy:.0%} of the CPUs busy when this run started")
    if any(str(r[-1]).endswith("!") for r in rows):
        print(
            "\nWARNING: rows marked '!' were timed while other processes were using the CPUs; "
            "rerun on a quiet machine"
        )
    if notes:
        print("\nnotes:")
        for note in notes:
            print("  " + note)
    if problems:
        print("\nDISAGREEMENTS / ERRORS:")
        for problem in problems:
            print("  " + problem)
