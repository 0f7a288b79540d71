"""Benchmark: a training step (forward + backward) of pyswitch.SwitchFFN vs PyTorch CPU MoE layers.

Top-1 Switch FFN layer, relu experts, capacity factor 1.25, one routing group, aux and z losses,
router jitter on. One step = forward(x, training=True) + backward(dy) with a fixed random dy (no
optimizer), throughput in tokens/s. Baselines, written in this file: "torch-index" (index-based,
one weight tensor per expert, a Python loop over experts, as in Hugging Face's Switch
Transformers) and "torch-onehot" (a (T, E, C) one-hot dispatch/combine tensor and einsums, as in
Mesh TensorFlow / fairseq), both differentiated by autograd. "GEMM limit": the tokens/s at which
the step's expert GEMMs alone (12 * d_model * d_ff flops a token) would run at the best GFLOP/s
pyswitch.matmul (the layer's own GEMM kernel) reaches on whole-batch GEMMs of their shapes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

NAME = "bench_layer"
K = 1
CAPACITY_FACTOR = 1.25
EVAL_CAPACITY_FACTOR = 2.0
MIN_CAPACITY = 4
ACTIVATION = "relu"
AUX_LOSS_COEF = 1e-2
Z_LOSS_COEF = 1e-3
JITTER_EPS = 1e-2
INIT_SCALE = 0.1
SEED = 0
EXPERTS = (8, 64)
DTYPES = ("float32", "bfloat16")
IMPLS = ("pyswitch", "torch-index", "torch-onehot")

# goals: pyswitch tokens/s over torch-index tokens/s, per (dtype, E); fraction of the GEMM limit
GOAL_VS_INDEX = {
    ("float32", 8): 1.3,
    ("float32", 64): 1.9,
    ("bfloat16", 8): 1.4,
    ("bfloat16", 64): 2.2,
}
GOAL_GEMM_FRACTION = {8: 0.85}  # only at E=8

# forward agreement: a row agrees when max|y_a - y_b| <= TOL * max|y_b| (whole output's scale).
# Up to AGREE_ROW_SLACK of the rows may differ (a near-tie in the router logits can flip a
# token's expert when the two router matmuls round differently); they are counted and reported.
FWD_TOL = {"float32": 1e-4, "bfloat16": 3e-2}
AGREE_ROW_SLACK = 1e-3
# gradient agreement, per gradient, as for the forward: dx by token rows, router by rows,
# w_in by (expert, hidden unit) columns, w_out by (expert, hidden unit) rows, each within
# GRAD_TOL x max|reference gradient|, up to AGREE_ROW_SLACK of them allowed to differ: a relu
# pre-activation within rounding of 0 (|h| ~ 1e-9) flips that hidden unit's mask in backward,
# which moves that token's dx row and that expert's w_in column wholesale (seen at E=64 fp32).
GRAD_TOL = {"float32": 1e-4, "bfloat16": 3e-2}
BUSY_WARN = 0.1

BASELINES = {
    "torch-index": "PyTorch CPU, Hugging Face SwitchTransformersSparseMLP style: router logits "
    "float32(x * jitter) @ W_r, softmax, top-1 = argmax of the logits (first index on ties), "
    "capacity by cumsum over the one-hot mask (HF's token_priority <= capacity), then for e in "
    "range(E): idx = mask[:, e]; out[idx] = gate[idx] * relu(x[idx] @ W_in[e]) @ W_out[e]; out "
    "starts as zeros (dropped tokens give 0, SPEC section 2); aux and z losses added to the "
    "objective with the layer's coefficients; one raw leaf tensor per expert weight; autograd",
    "torch-onehot": "PyTorch CPU, fairseq top1gating / Mesh-TF style: same router, locations by "
    "cumsum over one_hot, combine (T, E, C) = bmm(gates (T, E, 1), one_hot(location, C) "
    "(T, 1, C)), "
    "dispatch = combine.bool(); einsum('sec,sm->ecm') to the (E, C, d_model) buffers, batched "
    "expert matmuls (torch.bmm) with (E, d_model, d_ff) / (E, d_ff, d_model) weights, "
    "einsum('sec,ecm->sm') to combine; aux and z losses; autograd",
    "bfloat16": "torch bf16 runs use bfloat16 expert weights and bfloat16 activations (no "
    "autocast): x, the expert buffers and y are bfloat16, the router weight, logits, softmax and "
    "losses float32 (router input cast to float32 first), as pyswitch's dtype='bfloat16' does; "
    "torch's CPU bf16 matmuls accumulate in float32. torch's expert-weight gradients are bf16 "
    "(pyswitch keeps float32 master weights and gradients)",
    "gemm_limit": "pyswitch.matmul (the layer's GEMM kernel) GFLOP/s, median, on the shapes of "
    "the six GEMMs of "
    "one expert-FFN training step at whole-batch size: (T,d)@(d,f) and (T,f)@(f,d) twice each "
    "(forward and input gradients), (d,T)@(T,f) and (f,T)@(T,d) once each (weight gradients), "
    "operands pre-transposed outside the timing, each call allocating its output. limit "
    "tokens/s = best shape's GFLOP/s * 1e9 / (12 * d_model * d_ff) (a step is 3 passes x 2 "
    "GEMMs x 2*d_model*d_ff flops per token); router flops (2*d_model*E per token and pass) "
    "and all non-GEMM work are ignored, and per-expert GEMMs are smaller (T/E rows). "
    "'step mix' = T / (sum of the six GEMMs' times), for context. torch.mm (MKL for fp32, "
    "oneDNN for bf16) on the same shapes, for context",
    "memory": "peak RSS = VmHWM (/proc/self/status; the RSS high-water mark getrusage's "
    "ru_maxrss also reports, but ru_maxrss carries the parent's peak over fork + exec) of a "
    "fresh child process per "
    "(implementation, case) that imports only what that implementation needs (torch or "
    "pyswitch, not both), builds the inputs and the layer, and runs two training steps; "
    "'step' = that peak minus the child's RSS just before the first step (the inputs, weights "
    "and imports excluded). The torch children initialise their own weights (same shapes and "
    "init distribution as pyswitch's, not the same values)",
}


def capacity(S: int, E: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    """SPEC section 1: C = min(S, max(min_capacity, floor(capacity_factor * k * S / E)))."""
    return min(S, max(min_capacity, math.floor(capacity_factor * k * S / E)))


def step_flops(T: int, d_model: int, d_ff: int) -> float:
    """Expert-FFN GEMM flops of one forward + backward: 3 passes x 2 GEMMs x 2*d*f per token."""
    return 12.0 * d_model * d_ff * T


# --------------------------------------------------------------------------------------------
# Inputs and weights
# --------------------------------------------------------------------------------------------


def trunc_normal(rng, shape, fan_in: int) -> np.ndarray:
    """SPEC section 2 init: truncated normal, std = sqrt(INIT_SCALE / fan_in), resampled > 2 std."""
    a = rng.standard_normal(shape, dtype=np.float32)
    while True:
        bad = np.abs(a) > 2.0
        n = int(np.count_nonzero(bad))
        if n == 0:
            break
        a[bad] = rng.standard_normal(n, dtype=np.float32)
    a *= np.float32(math.sqrt(INIT_SCALE / fan_in))
    return a


def numpy_weights(d_model: int, d_ff: int, E: int, seed: int = SEED) -> dict:
    rng = np.random.default_rng(seed + 1000)
    return {
        "router": trunc_normal(rng, (d_model, E), d_model),
        "w_in": trunc_normal(rng, (E, d_model, d_ff), d_model),
        "w_out": trunc_normal(rng, (E, d_ff, d_model), d_ff),
    }


def make_inputs(T: int, d_model: int, dtype: str, seed: int = SEED):
    """x and dy as float32, or as ml_dtypes bfloat16 for dtype='bfloat16'."""
    rng = np.random.default_rng(seed + 7)
    x = rng.standard_normal((T, d_model), dtype=np.float32)
    dy = rng.standard_normal((T, d_model), dtype=np.float32)
    if dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16), dy.astype(ml_dtypes.bfloat16)
    return x, dy


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """RSS high-water mark of this process's address space, MiB.

    VmHWM from /proc/self/status, not getrusage's ru_maxrss: ru_maxrss survives fork + exec, so a
    child started from a large parent reports at least the parent's RSS at the fork.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# --------------------------------------------------------------------------------------------
# PyTorch baselines
# --------------------------------------------------------------------------------------------


def to_torch(torch, a: np.ndarray):
    """NumPy float32 / ml_dtypes bfloat16 array -> torch tensor (a copy)."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.float32:
        return torch.from_numpy(a.copy())
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    raise TypeError(f"unexpected dtype {a.dtype}")


def to_numpy_f32(t) -> np.ndarray:
    return t.detach().float().numpy()


class TorchMoE:
    """Switch FFN layer in PyTorch, ``style`` 'index' (HF) or 'onehot' (fairseq / Mesh-TF)."""

    def __init__(
        self, torch, style: str, weights: dict, dtype: str, jitter_eps: float = JITTER_EPS
    ):
        self.torch = torch
        self.F = torch.nn.functional
        self.style = style
        self.jitter_eps = jitter_eps
        self.gen = torch.Generator().manual_seed(SEED)
        wdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.router = torch.tensor(weights["router"], dtype=torch.float32).requires_grad_(True)
        w_in = torch.tensor(weights["w_in"]).to(wdt)
        w_out = torch.tensor(weights["w_out"]).to(wdt)
        self.E = w_in.shape[0]
        if style == "index":
            self.w_in = [w_in[e].clone().requires_grad_(True) for e in range(self.E)]
            self.w_out = [w_out[e].clone().requires_grad_(True) for e in range(self.E)]
            self.leaves = [self.router, *self.w_in, *self.w_out]
        elif style == "onehot":
            self.w_in = w_in.requires_grad_(True)
            self.w_out = w_out.requires_grad_(True)
            self.leaves = [self.router, self.w_in, self.w_out]
        else:
            raise ValueError(style)

    def _router(self, x, training: bool):
        torch, F = self.torch, self.F
        xr = x.to(torch.float32)  # selective precision: cast before the router matmul
        if training and self.jitter_eps > 0:
            noise = torch.empty_like(xr).uniform_(
                1.0 - self.jitter_eps, 1.0 + self.jitter_eps, generator=self.gen
            )
            xr = xr * noise
        logits = xr @ self.router  # (T, E) float32
        probs = F.softmax(logits, dim=-1)
        expert_index = torch.argmax(logits, dim=-1)  # first maximal index on ties
        one_hot = F.one_hot(expert_index, num_classes=self.E)  # (T, E) int64, before capacity
        # unscaled losses (SPEC section 1): E * sum f_i P_i and mean logsumexp^2
        f = one_hot.sum(dim=0).to(torch.float32) / x.shape[0]
        aux = self.E * torch.sum(f * probs.mean(dim=0))
        z = torch.logsumexp(logits, dim=-1).square().mean()
        return probs, expert_index, one_hot, aux, z

    def forward(self, x, training: bool = True):
        """Returns (y, aux_loss, z_loss); y in x's dtype."""
        T = x.shape[0]
        C = capacity(
            T, self.E, K, CAPACITY_FACTOR if training else EVAL_CAPACITY_FACTOR, MIN_CAPACITY
        )
        probs, expert_index, one_hot, aux, z = self._router(x, training)
        if self.style == "index":
            y = self._experts_index(x, probs, expert_index, one_hot, C)
        else:
            y = self._experts_onehot(x, probs, one_hot, C)
        return y, aux, z

    def _experts_index(self, x, probs, expert_index, one_hot, C):
        torch, F = self.torch, self.F
        token_priority = torch.cumsum(one_hot, dim=0)  # HF: position within the expert, 1-based
        router_mask = one_hot * (token_priority <= C)
        gate = probs.gather(1, expert_index.unsqueeze(1))  # (T, 1) float32
        out = torch.zeros_like(x)
        for e in range(self.E):
            idx = router_mask[:, e].bool()
            h = F.relu(x[idx] @ self.w_in[e])
            out[idx] = (gate[idx] * (h @ self.w_out[e])).to(out.dtype)
        return out

    def _experts_onehot(self, x, probs, one_hot, C):
        torch, F = self.torch, self.F
        locations = torch.cumsum(one_hot, dim=0) - 1
        mask = one_hot * (locations < C)
        locations_s = torch.sum(locations * mask, dim=1)
        gates = probs * mask  # (T, E): the gate at the chosen expert, 0 elsewhere and if dropped
        locations_sc = F.one_hot(locations_s, num_classes=C).to(gates.dtype)  # (T, C)
        combine = torch.bmm(gates.unsqueeze(-1), locations_sc.unsqueeze(1))  # (T, E, C)
        dispatch = combine.bool().to(x.dtype)
        buf = torch.einsum("sec,sm->ecm", dispatch, x)  # (E, C, d_model)
        h = F.relu(torch.bmm(buf, self.w_in))
        o = torch.bmm(h, self.w_out)
        return torch.einsum("sec,ecm->sm", combine.to(x.dtype), o)

    def train_step(self, x, dy):
        """Forward (training) + backward of sum(y * dy) + aux_coef * aux + z_coef * z."""
        for p in self.leaves:
            p.grad = None
        x.grad = None
        y, aux, z = self.forward(x, training=True)
        self.torch.autograd.backward([y, AUX_LOSS_COEF * aux + Z_LOSS_COEF * z], [dy, None])
        return y

    def grads(self) -> dict:
        torch = self.torch
        if self.style == "index":
            w_in = torch.stack([p.grad for p in self.w_in])
            w_out = torch.stack([p.grad for p in self.w_out])
        else:
            w_in, w_out = self.w_in.grad, self.w_out.grad
        return {
            "router": to_numpy_f32(self.router.grad),
            "w_in": to_numpy_f32(w_in),
            "w_out": to_numpy_f32(w_out),
        }


# --------------------------------------------------------------------------------------------
# pyswitch
# --------------------------------------------------------------------------------------------


def has_layer(ps) -> bool:
    return ps is not None and hasattr(ps, "SwitchFFN")


def make_pyswitch_layer(ps, d_model, d_ff, E, dtype, jitter_eps=JITTER_EPS):
    return ps.SwitchFFN(
        d_model,
        d_ff,
        E,
        k=K,
        capacity_factor=CAPACITY_FACTOR,
        eval_capacity_factor=EVAL_CAPACITY_FACTOR,
        min_capacity=MIN_CAPACITY,
        activation=ACTIVATION,
        dtype=dtype,
        aux_loss_coef=AUX_LOSS_COEF,
        z_loss_coef=Z_LOSS_COEF,
        jitter_eps=jitter_eps,
        seed=SEED,
    )


def pyswitch_params(layer) -> dict:
    return {
        n: np.array(layer.params[n], dtype=np.float32, copy=True)
        for n in ("router", "w_in", "w_out")
    }


# --------------------------------------------------------------------------------------------
# Agreement check (once per case, before timing)
# --------------------------------------------------------------------------------------------


def rows_agree(y: np.ndarray, ref: np.ndarray, tol: float) -> dict:
    """Rows of 2-D ``y`` within ``tol * max|ref|`` of ``ref``; a few may differ (see slack)."""
    y = np.asarray(y, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    scale = float(np.max(np.abs(ref))) or 1.0
    err = np.max(np.abs(y - ref), axis=1)
    bad = np.flatnonzero(~(err <= tol * scale))  # NaN counts as bad
    T = ref.shape[0]
    return {
        "ok": bad.size <= AGREE_ROW_SLACK * T,
        "rows_differ": int(bad.size),
        "rows": T,
        "max_abs_err": float(np.nanmax(err)) if err.size else 0.0,
        "scale": scale,
        "tol": tol,
        "first_rows": bad[:5].tolist(),
    }


def agree_text(a: dict | None) -> str:
    if a is None:
        return "-"
    if a.get("error"):
        return "ERR"
    if not a["ok"]:
        return "NO"
    return "yes" if a["rows_differ"] == 0 else f"yes({a['rows_differ']})"


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    nb = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (nb if nb > 0 else 1.0))


def check_case(report, ps, torch, case, T, d_model, d_ff, E, dtype) -> dict:
    """Forward (and gradient) agreement with identical weights and jitter off.

    Forward: pyswitch vs torch-index, torch-onehot vs torch-index (per-row tolerance).
    Gradients of one training step (dx, router, w_in, w_out): pyswitch vs torch-index,
    relative norm error.
    """
    out: dict = {"fwd": {}, "grads": None}
    if torch is None:
        return out
    x, dy = make_inputs(T, d_model, dtype, seed=SEED + 1)
    layer = None
    if has_layer(ps):
        try:
            layer = make_pyswitch_layer(ps, d_model, d_ff, E, dtype, jitter_eps=0.0)
            weights = pyswitch_params(layer)
        except Exception as exc:
            report.problem(f"{case}: building pyswitch.SwitchFFN raised {exc!r}")
            layer = None
    if layer is None:
        weights = numpy_weights(d_model, d_ff, E)
    xt = to_torch(torch, x)
    dyt = to_torch(torch, dy)
    ref_model = TorchMoE(torch, "index", weights, dtype, jitter_eps=0.0)
    with torch.no_grad():
        y_ref = to_numpy_f32(ref_model.forward(xt, training=True)[0])
    oh = TorchMoE(torch, "onehot", weights, dtype, jitter_eps=0.0)
    with torch.no_grad():
        y_oh = to_numpy_f32(oh.forward(xt, training=True)[0])
    del oh
    out["fwd"]["torch-onehot"] = rows_agree(y_oh, y_ref, FWD_TOL[dtype])
    if layer is not None:
        try:
            y_ps = np.asarray(layer.forward(x, training=True))
            if y_ps.dtype != x.dtype or y_ps.shape != x.shape:
                report.problem(
                    f"{case}: pyswitch forward returned {y_ps.dtype}{y_ps.shape}, "
                    f"expected {x.dtype}{x.shape}"
                )
            out["fwd"]["pyswitch"] = rows_agree(y_ps, y_ref, FWD_TOL[dtype])
            dx_ps = np.asarray(layer.backward(dy))
            g_ps = {
                n: np.array(layer.grads[n], dtype=np.float32) for n in ("router", "w_in", "w_out")
            }
            xg = xt.clone().requires_grad_(True)
            ref_model.train_step(xg, dyt)
            g_t = ref_model.grads()
            g_ps["dx"] = dx_ps.astype(np.float32)
            g_t["dx"] = to_numpy_f32(xg.grad)
            tol = GRAD_TOL[dtype]

            def units(n, a):  # 2-D view whose rows are the units compared (see GRAD_TOL)
                if n == "w_in":  # (E, d_model, d_ff) -> (E * d_ff, d_model) columns
                    return np.swapaxes(a, 1, 2).reshape(-1, a.shape[1])
                return a.reshape(-1, a.shape[-1])

            per = {
                n: rows_agree(units(n, g_ps[n]), units(n, g_t[n]), tol)
                for n in ("dx", "router", "w_in", "w_out")
            }
            for n, a in per.items():
                a["rel_err"] = rel_err(g_ps[n], g_t[n])
            out["grads"] = {
                "per_grad": per,
                "tol": tol,
                "ok": all(a["ok"] for a in per.values()),
                "units_differ": sum(a["rows_differ"] for a in per.values()),
            }
        except Exception as exc:
            report.problem(f"{case}: pyswitch check raised {exc!r}")
            out["fwd"].setdefault("pyswitch", {"error": repr(exc)})
    for name, a in out["fwd"].items():
        if a.get("error"):
            continue
        if not a["ok"]:
            report.problem(
                f"{case}: forward {name} vs torch-index: {a['rows_differ']}/{a['rows']} rows "
                f"differ by more than {a['tol']:g} x max|y| (max abs err {a['max_abs_err']:.3g}, "
                f"scale {a['scale']:.3g}; first rows {a['first_rows']})"
            )
        elif a["rows_differ"]:
            report.notes.append(
                f"{case}: forward {name} vs torch-index: {a['rows_differ']} of {a['rows']} rows "
                "differ (within the allowed share; near-tie routing)"
            )
    g = out["grads"]
    if g is not None:
        text = "; ".join(
            f"{n}: {a['rows_differ']}/{a['rows']} differ, max abs err {a['max_abs_err']:.3g} "
            f"(scale {a['scale']:.3g}), norm rel err {a['rel_err']:.2g}"
            for n, a in g["per_grad"].items()
        )
        if not g["ok"]:
            report.problem(
                f"{case}: gradients pyswitch vs torch-index beyond {g['tol']:g} x max|grad|: {text}"
            )
        elif g["units_differ"]:
            report.notes.append(
                f"{case}: gradients pyswitch vs torch-index, a few units differ (within the "
                f"allowed share; relu pre-activations within rounding of 0): {text}"
            )
    return out


# --------------------------------------------------------------------------------------------
# GEMM limit
# --------------------------------------------------------------------------------------------


def gemm_shapes(T, d_model, d_ff):
    """(name, M, K, N, count per training step) of the expert FFN's GEMMs."""
    return [
        ("(T,d)@(d,f)", T, d_model, d_ff, 2),  # x @ W_in; dy @ W_out^T
        ("(T,f)@(f,d)", T, d_ff, d_model, 2),  # h @ W_out; dh @ W_in^T
        ("(d,T)@(T,f)", d_model, T, d_ff, 1),  # x^T @ dh
        ("(f,T)@(T,d)", d_ff, T, d_model, 1),  # h^T @ dy
    ]


def bench_gemm(ps, torch, T, d_model, d_ff, warmup, repeat, dtypes=DTYPES) -> dict:
    """GFLOP/s of pyswitch.matmul (and torch.mm for context) on the step's GEMM shapes."""
    import ml_dtypes

    use_ps = ps is not None and hasattr(ps, "matmul")
    rng = np.random.default_rng(3)
    res = {}
    for dtype in dtypes:
        per_shape = {}
        torch_here = common.torch_for(torch, dtype)
        for name, M, Kd, N, count in gemm_shapes(T, d_model, d_ff):
            a = rng.standard_normal((M, Kd), dtype=np.float32)
            b = rng.standard_normal((Kd, N), dtype=np.float32)
            if dtype == "bfloat16":
                a, b = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
            fns = {}
            if use_ps:
                fns["pyswitch"] = lambda a=a, b=b: ps.matmul(a, b)
            # context: allocating and first-touching a fresh float32 output, which every
            # pyswitch.matmul call pays (page faults once the output is mmap-sized)
            fns["alloc"] = lambda M=M, N=N: np.empty((M, N), dtype=np.float32).fill(0)
            if torch_here is not None:
                ta, tb = to_torch(torch, a), to_torch(torch, b)
                fns["torch"] = lambda ta=ta, tb=tb: torch.mm(ta, tb)
            tm = common.time_many(fns, warmup=warmup, repeat=repeat)
            alloc = tm.pop("alloc")
            flops = 2.0 * M * Kd * N
            per_shape[name] = {
                "M": M,
                "K": Kd,
                "N": N,
                "count": count,
                "gflops": {n: flops / t["median_s"] / 1e9 for n, t in tm.items()},
                "median_s": {n: t["median_s"] for n, t in tm.items()},
                "output_alloc_fill_s": alloc["median_s"],
                "other_load": max(t["other_load"] or 0.0 for t in [alloc, *tm.values()]),
            }
        limit = {}
        per_token = 12.0 * d_model * d_ff
        for lib in ("pyswitch", "torch"):
            if all(lib in s["median_s"] for s in per_shape.values()):
                best_name = max(per_shape, key=lambda n: per_shape[n]["gflops"][lib])
                best = per_shape[best_name]["gflops"][lib]
                step_s = sum(s["count"] * s["median_s"][lib] for s in per_shape.values())
                mix = step_flops(T, d_model, d_ff) / step_s / 1e9
                limit[lib] = {
                    "best_shape": best_name,
                    "gflops": best,
                    "tokens_per_s": best * 1e9 / per_token,
                    "step_mix_gemm_s": step_s,
                    "step_mix_gflops": mix,
                    "step_mix_tokens_per_s": T / step_s,
                }
        res[dtype] = {
            "shapes": per_shape,
            "limit": limit,
            "source": "pyswitch" if use_ps else "torch",
        }
    return res


def print_gemm(gemm, T, d_model, d_ff):
    src = next(iter(gemm.values()))["source"]
    print(
        f"\nGEMM limit: {src}{'.matmul' if src == 'pyswitch' else '.mm'} GFLOP/s (median) on the "
        f"shapes of the step's six expert GEMMs at T={T}, d_model={d_model}, d_ff={d_ff} "
        f"(d=d_model, f=d_ff; {step_flops(T, d_model, d_ff) / 1e9:.1f} GFLOP a step); "
        "limit = the best shape's GFLOP/s * 1e9 / (12 * d_model * d_ff) tokens/s, router "
        "flops ignored; 'step mix' (the six GEMMs' total time) for context",
        flush=True,
    )
    for dtype, g in gemm.items():
        cells = []
        for name, s in g["shapes"].items():
            cell = f"{name} x{s['count']}: {s['gflops'].get(src, float('nan')):.0f}"
            if src != "torch" and "torch" in s["gflops"]:
                cell += f" (torch {s['gflops']['torch']:.0f})"
            cells.append(cell)
        print(f"  {dtype:8s}  " + "  ".join(cells), flush=True)
        for lib, lim in g["limit"].items():
            tag = "LIMIT" if lib == src else "context"
            print(
                f"  {'':8s}  {tag:7s} {lib:8s}: best {lim['gflops']:.0f} GFLOP/s "
                f"({lim['best_shape']}) -> {lim['tokens_per_s'] / 1e3:.2f} ktok/s; step mix "
                f"{lim['step_mix_gflops']:.0f} GFLOP/s -> "
                f"{lim['step_mix_tokens_per_s'] / 1e3:.2f} ktok/s",
                flush=True,
            )
    s = max(
        (s for g in gemm.values() for s in g["shapes"].values()),
        key=lambda s: s["output_alloc_fill_s"],
    )
    print(
        f"  (each call returns a fresh float32 output; allocating + first-touching the largest, "
        f"{s['M']}x{s['N']}, alone takes {s['output_alloc_fill_s'] * 1e3:.1f} ms single-threaded, "
        "and is inside these timings)",
        flush=True,
    )


# --------------------------------------------------------------------------------------------
# Peak memory, in child processes
# --------------------------------------------------------------------------------------------


def memory_child(spec: dict) -> dict:
    """Runs in a fresh process: build one implementation, run two steps, report RSS."""
    impl, T, d_model, d_ff, E, dtype = (
        spec[k] for k in ("impl", "T", "d_model", "d_ff", "E", "dtype")
    )
    x, dy = make_inputs(T, d_model, dtype)
    if impl == "pyswitch":
        ps = common.try_import_pyswitch()
        if not has_layer(ps):
            why = common.pyswitch_import_error()
            raise RuntimeError(f"pyswitch.SwitchFFN not available ({why})")
        ps.set_num_threads(spec["threads"])
        layer = make_pyswitch_layer(ps, d_model, d_ff, E, dtype)

        def step():
            layer.forward(x, training=True)
            layer.backward(dy)
    else:
        import torch

        torch.set_num_threads(spec["threads"])
        model = TorchMoE(torch, impl.split("-")[1], numpy_weights(d_model, d_ff, E), dtype)
        xt = to_torch(torch, x).requires_grad_(True)
        dyt = to_torch(torch, dy)
        del x, dy

        def step():
            model.train_step(xt, dyt)

    before = rss_mib()
    peak_before = peak_rss_mib()
    for _ in range(2):
        step()
    return {"rss_before_mib": before, "peak_before_mib": peak_before, "peak_mib": peak_rss_mib()}


def measure_memory(impl, T, d_model, d_ff, E, dtype, threads) -> dict:
    spec = dict(impl=impl, T=T, d_model=d_model, d_ff=d_ff, E=E, dtype=dtype, threads=threads)
    env = dict(os.environ)
    # the child must find the same pyswitch as this process
    ps = sys.modules.get("pyswitch")
    if ps is not None and getattr(ps, "__file__", None):
        root = str(Path(ps.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        r = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [f"rc {r.returncode}"]
        return {"error": tail[0]}
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"bad child output {r.stdout[-200:]!r}"}


def mem_text(m: dict | None) -> str:
    if m is None:
        return "-"
    if "error" in m:
        return "ERR"
    return f"{m['peak_mib']:,.0f} (+{m['peak_mib'] - m['rss_before_mib']:,.0f})"


# --------------------------------------------------------------------------------------------
# main benchmark
# --------------------------------------------------------------------------------------------


class Report:
    HEADERS = [
        "case",
        "agree (ps/oh)",
        "grads",
        "pyswitch",
        "torch-index",
        "torch-onehot",
        "vs index",
        "vs onehot",
        "goal vs index",
        "GEMM limit",
        "of limit",
        "goal of limit",
        "busy",
    ]
    MEM_HEADERS = ["case", "C", "pyswitch", "torch-index", "torch-onehot"]

    def __init__(self):
        self.rows, self.mem_rows, self.results, self.problems, self.notes = [], [], [], [], []

    def add_row(self, row):
        self.rows.append(row)
        print("  " + "  ".join(common.format_cell(c) for c in row), flush=True)

    def problem(self, text):
        self.problems.append(text)
        print(f"  PROBLEM: {text}", flush=True)


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def busy_text(busy):
    if busy is None:
        return "?"
    return f"{busy:.0%}" + (" !" if busy > BUSY_WARN else "")


def bench_case(report, ps, torch, gemm, cfg, E, dtype, threads, memory: bool):
    T, d_model, d_ff = cfg["T"], cfg["d_model"], cfg["d_ff"]
    case = f"E={E} {dtype}"
    C = capacity(T, E, K, CAPACITY_FACTOR, MIN_CAPACITY)

    check = check_case(report, ps, torch, case, T, d_model, d_ff, E, dtype)
    fwd = check["fwd"]
    agree_s = f"{agree_text(fwd.get('pyswitch'))}/{agree_text(fwd.get('torch-onehot'))}"
    g = check["grads"]
    if g is None:
        grads_s = "-"
    elif not g["ok"]:
        grads_s = "NO"
    else:
        grads_s = "yes" if not g["units_differ"] else f"yes({g['units_differ']})"

    x, dy = make_inputs(T, d_model, dtype)
    fns = {}
    layer = None
    if has_layer(ps):
        try:
            layer = make_pyswitch_layer(ps, d_model, d_ff, E, dtype)
            weights = pyswitch_params(layer)

            def ps_step(layer=layer):
                layer.forward(x, training=True)
                layer.backward(dy)

            ps_step()  # fail here, not inside the timing
            fns["pyswitch"] = ps_step
        except Exception as exc:
            report.problem(f"{case}: pyswitch step raised {exc!r}")
            layer = None
    if layer is None:
        weights = numpy_weights(d_model, d_ff, E)
    models = {}
    if torch is not None:
        xt = to_torch(torch, x).requires_grad_(True)
        dyt = to_torch(torch, dy)
        for impl in ("torch-index", "torch-onehot"):
            models[impl] = TorchMoE(torch, impl.split("-")[1], weights, dtype)
            fns[impl] = lambda m=models[impl]: m.train_step(xt, dyt)
    del weights

    timings = {}
    for name, fn in fns.items():  # one at a time: each step is long, and frees its memory after
        timings.update(common.time_many({name: fn}, warmup=cfg["warmup"], repeat=cfg["repeat"]))
        if name in models:
            del models[name]
            fns[name] = None
    del layer, fns, models
    tput = {n: T / t["median_s"] for n, t in timings.items()}
    busy = max((t["other_load"] or 0.0 for t in timings.values()), default=None)

    def ratio(a, b):
        return tput[a] / tput[b] if a in tput and b in tput else None

    vs_index, vs_onehot = ratio("pyswitch", "torch-index"), ratio("pyswitch", "torch-onehot")
    goal = GOAL_VS_INDEX[(dtype, E)]
    goal_idx_s = "-"
    if vs_index is not None:
        goal_idx_s = f">={goal:g}x: " + ("met" if vs_index >= goal else "MISSED")
    lim_src = gemm[dtype]["source"]
    limit = gemm[dtype]["limit"].get(lim_src, {}).get("tokens_per_s")
    frac = tput["pyswitch"] / limit if limit and "pyswitch" in tput else None
    goal_frac = GOAL_GEMM_FRACTION.get(E)
    if goal_frac is None or frac is None:
        goal_frac_s = "-"
    else:
        goal_frac_s = f">={goal_frac:.0%}: " + ("met" if frac >= goal_frac else "MISSED")
    report.add_row(
        [
            case,
            agree_s,
            grads_s,
            *[(tput[n] / 1e3 if n in tput else None) for n in IMPLS],
            fmt_ratio(vs_index),
            fmt_ratio(vs_onehot),
            goal_idx_s,
            None if limit is None else limit / 1e3,
            "-" if frac is None else f"{frac:.0%}",
            goal_frac_s,
            busy_text(busy),
        ]
    )

    mem = {}
    if memory:
        for impl in IMPLS:
            if impl == "pyswitch" and not has_layer(ps):
                continue
            if impl != "pyswitch" and torch is None:
                continue
            mem[impl] = measure_memory(impl, T, d_model, d_ff, E, dtype, threads)
            if "error" in mem[impl]:
                report.problem(f"{case}: memory child for {impl} failed: {mem[impl]['error']}")
        report.mem_rows.append([case, C, *[mem_text(mem.get(n)) for n in IMPLS]])

    report.results.append(
        {
            "case": case,
            "T": T,
            "d_model": d_model,
            "d_ff": d_ff,
            "E": E,
            "k": K,
            "dtype": dtype,
            "capacity": C,
            "capacity_factor": CAPACITY_FACTOR,
            "activation": ACTIVATION,
            "check": check,
            "tokens_per_s": tput,
            "timing": timings,
            "other_load": busy,
            "ratio_vs_torch_index": vs_index,
            "ratio_vs_torch_onehot": vs_onehot,
            "goal_ratio_vs_torch_index": goal,
            "goal_vs_index_met": None if vs_index is None else vs_index >= goal,
            "gemm_limit_tokens_per_s": limit,
            "gemm_limit_source": lim_src,
            "fraction_of_gemm_limit": frac,
            "goal_fraction_of_gemm_limit": goal_frac,
            "goal_fraction_met": None if (goal_frac is None or frac is None) else frac >= goal_frac,
            "memory_mib": mem,
        }
    )


def main(argv=None) -> int:
    p = common.make_parser(NAME, __doc__)
    p.add_argument(
        "--skip-memory", action="store_true", help="do not measure peak memory (child processes)"
    )
    p.add_argument(
        "--dtypes",
        default=",".join(DTYPES),
        help="comma-separated layer dtypes to time (default: %(default)s)",
    )
    p.add_argument("--memory-child", metavar="JSON", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child is not None:
        print(json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0

    t_start = time.perf_counter()
    threads = common.set_threads(args.threads)
    ps = common.try_import_pyswitch()
    torch = common.try_import_torch()
    info = common.machine_info()
    print(__doc__.strip())
    print(common.format_machine(info))
    print(f"threads  : {threads}")
    if not has_layer(ps):
        why = common.pyswitch_import_error() if ps is None else "no SwitchFFN (not built yet?)"
        print(f"pyswitch layer not available ({why}): timing the baselines only")
    if ps is not None and not hasattr(ps, "matmul"):
        print("pyswitch.matmul not available: the GEMM limit below is torch.mm's, for context only")
    if torch is None:
        print(f"torch not importable ({common.torch_import_error()}): pyswitch only")

    if args.quick:
        cfg = dict(T=1024, d_model=128, d_ff=512, warmup=1, repeat=3, gemm_warmup=1, gemm_repeat=3)
    else:
        cfg = dict(T=8192, d_model=512, d_ff=2048, warmup=1, repeat=7, gemm_warmup=2, gemm_repeat=5)
    T, d_model, d_ff = cfg["T"], cfg["d_model"], cfg["d_ff"]

    report = Report()
    dtypes = args.dtypes.split(",")
    for dtype in dtypes:
        if dtype not in DTYPES:
            p.error(f"--dtypes: expected a comma-separated subset of {DTYPES}, got {dtype!r}")
    gemm = bench_gemm(
        ps, torch, T, d_model, d_ff, cfg["gemm_warmup"], cfg["gemm_repeat"], tuple(dtypes)
    )
    print_gemm(gemm, T, d_model, d_ff)

    print(
        f"\nlayer: T={T}, d_model={d_model}, d_ff={d_ff}, k={K}, {ACTIVATION}, capacity factor "
        f"{CAPACITY_FACTOR}, min_capacity {MIN_CAPACITY}, one group, jitter {JITTER_EPS:g}, "
        f"aux {AUX_LOSS_COEF:g}, z {Z_LOSS_COEF:g}; forward + backward, ktokens/s, "
        f"median of {cfg['repeat']}",
        flush=True,
    )
    first = True
    for dtype in dtypes:
        torch_here = common.torch_for(torch, dtype)
        if torch is not None and torch_here is None:
            report.notes.append(common.TORCH_BF16_SKIPPED)
        for E in EXPERTS:
            # --quick measures memory for the first case only (each torch child imports torch)
            memory = not args.skip_memory and (first or not args.quick)
            bench_case(report, ps, torch_here, gemm, cfg, E, dtype, args.threads, memory)
            first = False

    print()
    print(
        "agree: forward output with identical weights, jitter off: pyswitch vs torch-index / "
        f"torch-onehot vs torch-index; a row agrees within {FWD_TOL['float32']:g} (fp32) / "
        f"{FWD_TOL['bfloat16']:g} (bf16) x max|y|; 'yes(n)': n rows differ, at most "
        f"{AGREE_ROW_SLACK:.1%} allowed (near-tie routing)"
    )
    print(
        "grads: one step's dx / router / w_in / w_out gradients, pyswitch vs torch-index, per "
        f"row (dx, router, w_out) or column (w_in) within {GRAD_TOL['float32']:g} (fp32) / "
        f"{GRAD_TOL['bfloat16']:g} (bf16) x max|grad|; 'yes(n)': n rows/columns differ, at most "
        f"{AGREE_ROW_SLACK:.1%} of each (relu pre-activations within rounding of 0)"
    )
    print(
        "throughput columns: ktokens/s; 'vs': pyswitch / baseline; GEMM limit (ktok/s): see "
        "above; 'of limit': pyswitch / GEMM limit (router flops ignored)"
    )
    print(
        "torch bf16: bfloat16 expert weights and activations, float32 router (no autocast); "
        "busy: share of the CPUs other processes used while the row was timed"
    )
    common.print_table(Report.HEADERS, report.rows, align="lllrrrrrlrrlr")
    if report.mem_rows:
        print(
            "\npeak memory, MiB: RSS high-water (VmHWM) of a child process per implementation "
            "and case (imports, inputs, weights, two steps); (+n): peak minus RSS just before "
            "the first step"
        )
        common.print_table(Report.MEM_HEADERS, report.mem_rows, align="lrrrr")
    common.print_run_summary(info, report.rows, report.notes, report.problems, busy_warn=0.15)
    elapsed = time.perf_counter() - t_start
    out = common.write_json(
        NAME,
        {
            "quick": args.quick,
            "threads": threads,
            "config": cfg,
            "machine": info,
            "baselines": BASELINES,
            "layer": {
                "k": K,
                "capacity_factor": CAPACITY_FACTOR,
                "min_capacity": MIN_CAPACITY,
                "activation": ACTIVATION,
                "aux_loss_coef": AUX_LOSS_COEF,
                "z_loss_coef": Z_LOSS_COEF,
                "jitter_eps": JITTER_EPS,
                "seed": SEED,
            },
            "goals": {
                "ratio_vs_torch_index": {f"{d} E={e}": g for (d, e), g in GOAL_VS_INDEX.items()},
                "fraction_of_gemm_limit": {f"E={e}": g for e, g in GOAL_GEMM_FRACTION.items()},
            },
            "tolerances": {
                "forward_rows": FWD_TOL,
                "grads_rows": GRAD_TOL,
                "row_slack": AGREE_ROW_SLACK,
            },
            "gemm": gemm,
            "results": report.results,
            "problems": report.problems,
            "notes": report.notes,
            "table": {"headers": Report.HEADERS, "rows": report.rows},
            "memory_table": {"headers": Report.MEM_HEADERS, "rows": report.mem_rows},
            "elapsed_s": elapsed,
        },
        args.json,
    )
    print(f"\nwrote {out} ({elapsed:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
