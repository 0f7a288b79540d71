# Plain float64 NumPy reference of SPEC section 1 (routing, expert choice, losses, router backward).
# Written for clarity, independently of the C++ core; it is an oracle for tests, not a fast path.
"""Float64 reference of pyswitch routing (SPEC section 1).

Everything here works on float64 copies of the inputs and uses plain loops where that keeps the
rule visible.  Shapes: ``logits`` is ``(T, E)``; a group has ``S`` tokens; ``G = T // S`` groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np

# --------------------------------------------------------------------------------------------
# Basic maths
# --------------------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a ``(T, E)`` array, float64, max-subtracted."""
    L = np.asarray(logits, dtype=np.float64)
    m = L.max(axis=1, keepdims=True)
    e = np.exp(L - m)
    return e / e.sum(axis=1, keepdims=True)


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """Row-wise logsumexp, ``(T,)``, float64."""
    L = np.asarray(logits, dtype=np.float64)
    m = L.max(axis=1)
    return m + np.log(np.exp(L - m[:, None]).sum(axis=1))


def topk_experts(row: np.ndarray, k: int) -> list:
    """The k experts with the largest logit, descending; ties go to the lowest expert index."""
    return sorted(range(len(row)), key=lambda e: (-float(row[e]), e))[:k]


def capacity(S: int, E: int, k: int, capacity_factor, min_capacity: int, rounding: str) -> int:
    """C = min(S, max(min_capacity, floor/ceil(capacity_factor * k * S / E))), exact rationals."""
    x = Fraction(capacity_factor) * k * S / E
    c = math.floor(x) if rounding == "floor" else math.ceil(x)
    return min(S, max(min_capacity, c))


def expert_choice_capacity(S: int, E: int, capacity_factor) -> int:
    """C = min(S, max(1, floor(capacity_factor * S / E)))."""
    return min(S, max(1, math.floor(Fraction(capacity_factor) * S / E)))


# --------------------------------------------------------------------------------------------
# Tokens choose experts
# --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    expert_index: np.ndarray  # int64 (T, k)
    gate: np.ndarray  # float64 (T, k), 0 where dropped
    slot: np.ndarray  # int64 (T, k), -1 where dropped
    capacity: int
    tokens_per_expert: np.ndarray  # int64 (E,)
    dropped: int
    aux_loss: float
    z_loss: float
    num_groups: int
    group_size: int
    num_experts: int
    k: int
    # Extras used by the backward reference.
    probs: np.ndarray  # float64 (T, E)
    kept: np.ndarray  # bool (T, k)
    group_counts: np.ndarray  # int64 (G, E), assignments before capacity


#: The keyword arguments of :func:`route` (and of ``pyswitch.route`` / ``pyswitch.Router``).
ROUTE_KEYS = (
    "k",
    "capacity_factor",
    "min_capacity",
    "group_size",
    "priority",
    "capacity_rounding",
    "normalize_gates",
)


def route(
    logits,
    *,
    k: int = 1,
    capacity_factor: float | None = 1.25,
    min_capacity: int = 4,
    group_size: int | None = None,
    priority: str = "position",
    capacity_rounding: str = "floor",
    normalize_gates: bool = False,
) -> Plan:
    """Reference of ``pyswitch.route`` (arguments assumed valid)."""
    L = np.asarray(logits, dtype=np.float64)
    T, E = L.shape
    S = T if group_size is None else group_size
    G = T // S
    probs = softmax(L)

    expert_index = np.zeros((T, k), dtype=np.int64)
    raw_gate = np.zeros((T, k), dtype=np.float64)
    for t in range(T):
        chosen = topk_experts(L[t], k)
        expert_index[t] = chosen
        raw_gate[t] = probs[t, chosen]
    gate = raw_gate.copy()
    if normalize_gates:
        gate = raw_gate / raw_gate.sum(axis=1, keepdims=True)

    group_counts = np.zeros((G, E), dtype=np.int64)
    for g in range(G):
        for t in range(g * S, (g + 1) * S):
            for j in range(k):
                group_counts[g, expert_index[t, j]] += 1

    if capacity_factor is None:  # dropless
        C = int(group_counts.max())
    else:
        C = capacity(S, E, k, capacity_factor, min_capacity, capacity_rounding)

    slot = np.full((T, k), -1, dtype=np.int64)
    for g in range(G):
        tokens = list(range(g * S, (g + 1) * S))
        if priority == "batch_prioritized":
            # Top-1 probability descending, ties by position (Python's sort is stable).
            tokens.sort(key=lambda t: -raw_gate[t, 0])
        fill = [0] * E
        for j in range(k):
            for t in tokens:
                e = expert_index[t, j]
                if fill[e] < C:
                    slot[t, j] = g * C + fill[e]
                fill[e] += 1

    return plan_with_losses(L, probs, expert_index, gate, slot, group_counts, C, S)


def plan_with_losses(L, probs, expert_index, gate, slot, group_counts, capacity, S) -> Plan:
    """The :class:`Plan` of routing decisions: zero the dropped gates, compute aux and z losses.

    ``L`` / ``probs`` are the float64 logits and their softmax ``(T, E)``; ``expert_index``,
    ``gate`` (before dropping) and ``slot`` are ``(T, k)``; ``group_counts`` is ``(G, E)``, the
    assignments per group before capacity; ``S`` is the group size.
    """
    T, E = L.shape
    k = expert_index.shape[1]
    G = T // S
    kept = slot >= 0
    gate = np.where(kept, gate, 0.0)

    aux = 0.0
    for g in range(G):
        f = group_counts[g] / (S * k)
        P = probs[g * S : (g + 1) * S].mean(axis=0)
        aux += E * float(np.sum(f * P))
    aux /= G
    z = float(np.mean(logsumexp(L) ** 2))

    return Plan(
        expert_index=expert_index,
        gate=gate,
        slot=slot,
        capacity=capacity,
        tokens_per_expert=group_counts.sum(axis=0),
        dropped=int((~kept).sum()),
        aux_loss=aux,
        z_loss=z,
        num_groups=G,
        group_size=S,
        num_experts=E,
        k=k,
        probs=probs,
        kept=kept,
        group_counts=group_counts,
    )


# --------------------------------------------------------------------------------------------
# Experts choose tokens
# --------------------------------------------------------------------------------------------


@dataclass
class ExpertChoicePlan:
    token_index: np.ndarray  # int64 (E, G*C)
    gate: np.ndarray  # float64 (E, G*C)
    capacity: int
    experts_per_token: np.ndarray  # int64 (T,)
    z_loss: float
    num_groups: int
    group_size: int


def route_expert_choice(logits, *, capacity_factor=2.0, group_size=None) -> ExpertChoicePlan:
    """Reference of ``pyswitch.route_expert_choice``."""
    L = np.asarray(logits, dtype=np.float64)
    T, E = L.shape
    S = T if group_size is None else group_size
    G = T // S
    C = expert_choice_capacity(S, E, capacity_factor)
    probs = softmax(L)
    token_index = np.zeros((E, G * C), dtype=np.int64)
    gate = np.zeros((E, G * C), dtype=np.float64)
    for e in range(E):
        for g in range(G):
            tokens = sorted(range(g * S, (g + 1) * S), key=lambda t: (-probs[t, e], t))[:C]
            for c, t in enumerate(tokens):
                token_index[e, g * C + c] = t
                gate[e, g * C + c] = probs[t, e]
    experts_per_token = np.bincount(token_index.ravel(), minlength=T).astype(np.int64)
    z = float(np.mean(logsumexp(L) ** 2))
    return ExpertChoicePlan(token_index, gate, C, experts_per_token, z, G, S)


# --------------------------------------------------------------------------------------------
# Router layer backward (hand-written chain rule, routing decisions held fixed)
# --------------------------------------------------------------------------------------------


def routing_objective(plan: Plan, d_gate, aux_loss_coef=0.0, z_loss_coef=0.0) -> float:
    """J = sum(d_gate * gate) + aux_loss_coef * aux_loss + z_loss_coef * z_loss."""
    d_gate = np.asarray(d_gate, dtype=np.float64)
    return float(
        np.sum(d_gate * plan.gate) + aux_loss_coef * plan.aux_loss + z_loss_coef * plan.z_loss
    )


def logits_grad(
    logits, plan: Plan, d_gate, *, aux_loss_coef=0.0, z_loss_coef=0.0, normalize_gates=False
) -> np.ndarray:
    """dJ/dlogits, ``(T, E)`` float64.

    Dropped gates are the constant 0; the aux loss' f_i is a count (no gradient); with
    ``normalize_gates`` the gradient flows through the division by the sum of the k raw gates.
    """
    L = np.asarray(logits, dtype=np.float64)
    d_gate = np.asarray(d_gate, dtype=np.float64)
    T, E = L.shape
    p = plan.probs
    S, G, k = plan.group_size, plan.num_groups, plan.k
    dp = np.zeros((T, E))  # dJ/dprobs

    for t in range(T):
        chosen = plan.expert_index[t]
        raw = p[t, chosen]
        if normalize_gates:
            s = raw.sum()
            # gate_j = raw_j / s;  dgate_j/draw_m = delta_jm / s - raw_j / s^2
            weighted = sum(d_gate[t, j] * raw[j] for j in range(k) if plan.kept[t, j])
            for m in range(k):
                own = d_gate[t, m] / s if plan.kept[t, m] else 0.0
                dp[t, chosen[m]] += own - weighted / s**2
        else:
            for j in range(k):
                if plan.kept[t, j]:
                    dp[t, chosen[j]] += d_gate[t, j]

    if aux_loss_coef:
        # aux = (1/G) sum_g E * sum_i f_gi * (1/S) sum_{t in g} p[t, i]
        for g in range(G):
            f = plan.group_counts[g] / (S * k)
            dp[g * S : (g + 1) * S] += aux_loss_coef * E * f[None, :] / (S * G)

    # Softmax backward: dL = p * (dp - <dp, p>).
    dL = p * (dp - np.sum(dp * p, axis=1, keepdims=True))

    if z_loss_coef:
        # z = (1/T) sum_t lse_t^2;  dlse_t/dL[t, i] = p[t, i]
        lse = logsumexp(L)
        dL += z_loss_coef * 2.0 * lse[:, None] * p / T
    return dL


@dataclass
class RouterGrads:
    plan: Plan
    objective: float
    d_logits: np.ndarray
    d_weight: np.ndarray
    dx: np.ndarray


def router_backward(
    x_router,
    weight,
    d_gate,
    *,
    logits=None,
    jitter=None,
    aux_loss_coef=0.0,
    z_loss_coef=0.0,
    **route_kwargs,
) -> RouterGrads:
    """Reference forward + backward of the router layer ``logits = (x * jitter) @ weight``.

    ``x_router`` ``(T, d_model)``, ``weight`` ``(d_model, E)``, ``d_gate`` ``(T, k)``.  If
    ``logits`` is given, routing decisions use it (e.g. the implementation's float32 logits) while
    the chain rule still uses ``x`` and ``weight``.  ``jitter`` is the multiplicative noise
    (``None`` = ones).  Returns dJ/dweight ``(d_model, E)`` and dJ/dx ``(T, d_model)``.
    """
    x = np.asarray(x_router, dtype=np.float64)
    W = np.asarray(weight, dtype=np.float64)
    u = np.ones_like(x) if jitter is None else np.asarray(jitter, dtype=np.float64)
    xj = x * u
    L = xj @ W if logits is None else np.asarray(logits, dtype=np.float64)
    plan = route(L, **route_kwargs)
    dL = logits_grad(
        L,
        plan,
        d_gate,
        aux_loss_coef=aux_loss_coef,
        z_loss_coef=z_loss_coef,
        normalize_gates=route_kwargs.get("normalize_gates", False),
    )
    return RouterGrads(
        plan=plan,
        objective=routing_objective(plan, d_gate, aux_loss_coef, z_loss_coef),
        d_logits=dL,
        d_weight=xj.T @ dL,
        dx=(dL @ W.T) * u,
    )


def router_objective(
    x_router, weight, d_gate, *, aux_loss_coef=0.0, z_loss_coef=0.0, **route_kwargs
) -> float:
    """J(x, weight) recomputed from scratch in float64 (for finite differences)."""
    L = np.asarray(x_router, np.float64) @ np.asarray(weight, np.float64)
    plan = route(L, **route_kwargs)
    return routing_objective(plan, d_gate, aux_loss_coef, z_loss_coef)


def central_difference(f: Callable[[np.ndarray], float], x0, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function ``f`` at ``x0`` (any shape), float64."""
    x0 = np.array(x0, dtype=np.float64)
    grad = np.zeros_like(x0)
    for idx in np.ndindex(x0.shape):
        xp = x0.copy()
        xm = x0.copy()
        xp[idx] += h
        xm[idx] -= h
        grad[idx] = (f(xp) - f(xm)) / (2.0 * h)
    return grad


# --------------------------------------------------------------------------------------------
# Test-input hygiene
# --------------------------------------------------------------------------------------------


def copy_rows_to_remove_near_ties(logits, keys: np.ndarray, rtol: float = 1e-5) -> np.ndarray:
    """Make float near-ties exact ties.

    ``keys`` is ``(T,)`` or ``(T, n)``: the float64 quantities the routing compares across tokens
    (top-1 probability for batch-prioritized routing, the whole probability row for expert
    choice).  Two different rows whose keys agree to ``rtol`` but not exactly would be ordered by
    float32 rounding in the implementation and by float64 rounding here, so such a later row is
    replaced by a copy of the earlier one: the tie becomes exact in both precisions.  Rows that
    are already equal are left alone.
    """
    L = np.array(logits, copy=True)
    K = np.array(keys, dtype=np.float64, copy=True)
    if K.ndim == 1:
        K = K[:, None]
    for u in range(1, L.shape[0]):
        diff = np.abs(K[:u] - K[u][None, :])
        near = (diff <= rtol * np.maximum(np.abs(K[:u]), np.abs(K[u][None, :]))).any(axis=1)
        same = (L[:u] == L[u][None, :]).all(axis=1)
        bad = np.nonzero(near & ~same)[0]
        if bad.size:
            L[u] = L[bad[0]]
            K[u] = K[bad[0]]
    return L


def top1_prob(logits) -> np.ndarray:
    """Largest softmax probability of each row, float64 ``(T,)``."""
    return softmax(logits).max(axis=1)
