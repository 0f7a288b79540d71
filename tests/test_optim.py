# pyswitch.optim: AdamW and Adafactor updates, the learning-rate schedule and global-norm clipping
# against float64 NumPy references of the formulas; bad arguments.
"""Optimizer tests.

References (float64, written from the formulas):

* AdamW (decoupled decay, bias correction)::

      m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
      p = p (1 - lr wd [decay only]) - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

* Adafactor (no momentum), rho = 1 - t^-decay_rate, g2 = g^2 + eps; for a tensor seen as
  ``batches`` matrices (rows, cols) with rows, cols >= 2 (factored, per batch)::

      R = rho R + (1 - rho) mean_cols(g2);   C = rho C + (1 - rho) mean_rows(g2)
      u = g / sqrt(R_i C_j / mean(R))

  else (unfactored) ``V = rho V + (1 - rho) g2; u = g / sqrt(V)``; then over the whole tensor
  ``p = p (1 - lr wd) - lr / max(1, rms(u) / clip_threshold) * u``.

Tolerances: the core updates in float32 (moments and states stored as float32), so parameters
are compared within ``1e-6 * steps`` absolute for O(1) parameters and updates of size lr (about
ten float32 ulps per step), states within 1e-5 relative (AdamW's m, a sum of both signs, also
within 1e-6 of its largest entry).
"""

import math

import numpy as np
import pytest
from array_utils import assert_bits_equal

import pyswitch
from pyswitch import _core
from pyswitch.optim import (
    Adafactor,
    AdamW,
    clip_grad_norm,
    learning_rate,
    make_optimizer,
)


def _adamw_core(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, decay):
    """The core's adamw_step, hyperparameters given as an AdamWOptions (bound by field name)."""
    options = _core.AdamWOptions(beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    _core.adamw_step(param, grad, m, v, step=step, lr=lr, options=options, decay=decay)


STATE_RTOL = 1e-5


def f64(a):
    return np.asarray(a, dtype=np.float64)


def assert_close(got, expected, atol, rtol, what):
    got, expected = f64(got), f64(expected)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    err = np.abs(got - expected)
    tol = atol + rtol * np.abs(expected)
    bad = err > tol
    assert not bad.any(), (
        f"{what}: {int(bad.sum())}/{bad.size} off, max err {err.max()!r}, "
        f"first at {tuple(np.argwhere(bad)[0])}"
    )


# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------


def adamw_ref(p, g, m, v, t, lr, beta1=0.9, beta2=0.95, eps=1e-8, wd=0.1, decay=True):
    p, g, m, v = f64(p), f64(g), f64(m), f64(v)
    # The moment averages use beta1 and beta2 rounded to float32 (as the core holds them): for
    # beta2 = 0.999, 1 - float32(beta2) is 1.3e-5 off 1 - beta2, above the state tolerance.
    b1, b2 = float(np.float32(beta1)), float(np.float32(beta2))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat = m / (1 - beta1**t)
    vhat = v / (1 - beta2**t)
    shrink = (1 - lr * wd) if decay else 1.0
    return p * shrink - lr * mhat / (np.sqrt(vhat) + eps), m, v


@pytest.mark.parametrize("decay", [True, False])
@pytest.mark.parametrize(
    "hyper",
    [
        dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1),
        dict(beta1=0.0, beta2=0.999, eps=1e-3, weight_decay=0.5),
    ],
    ids=["default", "no-momentum"],
)
def test_adamw_matches_reference_over_steps(hyper, decay):
    rng = np.random.default_rng(0)
    shape = (37, 19)
    p = rng.standard_normal(shape).astype(np.float32)
    m = np.zeros(shape, np.float32)
    v = np.zeros(shape, np.float32)
    rp, rm_, rv = f64(p), f64(m), f64(v)
    lr = 3e-2
    for t in range(1, 11):
        g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 2)).astype(np.float32)
        g[0, :3] = 0.0  # zero gradients: the update is m / (sqrt(v) + eps)
        _adamw_core(
            p, g, m, v, t, lr, hyper["beta1"], hyper["beta2"], hyper["eps"],
            hyper["weight_decay"], decay,
        )  # fmt: skip
        rp, rm_, rv = adamw_ref(
            rp, g, rm_, rv, t, lr, hyper["beta1"], hyper["beta2"], hyper["eps"],
            hyper["weight_decay"], decay,
        )  # fmt: skip
        # m sums gradients of both signs: cancellation, so relative to its largest entry.
        assert_close(m, rm_, 1e-6 * np.abs(rm_).max(), STATE_RTOL, f"m at step {t}")
        assert_close(v, rv, 1e-30, STATE_RTOL, f"v at step {t}")
        assert_close(p, rp, 1e-6 * t, 0.0, f"param at step {t}")


def test_adamw_first_step_closed_form():
    """Step 1: m_hat = g, v_hat = g^2, so the update is lr * sign(g) (eps aside) and weight decay
    multiplies by exactly (1 - lr wd)."""
    p = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    g = np.array([0.3, -1e-3, 0.0, 5.0], np.float32)
    m, v = np.zeros(4, np.float32), np.zeros(4, np.float32)
    lr, wd = 0.01, 0.1
    _adamw_core(p, g, m, v, 1, lr, 0.9, 0.95, 1e-8, wd, True)
    expected = np.array([1.0, -2.0, 0.5, 3.0]) * (1 - lr * wd) - lr * np.sign([0.3, -1e-3, 0, 5])
    np.testing.assert_allclose(p, expected, atol=2e-6)


def test_adamw_class_decays_only_named_params_and_counts_steps():
    rng = np.random.default_rng(1)
    params = {
        "w": rng.standard_normal((8, 5)).astype(np.float32),
        "norm": rng.standard_normal(5).astype(np.float32),
        "e": rng.standard_normal((2, 3, 4)).astype(np.float32),
    }
    start = {k: v.copy() for k, v in params.items()}
    opt = AdamW(params, decay={"w", "e"}, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.2)
    assert set(opt.state) == {f"{n}.{s}" for n in params for s in ("m", "v")}
    ref = {k: (f64(v), np.zeros(v.shape), np.zeros(v.shape)) for k, v in params.items()}
    for t in range(1, 4):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        opt.step(grads, 0.05)
        assert opt.steps == t
        for k in params:
            p, m, v = ref[k]
            ref[k] = adamw_ref(p, grads[k], m, v, t, 0.05, 0.8, 0.9, 1e-6, 0.2, k in {"w", "e"})
            assert_close(params[k], ref[k][0], 1e-6 * t, 0, k)
            m_ref = ref[k][1]
            assert_close(opt.state[f"{k}.m"], m_ref, 1e-6 * np.abs(m_ref).max(), STATE_RTOL, k)
    # Live: the dict's arrays were updated in place.
    assert all(not np.array_equal(params[k], start[k]) for k in params)


def test_adamw_zero_lr_changes_only_state():
    p = np.ones(6, np.float32)
    m, v = np.zeros(6, np.float32), np.zeros(6, np.float32)
    _adamw_core(p, np.full(6, 2.0, np.float32), m, v, 1, 0.0, 0.9, 0.95, 1e-8, 0.1, True)
    assert np.all(p == 1.0)
    np.testing.assert_allclose(m, 0.2, rtol=1e-6)
    np.testing.assert_allclose(v, 0.2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Adafactor
# ---------------------------------------------------------------------------------------------


class AdafactorRef:
    """Float64 Adafactor state for one tensor of shape (batches, rows, cols)."""

    def __init__(self, batches, rows, cols, decay_rate=0.8, eps=1e-30, clip=1.0, wd=0.0):
        self.shape = (batches, rows, cols)
        self.factored = rows >= 2 and cols >= 2
        self.R = np.zeros((batches, rows))
        self.C = np.zeros((batches, cols))
        self.V = np.zeros((batches, rows, cols))
        self.decay_rate, self.eps, self.clip, self.wd = decay_rate, eps, clip, wd
        self.last_rms = None

    def step(self, p, g, t, lr):
        p = f64(p).reshape(self.shape)
        g = f64(g).reshape(self.shape)
        rho = 1.0 - t ** (-self.decay_rate)
        g2 = g * g + self.eps
        if self.factored:
            self.R = rho * self.R + (1 - rho) * g2.mean(axis=2)
            self.C = rho * self.C + (1 - rho) * g2.mean(axis=1)
            vhat = self.R[:, :, None] * self.C[:, None, :] / self.R.mean(axis=1)[:, None, None]
        else:
            self.V = rho * self.V + (1 - rho) * g2
            vhat = self.V
        u = g / np.sqrt(vhat)
        self.last_rms = float(np.sqrt(np.mean(u * u)))
        scale = lr / max(1.0, self.last_rms / self.clip)
        return p * (1 - lr * self.wd) - scale * u


def _adafactor_call(p, g, state, shape, t, lr, decay_rate=0.8, eps=1e-30, clip=1.0, wd=0.0):
    batches, rows, cols = shape
    options = _core.AdafactorOptions(
        decay_rate=decay_rate, eps=eps, clip_threshold=clip, weight_decay=wd
    )
    _core.adafactor_step(
        p, g, state["row"], state["col"], state["full"], batches=batches, rows=rows, cols=cols,
        step=t, lr=lr, options=options,
    )  # fmt: skip


def _adafactor_state(shape):
    b, r, c = shape
    factored = r >= 2 and c >= 2
    return {
        "row": np.zeros(b * r if factored else 0, np.float32),
        "col": np.zeros(b * c if factored else 0, np.float32),
        "full": np.zeros(0 if factored else b * r * c, np.float32),
    }


@pytest.mark.parametrize(
    "shape",
    [(1, 12, 7), (3, 5, 6), (1, 1, 20), (1, 9, 1), (4, 1, 3)],
    ids=["matrix", "3d-per-batch", "vector", "column", "batched-rows-1"],
)
@pytest.mark.parametrize("clip", [1.0, 0.3])
def test_adafactor_matches_reference_over_steps(shape, clip):
    rng = np.random.default_rng(2)
    n = int(np.prod(shape))
    p = rng.standard_normal(n).astype(np.float32)
    state = _adafactor_state(shape)
    ref = AdafactorRef(*shape, clip=clip, wd=0.05)
    rp = f64(p).reshape(shape)
    lr = 1e-2
    clipped = False
    for t in range(1, 8):
        # Row / column structure in the gradient so that the factorisation matters.
        g = rng.standard_normal(shape) * rng.uniform(0.1, 3.0, size=shape[:2] + (1,))
        g = (g * 10.0 ** rng.integers(-3, 2)).astype(np.float32).reshape(n)
        _adafactor_call(p, g, state, shape, t, lr, clip=clip, wd=0.05)
        rp = ref.step(rp, g, t, lr)
        clipped |= ref.last_rms > clip
        if ref.factored:
            assert_close(state["row"], ref.R.ravel(), 0, STATE_RTOL, f"row state at {t}")
            assert_close(state["col"], ref.C.ravel(), 0, STATE_RTOL, f"col state at {t}")
        else:
            assert_close(state["full"], ref.V.ravel(), 0, STATE_RTOL, f"full state at {t}")
        assert_close(p, rp.ravel(), 1e-6 * t, 0, f"param at step {t}")
    if clip < 1.0:
        assert clipped  # the clipping branch was exercised


def test_adafactor_first_step_unfactored_is_sign_update():
    """Step 1 of a vector: rho = 0, V = g^2 (+eps), u = sign(g), RMS(u) = 1: p -= lr * sign(g)."""
    g = np.array([0.5, -3.0, 1e-4, -2e-2], np.float32)
    p = np.zeros(4, np.float32)
    state = _adafactor_state((1, 1, 4))
    _adafactor_call(p, g, state, (1, 1, 4), 1, 0.1)
    np.testing.assert_allclose(p, -0.1 * np.sign(g), rtol=1e-6)
    np.testing.assert_allclose(state["full"], f64(g) ** 2, rtol=1e-6)


def test_adafactor_factored_rank_one_is_exact():
    """For a rank-one |g| = a b^T the factored estimate is exact on step 1: V_hat = g^2, so
    u = sign(g) and RMS(u) = 1."""
    a = np.array([1.0, 2.0, 0.5]), np.array([0.1, 1.0, 3.0, 0.2])
    g = np.outer(*a) * np.array([[1, -1, 1, -1], [-1, 1, 1, 1], [1, 1, -1, 1]])
    g = g.astype(np.float32)
    p = np.zeros(12, np.float32)
    state = _adafactor_state((1, 3, 4))
    _adafactor_call(p, g.ravel(), state, (1, 3, 4), 1, 0.01, eps=0.0)
    np.testing.assert_allclose(p, -0.01 * np.sign(g.ravel()), rtol=1e-5)


def test_adafactor_class_shapes_and_decay():
    rng = np.random.default_rng(3)
    params = {
        "embed": rng.standard_normal((10, 6)).astype(np.float32),
        "expert": rng.standard_normal((3, 6, 4)).astype(np.float32),
        "norm": rng.standard_normal(6).astype(np.float32),
        "row": rng.standard_normal((1, 5)).astype(np.float32),
    }
    opt = Adafactor(params, decay={"embed", "expert"}, weight_decay=0.1, clip_threshold=0.5)
    sizes = {k: (v.size if isinstance(v, np.ndarray) else v) for k, v in opt.state.items()}
    assert sizes == {
        "embed.row": 10, "embed.col": 6, "embed.full": 0,
        "expert.row": 18, "expert.col": 12, "expert.full": 0,
        "norm.row": 0, "norm.col": 0, "norm.full": 6,
        "row.row": 0, "row.col": 0, "row.full": 5,
    }  # fmt: skip
    shapes = {"embed": (1, 10, 6), "expert": (3, 6, 4), "norm": (1, 1, 6), "row": (1, 1, 5)}
    refs = {
        k: AdafactorRef(*shapes[k], clip=0.5, wd=0.1 if k in ("embed", "expert") else 0.0)
        for k in params
    }
    rp = {k: f64(v).reshape(shapes[k]) for k, v in params.items()}
    for t in range(1, 4):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        opt.step(grads, 2e-2)
        for k in params:
            rp[k] = refs[k].step(rp[k], grads[k], t, 2e-2)
            assert_close(params[k], rp[k].reshape(params[k].shape), 1e-6 * t, 0, k)
    assert opt.steps == 3


def test_make_optimizer():
    params = {"w": np.ones((2, 2), np.float32)}
    assert isinstance(make_optimizer("adamw", params, beta1=0.5), AdamW)
    assert make_optimizer("adamw", params, beta1=0.5).hyper["beta1"] == 0.5
    assert isinstance(make_optimizer("adafactor", params, clip_threshold=2.0), Adafactor)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("sgd", params)
    with pytest.raises(TypeError):
        make_optimizer("adamw", params, momentum=0.9)
    for beta in (1.0, -0.1):
        with pytest.raises(ValueError, match="beta"):
            AdamW(params, beta1=beta)
        with pytest.raises(ValueError, match="beta"):
            AdamW(params, beta2=beta)


# ---------------------------------------------------------------------------------------------
# Learning rate
# ---------------------------------------------------------------------------------------------


def lr_ref(step, peak, warmup, total, decay, final=0.1):
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if decay == "constant":
        return peak
    if decay == "rsqrt":
        return peak * math.sqrt(max(warmup, 1) / max(step, 1))
    progress = min(1.0, (step - warmup) / max(total - warmup, 1))
    floor = peak * final
    if decay == "linear":
        return peak - (peak - floor) * progress
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("decay", ["cosine", "linear", "rsqrt", "constant"])
@pytest.mark.parametrize("warmup", [0, 1, 10])
def test_learning_rate_closed_forms(decay, warmup):
    total, peak = 100, 3e-3
    for step in list(range(0, 120)) + [10**6]:
        got = learning_rate(step, peak, warmup, total, decay)
        assert got == pytest.approx(lr_ref(step, peak, warmup, total, decay), rel=1e-12), step
    # Warmup is linear from peak / warmup to peak; the decay starts at peak.
    if warmup:
        assert learning_rate(0, peak, warmup, total, decay) == pytest.approx(peak / warmup)
        assert learning_rate(warmup - 1, peak, warmup, total, decay) == pytest.approx(peak)
    assert learning_rate(warmup, peak, warmup, total, decay) == pytest.approx(peak)


def test_learning_rate_landmarks():
    peak = 1.0
    # cosine: half way is the mean of peak and floor; the end (and beyond) is the floor.
    assert learning_rate(60, peak, 10, 110, "cosine") == pytest.approx(0.55)
    assert learning_rate(110, peak, 10, 110, "cosine") == pytest.approx(0.1)
    assert learning_rate(500, peak, 10, 110, "cosine") == pytest.approx(0.1)
    assert learning_rate(60, peak, 10, 110, "linear") == pytest.approx(0.55)
    assert learning_rate(110, peak, 10, 110, "linear", final_fraction=0.0) == 0.0
    # rsqrt: peak * sqrt(warmup / step), the paper's inverse square root.
    assert learning_rate(40, peak, 10, 110, "rsqrt") == pytest.approx(0.5)
    assert learning_rate(1000, peak, 10, 110, "rsqrt") == pytest.approx(0.1)
    assert learning_rate(50, 2.0, 0, 110, "constant") == 2.0


@pytest.mark.parametrize(
    "args",
    [
        (-1, 1.0, 10, 100, "cosine"),
        (0, 1.0, -1, 100, "cosine"),
        (0, 1.0, 10, 0, "cosine"),
        (0, 1.0, 10, 100, "exponential"),
        (0, 1.0, 10, 100, "COSINE"),
    ],
    ids=str,
)
def test_learning_rate_bad_args(args):
    with pytest.raises(ValueError):
        learning_rate(*args)
    with pytest.raises(ValueError):
        step = args[0] if args[0] < 0 else max(args[0], 10)  # past warmup for the core
        _core.learning_rate(step, *args[1:])


def test_core_learning_rate_checks_decay_during_warmup():
    """The core rejects an unknown decay name at every step, warmup included (it used to accept
    one until the warmup was over)."""
    with pytest.raises(ValueError, match="decay must be"):
        _core.learning_rate(0, 1.0, 10, 100, "exponential")


def test_learning_rate_bad_types():
    with pytest.raises(TypeError):
        learning_rate(1.5, 1.0, 10, 100)


# ---------------------------------------------------------------------------------------------
# Gradient clipping
# ---------------------------------------------------------------------------------------------


def _grads(rng, scale):
    return [
        (rng.standard_normal(s) * scale).astype(np.float32) for s in [(40, 30), (7,), (3, 4, 5)]
    ]


def test_clip_grad_norm_scales_to_max_norm():
    rng = np.random.default_rng(4)
    grads = _grads(rng, 1.0)
    before = [g.copy() for g in grads]
    expected = np.sqrt(sum(np.sum(f64(g) ** 2) for g in grads))
    norm = clip_grad_norm(grads, 1.5)
    assert norm == pytest.approx(expected, rel=1e-12)
    scale = np.float32(1.5 / expected)
    for g, b in zip(grads, before):
        np.testing.assert_array_equal(g, b * scale)
    after = np.sqrt(sum(np.sum(f64(g) ** 2) for g in grads))
    assert after == pytest.approx(1.5, rel=1e-6)


def test_clip_grad_norm_below_threshold_is_untouched():
    rng = np.random.default_rng(5)
    grads = _grads(rng, 1e-3)
    before = [g.copy() for g in grads]
    norm = clip_grad_norm(grads, 10.0)
    assert norm == pytest.approx(np.sqrt(sum(np.sum(f64(g) ** 2) for g in before)), rel=1e-12)
    for g, b in zip(grads, before):
        assert_bits_equal(g, b, "unclipped")


def test_clip_grad_norm_non_finite_leaves_grads():
    grads = [np.array([1.0, np.nan, 3.0], np.float32), np.array([1e3], np.float32)]
    before = [g.copy() for g in grads]
    assert math.isnan(clip_grad_norm(grads, 1.0))
    for g, b in zip(grads, before):
        assert_bits_equal(g, b, "nan grads")


def test_clip_grad_norm_infinite_leaves_grads():
    grads = [np.array([np.inf, 1.0], np.float32), np.array([2.0], np.float32)]
    assert clip_grad_norm(grads, 1.0) == math.inf
    assert grads[0][1] == 1.0 and grads[1][0] == 2.0 and grads[0][0] == np.inf


def test_clip_grad_norm_empty_and_large():
    assert clip_grad_norm([], 1.0) == 0.0
    big = np.full(1 << 16, 0.5, np.float32)  # several blocks
    assert clip_grad_norm([big], 1.0) == pytest.approx(math.sqrt((1 << 16) * 0.25), rel=1e-12)
    assert np.linalg.norm(f64(big)) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.inf, math.nan, "1"])
def test_clip_grad_norm_bad_max_norm(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([np.ones(3, np.float32)], max_norm)


def test_clip_grad_norm_bad_arrays():
    base = np.full((4, 6), 100.0, np.float32)
    with pytest.raises(ValueError, match="contiguous"):
        clip_grad_norm([base[:, ::2]], 1.0)
    assert np.all(base == 100.0)  # neither the original nor a silent copy was scaled
    with pytest.raises(TypeError, match="float32"):
        clip_grad_norm([np.ones(3, np.float64)], 1.0)
    with pytest.raises(TypeError):
        clip_grad_norm([[1.0, 2.0]], 1.0)
    ro = np.full(3, 100.0, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        clip_grad_norm([ro], 0.5)
    assert np.all(ro == 100.0)


# ---------------------------------------------------------------------------------------------
# Bad arguments of the update kernels: never a silent update of a copy
# ---------------------------------------------------------------------------------------------


def _adamw_args(n=6):
    return [np.ones(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32),
            np.zeros(n, np.float32)]  # fmt: skip


@pytest.mark.parametrize("which", [0, 2, 3], ids=["param", "m", "v"])
def test_adamw_non_contiguous_inplace_array_raises(which):
    args = _adamw_args()
    big = np.ones(12, np.float32) * (5.0 if which == 0 else 0.0)
    args[which] = big[::2]
    with pytest.raises(ValueError, match="contiguous"):
        _adamw_core(*args, 1, 0.1, 0.9, 0.95, 1e-8, 0.1, True)
    assert np.all(big == (5.0 if which == 0 else 0.0))


def test_adamw_class_non_contiguous_param_raises():
    big = np.ones((4, 6), np.float32)
    params = {"w": big[:, ::2]}
    opt = AdamW(params)
    with pytest.raises(ValueError, match="contiguous"):
        opt.step({"w": np.ones((4, 3), np.float32)}, 0.1)
    assert np.all(big == 1.0)


def test_adamw_non_contiguous_grad_is_read_correctly():
    g = np.arange(12, dtype=np.float32).reshape(3, 4) - 5
    a, b = _adamw_args(12), _adamw_args(12)
    _adamw_core(a[0], np.ascontiguousarray(g.T).ravel(), a[2], a[3], 1, 0.1, 0.9, 0.95,
                     1e-8, 0.0, False)  # fmt: skip
    _adamw_core(b[0], g.T, b[2], b[3], 1, 0.1, 0.9, 0.95, 1e-8, 0.0, False)
    assert_bits_equal(b[0], a[0], "strided grad")


def test_adamw_bad_arguments():
    def call(**change):
        args = dict(zip(("param", "grad", "m", "v"), _adamw_args()))
        kw = dict(step=1, lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, decay=True)
        args.update(kw)
        args.update(change)
        _adamw_core(**args)

    call()
    with pytest.raises(TypeError, match="float32"):
        call(param=np.ones(6, np.float64))
    with pytest.raises(TypeError, match="float32"):
        call(grad=np.ones(6, np.float64))
    with pytest.raises(TypeError, match="numpy array"):
        call(m=[0.0] * 6)
    with pytest.raises(ValueError, match="size"):
        call(grad=np.ones(5, np.float32))
    with pytest.raises(ValueError, match="size"):
        call(v=np.zeros(7, np.float32))
    with pytest.raises(ValueError, match="step"):
        call(step=0)
    for lr in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="lr"):
            call(lr=lr)
    ro = np.ones(6, np.float32)
    ro.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        call(param=ro)
    assert np.all(ro == 1.0)


@pytest.mark.parametrize("which", ["param", "row", "col", "full"])
def test_adafactor_non_contiguous_inplace_array_raises(which):
    shape = (1, 4, 3) if which != "full" else (1, 1, 6)
    n = int(np.prod(shape))
    state = _adafactor_state(shape)
    p = np.ones(n, np.float32)
    size = n if which == "param" else state[which].size
    big = np.full(2 * size, 7.0, np.float32)
    if which == "param":
        p = big[::2]
    else:
        state[which] = big[::2]
    with pytest.raises(ValueError, match="contiguous"):
        _adafactor_call(p, np.ones(n, np.float32), state, shape, 1, 0.1)
    assert np.all(big == 7.0)


def test_adafactor_bad_arguments():
    shape = (2, 3, 4)
    state = _adafactor_state(shape)
    p, g = np.ones(24, np.float32), np.ones(24, np.float32)
    with pytest.raises(ValueError, match="sizes"):
        _adafactor_call(p, g, state, (1, 3, 4), 1, 0.1)
    with pytest.raises(ValueError, match="sizes"):
        _adafactor_call(p, g[:23], state, shape, 1, 0.1)
    bad = dict(state, full=np.zeros(24, np.float32))  # factored: no full state
    with pytest.raises(ValueError, match="sizes"):
        _adafactor_call(p, g, bad, shape, 1, 0.1)
    with pytest.raises(ValueError, match="step"):
        _adafactor_call(p, g, state, shape, 0, 0.1)
    with pytest.raises(ValueError, match="lr"):
        _adafactor_call(p, g, state, shape, 1, math.nan)
    with pytest.raises(TypeError, match="float32"):
        _adafactor_call(p.astype(np.float64), g, state, shape, 1, 0.1)
    assert np.all(p == 1.0) and np.all(state["row"] == 0) and np.all(state["col"] == 0)


def test_adafactor_class_non_contiguous_param_raises():
    big = np.ones((6, 8), np.float32)
    params = {"w": big[:, ::2]}
    opt = Adafactor(params)
    with pytest.raises(ValueError, match="contiguous"):
        opt.step({"w": np.ones((6, 4), np.float32)}, 0.1)
    assert np.all(big == 1.0)


def test_optimizers_bit_identical_across_threads():
    before = pyswitch.get_num_threads()
    rng = np.random.default_rng(6)
    p0 = rng.standard_normal((3, 200, 130)).astype(np.float32)  # > one 16K block
    grads = [rng.standard_normal(p0.shape).astype(np.float32) for _ in range(3)]
    out = []
    try:
        for threads in (1, 2):
            pyswitch.set_num_threads(threads)
            results = []
            for name in ("adamw", "adafactor"):
                params = {"w": p0.copy()}
                opt = make_optimizer(name, params, {"w"})
                for g in grads:
                    opt.step({"w": g}, 1e-2)
                results.append(params["w"])
            norm_grads = [g.copy() for g in grads]
            results.append(np.array([clip_grad_norm(norm_grads, 1.0)]))
            out.append(results)
    finally:
        pyswitch.set_num_threads(before)
    for a, b in zip(*out):
        assert_bits_equal(b, a, "threads")
