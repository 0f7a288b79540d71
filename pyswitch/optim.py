"""Optimizers over a model's float32 master parameters (the update runs in the C++ core).

``AdamW`` (decoupled weight decay) and ``Adafactor`` (the Switch Transformer paper's: factored
second moments, no momentum, update clipping), global-norm gradient clipping and the learning
rate schedule (linear warmup, then cosine, linear, inverse-square-root or constant). Both
optimizers keep their state as float32 NumPy arrays in ``state`` (a flat dict, saved in
checkpoints) and give bit-identical updates for the same inputs on any thread count.
"""

from __future__ import annotations

import math

import numpy as np

from . import _core

_DECAYS = ("cosine", "linear", "rsqrt", "constant")


def learning_rate(
    step: int,
    peak: float,
    warmup_steps: int,
    total_steps: int,
    decay: str = "cosine",
    final_fraction: float = 0.1,
) -> float:
    """The learning rate at 0-based ``step``: linear warmup over ``warmup_steps``, then
    ``decay`` to ``peak * final_fraction`` at ``total_steps`` ("rsqrt": ``peak *
    sqrt(warmup / step)``, the paper's schedule)."""
    if decay not in _DECAYS:
        raise ValueError(f"learning_rate: decay must be one of {_DECAYS}, got {decay!r}")
    return float(
        _core.learning_rate(
            step, peak, warmup_steps, total_steps, decay, final_fraction=final_fraction
        )
    )


def clip_grad_norm(grads: list[np.ndarray], max_norm: float) -> float:
    """Scales the gradients in place so that their global L2 norm is at most ``max_norm``;
    returns the norm before clipping (NaN/inf when a gradient is not finite; then nothing is
    scaled)."""
    if not (isinstance(max_norm, (int, float)) and max_norm > 0 and math.isfinite(max_norm)):
        raise ValueError(f"clip_grad_norm: max_norm must be finite and > 0, got {max_norm!r}")
    return float(_core.clip_by_global_norm(list(grads), float(max_norm)))


class AdamW:
    """AdamW: ``m, v`` moments per parameter, bias correction, decoupled weight decay on the
    names in ``decay`` (matrices by convention; norms are not decayed).

    Parameters
    ----------
    params : dict of str -> float32 ndarray (live parameters, updated in place). Holding
        live views of a bfloat16 layer's masters makes its every forward re-round its bf16
        compute copy (correct, at the old cost); the C++ Trainer avoids that pass.
    decay : set of str
    beta1, beta2, eps, weight_decay : float
    """

    name = "adamw"

    def __init__(
        self,
        params: dict,
        decay=(),
        *,
        beta1: float = 0.9,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.1,
    ):
        for label, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise ValueError(f"AdamW: {label} must be in [0, 1), got {value}")
        self.params = params
        self.decay = set(decay)
        self.hyper = dict(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        self._options = _core.AdamWOptions(**self.hyper)
        self.steps = 0
        self.state = {}
        for name, p in params.items():
            self.state[f"{name}.m"] = np.zeros_like(p)
            self.state[f"{name}.v"] = np.zeros_like(p)

    def step(self, grads: dict, lr: float) -> None:
        """One update of every parameter from ``grads`` (same names) with learning rate lr."""
        self.steps += 1
        for name, p in self.params.items():
            _core.adamw_step(
                p,
                grads[name],
                self.state[f"{name}.m"],
                self.state[f"{name}.v"],
                step=self.steps,
                lr=float(lr),
                options=self._options,
                decay=name in self.decay,
            )


class Adafactor:
    """Adafactor (Shazeer & Stern 2018) as in the Switch Transformer paper: no momentum,
    second-moment decay ``1 - step^-0.8``, update clipping at RMS 1, factored row/column
    statistics for matrices (expert tensors (E, a, b): per expert), full statistics for
    vectors. The learning rate comes from the schedule (no relative step size).
    """

    name = "adafactor"

    def __init__(
        self,
        params: dict,
        decay=(),
        *,
        decay_rate: float = 0.8,
        eps: float = 1e-30,
        clip_threshold: float = 1.0,
        weight_decay: float = 0.0,
    ):
        self.params = params
        self.decay = set(decay)
        self.hyper = dict(
            decay_rate=decay_rate, eps=eps, clip_threshold=clip_threshold, weight_decay=weight_decay
        )
        # Indexed by "is this tensor decayed": weight decay applies to the decay names only.
        self._options = (
            _core.AdafactorOptions(**{**self.hyper, "weight_decay": 0.0}),
            _core.AdafactorOptions(**self.hyper),
        )
        self.steps = 0
        self.state = {}
        self._shapes = {}
        for name, p in params.items():
            if p.ndim >= 2:
                batches = int(np.prod(p.shape[:-2], dtype=np.int64))
                rows, cols = p.shape[-2], p.shape[-1]
            else:
                batches, rows, cols = 1, 1, p.size
            self._shapes[name] = (batches, rows, cols)
            factored = rows >= 2 and cols >= 2
            self.state[f"{name}.row"] = np.zeros(batches * rows if factored else 0, np.float32)
            self.state[f"{name}.col"] = np.zeros(batches * cols if factored else 0, np.float32)
            self.state[f"{name}.full"] = np.zeros(0 if factored else p.size, np.float32)

    def step(self, grads: dict, lr: float) -> None:
        self.steps += 1
        for name, p in self.params.items():
            batches, rows, cols = self._shapes[name]
            _core.adafactor_step(
                p,
                grads[name],
                self.state[f"{name}.row"],
                self.state[f"{name}.col"],
                self.state[f"{name}.full"],
                batches=batches,
                rows=rows,
                cols=cols,
                step=self.steps,
                lr=float(lr),
                options=self._options[name in self.decay],
            )


def make_optimizer(name: str, params: dict, decay=(), **kwargs):
    """``"adamw"`` or ``"adafactor"`` over ``params``."""
    if name == "adamw":
        return AdamW(params, decay, **kwargs)
    if name == "adafactor":
        return Adafactor(params, decay, **kwargs)
    raise ValueError(f"optimizer must be 'adamw' or 'adafactor', got {name!r}")
