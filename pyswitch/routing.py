"""Token routing: Switch / GShard token-choice routing, expert-choice routing, the Router layer.

The semantics are those of SPEC section 1 (Fedus et al. 2022; Mesh TensorFlow's
``_switch_gating``): float32 softmax, top-k on the logits with ties to the lowest expert index,
per-group capacity, position or batch-prioritized priority, and the unscaled load-balancing and
z losses. All the work happens in the C++ core with the GIL released.
"""

from __future__ import annotations

import numpy as np

from . import _core
from .runtime import _as_int, _as_seed

RoutingPlan = _core.RoutingPlan
ExpertChoicePlan = _core.ExpertChoicePlan

_PRIORITIES = ("position", "batch_prioritized")
_ROUNDINGS = ("floor", "ceil")


def _as_factor(where: str, name: str, value, *, allow_none: bool):
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{where}: {name} must be a number, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _as_str(where: str, name: str, value, choices) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where}: {name} must be one of {choices}, got {value!r}")
    return value


_DEVICES = ("cpu", "cuda")


def _as_device(where: str, device) -> str:
    """A checked device name; "cuda" also loads the CUDA backend (DeviceError where it cannot)."""
    name = _as_str(where, "device", device, _DEVICES)
    if name == "cuda":
        from . import cuda

        cuda.require(where)
    return name


def _as_group_size(where: str, value):
    return None if value is None else _as_int(where, "group_size", value)


def _route_options(
    where,
    k,
    capacity_factor,
    min_capacity,
    group_size,
    priority,
    capacity_rounding,
    normalize_gates,
):
    """The core's RouteOptions (bound by field name) from checked Python values."""
    return _core.RouteOptions(
        k=_as_int(where, "k", k),
        capacity_factor=_as_factor(where, "capacity_factor", capacity_factor, allow_none=True),
        min_capacity=_as_int(where, "min_capacity", min_capacity),
        group_size=_as_group_size(where, group_size),
        priority=_as_str(where, "priority", priority, _PRIORITIES),
        capacity_rounding=_as_str(where, "capacity_rounding", capacity_rounding, _ROUNDINGS),
        normalize_gates=bool(normalize_gates),
    )


def _router_options(where, *, eval_capacity_factor, jitter_eps, init_scale, seed, **route):
    """The core's RouterOptions: routing (see _route_options), eval capacity, jitter, init."""
    return _core.RouterOptions(
        route=_route_options(where, **route),
        eval_capacity_factor=_as_factor(
            where, "eval_capacity_factor", eval_capacity_factor, allow_none=True
        ),
        jitter_eps=_as_factor(where, "jitter_eps", jitter_eps, allow_none=False),
        init_scale=_as_factor(where, "init_scale", init_scale, allow_none=False),
        seed=_as_seed(where, seed),
    )


def route(
    logits: np.ndarray,
    *,
    k: int = 1,
    capacity_factor: float | None = 1.25,
    min_capacity: int = 4,
    group_size: int | None = None,
    priority: str = "position",
    capacity_rounding: str = "floor",
    normalize_gates: bool = False,
    device: str = "cpu",
) -> RoutingPlan:
    """Route T tokens to E experts (tokens choose experts).

    Parameters
    ----------
    logits : ndarray of float32, shape (T, E)
        Router logits. Other dtypes (float64 included) raise ``TypeError``: routing is float32
        by design ("selective precision"), so convert explicitly with ``.astype(np.float32)``.
        Non-contiguous views are accepted (copied first).
    k : int
        Experts per token (1 = Switch, 2 = GShard), ``1 <= k <= E``.
    capacity_factor : float or None
        Capacity per expert per group is
        ``C = min(S, max(min_capacity, floor(capacity_factor * k * S / E)))``. ``None`` is
        dropless: nothing is dropped and ``C`` is the largest per-expert count of any group.
    min_capacity : int
        Lower bound of ``C``.
    group_size : int or None
        Tokens per routing group S (must divide T); ``None`` routes all T tokens as one group.
    priority : {"position", "batch_prioritized"}
        Who gets a slot when an expert overflows: first choices in token order then second
        choices (``"position"``, the paper), or the same with tokens ordered by their top-1
        probability, descending, ties by position (``"batch_prioritized"``, V-MoE).
    capacity_rounding : {"floor", "ceil"}
    normalize_gates : bool
        Divide the k gates of a token by their sum (before dropping); needs ``k > 1``.
    device : {"cpu", "cuda"}
        Where the per-token pass runs. "cuda" gives the same plan as "cpu", bit for bit
        (docs/cuda.md); NumPy logits are copied to the GPU, and a float32 CUDA array exporting
        DLPack (torch, CuPy) is routed in place. :class:`pyswitch.DeviceError` where CUDA is not
        available.

    Returns
    -------
    RoutingPlan
        ``expert_index`` int32 (T, k), descending probability, ties to the lower index;
        ``gate`` float32 (T, k), the softmax probability of the chosen expert, exactly 0 where
        dropped; ``slot`` int32 (T, k), the row in that expert's buffer (group g's rows start
        at g*C), -1 where dropped; ``capacity``; ``tokens_per_expert`` int64 (E,) before
        capacity; ``group_tokens_per_expert`` int64 (G, E); ``dropped``; ``aux_loss`` and
        ``z_loss`` (unscaled); ``num_groups``, ``group_size``, ``num_experts``, ``k``.
        The arrays are read-only views owned by the plan.

    Raises
    ------
    TypeError
        Wrong dtype or argument type.
    ValueError
        Bad shapes or values, or non-finite logits (the message names the first bad row).
    """
    options = _route_options(
        "route",
        k,
        capacity_factor,
        min_capacity,
        group_size,
        priority,
        capacity_rounding,
        normalize_gates,
    )
    return _core.route(logits, options, _as_device("route", device))


def route_expert_choice(
    logits: np.ndarray, *, capacity_factor: float = 2.0, group_size: int | None = None
) -> ExpertChoicePlan:
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens per group.

    ``C = min(S, max(1, floor(capacity_factor * S / E)))``; ties go to the lower token index. A
    token may be picked by 0..E experts. This is **not causal**: whether a token is routed
    depends on the other tokens of its group, including later ones, so it must not be used in
    autoregressive decoders (training or generation).

    Parameters
    ----------
    logits : ndarray of float32, shape (T, E)
    capacity_factor : float
        Average number of experts per token (2.0 in the paper).
    group_size : int or None
        Tokens per group S (divides T); ``None`` = one group.

    Returns
    -------
    ExpertChoicePlan
        ``token_index`` int32 (E, G*C): row g*C + c of expert e's buffer holds token
        ``token_index[e, g*C + c]``, picks ordered by probability, descending; ``gate`` float32
        (E, G*C) = ``probs[token, e]``; ``experts_per_token`` int32 (T,); ``capacity``;
        ``z_loss``; ``num_groups``; ``group_size``.
    """
    where = "route_expert_choice"
    return _core.route_expert_choice(
        logits,
        _as_factor(where, "capacity_factor", capacity_factor, allow_none=False),
        _as_group_size(where, group_size),
    )


class Router:
    """The Switch router layer: ``logits = float32(x * jitter) @ weight``, then :func:`route`.

    The router input is cast to float32 *before* the matmul even when ``x`` is bfloat16
    ("selective precision", paper section 2.4), and everything after it is float32.

    Parameters
    ----------
    d_model, num_experts : int
    k, capacity_factor, min_capacity, group_size, priority, capacity_rounding, normalize_gates
        As in :func:`route`; ``capacity_factor`` applies in training.
    eval_capacity_factor : float or None
        The capacity factor when ``training=False`` (default 2.0; None = dropless).
    dtype : {"float32", "bfloat16"}
        The layer's compute dtype. The router itself always computes in float32; this only
        records the policy (inputs of either dtype are accepted).
    jitter_eps : float
        Multiplicative jitter ``U(1 - eps, 1 + eps)`` on the router input, training only.
    init_scale : float
        Weights start truncated-normal with ``std = sqrt(init_scale / d_model)``, cut at 2 std.
    seed : int
        Seeds the initial weights and the jitter stream; same seed, same bits.

    Attributes
    ----------
    weight : ndarray of float32, shape (d_model, E)
        Live: writing into it changes the router.
    params, grads : dict
        ``{"weight": ...}``; ``grads`` is filled by :meth:`backward` (live, overwritten by the
        next backward).
    last_plan : RoutingPlan or None
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        *,
        k: int = 1,
        capacity_factor: float | None = 1.25,
        eval_capacity_factor: float | None = 2.0,
        min_capacity: int = 4,
        group_size: int | None = None,
        priority: str = "position",
        capacity_rounding: str = "floor",
        normalize_gates: bool = False,
        dtype: str = "float32",
        jitter_eps: float = 1e-2,
        init_scale: float = 0.1,
        seed: int = 0,
    ):
        where = "Router"
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"{where}: dtype must be 'float32' or 'bfloat16', got {dtype!r}")
        options = _router_options(
            where,
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            group_size=group_size,
            priority=priority,
            capacity_rounding=capacity_rounding,
            normalize_gates=normalize_gates,
            jitter_eps=jitter_eps,
            init_scale=init_scale,
            seed=seed,
        )
        self.dtype = dtype
        self._impl = _core.Router(
            _as_int(where, "d_model", d_model), _as_int(where, "num_experts", num_experts), options
        )
        self.weight = self._impl.weight
        self.params = {"weight": self.weight}
        self.grads = {"weight": self._impl.weight_grad}
        self.last_plan = None

    @property
    def d_model(self) -> int:
        return self._impl.d_model

    @property
    def num_experts(self) -> int:
        return self._impl.num_experts

    @property
    def last_logits(self) -> np.ndarray:
        """float32 (T, E) logits of the last forward (a copy)."""
        return self._impl.last_logits

    def forward(self, x: np.ndarray, training: bool = False) -> RoutingPlan:
        """Compute the logits of ``x`` and route them.

        Parameters
        ----------
        x : ndarray of float32 or bfloat16, shape (T, d_model)
        training : bool
            Applies jitter and uses ``capacity_factor`` (else ``eval_capacity_factor``).

        Returns
        -------
        RoutingPlan
        """
        self.last_plan = self._impl.forward(x, bool(training))
        return self.last_plan

    __call__ = forward

    def backward(
        self, d_gate: np.ndarray, *, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0
    ) -> np.ndarray:
        """Differentiate ``sum(d_gate * plan.gate) + aux_loss_coef * aux + z_loss_coef * z``.

        Dropped gates are constant zeros; the expert counts in the aux loss carry no gradient.

        Parameters
        ----------
        d_gate : ndarray of float32, shape (T, k)
        aux_loss_coef, z_loss_coef : float

        Returns
        -------
        dx : ndarray, shape (T, d_model), in the dtype of the forward's ``x``.
            Also writes ``grads["weight"]``.

        Raises
        ------
        pyswitch.Error
            If no forward preceded it.
        """
        where = "Router.backward"
        return self._impl.backward(
            d_gate,
            _as_factor(where, "aux_loss_coef", aux_loss_coef, allow_none=False),
            _as_factor(where, "z_loss_coef", z_loss_coef, allow_none=False),
        )
