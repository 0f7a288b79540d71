# Plain float64 NumPy reference of the Switch FFN and dense FFN layers (SPEC section 2): forward,
# the layer loss L = sum(dy * y) + scaled aux + scaled z, and a hand-written backward.
"""Float64 reference of ``pyswitch.SwitchFFN`` / ``pyswitch.DenseFFN``.

Written from the definitions, independently of the C++ core, on float64 copies of the inputs:

* ``logits = x @ router`` (the jitter is 1 outside training), ``plan = reference.route(logits)``;
* ``Expert_e(x) = act(x W_in[e] + b_in[e]) W_out[e] + b_out[e]``, ``act`` in relu, gelu (tanh
  approximation), geglu (``gelu(x W_in + b_in) * (x W_gate)``);
* ``y[t] = sum over kept j of gate[t, j] * Expert_{e[t, j]}(x[t])``; dropped assignments add 0;
* ``L = sum(dy * y) + aux_loss_coef * aux_loss + z_loss_coef * z_loss``.

Routing decisions can come from the reference's own float64 routing or be taken from the
implementation's plan (:func:`plan_from_decisions`): where float32 and float64 logits straddle a
near-tie the two plans legitimately differ, and the FFN arithmetic is then compared on the
implementation's decisions while gates, probabilities and losses are still recomputed here in
float64.

``params`` dicts use the layer's keys: ``router`` ``(d_model, E)``, ``w_in`` ``(E, d_model,
d_ff)``, ``w_out`` ``(E, d_ff, d_model)``, optional ``w_gate`` ``(E, d_model, d_ff)``, ``b_in``
``(E, d_ff)``, ``b_out`` ``(E, d_model)``.  Dense params drop the expert axis and the router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import reference as ref

GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715

# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


def gelu(x):
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(GELU_C * (x + GELU_A * x**3)))


def gelu_grad(x):
    x = np.asarray(x, dtype=np.float64)
    th = np.tanh(GELU_C * (x + GELU_A * x**3))
    return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_C * (1.0 + 3.0 * GELU_A * x * x)


def bf16_round(a):
    """Round to bfloat16 (nearest even) and back, as float64."""
    return np.asarray(a, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def as64(params):
    return {key: np.asarray(v, dtype=np.float64) for key, v in params.items()}


# --------------------------------------------------------------------------------------------
# One expert (or the dense FFN) on a block of rows
# --------------------------------------------------------------------------------------------


@dataclass
class FFNCache:
    x: np.ndarray  # (n, d) the input as used by the first GEMM
    pre: np.ndarray  # (n, f) x W_in + b_in
    lin: np.ndarray | None  # (n, f) x W_gate (geglu)
    hidden: np.ndarray  # (n, f) act(...) as used by the second GEMM
    out: np.ndarray  # (n, d)


def ffn(x, w_in, w_out, *, activation, w_gate=None, b_in=None, b_out=None, bf16=False):
    """``act(x W_in + b_in) W_out + b_out`` on rows ``x`` ``(n, d)``, float64.

    ``bf16=True`` emulates the bfloat16 compute policy: x and the weights are rounded to bf16
    before each GEMM and the hidden activation is rounded to bf16 before the second GEMM
    (biases, accumulation and everything else in float64 here).
    """
    rnd = bf16_round if bf16 else (lambda a: np.asarray(a, dtype=np.float64))
    xg = rnd(x)
    pre = xg @ rnd(w_in)
    if b_in is not None:
        pre = pre + np.asarray(b_in, dtype=np.float64)
    lin = None
    if activation == "relu":
        hidden = np.maximum(pre, 0.0)
    elif activation == "gelu":
        hidden = gelu(pre)
    elif activation == "geglu":
        lin = xg @ rnd(w_gate)
        hidden = gelu(pre) * lin
    else:
        raise ValueError(activation)
    hidden_used = rnd(hidden)
    out = hidden_used @ rnd(w_out)
    if b_out is not None:
        out = out + np.asarray(b_out, dtype=np.float64)
    return FFNCache(xg, pre, lin, hidden_used, out)


def ffn_backward(cache: FFNCache, dout, w_in, w_out, *, activation, w_gate=None):
    """Gradients of ``sum(dout * out)``: dict with x, w_in, w_out, [w_gate], b_in, b_out."""
    dout = np.asarray(dout, dtype=np.float64)
    w_in = np.asarray(w_in, dtype=np.float64)
    w_out = np.asarray(w_out, dtype=np.float64)
    g = {"w_out": cache.hidden.T @ dout, "b_out": dout.sum(axis=0)}
    dh = dout @ w_out.T
    if activation == "relu":
        dpre = dh * (cache.pre > 0)
    elif activation == "gelu":
        dpre = dh * gelu_grad(cache.pre)
    else:
        dpre = dh * gelu_grad(cache.pre) * cache.lin
        dlin = dh * gelu(cache.pre)
        g["w_gate"] = cache.x.T @ dlin
    g["w_in"] = cache.x.T @ dpre
    g["b_in"] = dpre.sum(axis=0)
    dx = dpre @ w_in.T
    if activation == "geglu":
        dx = dx + dlin @ np.asarray(w_gate, dtype=np.float64).T
    g["x"] = dx
    return g


def kink_signature(pre, activation):
    """Where a relu changes its derivative (None for smooth activations)."""
    return (np.asarray(pre) > 0) if activation == "relu" else None


# --------------------------------------------------------------------------------------------
# Routing decisions
# --------------------------------------------------------------------------------------------


def router_logits(x, router):
    return np.asarray(x, dtype=np.float64) @ np.asarray(router, dtype=np.float64)


def route_kwargs(cfg, training=False):
    """The ``reference.route`` keyword arguments of a layer config (as passed to SwitchFFN)."""
    kw = {key: cfg[key] for key in ref.ROUTE_KEYS if key in cfg}
    kw.pop("capacity_factor", None)
    if training:
        kw["capacity_factor"] = cfg.get("capacity_factor", 1.25)
    else:
        kw["capacity_factor"] = cfg.get("eval_capacity_factor", 2.0)
    return kw


def plan_from_decisions(logits, expert_index, slot, *, k, group_size=None, normalize_gates=False):
    """A ``reference.Plan`` with the given (implementation's) decisions, recomputed in float64.

    Gates, probabilities, counts and losses are recomputed from ``logits`` in float64; only which
    experts were chosen and which assignments were kept come from ``expert_index`` / ``slot``.
    """
    L = np.asarray(logits, dtype=np.float64)
    T, E = L.shape
    S = T if group_size is None else group_size
    G = T // S
    expert_index = np.asarray(expert_index, dtype=np.int64)
    slot = np.asarray(slot, dtype=np.int64)
    probs = ref.softmax(L)
    raw = np.take_along_axis(probs, expert_index, axis=1)
    gate = raw / raw.sum(axis=1, keepdims=True) if normalize_gates else raw.copy()
    assert expert_index.shape == (T, k), (expert_index.shape, T, k)
    counts = np.zeros((G, E), dtype=np.int64)
    for g in range(G):
        for e in expert_index[g * S : (g + 1) * S].ravel():
            counts[g, e] += 1
    C = int(slot.max()) + 1 if (slot >= 0).any() else 0
    return ref.plan_with_losses(L, probs, expert_index, gate, slot, counts, C, S)


def same_decisions(plan_a, plan_b) -> bool:
    """True if two plans (reference or implementation) chose and kept the same assignments."""
    return bool(
        np.array_equal(np.asarray(plan_a.expert_index), np.asarray(plan_b.expert_index))
        and np.array_equal(np.asarray(plan_a.slot), np.asarray(plan_b.slot))
    )


# --------------------------------------------------------------------------------------------
# Switch FFN forward / loss / backward
# --------------------------------------------------------------------------------------------


@dataclass
class SwitchForward:
    y: np.ndarray  # (T, d) float64
    plan: ref.Plan
    logits: np.ndarray  # (T, E)
    caches: dict  # (t, j) -> FFNCache of one row
    kinks: tuple  # relu sign patterns of every kept (t, j), for finite differences


def expert_params(params, e):
    p = {"w_in": params["w_in"][e], "w_out": params["w_out"][e]}
    for key in ("w_gate", "b_in", "b_out"):
        if key in params:
            p[key] = params[key][e]
    return p


def switch_forward(x, params, cfg, *, plan=None, training=False, bf16=False) -> SwitchForward:
    """Reference forward. ``plan``: routing decisions to use (default: route the float64 logits).

    ``cfg`` holds the SwitchFFN keyword arguments (k, capacity factors, activation, ...).
    """
    params = as64(params)
    x = np.asarray(x, dtype=np.float64)
    T, d = x.shape
    activation = cfg.get("activation", "relu")
    L = router_logits(x, params["router"])
    kw = route_kwargs(cfg, training)
    if plan is None:
        plan = ref.route(L, **kw)
    elif not isinstance(plan, ref.Plan):
        plan = plan_from_decisions(
            L,
            plan.expert_index,
            plan.slot,
            k=kw.get("k", 1),
            group_size=kw.get("group_size"),
            normalize_gates=kw.get("normalize_gates", False),
        )
    y = np.zeros((T, d))
    caches = {}
    kinks = []
    k = plan.k
    for t in range(T):
        for j in range(k):
            if not plan.kept[t, j]:
                continue
            e = int(plan.expert_index[t, j])
            c = ffn(x[t : t + 1], activation=activation, bf16=bf16, **expert_params(params, e))
            caches[(t, j)] = c
            y[t] += plan.gate[t, j] * c.out[0]
            kinks.append(kink_signature(c.pre, activation))
    return SwitchForward(y, plan, L, caches, tuple(kinks))


def switch_loss(x, params, dy, cfg, *, plan=None):
    """(L, forward) with L = sum(dy * y) + aux_coef * aux + z_coef * z, all float64."""
    fw = switch_forward(x, params, cfg, plan=plan)
    L = float(np.sum(np.asarray(dy, dtype=np.float64) * fw.y))
    L += cfg.get("aux_loss_coef", 1e-2) * fw.plan.aux_loss
    L += cfg.get("z_loss_coef", 1e-3) * fw.plan.z_loss
    return L, fw


def switch_backward(x, params, dy, cfg, *, plan=None):
    """Hand-written float64 gradients of :func:`switch_loss`: dict of params' keys plus ``x``."""
    params64 = as64(params)
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    activation = cfg.get("activation", "relu")
    fw = switch_forward(x, params64, cfg, plan=plan)
    p = fw.plan
    T, d = x.shape
    grads = {key: np.zeros_like(v) for key, v in params64.items()}
    dx = np.zeros_like(x)
    d_gate = np.zeros((T, p.k))
    for (t, j), c in fw.caches.items():
        e = int(p.expert_index[t, j])
        d_gate[t, j] = float(np.dot(dy[t], c.out[0]))
        ep = expert_params(params64, e)
        g = ffn_backward(
            c,
            p.gate[t, j] * dy[t : t + 1],
            ep["w_in"],
            ep["w_out"],
            activation=activation,
            w_gate=ep.get("w_gate"),
        )
        for key in ("w_in", "w_out", "w_gate", "b_in", "b_out"):
            if key in grads:
                grads[key][e] += g[key]
        dx[t] += g["x"][0]
    kw = route_kwargs(cfg)
    dL = ref.logits_grad(
        fw.logits,
        p,
        d_gate,
        aux_loss_coef=cfg.get("aux_loss_coef", 1e-2),
        z_loss_coef=cfg.get("z_loss_coef", 1e-3),
        normalize_gates=kw.get("normalize_gates", False),
    )
    grads["router"] = x.T @ dL
    grads["x"] = dx + dL @ params64["router"].T
    return grads


def dense_mixture(x, params, cfg):
    """Second, dispatch-free reference for the no-drop case: every expert on every token, then
    ``y = sum_e G[t, e] * Expert_e(x[t])`` with the (T, E) gate matrix of the top-k."""
    params = as64(params)
    x = np.asarray(x, dtype=np.float64)
    L = router_logits(x, params["router"])
    probs = ref.softmax(L)
    T, E = probs.shape
    k = cfg.get("k", 1)
    Gm = np.zeros((T, E))
    for t in range(T):
        chosen = ref.topk_experts(L[t], k)
        raw = probs[t, chosen]
        if cfg.get("normalize_gates", False):
            raw = raw / raw.sum()
        Gm[t, chosen] = raw
    activation = cfg.get("activation", "relu")
    y = np.zeros_like(x)
    for e in range(E):
        y += Gm[:, e : e + 1] * ffn(x, activation=activation, **expert_params(params, e)).out
    return y


def entropy(logits):
    """Mean over tokens of -sum_i p_i log p_i (natural log), float64."""
    p = ref.softmax(logits)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(p), 0.0)
    return float(np.mean(-plogp.sum(axis=1)))


# --------------------------------------------------------------------------------------------
# Dense FFN
# --------------------------------------------------------------------------------------------


def dense_forward(x, params, activation="relu", bf16=False):
    params = as64(params)
    return ffn(
        x,
        params["w_in"],
        params["w_out"],
        activation=activation,
        w_gate=params.get("w_gate"),
        b_in=params.get("b_in"),
        b_out=params.get("b_out"),
        bf16=bf16,
    )


def dense_loss(x, params, dy, activation="relu"):
    c = dense_forward(x, params, activation)
    return float(np.sum(np.asarray(dy, dtype=np.float64) * c.out)), c


def dense_backward(x, params, dy, activation="relu"):
    params = as64(params)
    c = dense_forward(x, params, activation)
    g = ffn_backward(
        c, dy, params["w_in"], params["w_out"], activation=activation, w_gate=params.get("w_gate")
    )
    return {key: g[key] for key in list(params) + ["x"]}
