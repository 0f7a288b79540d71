"""Benchmark: pyswitch.route vs NumPy and PyTorch routers; bf16 conversion vs ml_dtypes."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

NAME = "bench_router"
CAPACITY_FACTOR = 1.25
MIN_CAPACITY = 4
PRIORITY = "position"
GOAL_ROUTER_VS_TORCH = 3.0
GOAL_CONVERT_VS_MLDTYPES = 5.0
GATE_ATOL = 1e-5
LOSS_RTOL = 1e-4
BUSY_WARN = common.BUSY_WARN

BASELINES = {
    "numpy": "vectorised NumPy router written in this file (softmax; top-k by repeated argmax "
    "with the chosen entries masked, lowest index on ties; position priority by a stable "
    "radix argsort of the choice-major expert ids; capacity mask; aux and z losses)",
    "torch": "PyTorch CPU router written in this file in the fairseq/GShard style (softmax; "
    "argmax + one_hot + masked_fill for top-k; cumsum over one_hot for positions, offset by the "
    "earlier choices' counts, gathered per token; capacity mask; aux and z losses). torch.topk is "
    "not used: its tie order is unspecified (it does not put the lowest index first)",
    "numpy_convert": "ml_dtypes astype: a.astype(ml_dtypes.bfloat16), b.astype(np.float32)",
    "torch_convert": "torch Tensor.to(torch.bfloat16) / .to(torch.float32) on from_numpy tensors",
}


def capacity(S: int, E: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """SPEC section 1: C = min(S, max(min_capacity, floor(capacity_factor * k * S / E)))."""
    return min(S, max(min_capacity, math.floor(capacity_factor * k * S / E)))


# --------------------------------------------------------------------------------------------
# Baseline (a): vectorised NumPy
# --------------------------------------------------------------------------------------------


def route_numpy(
    logits: np.ndarray,
    k: int,
    capacity_factor: float = CAPACITY_FACTOR,
    min_capacity: int = MIN_CAPACITY,
) -> dict:
    T, E = logits.shape
    C = capacity(T, E, k, capacity_factor, min_capacity)
    m = logits.max(axis=1, keepdims=True)
    ex = np.exp(logits - m)
    s = ex.sum(axis=1, keepdims=True)
    probs = ex / s
    rows = np.arange(T)

    # top-k, descending probability; argmax returns the first (lowest) index on ties
    idx = np.empty((k, T), dtype=np.intp)  # choice-major
    gates = np.empty((k, T), dtype=np.float32)
    work = probs if k == 1 else probs.copy()
    for j in range(k):
        ij = work.argmax(axis=1)
        idx[j] = ij
        gates[j] = probs[rows, ij]
        if j + 1 < k:
            work[rows, ij] = -1.0

    # position priority: slot = rank of the assignment among those to the same expert, in the
    # order (choice, token). A stable sort of the choice-major expert ids gives that order; with
    # small integer keys NumPy's stable sort is a radix sort (O(T*k)).
    flat = idx.reshape(-1)
    key = flat.astype(np.uint8 if E <= 256 else np.uint16 if E <= 65536 else np.int64)
    counts = np.bincount(flat, minlength=E)
    order = np.argsort(key, kind="stable")
    starts = np.cumsum(counts) - counts
    rank = np.empty(flat.shape[0], dtype=np.int64)
    rank[order] = np.arange(flat.shape[0]) - np.repeat(starts, counts)
    kept = rank < C
    slot = np.where(kept, rank, -1).astype(np.int32).reshape(k, T)
    gate = np.where(kept.reshape(k, T), gates, np.float32(0))

    f = counts / (T * k)
    P = probs.mean(axis=0, dtype=np.float64)
    aux = float(E * np.dot(f, P))
    lse = m[:, 0].astype(np.float64) + np.log(s[:, 0].astype(np.float64))
    z = float(np.mean(lse * lse))
    return {
        "expert_index": np.ascontiguousarray(idx.T, dtype=np.int32),
        "gate": np.ascontiguousarray(gate.T),
        "slot": np.ascontiguousarray(slot.T),
        "capacity": C,
        "tokens_per_expert": counts.astype(np.int64),
        "dropped": int(flat.shape[0] - np.count_nonzero(kept)),
        "aux_loss": aux,
        "z_loss": z,
    }


# --------------------------------------------------------------------------------------------
# Baseline (b): PyTorch CPU, fairseq / GShard / Mesh-TF style
# --------------------------------------------------------------------------------------------


def make_route_torch(torch):
    F = torch.nn.functional

    def route_torch(
        logits: np.ndarray,
        k: int,
        capacity_factor: float = CAPACITY_FACTOR,
        min_capacity: int = MIN_CAPACITY,
    ) -> dict:
        x = torch.from_numpy(logits)
        T, E = x.shape
        C = capacity(T, E, k, capacity_factor, min_capacity)
        probs = F.softmax(x, dim=1)
        masked = probs
        offset = torch.zeros(E, dtype=torch.int64)  # assignments by earlier choices
        idxs, gates, slots = [], [], []
        for j in range(k):
            ij = torch.argmax(masked, dim=1)  # first maximal index on ties
            mask = F.one_hot(ij, num_classes=E)  # (T, E) int64
            loc = torch.cumsum(mask, dim=0) - 1 + offset
            offset = offset + mask.sum(dim=0)
            loc_s = loc.gather(1, ij.unsqueeze(1)).squeeze(1)  # this token's position
            kept = loc_s < C
            g = probs.gather(1, ij.unsqueeze(1)).squeeze(1)
            idxs.append(ij)
            gates.append(torch.where(kept, g, torch.zeros((), dtype=g.dtype)))
            slots.append(torch.where(kept, loc_s, torch.full((), -1, dtype=loc_s.dtype)))
            if j + 1 < k:
                masked = masked.masked_fill(mask.bool(), float("-inf"))
        counts = offset
        me = probs.mean(dim=0)
        ce = counts.to(torch.float32) / (T * k)
        aux = float(E * torch.sum(me * ce))
        z = float(torch.logsumexp(x, dim=1).square().mean())
        slot = torch.stack(slots, dim=1).to(torch.int32)
        return {
            "expert_index": torch.stack(idxs, dim=1).to(torch.int32).numpy(),
            "gate": torch.stack(gates, dim=1).numpy(),
            "slot": slot.numpy(),
            "capacity": C,
            "tokens_per_expert": counts.numpy(),
            "dropped": int((slot < 0).sum()),
            "aux_loss": aux,
            "z_loss": z,
        }

    return route_torch


# --------------------------------------------------------------------------------------------
# pyswitch
# --------------------------------------------------------------------------------------------

PLAN_FIELDS = (
    "expert_index",
    "gate",
    "slot",
    "capacity",
    "tokens_per_expert",
    "dropped",
    "aux_loss",
    "z_loss",
)


def make_route_pyswitch(ps):
    def route_pyswitch(
        logits: np.ndarray,
        k: int,
        capacity_factor: float = CAPACITY_FACTOR,
        min_capacity: int = MIN_CAPACITY,
    ):
        plan = ps.route(
            logits,
            k=k,
            capacity_factor=capacity_factor,
            min_capacity=min_capacity,
            priority=PRIORITY,
        )
        # touch every output so that lazily built attributes are paid for inside the timing
        for f in PLAN_FIELDS:
            getattr(plan, f)
        return plan

    return route_pyswitch


def plan_to_dict(plan) -> dict:
    if isinstance(plan, dict):
        return plan
    return {f: getattr(plan, f) for f in PLAN_FIELDS}


def compare_plans(ref: dict, other: dict) -> list[str]:
    """Differences between two plans (empty list: they agree)."""
    out = []
    for f in ("expert_index", "slot"):
        a, b = np.asarray(ref[f]), np.asarray(other[f])
        if a.shape != b.shape:
            out.append(f"{f}: shape {a.shape} vs {b.shape}")
            continue
        bad = np.argwhere(a != b)
        if bad.size:
            t, j = bad[0]
            out.append(
                f"{f}: {len(bad)} differ, first at token {t} choice {j}: {a[t, j]} vs {b[t, j]}"
            )
    a, b = np.asarray(ref["gate"], dtype=np.float64), np.asarray(other["gate"], dtype=np.float64)
    if a.shape != b.shape:
        out.append(f"gate: shape {a.shape} vs {b.shape}")
    else:
        d = np.abs(a - b)
        if not (d <= GATE_ATOL).all():
            t, j = np.unravel_index(np.nanargmax(np.where(np.isnan(d), np.inf, d)), d.shape)
            out.append(
                f"gate: max |diff| {d.max():.3g} > {GATE_ATOL} at token {t} choice {j}: "
                f"{a[t, j]!r} vs {b[t, j]!r}"
            )
    for f in ("capacity", "dropped"):
        if int(ref[f]) != int(other[f]):
            out.append(f"{f}: {int(ref[f])} vs {int(other[f])}")
    a, b = np.asarray(ref["tokens_per_expert"]), np.asarray(other["tokens_per_expert"])
    if a.shape != b.shape or not np.array_equal(a, b):
        out.append(f"tokens_per_expert differ: {a[:8]}... vs {b[:8]}...")
    for f in ("aux_loss", "z_loss"):
        x, y = float(ref[f]), float(other[f])
        if not abs(x - y) <= LOSS_RTOL * max(abs(x), abs(y), 1e-12):
            out.append(f"{f}: {x!r} vs {y!r}")
    return out


def reproducer(T: int, E: int, k: int, ref_name: str, agree: dict) -> str:
    """A one-line command (run from the repo root) that shows a router disagreement."""
    other = next(b for b, d in agree.items() if d)
    impl = {
        "pyswitch": "b.plan_to_dict(b.make_route_pyswitch(pyswitch)(x, {k}))",
        "numpy": "b.route_numpy(x, {k})",
        "torch": "b.make_route_torch(torch)(x, {k})",
    }
    mods = "pyswitch, torch" if "torch" in (ref_name, other) else "pyswitch"
    return (
        "python -c \"import sys; sys.path.insert(0, 'benchmarks'); "
        f"import bench_router as b, {mods}; "
        f"x = b.make_logits({T}, {E}); "
        f'print(b.compare_plans({impl[ref_name].format(k=k)}, {impl[other].format(k=k)}))"'
    )


def make_logits(T: int, E: int, seed: int = 0) -> np.ndarray:
    """Standard-normal float32 logits, with a few exact ties planted to exercise the tie-break."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, E), dtype=np.float32)
    x[0] = 0.0  # all experts tie: choices 0, 1, ...
    x[1, [E // 2, 1]] = 5.0  # tie for first place between 1 and E/2: 1 first
    x[2, [E - 1, 0]] = 4.0  # tie between the last and the first expert
    x[3, [2, E - 2]] = 3.0
    x[3, 0] = 6.0  # clear first, tie for second place
    return x


# --------------------------------------------------------------------------------------------
# bf16 conversion
# --------------------------------------------------------------------------------------------


def make_f32(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n, dtype=np.float32)
    specials = np.array(
        [
            np.nan,
            -np.nan,
            np.inf,
            -np.inf,
            0.0,
            -0.0,
            1e-40,
            -1e-45,
            3.4e38,
            -3.4e38,
            1.00390625,
            1.01171875,
            np.finfo(np.float32).tiny,
        ],
        dtype=np.float32,
    )
    a[: len(specials)] = specials
    a[len(specials)] = np.uint32(0x7F800001).view(np.float32)  # signalling NaN payload
    a[len(specials) + 1] = np.uint32(0xFFC00123).view(np.float32)  # negative NaN with payload
    return a


def bits_agree(ref: np.ndarray, other: np.ndarray, nbytes: int) -> str:
    u = np.uint16 if nbytes == 2 else np.uint32
    a, b = np.asarray(ref).view(u), np.asarray(other).view(u)
    if a.shape != b.shape:
        return f"shape {a.shape} vs {b.shape}"
    if np.asarray(ref).dtype != np.asarray(other).dtype:
        return f"dtype {np.asarray(ref).dtype} vs {np.asarray(other).dtype}"
    bad = np.flatnonzero(a != b)
    if bad.size == 0:
        return "yes"
    fa = np.asarray(ref).astype(np.float32)
    only_nan = bool(np.isnan(fa[bad]).all())
    i = bad[0]
    return (
        "NaN bits only" if only_nan else "NO"
    ) + f" ({bad.size} differ, first [{i}] {a[i]:#x} vs {b[i]:#x})"


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


class Report:
    """Rows of the table, per-case JSON records, disagreements and notes."""

    HEADERS = [
        "case",
        "unit",
        "agree (numpy/torch)",
        "pyswitch",
        "numpy",
        "torch",
        "vs numpy",
        "vs torch",
        "goal",
        "busy",
    ]

    def __init__(self):
        self.rows, self.results, self.problems, self.notes = [], [], [], []

    def add_row(self, row):
        self.rows.append(row)
        print("  " + "  ".join(common.format_cell(c) for c in row), flush=True)

    def problem(self, text):
        self.problems.append(text)


def busy_text(busy):
    """The 'busy' column: CPU share other processes used while a row was timed."""
    if busy is None:
        return "?"
    return f"{busy:.0%}" + (" !" if busy > BUSY_WARN else "")


def goal_text(ratio, goal, what):
    if ratio is None:
        return "-"
    return f">={goal:g}x {what}: " + ("met" if ratio >= goal else "MISSED")


def bench_route(report, ps, torch, T, warmup, repeat):
    impls = {"numpy": route_numpy}
    if torch is not None:
        impls["torch"] = make_route_torch(torch)
    if ps is not None:
        impls["pyswitch"] = make_route_pyswitch(ps)
    print(
        f"\nrouter: T={T}, capacity_factor={CAPACITY_FACTOR}, min_capacity={MIN_CAPACITY}, "
        f"priority={PRIORITY!r}, one group; Mtokens/s, median of {repeat}",
        flush=True,
    )
    for E in (8, 64, 128):
        logits = make_logits(T, E)
        for k in (1, 2):
            case = f"route E={E} k={k}"
            case_impls, plans = {}, {}
            for name, fn in impls.items():
                try:
                    plans[name] = plan_to_dict(fn(logits, k))
                    case_impls[name] = fn
                except Exception as exc:  # report it and go on without that implementation
                    report.problem(f"{case}: {name} raised {exc!r}")
                    print(f"  {case}: {name} raised {exc!r}", flush=True)
            ref_name = "pyswitch" if "pyswitch" in plans else "numpy"
            agree = {
                b: compare_plans(plans[ref_name], plans[b])
                for b in ("numpy", "torch")
                if b in plans and b != ref_name
            }
            for b, diffs in agree.items():
                if diffs:
                    report.problem(f"{case}: {ref_name} vs {b}: " + "; ".join(diffs))
            if any(agree.values()):
                report.problem(f"{case}: reproduce with: {reproducer(T, E, k, ref_name, agree)}")
            agree_s = "/".join(
                ("NO" if agree[b] else "yes") if b in agree else "-" for b in ("numpy", "torch")
            )

            timings = common.time_many(
                {name: (lambda fn=fn, x=logits, k=k: fn(x, k)) for name, fn in case_impls.items()},
                warmup=warmup,
                repeat=repeat,
            )
            tput = {name: T / tm["median_s"] for name, tm in timings.items()}
            busy = max((tm["other_load"] or 0.0 for tm in timings.values()), default=None)
            vs_np = tput["pyswitch"] / tput["numpy"] if "pyswitch" in tput else None
            vs_t = tput["pyswitch"] / tput["torch"] if {"pyswitch", "torch"} <= set(tput) else None
            report.add_row(
                [case, "Mtok/s", agree_s]
                + [(tput[n] / 1e6 if n in tput else None) for n in ("pyswitch", "numpy", "torch")]
                + [
                    fmt_ratio(vs_np),
                    fmt_ratio(vs_t),
                    goal_text(vs_t, GOAL_ROUTER_VS_TORCH, "torch"),
                    busy_text(busy),
                ]
            )
            ref = plans[ref_name]
            report.results.append(
                {
                    "kind": "route",
                    "case": case,
                    "T": T,
                    "E": E,
                    "k": k,
                    "capacity_factor": CAPACITY_FACTOR,
                    "min_capacity": MIN_CAPACITY,
                    "priority": PRIORITY,
                    "group_size": None,
                    "capacity": int(ref["capacity"]),
                    "dropped": int(ref["dropped"]),
                    "reference": ref_name,
                    "agree": {b: (not d) for b, d in agree.items()},
                    "differences": {b: d for b, d in agree.items() if d},
                    "tokens_per_s": tput,
                    "other_load": busy,
                    "timing": timings,
                    "ratio_vs_numpy": vs_np,
                    "ratio_vs_torch": vs_t,
                    "goal_ratio_vs_torch": GOAL_ROUTER_VS_TORCH,
                    "goal_met": None if vs_t is None else vs_t >= GOAL_ROUTER_VS_TORCH,
                }
            )


def bench_convert(report, ps, torch, n, warmup, repeat, into_existing=False):
    """Conversion throughput. Allocating: each call returns a new array (a.astype vs
    pyswitch.to_bfloat16(a)), so page faults of the fresh output are part of every number.
    Into existing (into_existing=True): every implementation writes into a preallocated output
    (np.copyto with the ml_dtypes cast, torch's Tensor.copy_, pyswitch's out=)."""
    import ml_dtypes

    mode = "into existing output" if into_existing else "allocating the output"
    print(
        f"\nbf16 conversion: {n // 2**20} Mi elements, {mode}; GB/s = (bytes read + written) / "
        f"time, median of {repeat}",
        flush=True,
    )
    a32 = make_f32(n)
    a16 = a32.astype(ml_dtypes.bfloat16)
    if into_existing:
        o16 = np.empty(n, ml_dtypes.bfloat16)
        o32 = np.empty(n, np.float32)
        o16.fill(0)
        o32.fill(0)
        conv = {
            "to_bfloat16": {
                "numpy": lambda: (np.copyto(o16, a32, casting="unsafe"), o16)[1],
                "nbytes_out": 2,
            },
            "to_float32": {"numpy": lambda: (np.copyto(o32, a16), o32)[1], "nbytes_out": 4},
        }
    else:
        conv = {
            "to_bfloat16": {"numpy": lambda: a32.astype(ml_dtypes.bfloat16), "nbytes_out": 2},
            "to_float32": {"numpy": lambda: a16.astype(np.float32), "nbytes_out": 4},
        }
    if torch is not None:
        t32 = torch.from_numpy(a32)
        t16 = torch.from_numpy(a16.view(np.int16)).view(torch.bfloat16)
        if into_existing:
            u16 = torch.from_numpy(o16.view(np.int16)).view(torch.bfloat16)
            u32 = torch.from_numpy(o32)
            conv["to_bfloat16"]["torch"] = lambda: (u16.copy_(t32), o16)[1]
            conv["to_float32"]["torch"] = lambda: (u32.copy_(t16), o32)[1]
        else:
            conv["to_bfloat16"]["torch"] = lambda: (
                t32.to(torch.bfloat16).view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            )
            conv["to_float32"]["torch"] = lambda: t16.to(torch.float32).numpy()
    if ps is not None:
        if into_existing:
            conv["to_bfloat16"]["pyswitch"] = lambda: ps.to_bfloat16(a32, out=o16)
            conv["to_float32"]["pyswitch"] = lambda: ps.to_float32(a16, out=o32)
        else:
            conv["to_bfloat16"]["pyswitch"] = lambda: ps.to_bfloat16(a32)
            conv["to_float32"]["pyswitch"] = lambda: ps.to_float32(a16)

    for op, d in conv.items():
        case = f"{op} {n // 2**20}Mi" + (" out=" if into_existing else "")
        nbytes = n * (2 + 4)
        ref_out = d["numpy"]()
        agree = {}
        if "pyswitch" in d:
            try:
                out = d["pyswitch"]()
            except Exception as exc:
                report.problem(f"{case}: pyswitch raised {exc!r}")
                print(f"  {case}: pyswitch raised {exc!r}", flush=True)
                del d["pyswitch"]
        if "pyswitch" in d:
            agree["numpy"] = bits_agree(ref_out, out, d["nbytes_out"])
            if "torch" in d:
                agree["torch"] = bits_agree(d["torch"](), out, d["nbytes_out"])
            del out
        elif "torch" in d:
            agree["torch"] = bits_agree(ref_out, d["torch"](), d["nbytes_out"])
        del ref_out
        for b, s in agree.items():
            if b == "torch" and s.startswith("NaN bits only"):
                report.notes.append(f"{case}: torch writes other NaN bits than ml_dtypes: {s}")
            elif s != "yes":
                report.problem(f"{case}: {b}: {s}")
        agree_s = "/".join(
            ("yes" if agree[b] == "yes" else "nan" if agree[b].startswith("NaN") else "NO")
            if b in agree
            else "-"
            for b in ("numpy", "torch")
        )

        # context: the cost of the output allocation + first touch alone (page faults), which
        # every implementation pays since the timings include output allocation
        out_dtype = np.uint16 if d["nbytes_out"] == 2 else np.float32
        fns = {name: d[name] for name in ("pyswitch", "numpy", "torch") if name in d}
        fns["floor"] = lambda dt=out_dtype: np.empty(n, dtype=dt).fill(0)
        timings = common.time_many(fns, warmup=warmup, repeat=repeat)
        floor = timings.pop("floor")
        gbps = {name: nbytes / tm["median_s"] / 1e9 for name, tm in timings.items()}
        busy = max(tm["other_load"] or 0.0 for tm in [floor, *timings.values()])
        vs_np = gbps["pyswitch"] / gbps["numpy"] if "pyswitch" in gbps else None
        vs_t = gbps["pyswitch"] / gbps["torch"] if {"pyswitch", "torch"} <= set(gbps) else None
        report.add_row(
            [case, "GB/s", agree_s]
            + [gbps.get(k) for k in ("pyswitch", "numpy", "torch")]
            + [
                fmt_ratio(vs_np),
                fmt_ratio(vs_t),
                goal_text(vs_np, GOAL_CONVERT_VS_MLDTYPES, "ml_dtypes"),
                busy_text(busy),
            ]
        )
        report.results.append(
            {
                "kind": "convert",
                "case": case,
                "op": op,
                "elements": n,
                "bytes_moved": nbytes,
                "agree": agree,
                "gb_per_s": gbps,
                "other_load": busy,
                "timing": timings,
                "ratio_vs_numpy": vs_np,
                "ratio_vs_torch": vs_t,
                "goal_ratio_vs_numpy": GOAL_CONVERT_VS_MLDTYPES,
                "goal_met": None if vs_np is None else vs_np >= GOAL_CONVERT_VS_MLDTYPES,
                "output_alloc_fill": floor,
            }
        )
        print(
            f"    context: allocating and filling the {n // 2**20} Mi-element output alone "
            f"(np.empty + fill, 1 thread) takes {floor['median_s'] * 1e3:.1f} ms, "
            f"i.e. {nbytes / floor['median_s'] / 1e9:.1f} GB/s in this table's accounting",
            flush=True,
        )


def main(argv=None) -> int:
    args = common.make_parser(NAME, __doc__).parse_args(argv)
    threads = common.set_threads(args.threads)
    ps = common.try_import_pyswitch()
    torch = common.try_import_torch()

    info = common.machine_info()
    print(__doc__.strip())
    print(common.format_machine(info))
    print(f"threads  : {threads}")
    if ps is None:
        print(
            f"pyswitch not importable ({common.pyswitch_import_error()}): timing the baselines only"
        )
    if torch is None:
        print(f"torch not importable ({common.torch_import_error()}): skipping the torch baseline")

    report = Report()
    if args.quick:
        bench_route(report, ps, torch, T=8192, warmup=1, repeat=3)
    else:
        bench_route(report, ps, torch, T=65536, warmup=2, repeat=10)
    # the conversion input holds NaN/Inf/overflowing values on purpose: no cast warnings
    with np.errstate(invalid="ignore", over="ignore"):
        if args.quick:
            for into in (False, True):
                bench_convert(
                    report, ps, torch, n=8 * 2**20, warmup=1, repeat=3, into_existing=into
                )
        else:
            for n_conv in (2**20, 64 * 2**20):
                for into in (False, True):
                    bench_convert(
                        report, ps, torch, n=n_conv, warmup=2, repeat=7, into_existing=into
                    )

    print()
    print(
        "numpy column: the NumPy router (route rows) / ml_dtypes astype (conversion rows); "
        "'vs' columns: pyswitch throughput / baseline throughput"
    )
    if ps is not None:
        print(
            "agree: pyswitch vs numpy / pyswitch vs torch (route: expert_index, slot, capacity, "
            f"counts, dropped exact, gate within {GATE_ATOL:g}, losses within rel "
            f"{LOSS_RTOL:g}; conversion: bit-exact, 'nan' = only NaN bit patterns differ)"
        )
    else:
        print("agree: torch vs numpy (pyswitch not importable)")
    print(
        "busy: share of the CPUs that other processes used while the row was timed "
        f"('!' above {BUSY_WARN:.0%}: that row's numbers are not trustworthy)"
    )
    common.print_table(Report.HEADERS, report.rows, align="lllrrrrrlr")
    common.print_run_summary(info, report.rows, report.notes, report.problems, busy_warn=BUSY_WARN)
    out = common.write_json(
        NAME,
        {
            "quick": args.quick,
            "threads": threads,
            "machine": info,
            "baselines": BASELINES,
            "goals": {
                "router_vs_torch": GOAL_ROUTER_VS_TORCH,
                "conversion_vs_ml_dtypes": GOAL_CONVERT_VS_MLDTYPES,
            },
            "tolerances": {"gate_atol": GATE_ATOL, "loss_rtol": LOSS_RTOL},
            "results": report.results,
            "problems": report.problems,
            "notes": report.notes,
            "table": {"headers": Report.HEADERS, "rows": report.rows},
        },
        args.json,
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
