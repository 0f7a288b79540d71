# pyswitch.SwitchFFN / pyswitch.DenseFFN (SPEC section 2) against the float64 reference in
# reference_layer.py: forward, finite-difference and analytic gradients, bf16 policy,
# determinism across ISAs and threads, stats(), dense equivalence, bad inputs.
"""Switch FFN and dense FFN layer tests.

Reference.  ``reference_layer.py`` computes the layer in float64 from the definitions: float64
logits ``x @ router`` routed by ``reference.route``, then the experts.  Every case first checks
that the reference plan's ``expert_index`` / ``slot`` equal ``layer.last_plan``'s.  Fixed cases
are drawn with well-separated logits (no logit gap below 1e-3, no two top-1 probabilities closer
than 1e-4 under batch-prioritized routing), so the plans must agree exactly.  Hypothesis cases
may hit near-ties where float32 and float64 legitimately decide differently; there the test
asserts a near-tie exists and compares the FFN on the implementation's decisions (gates and
losses still recomputed in float64).

Tolerances.
* float32 forward: ``|y - y_ref| <= 1e-4 * max|y_ref|`` (FWD_RTOL); dropped tokens exactly 0.
* float32 gradients vs the analytic float64 backward: per array,
  ``|g - g_ref| <= 1e-4 * max|g_ref| + 1e-4 * |g_ref| + 1e-6``.
* finite differences: central differences of the float64 reference loss at the layer's float32
  parameters, h = 1e-3; ``|g - fd| <= 1e-3 + 1e-2 * |fd|`` (abs 1e-3 is small against the O(1)
  gradients the cases are built to have); coordinates whose perturbation changes the routing
  decisions or a relu's on/off pattern are skipped (at most 20 % may be skipped).
* bfloat16 layers: reference on bf16-rounded x and weights with the hidden activation rounded to
  bf16; ``|y - y_ref| <= 2e-2 * max|y_ref|`` (BF16_RTOL: a few bf16 roundings of 2^-9 each
  through two GEMMs); gradients within 5e-2 of the float32 layer's gradients, relative to each
  array's largest magnitude.
* scaled aux / z losses, router entropy, gates: relative 1e-5.
"""

import math
from dataclasses import dataclass

import numpy as np
import pytest
import reference as ref
import reference_layer as rl
from array_utils import assert_bits_equal
from bad_input_utils import Case, assert_raises_case, run_cases_in_child
from hypothesis import assume, event, given
from hypothesis import strategies as st
from isa_utils import all_configs, cpu_config

import pyswitch

BF16 = np.dtype(pyswitch.bfloat16)
F32 = np.dtype(np.float32)

FWD_RTOL = 1e-4
GRAD_SCALE_TOL = 1e-4
GRAD_RTOL = 1e-4
FD_H = 1e-3
FD_ATOL = 1e-3
FD_RTOL = 1e-2
FD_MAX_SKIPPED = 0.2
BF16_RTOL = 2e-2
BF16_GRAD_RTOL = 5e-2
LOSS_RTOL = 1e-5

ACTIVATIONS = ["relu", "gelu", "geglu"]
EXPERT_KEYS = ("w_in", "w_out", "w_gate", "b_in", "b_out")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def f64(a):
    return np.asarray(a).astype(np.float64)


def assert_close_scaled(got, expected, rtol, what, elem_rtol=0.0, atol=0.0):
    """|got - expected| <= rtol * max|expected| + elem_rtol * |expected| + atol, elementwise."""
    got, expected = f64(got), f64(expected)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    assert np.all(np.isfinite(got)), (what, "non-finite values", got)
    scale = float(np.max(np.abs(expected), initial=0.0))
    tol = rtol * scale + elem_rtol * np.abs(expected) + atol
    err = np.abs(got - expected)
    bad = err > tol
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.size} entries off; first at {idx}: got {got[idx]!r}, "
            f"expected {expected[idx]!r}, tol {np.broadcast_to(tol, err.shape)[idx]!r}, "
            f"max err {float(err.max())!r}, scale {scale!r}"
        )


def assert_rel(got, expected, rtol, what):
    assert abs(float(got) - float(expected)) <= rtol * max(abs(float(expected)), 1e-30), (
        what,
        float(got),
        float(expected),
    )


def make_switch(d, f, E, cfg, seed=0, **extra):
    return pyswitch.SwitchFFN(d, f, E, seed=seed, **cfg, **extra)


def fill_params(layer, rng, *, router_std=1.0, w_std=0.5, b_std=0.2):
    """Overwrite the live params with O(1) values (gates that vary, gradients that are O(1))."""
    for key, p in layer.params.items():
        if key == "router":
            p[...] = rng.standard_normal(p.shape) * router_std
        elif key.startswith("b_"):
            p[...] = rng.standard_normal(p.shape) * b_std
        else:
            p[...] = rng.standard_normal(p.shape) * w_std
    return layer


def snapshot(params):
    return {key: np.array(v, dtype=np.float64, copy=True) for key, v in params.items()}


def well_separated(L, cfg, gap=1e-3, p1_gap=1e-4):
    L = f64(L)
    if L.shape[1] > 1 and np.min(np.diff(np.sort(L, axis=1), axis=1)) < gap:
        return False
    if cfg.get("priority") == "batch_prioritized":
        p1 = np.sort(ref.top1_prob(L))
        if p1.size > 1 and np.min(np.diff(p1)) < p1_gap:
            return False
    return True


def has_near_tie(L, cfg, rtol=1e-5):
    """A near-tie that may legitimately make float32 and float64 routing disagree.

    The hypothesis cases have logits on a dyadic grid, exact in float32 and float64, so exact
    logit ties are decided identically (lowest index) and do not count.  What remains is the
    batch-prioritized order: two tokens whose top-1 probabilities agree to ``rtol`` (or exactly)
    while their max-subtracted logit rows differ (float32 softmax may order them either way).
    """
    L = f64(L)
    if cfg.get("priority") != "batch_prioritized":
        return False
    shifted = L - L.max(axis=1, keepdims=True)
    p1 = ref.top1_prob(L)
    for a in range(len(p1)):
        for b in range(a):
            if abs(p1[a] - p1[b]) <= rtol * max(p1[a], p1[b]) and not np.array_equal(
                shifted[a], shifted[b]
            ):
                return True
    return False


def separated_case(cfg, T, d, f, E, seed, *, want_drops=None, training=False, sep=(1e-3, 1e-4)):
    """(layer, x, dy): params filled with O(1) values, logits well separated (``sep``: minimum
    logit gap and top-1 probability gap); ``want_drops``: require (True) or forbid (False)
    dropped assignments in the reference plan."""
    for s in range(seed, seed + 2000):
        rng = np.random.default_rng(s)
        layer = fill_params(make_switch(d, f, E, cfg, seed=s), rng)
        x = rng.standard_normal((T, d)).astype(np.float32)
        L = rl.router_logits(x, layer.params["router"])
        if not well_separated(L, cfg, *sep):
            continue
        plan = ref.route(L, **rl.route_kwargs(cfg, training))
        if want_drops is not None and (plan.dropped > 0) != want_drops:
            continue
        dy = rng.standard_normal((T, d)).astype(np.float32)
        return layer, x, dy
    raise AssertionError(f"no well-separated case for {cfg}")


def check_plan(layer_plan, ref_plan, what=""):
    assert np.array_equal(np.asarray(layer_plan.expert_index), ref_plan.expert_index), what
    assert np.array_equal(np.asarray(layer_plan.slot), ref_plan.slot), what
    assert_close_scaled(layer_plan.gate, ref_plan.gate, 0.0, f"{what} gate", elem_rtol=1e-5)


def dropped_tokens(plan):
    return np.nonzero((np.asarray(plan.slot) < 0).all(axis=1))[0]


# ---------------------------------------------------------------------------------------------
# Finite differences with routing / kink change detection (reuses reference.central_difference)
# ---------------------------------------------------------------------------------------------


def signature(fw):
    kinks = tuple(None if k is None else k.tobytes() for k in fw.kinks)
    return (fw.plan.expert_index.tobytes(), fw.plan.slot.tobytes(), kinks)


def fd_with_skips(loss_of, x0, h=FD_H):
    """Central differences of ``loss_of(x) -> (loss, forward)`` and a mask of coordinates where
    the +h and -h evaluations kept the base point's routing and relu patterns."""
    base = signature(loss_of(np.array(x0, dtype=np.float64))[1])
    sigs = []

    def f(xp):
        loss, fw = loss_of(xp)
        sigs.append(signature(fw))
        return loss

    grad = ref.central_difference(f, x0, h=h)
    same = np.array([sigs[2 * i] == base and sigs[2 * i + 1] == base for i in range(grad.size)])
    return grad, same.reshape(grad.shape)


def assert_fd_close(got, fd, valid, what):
    got = f64(got)
    assert got.shape == fd.shape, (what, got.shape, fd.shape)
    assert np.all(np.isfinite(got)), what
    skipped = 1.0 - valid.mean() if valid.size else 0.0
    assert skipped <= FD_MAX_SKIPPED, f"{what}: {skipped:.0%} of coordinates skipped"
    err = np.abs(got - fd)
    bad = valid & (err > FD_ATOL + FD_RTOL * np.abs(fd))
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} coordinates off; first at {idx}: got {got[idx]!r}, "
            f"finite difference {fd[idx]!r}"
        )


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

T_F, D_F, F_F, E_F = 16, 6, 8, 4

FORWARD_CONFIGS = [
    pytest.param(dict(k=1, eval_capacity_factor=0.5, min_capacity=1), True, id="k1-tight"),
    pytest.param(dict(k=1, eval_capacity_factor=None), False, id="k1-dropless"),
    pytest.param(dict(k=1, eval_capacity_factor=4.0), False, id="k1-capacity>=S"),
    pytest.param(
        dict(k=2, eval_capacity_factor=0.5, min_capacity=0, normalize_gates=True),
        True,
        id="k2-tight-normalized",
    ),
    pytest.param(dict(k=2, eval_capacity_factor=None), False, id="k2-dropless"),
    pytest.param(
        dict(k=2, eval_capacity_factor=0.75, min_capacity=1, group_size=4),
        True,
        id="k2-groups-tight",
    ),
    pytest.param(
        dict(
            k=1,
            eval_capacity_factor=0.5,
            min_capacity=1,
            group_size=8,
            priority="batch_prioritized",
        ),
        True,
        id="k1-batch-prioritized-groups",
    ),
    pytest.param(
        dict(
            k=2,
            eval_capacity_factor=0.75,
            min_capacity=0,
            priority="batch_prioritized",
            capacity_rounding="ceil",
        ),
        True,
        id="k2-batch-prioritized-ceil",
    ),
    pytest.param(dict(k=2, eval_capacity_factor=2.0, group_size=8), None, id="k2-default-eval"),
]


# ---------------------------------------------------------------------------------------------
# The reference's own backward against finite differences (no pyswitch involved)
# ---------------------------------------------------------------------------------------------

REF_CONFIGS = [
    dict(k=1, eval_capacity_factor=0.5, min_capacity=1, activation="relu"),
    dict(k=2, eval_capacity_factor=0.5, min_capacity=0, normalize_gates=True, activation="gelu"),
    dict(k=2, eval_capacity_factor=None, group_size=4, activation="geglu", use_bias=True),
    dict(k=1, eval_capacity_factor=0.75, priority="batch_prioritized", activation="geglu"),
]


@pytest.mark.parametrize("cfg", REF_CONFIGS, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_reference_backward_matches_finite_differences(cfg):
    rng = np.random.default_rng(11)
    T, d, f, E = 8, 3, 4, 3
    cfg = dict(cfg, aux_loss_coef=0.5, z_loss_coef=0.5)
    k = cfg["k"]
    for _ in range(200):
        params = {
            "router": rng.standard_normal((d, E)),
            "w_in": rng.standard_normal((E, d, f)) * 0.7,
            "w_out": rng.standard_normal((E, f, d)) * 0.7,
        }
        if cfg["activation"] == "geglu":
            params["w_gate"] = rng.standard_normal((E, d, f)) * 0.7
        if cfg.get("use_bias"):
            params["b_in"] = rng.standard_normal((E, f)) * 0.3
            params["b_out"] = rng.standard_normal((E, d)) * 0.3
        x = rng.standard_normal((T, d))
        if well_separated(x @ params["router"], cfg):
            break
    dy = rng.standard_normal((T, d))
    plan = ref.route(x @ params["router"], **rl.route_kwargs(cfg))
    assert k == 1 or plan.k == 2
    if cfg.get("eval_capacity_factor") is not None:
        assert plan.dropped > 0
    g = rl.switch_backward(x, params, dy, cfg)
    for key in list(params) + ["x"]:

        def loss_of(v, key=key):
            p = dict(params)
            xx = x
            if key == "x":
                xx = v
            else:
                p[key] = v
            return rl.switch_loss(xx, p, dy, cfg)

        x0 = x if key == "x" else params[key]
        fd, valid = fd_with_skips(loss_of, x0, h=1e-6)
        assert valid.mean() >= 0.9, key
        np.testing.assert_allclose(g[key][valid], fd[valid], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_dense_backward_matches_finite_differences(activation):
    rng = np.random.default_rng(3)
    d, f, T = 3, 5, 6
    params = {"w_in": rng.standard_normal((d, f)), "w_out": rng.standard_normal((f, d))}
    if activation == "geglu":
        params["w_gate"] = rng.standard_normal((d, f))
    params["b_in"] = rng.standard_normal(f) * 0.3
    params["b_out"] = rng.standard_normal(d) * 0.3
    x = rng.standard_normal((T, d))
    dy = rng.standard_normal((T, d))
    g = rl.dense_backward(x, params, dy, activation)
    for key in list(params) + ["x"]:

        def loss(v, key=key):
            p = dict(params)
            if key == "x":
                return rl.dense_loss(v, p, dy, activation)[0]
            p[key] = v
            return rl.dense_loss(x, p, dy, activation)[0]

        fd = ref.central_difference(loss, x if key == "x" else params[key], h=1e-6)
        np.testing.assert_allclose(g[key], fd, rtol=1e-5, atol=1e-6, err_msg=key)


def test_reference_dense_mixture_equals_dispatch_reference_without_drops():
    rng = np.random.default_rng(4)
    T, d, f, E = 10, 3, 4, 4
    for cfg in (dict(k=1), dict(k=2, normalize_gates=True), dict(k=2, activation="geglu")):
        cfg = dict(cfg, eval_capacity_factor=None)
        params = {
            "router": rng.standard_normal((d, E)),
            "w_in": rng.standard_normal((E, d, f)),
            "w_out": rng.standard_normal((E, f, d)),
            "w_gate": rng.standard_normal((E, d, f)),
        }
        if cfg.get("activation") != "geglu":
            del params["w_gate"]
        x = rng.standard_normal((T, d))
        np.testing.assert_allclose(
            rl.switch_forward(x, params, cfg).y, rl.dense_mixture(x, params, cfg), rtol=1e-12
        )


# ---------------------------------------------------------------------------------------------
# Construction, parameters, init
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("use_bias", [False, True])
def test_param_keys_shapes_and_grads_after_backward(activation, use_bias):
    d, f, E = 5, 7, 3
    layer = pyswitch.SwitchFFN(d, f, E, activation=activation, use_bias=use_bias)
    expect = {"router": (d, E), "w_in": (E, d, f), "w_out": (E, f, d)}
    if activation == "geglu":
        expect["w_gate"] = (E, d, f)
    if use_bias:
        expect["b_in"] = (E, f)
        expect["b_out"] = (E, d)
    assert set(layer.params) == set(expect)
    for key, shape in expect.items():
        assert layer.params[key].shape == shape, key
        assert layer.params[key].dtype == F32, key
    x = np.random.default_rng(0).standard_normal((8, d)).astype(np.float32)
    y = layer.forward(x)
    assert y.shape == x.shape and y.dtype == F32
    dx = layer.backward(np.ones_like(y))
    assert dx.shape == x.shape and dx.dtype == F32
    assert set(layer.grads) == set(expect)
    for key, shape in expect.items():
        assert layer.grads[key].shape == shape, key
        assert layer.grads[key].dtype == F32, key
        assert np.all(np.isfinite(layer.grads[key])), key


def test_params_are_live():
    rng = np.random.default_rng(1)
    layer = pyswitch.SwitchFFN(4, 6, 3, eval_capacity_factor=None, use_bias=True)
    x = rng.standard_normal((8, 4)).astype(np.float32)
    y0 = layer.forward(x)
    assert np.any(y0 != 0)
    layer.params["w_out"][...] = 0.0
    y1 = layer.forward(x)
    assert np.all(y1 == 0.0)
    layer.params["b_out"][...] = 1.0
    y2 = layer.forward(x)
    # Every token is kept (dropless), so y[t] = sum of its gates = raw top-1 probability.
    np.testing.assert_allclose(y2, np.repeat(np.asarray(layer.last_plan.gate), 4, axis=1), 1e-6)
    layer.params["router"][...] = 0.0  # uniform probabilities: every gate is 1/3
    y3 = layer.forward(x)
    np.testing.assert_allclose(y3, np.full_like(y3, 1.0 / 3.0), rtol=1e-6)


@pytest.mark.parametrize("activation", ["relu", "geglu"])
def test_init_is_truncated_normal_with_fan_in_scaling(activation):
    d, f, E, s = 64, 96, 4, 0.1
    layer = pyswitch.SwitchFFN(d, f, E, activation=activation, use_bias=True, init_scale=s, seed=7)
    fan_in = {"router": d, "w_in": d, "w_gate": d, "w_out": f}
    trunc_std = 0.8796256610342398  # std of a standard normal truncated at +-2
    for key, p in layer.params.items():
        if key.startswith("b_"):
            assert np.all(p == 0.0), key
            continue
        std = math.sqrt(s / fan_in[key])
        a = f64(p)
        assert np.max(np.abs(a)) <= 2.0 * std * (1 + 1e-6), key
        n = a.size
        tol = 4.0 * trunc_std * std / math.sqrt(n) * 1.5 + 1e-9
        assert abs(a.mean()) <= tol, (key, a.mean(), tol)
        assert abs(a.std() / (trunc_std * std) - 1.0) <= max(0.05, 6.0 / math.sqrt(n)), (
            key,
            a.std(),
            trunc_std * std,
        )
    # The seed decides the parameters.
    same = pyswitch.SwitchFFN(d, f, E, activation=activation, use_bias=True, init_scale=s, seed=7)
    other = pyswitch.SwitchFFN(d, f, E, activation=activation, use_bias=True, init_scale=s, seed=8)
    for key in layer.params:
        assert_bits_equal(same.params[key], layer.params[key], key)
        if not key.startswith("b_"):
            assert not np.array_equal(other.params[key], layer.params[key]), key


def test_constructor_signatures_match_the_contract():
    import inspect

    expect = dict(
        k=1,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        min_capacity=4,
        group_size=None,
        priority="position",
        capacity_rounding="floor",
        normalize_gates=False,
        activation="relu",
        use_bias=False,
        expert_dropout=0.0,
        dtype="float32",
        aux_loss_coef=1e-2,
        z_loss_coef=1e-3,
        jitter_eps=1e-2,
        init_scale=0.1,
        seed=0,
        comm=None,
    )
    sig = inspect.signature(pyswitch.SwitchFFN)
    assert list(sig.parameters)[:3] == ["d_model", "d_ff", "num_experts"]
    for name, default in expect.items():
        assert sig.parameters[name].kind == inspect.Parameter.KEYWORD_ONLY, name
        assert sig.parameters[name].default == default, name
    dense = dict(
        activation="relu", use_bias=False, dropout=0.0, dtype="float32", init_scale=0.1, seed=0
    )
    sig = inspect.signature(pyswitch.DenseFFN)
    assert list(sig.parameters)[:2] == ["d_model", "d_ff"]
    for name, default in dense.items():
        assert sig.parameters[name].default == default, name


def test_default_loss_coefficients_scale_the_plan_losses():
    layer = pyswitch.SwitchFFN(4, 6, 4, init_scale=4.0)
    x = np.random.default_rng(0).standard_normal((16, 4)).astype(np.float32)
    layer.forward(x)
    plan = layer.last_plan
    assert_rel(layer.aux_loss, 1e-2 * plan.aux_loss, 1e-6, "aux")
    assert_rel(layer.z_loss, 1e-3 * plan.z_loss, 1e-6, "z")
    L = rl.router_logits(x, layer.params["router"])
    rplan = ref.route(L, capacity_factor=2.0)
    assert_rel(plan.aux_loss, rplan.aux_loss, LOSS_RTOL, "plan aux")
    assert_rel(plan.z_loss, rplan.z_loss, LOSS_RTOL, "plan z")


def test_jitter_multiplies_the_router_input_within_eps_in_training_only():
    """k = E, dropless: the gates are the whole softmax row, so logit differences are
    recoverable as log-ratios and must lie within eps * sum_d |x_d| |W_di - W_d0| of the
    unjittered ones (and differ from them in training)."""
    T, d, E, eps = 32, 4, 3, 0.05
    layer = pyswitch.SwitchFFN(
        d, 4, E, k=E, capacity_factor=None, eval_capacity_factor=None, jitter_eps=eps, seed=1
    )
    rng = np.random.default_rng(2)
    layer.params["router"][...] = rng.standard_normal((d, E))
    x = rng.standard_normal((T, d)).astype(np.float32)
    W = f64(layer.params["router"])
    L = f64(x) @ W
    dL = L[:, 1:] - L[:, :1]
    bound = eps * np.abs(f64(x)) @ np.abs(W[:, 1:] - W[:, :1])

    def recovered():
        plan = layer.last_plan
        P = np.zeros((T, E))
        np.put_along_axis(P, np.asarray(plan.expert_index, np.int64), f64(plan.gate), axis=1)
        return np.log(P[:, 1:]) - np.log(P[:, :1])

    layer.forward(x, training=False)
    np.testing.assert_allclose(recovered(), dL, atol=1e-4)
    layer.forward(x, training=True)
    got = recovered()
    assert np.all(np.abs(got - dL) <= bound + 1e-4), np.max(np.abs(got - dL) - bound)
    assert np.max(np.abs(got - dL)) > 1e-3 * np.max(bound)


# ---------------------------------------------------------------------------------------------
# Forward against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("cfg,want_drops", FORWARD_CONFIGS)
def test_forward_matches_reference(cfg, want_drops, activation, use_bias):
    cfg = dict(cfg, activation=activation, use_bias=use_bias, aux_loss_coef=0.3, z_loss_coef=0.2)
    layer, x, _ = separated_case(cfg, T_F, D_F, F_F, E_F, seed=100, want_drops=want_drops)
    y = layer.forward(x)
    assert y.dtype == F32 and y.shape == x.shape
    fw = rl.switch_forward(x, layer.params, cfg)
    check_plan(layer.last_plan, fw.plan)
    assert_close_scaled(y, fw.y, FWD_RTOL, "y")
    for t in dropped_tokens(fw.plan):
        assert np.all(y[t] == 0.0), (t, y[t])
    if want_drops:
        assert len(dropped_tokens(fw.plan)) > 0 or cfg["k"] > 1
    assert_rel(layer.aux_loss, 0.3 * fw.plan.aux_loss, LOSS_RTOL, "aux_loss")
    assert_rel(layer.z_loss, 0.2 * fw.plan.z_loss, LOSS_RTOL, "z_loss")
    if not fw.plan.dropped:
        # capacity >= every count (or dropless): a dense per-token mixture, no dispatch involved.
        assert_close_scaled(y, rl.dense_mixture(x, layer.params, cfg), FWD_RTOL, "y vs mixture")


def test_capacity_at_least_group_size_is_the_dense_mixture():
    """capacity_factor large enough that C = S: nothing can drop, y = per-token mixture."""
    for k in (1, 2):
        cfg = dict(k=k, eval_capacity_factor=8.0, activation="gelu", use_bias=True)
        layer, x, _ = separated_case(cfg, T_F, D_F, F_F, E_F, seed=7)
        y = layer.forward(x)
        assert layer.last_plan.capacity == T_F
        assert layer.last_plan.dropped == 0
        assert_close_scaled(y, rl.dense_mixture(x, layer.params, cfg), FWD_RTOL, f"k={k}")


def test_tokens_dropped_entirely_give_exact_zero_even_with_bias():
    cfg = dict(k=1, eval_capacity_factor=0.25, min_capacity=1, use_bias=True)
    layer, x, _ = separated_case(cfg, 16, 4, 5, 4, seed=3, want_drops=True)
    y = layer.forward(x)
    dropped = dropped_tokens(layer.last_plan)
    assert dropped.size >= 8
    assert np.all(y[dropped] == 0.0)
    kept = np.setdiff1d(np.arange(16), dropped)
    assert np.all(np.any(y[kept] != 0.0, axis=1))


def test_training_without_jitter_equals_eval_with_same_capacity():
    cfg = dict(k=2, capacity_factor=0.75, eval_capacity_factor=0.75, min_capacity=1)
    layer, x, dy = separated_case(cfg, 12, 4, 6, 3, seed=5, want_drops=True)
    layer2 = make_switch(4, 6, 3, cfg, jitter_eps=0.0, expert_dropout=0.0)
    for key in layer.params:
        layer2.params[key][...] = layer.params[key]
    y_eval = layer.forward(x, training=False)
    dx_eval = layer.backward(dy)
    g_eval = {key: v.copy() for key, v in layer.grads.items()}
    y_train = layer2.forward(x, training=True)
    dx_train = layer2.backward(dy)
    assert_bits_equal(y_train, y_eval, "y")
    assert_bits_equal(dx_train, dx_eval, "dx")
    for key in g_eval:
        assert_bits_equal(layer2.grads[key], g_eval[key], key)


def test_training_uses_capacity_factor_and_eval_uses_eval_capacity_factor():
    T, E = 16, 4
    layer = pyswitch.SwitchFFN(
        4, 4, E, capacity_factor=0.5, eval_capacity_factor=1.5, min_capacity=1, jitter_eps=0.0
    )
    x = np.random.default_rng(0).standard_normal((T, 4)).astype(np.float32)
    layer.forward(x, training=True)
    assert layer.last_plan.capacity == ref.capacity(T, E, 1, 0.5, 1, "floor")
    layer.forward(x, training=False)
    assert layer.last_plan.capacity == ref.capacity(T, E, 1, 1.5, 1, "floor")


# ---------------------------------------------------------------------------------------------
# Gradients: finite differences of the float64 reference loss, and the analytic reference
# ---------------------------------------------------------------------------------------------

FD_CONFIGS = [
    pytest.param(dict(k=1, eval_capacity_factor=0.5, min_capacity=1), id="k1-relu-drops"),
    pytest.param(
        dict(k=2, eval_capacity_factor=0.5, min_capacity=0, normalize_gates=True),
        id="k2-normalized-drops",
    ),
    pytest.param(
        dict(k=2, eval_capacity_factor=None, activation="geglu", use_bias=True, group_size=4),
        id="k2-geglu-bias-dropless-groups",
    ),
    pytest.param(
        dict(
            k=1,
            eval_capacity_factor=0.5,
            min_capacity=1,
            activation="gelu",
            use_bias=True,
            priority="batch_prioritized",
        ),
        id="k1-gelu-bias-batch-prioritized",
    ),
    pytest.param(
        dict(
            k=2,
            eval_capacity_factor=0.75,
            min_capacity=1,
            activation="geglu",
            use_bias=True,
            normalize_gates=True,
            group_size=6,
        ),
        id="k2-geglu-bias-normalized-groups-drops",
    ),
]
T_FD, D_FD, F_FD, E_FD = 12, 4, 6, 4


@pytest.mark.parametrize("coefs", [(0.5, 0.5), (0.0, 0.0)], ids=["aux-z", "no-losses"])
@pytest.mark.parametrize("cfg", FD_CONFIGS)
def test_gradients_match_finite_differences(cfg, coefs):
    cfg = dict(cfg, aux_loss_coef=coefs[0], z_loss_coef=coefs[1])
    want = None if cfg.get("eval_capacity_factor") is None else True
    layer, x, dy = separated_case(
        cfg, T_FD, D_FD, F_FD, E_FD, seed=20, want_drops=want, sep=(1e-2, 1e-3)
    )
    layer.forward(x)
    dx = layer.backward(dy)
    assert dx.dtype == F32
    params = snapshot(layer.params)
    fw = rl.switch_forward(x, params, cfg)
    check_plan(layer.last_plan, fw.plan)
    if want:
        assert fw.plan.dropped > 0
    for key in list(params) + ["x"]:

        def loss_of(v, key=key):
            if key == "x":
                return rl.switch_loss(v, params, dy, cfg)
            return rl.switch_loss(x, dict(params, **{key: v}), dy, cfg)

        fd, valid = fd_with_skips(loss_of, f64(x) if key == "x" else params[key])
        got = dx if key == "x" else layer.grads[key]
        assert_fd_close(got, fd, valid, key)


def assert_grads_match_reference(layer, x, dy, dx, cfg, plan=None, what=""):
    g = rl.switch_backward(x, layer.params, dy, cfg, plan=plan)
    for key in list(layer.params) + ["x"]:
        got = dx if key == "x" else layer.grads[key]
        assert_close_scaled(
            got, g[key], GRAD_SCALE_TOL, f"{what} {key}", elem_rtol=GRAD_RTOL, atol=1e-6
        )


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("cfg,want_drops", FORWARD_CONFIGS)
def test_gradients_match_analytic_reference(cfg, want_drops, activation, use_bias):
    cfg = dict(cfg, activation=activation, use_bias=use_bias, aux_loss_coef=0.5, z_loss_coef=0.5)
    layer, x, dy = separated_case(cfg, T_F, D_F, F_F, E_F, seed=300, want_drops=want_drops)
    layer.forward(x)
    dx = layer.backward(dy)
    assert_grads_match_reference(layer, x, dy, dx, cfg)


def test_backward_is_repeatable_and_grads_are_overwritten():
    cfg = dict(k=2, eval_capacity_factor=0.5, min_capacity=1, use_bias=True)
    layer, x, dy = separated_case(cfg, 12, 4, 6, 4, seed=2, want_drops=True)
    layer.forward(x)
    dx1 = layer.backward(dy)
    g1 = {key: v.copy() for key, v in layer.grads.items()}
    dx2 = layer.backward(dy)
    assert_bits_equal(dx2, dx1, "dx")
    for key in g1:  # not accumulated
        assert_bits_equal(np.asarray(layer.grads[key]), g1[key], key)
    dx3 = layer.backward(2 * dy)
    # Only the FFN part scales with dy; the scaled losses do not.
    g_ref = rl.switch_backward(x, layer.params, 2 * dy, cfg)
    assert_close_scaled(dx3, g_ref["x"], GRAD_SCALE_TOL, "dx(2 dy)", elem_rtol=GRAD_RTOL)


# ---------------------------------------------------------------------------------------------
# Hypothesis properties
# ---------------------------------------------------------------------------------------------


@st.composite
def layer_cases(draw):
    """Tiny layers; x and router on dyadic grids (logits exact in float32 and float64)."""
    E = draw(st.integers(1, 4))
    k = draw(st.integers(1, min(2, E)))
    S = draw(st.integers(1, 6))
    G = draw(st.integers(1, 3))
    T = S * G
    d = draw(st.integers(1, 4))
    f = draw(st.integers(1, 5))
    cf = draw(st.sampled_from([None, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0, 4.0]))
    cfg = dict(
        k=k,
        eval_capacity_factor=cf,
        min_capacity=draw(st.integers(0, 3)),
        group_size=None if G == 1 and draw(st.booleans()) else S,
        priority=draw(st.sampled_from(["position", "batch_prioritized"])),
        capacity_rounding=draw(st.sampled_from(["floor", "ceil"])),
        normalize_gates=k > 1 and draw(st.booleans()),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        use_bias=draw(st.booleans()),
        aux_loss_coef=draw(st.sampled_from([0.0, 1e-2, 0.5])),
        z_loss_coef=draw(st.sampled_from([0.0, 1e-3, 0.5])),
    )
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mags = rng.integers(1, 9, size=(T, d)) / 4.0
    x = (mags * rng.choice([-1.0, 1.0], size=(T, d))).astype(np.float32)
    router = (rng.integers(-16, 17, size=(d, E)) / 8.0).astype(np.float32)
    layer = pyswitch.SwitchFFN(d, f, E, seed=seed % 1000, **cfg)
    fill_params(layer, rng)
    layer.params["router"][...] = router
    dy = rng.standard_normal((T, d)).astype(np.float32)
    return cfg, layer, x, dy


def reference_plan_or_impl(layer, x, cfg):
    """The reference plan if the decisions agree; else assert a near-tie and use the layer's."""
    L = rl.router_logits(x, layer.params["router"])
    rplan = ref.route(L, **rl.route_kwargs(cfg))
    event(f"dropped assignments: {'yes' if rplan.dropped else 'no'}")
    if rl.same_decisions(rplan, layer.last_plan):
        return None
    assert has_near_tie(L, cfg), ("plans differ without a near-tie", L, cfg)
    event("near-tie: compared on the implementation's plan")
    return layer.last_plan


@given(layer_cases())
def test_property_forward_matches_reference(case):
    cfg, layer, x, _ = case
    y = layer.forward(x)
    plan = reference_plan_or_impl(layer, x, cfg)
    fw = rl.switch_forward(x, layer.params, cfg, plan=plan)
    assert_close_scaled(layer.last_plan.gate, fw.plan.gate, 0.0, "gate", elem_rtol=1e-5, atol=1e-7)
    assert_close_scaled(y, fw.y, FWD_RTOL, "y", atol=1e-7)
    for t in dropped_tokens(fw.plan):
        assert np.all(y[t] == 0.0)
    assert_rel(layer.aux_loss, cfg["aux_loss_coef"] * fw.plan.aux_loss, LOSS_RTOL, "aux")
    assert_rel(layer.z_loss, cfg["z_loss_coef"] * fw.plan.z_loss, LOSS_RTOL, "z")


@given(layer_cases())
def test_property_backward_matches_reference(case):
    cfg, layer, x, dy = case
    layer.forward(x)
    dx = layer.backward(dy)
    plan = reference_plan_or_impl(layer, x, cfg)
    assert_grads_match_reference(layer, x, dy, dx, cfg, plan=plan)


@given(layer_cases(), st.integers(0, 2**31 - 1))
def test_property_adjoint_identity(case, vseed):
    """(L(p + h v) - L(p - h v)) / 2h == <grad, v> for a random direction v over all inputs."""
    cfg, layer, x, dy = case
    layer.forward(x)
    dx = layer.backward(dy)
    plan = reference_plan_or_impl(layer, x, cfg)
    assume(plan is None)
    rng = np.random.default_rng(vseed)
    p0 = snapshot(layer.params)
    v = {key: rng.standard_normal(a.shape) for key, a in p0.items()}
    vx = rng.standard_normal(x.shape)
    h = 1e-5

    def at(s):
        p = {key: p0[key] + s * v[key] for key in p0}
        return rl.switch_loss(f64(x) + s * vx, p, dy, cfg)

    (lp, fp), (lm, fm) = at(h), at(-h)
    base = rl.switch_forward(x, p0, cfg)
    assume(signature(fp) == signature(base) == signature(fm))
    directional = (lp - lm) / (2 * h)
    inner = float(np.sum(f64(dx) * vx)) + sum(
        float(np.sum(f64(layer.grads[key]) * v[key])) for key in p0
    )
    mag = float(np.sum(np.abs(f64(dx) * vx))) + sum(
        float(np.sum(np.abs(f64(layer.grads[key]) * v[key]))) for key in p0
    )
    assert abs(inner - directional) <= 1e-4 * mag + 1e-5, (inner, directional, mag)


# ---------------------------------------------------------------------------------------------
# bfloat16 policy
# ---------------------------------------------------------------------------------------------

BF16_CONFIGS = [
    pytest.param(dict(k=1, eval_capacity_factor=0.5, min_capacity=1), id="k1-drops-relu"),
    pytest.param(
        dict(k=2, eval_capacity_factor=None, activation="geglu", use_bias=True),
        id="k2-geglu-bias-dropless",
    ),
    pytest.param(
        dict(k=2, eval_capacity_factor=0.75, normalize_gates=True, activation="gelu"),
        id="k2-gelu-normalized",
    ),
]


def bf16_case(cfg, seed):
    """A bf16 layer and a float32 layer with identical params; x exactly representable in bf16
    and x_f32 = x + small noise (not bf16-exact); both well separated."""
    for s in range(seed, seed + 2000):
        rng = np.random.default_rng(s)
        lay16 = fill_params(make_switch(8, 12, 4, cfg, seed=s, dtype="bfloat16"), rng)
        x = rng.standard_normal((16, 8)).astype(np.float32).astype(BF16).astype(np.float32)
        x_f32 = x + (rng.standard_normal(x.shape) * 1e-3).astype(F32)
        router = lay16.params["router"]
        if all(well_separated(rl.router_logits(a, router), cfg, 1e-2, 1e-3) for a in (x, x_f32)):
            lay32 = make_switch(8, 12, 4, cfg, seed=s)
            for key in lay16.params:
                lay32.params[key][...] = lay16.params[key]
            dy = rng.standard_normal((16, 8)).astype(np.float32).astype(BF16).astype(np.float32)
            return lay16, lay32, x, x_f32, dy
    raise AssertionError("no bf16 case")


@pytest.mark.parametrize("in_dtype", [BF16, F32], ids=["x-bf16", "x-f32"])
@pytest.mark.parametrize("cfg", BF16_CONFIGS)
def test_bf16_layer_matches_bf16_rounded_reference(cfg, in_dtype):
    cfg = dict(cfg, aux_loss_coef=0.5, z_loss_coef=0.5)
    lay16, lay32, x, x_f32, dy = bf16_case(cfg, seed=40)
    # float32 input that is not bf16-exact: the experts see it rounded, the router does not.
    x_in = x if in_dtype == BF16 else x_f32
    y = lay16.forward(x_in.astype(in_dtype))
    assert y.dtype == in_dtype and y.shape == x.shape
    fw = rl.switch_forward(x_in, lay16.params, cfg, bf16=True)
    check_plan(lay16.last_plan, fw.plan, "bf16")
    assert_close_scaled(y, fw.y, BF16_RTOL, "bf16 y")
    for t in dropped_tokens(fw.plan):
        assert np.all(f64(y[t]) == 0.0)
    dx = lay16.backward(dy.astype(in_dtype))
    assert dx.dtype == in_dtype and dx.shape == x.shape
    for key, g in lay16.grads.items():
        assert g.dtype == F32 and np.all(np.isfinite(g)), key
    lay32.forward(x_in)
    dx32 = lay32.backward(dy)
    check_plan(lay32.last_plan, fw.plan, "f32")
    for key in lay32.grads:
        assert_close_scaled(lay16.grads[key], lay32.grads[key], BF16_GRAD_RTOL, f"bf16 {key}")
    assert_close_scaled(dx, dx32, BF16_GRAD_RTOL, "bf16 dx")
    assert_rel(lay16.aux_loss, lay32.aux_loss, LOSS_RTOL, "aux")
    assert_rel(lay16.z_loss, lay32.z_loss, LOSS_RTOL, "z")


def test_bf16_master_params_stay_float32():
    layer = pyswitch.SwitchFFN(4, 6, 2, dtype="bfloat16", activation="geglu", use_bias=True)
    for key, p in layer.params.items():
        assert p.dtype == F32, key
    # Params that are not bf16-exact stay unrounded (the master copy).
    layer.params["w_in"][0, 0, 0] = 1.0 + 2.0**-20
    assert layer.params["w_in"][0, 0, 0] == np.float32(1.0 + 2.0**-20)


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------

DET_CFG = dict(
    k=2,
    capacity_factor=0.75,
    eval_capacity_factor=1.0,
    min_capacity=1,
    activation="geglu",
    use_bias=True,
    normalize_gates=True,
    expert_dropout=0.3,
    jitter_eps=0.05,
    aux_loss_coef=0.1,
    z_loss_coef=0.1,
    group_size=16,
)


def det_run(dtype, in_dtype, seed=9, T=64, d=16, f=24, E=4):
    """Train step + eval step of a fresh layer: every output as raw arrays."""
    layer = pyswitch.SwitchFFN(d, f, E, dtype=dtype, seed=seed, init_scale=1.0, **DET_CFG)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, d)).astype(np.float32).astype(in_dtype)
    dy = rng.standard_normal((T, d)).astype(np.float32).astype(in_dtype)
    out = {}
    for mode in ("train", "eval"):
        out[f"y-{mode}"] = layer.forward(x, training=mode == "train").copy()
        out[f"aux-{mode}"] = np.float64(layer.aux_loss)
        out[f"z-{mode}"] = np.float64(layer.z_loss)
        out[f"dx-{mode}"] = layer.backward(dy).copy()
        for key, g in layer.grads.items():
            out[f"{key}-{mode}"] = np.array(g, copy=True)
        out[f"slot-{mode}"] = np.array(layer.last_plan.slot, copy=True)
    return out


@pytest.mark.parametrize(
    "dtype,in_dtype", [("float32", F32), ("bfloat16", BF16), ("bfloat16", F32)]
)
def test_bitwise_identical_across_isas_and_threads(dtype, in_dtype):
    first = None
    for isa, threads in all_configs():
        with cpu_config(isa=isa, threads=threads):
            out = det_run(dtype, in_dtype)
        if first is None:
            first = out
            continue
        for key in first:
            assert_bits_equal(out[key], first[key], f"{key} ({isa}, {threads} threads)")


def test_training_is_reproducible_for_a_seed_and_depends_on_it():
    a = det_run("float32", F32, seed=9)
    b = det_run("float32", F32, seed=9)
    for key in a:
        assert_bits_equal(b[key], a[key], key)
    # Same params, different seed: jitter and dropout streams differ.
    T, d, f, E = 64, 16, 24, 4
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, d)).astype(np.float32)
    l1 = pyswitch.SwitchFFN(d, f, E, seed=9, init_scale=1.0, **DET_CFG)
    l2 = pyswitch.SwitchFFN(d, f, E, seed=10, init_scale=1.0, **DET_CFG)
    for key in l1.params:
        l2.params[key][...] = l1.params[key]
    assert not np.array_equal(l1.forward(x, training=True), l2.forward(x, training=True))
    # ... but eval is deterministic given the params.
    assert_bits_equal(l1.forward(x), l2.forward(x), "eval y")


def test_expert_dropout_masks_hidden_units_and_scales_by_keep_probability():
    """E = 1, d_ff = 1: the only hidden unit of a token is dropped (y = 0) or kept (y scaled by
    1/(1-p)); the same mask applies in backward.  Eval ignores dropout."""
    p, T, d = 0.25, 400, 3
    layer = pyswitch.SwitchFFN(
        d,
        1,
        1,
        capacity_factor=None,
        activation="gelu",
        use_bias=True,
        expert_dropout=p,
        jitter_eps=0.0,
        aux_loss_coef=0.0,
        z_loss_coef=0.0,
        seed=3,
        init_scale=1.0,
    )
    layer.params["b_in"][...] = 3.0  # gelu(pre) far from 0 for every token
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, d)).astype(np.float32) * 0.3
    dy = rng.standard_normal((T, d)).astype(np.float32)
    y_eval = f64(layer.forward(x))
    dx_eval = f64(layer.backward(dy))
    b_out = f64(layer.params["b_out"][0])
    core_eval = y_eval - b_out
    y_tr = f64(layer.forward(x, training=True))
    assert np.all(np.asarray(layer.last_plan.gate) == 1.0)
    dx_tr = f64(layer.backward(dy))
    core_tr = y_tr - b_out
    zero = np.all(np.abs(core_tr) <= 1e-6 * np.abs(core_eval).max(), axis=1)
    kept = ~zero
    np.testing.assert_allclose(core_tr[kept], core_eval[kept] / (1 - p), rtol=1e-5, atol=1e-6)
    frac = zero.mean()
    assert abs(frac - p) <= 4 * math.sqrt(p * (1 - p) / T), frac
    # dx: with E = 1 the softmax is the constant 1 and the loss coefficients are 0, so the
    # router contributes nothing to dx.
    np.testing.assert_allclose(dx_tr[kept], dx_eval[kept] / (1 - p), rtol=1e-4, atol=1e-6)
    assert np.allclose(dx_tr[zero], 0.0, atol=1e-6)
    # Eval ignores dropout.
    assert_bits_equal(layer.forward(x).astype(np.float64), y_eval, "eval y after training")


# ---------------------------------------------------------------------------------------------
# stats()
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,want_drops", FORWARD_CONFIGS)
def test_stats_match_plan_and_reference(cfg, want_drops):
    layer, x, _ = separated_case(cfg, T_F, D_F, F_F, E_F, seed=500, want_drops=want_drops)
    layer.forward(x)
    st_ = layer.stats()
    plan = layer.last_plan
    fw = rl.switch_forward(x, layer.params, cfg)
    tpe = np.asarray(st_["tokens_per_expert"])
    assert tpe.dtype == np.int64 and tpe.shape == (E_F,)
    assert np.array_equal(tpe, np.asarray(plan.tokens_per_expert))
    assert np.array_equal(tpe, fw.plan.tokens_per_expert)
    k = cfg["k"]
    assert plan.dropped == fw.plan.dropped
    assert st_["drop_fraction"] == plan.dropped / (T_F * k)
    assert isinstance(st_["router_entropy"], float)
    assert_rel(st_["router_entropy"], rl.entropy(fw.logits), LOSS_RTOL, "entropy")


def test_stats_entropy_extremes():
    layer = pyswitch.SwitchFFN(4, 4, 8)
    layer.params["router"][...] = 0.0
    layer.forward(np.ones((8, 4), np.float32))
    assert_rel(layer.stats()["router_entropy"], math.log(8), 1e-6, "uniform")
    # Uniform probabilities: every token picks expert 0 (ties to the lowest index), C = 4 of 8.
    assert layer.stats()["drop_fraction"] == 0.5
    assert np.array_equal(layer.stats()["tokens_per_expert"], [8, 0, 0, 0, 0, 0, 0, 0])


# ---------------------------------------------------------------------------------------------
# DenseFFN
# ---------------------------------------------------------------------------------------------


def make_dense(d, f, activation, use_bias, seed=0, **kw):
    layer = pyswitch.DenseFFN(d, f, activation=activation, use_bias=use_bias, seed=seed, **kw)
    fill_params(layer, np.random.default_rng(seed + 100))
    return layer


@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_forward_and_gradients(activation, use_bias):
    d, f, T = 5, 7, 9
    layer = make_dense(d, f, activation, use_bias)
    expect = {"w_in": (d, f), "w_out": (f, d)}
    if activation == "geglu":
        expect["w_gate"] = (d, f)
    if use_bias:
        expect.update(b_in=(f,), b_out=(d,))
    assert {key: v.shape for key, v in layer.params.items()} == expect
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, d)).astype(np.float32)
    dy = rng.standard_normal((T, d)).astype(np.float32)
    y = layer.forward(x)
    assert y.dtype == F32
    assert layer.aux_loss == 0.0 and layer.z_loss == 0.0
    params = snapshot(layer.params)
    assert_close_scaled(y, rl.dense_forward(x, params, activation).out, FWD_RTOL, "dense y")
    dx = layer.backward(dy)
    g = rl.dense_backward(x, params, dy, activation)
    assert set(layer.grads) == set(expect)
    for key in list(params) + ["x"]:
        got = dx if key == "x" else layer.grads[key]
        assert_close_scaled(got, g[key], GRAD_SCALE_TOL, key, elem_rtol=GRAD_RTOL, atol=1e-6)

        def loss_of(v, key=key):
            if key == "x":
                loss, c = rl.dense_loss(v, params, dy, activation)
            else:
                loss, c = rl.dense_loss(x, dict(params, **{key: v}), dy, activation)
            return loss, _DenseSig(rl.kink_signature(c.pre, activation))

        fd, valid = fd_with_skips(loss_of, f64(x) if key == "x" else params[key])
        assert_fd_close(got, fd, valid, f"dense {key}")


@dataclass
class _DenseSig:
    """Adapter so fd_with_skips' signature() works for the dense layer (no routing)."""

    kink: object

    @property
    def kinks(self):
        return (self.kink,)

    @property
    def plan(self):
        return _NoPlan


class _NoPlan:
    expert_index = np.zeros(0)
    slot = np.zeros(0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_bf16_matches_rounded_reference(activation):
    layer = make_dense(8, 12, activation, True, dtype="bfloat16")
    x = np.random.default_rng(2).standard_normal((10, 8)).astype(np.float32)
    for in_dtype in (BF16, F32):
        xin = x.astype(in_dtype)
        y = layer.forward(xin)
        assert y.dtype == in_dtype
        expected = rl.dense_forward(f64(xin), layer.params, activation, bf16=True).out
        assert_close_scaled(y, expected, BF16_RTOL, f"dense bf16 {in_dtype}")
        dx = layer.backward(np.ones_like(y))
        assert dx.dtype == in_dtype and np.all(np.isfinite(f64(dx)))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_bf16_grads_close_to_float32(activation):
    l16 = make_dense(8, 12, activation, True, seed=6, dtype="bfloat16")
    l32 = make_dense(8, 12, activation, True, seed=6)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((10, 8)).astype(np.float32).astype(BF16)
    dy = rng.standard_normal((10, 8)).astype(np.float32).astype(BF16)
    l16.forward(x)
    dx16 = l16.backward(dy)
    l32.forward(x.astype(F32))
    dx32 = l32.backward(dy.astype(F32))
    assert_close_scaled(dx16, dx32, BF16_GRAD_RTOL, "dense bf16 dx")
    for key in l32.grads:
        assert l16.grads[key].dtype == F32
        assert_close_scaled(l16.grads[key], l32.grads[key], BF16_GRAD_RTOL, f"dense bf16 {key}")


def test_non_contiguous_input_is_accepted():
    layer = pyswitch.SwitchFFN(4, 6, 3, eval_capacity_factor=None, init_scale=2.0)
    wide = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    view = wide[:, ::2]
    assert not view.flags.c_contiguous
    y_view = layer.forward(view)
    dx_view = layer.backward(np.ones_like(y_view)[:, :])
    y = layer.forward(np.ascontiguousarray(view))
    dx = layer.backward(np.ones_like(y))
    assert_bits_equal(y_view, y, "y")
    assert_bits_equal(dx_view, dx, "dx")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("use_bias", [False, True], ids=["nobias", "bias"])
def test_switch_with_one_expert_equals_dense(activation, use_bias):
    d, f, T = 6, 10, 20
    dense = make_dense(d, f, activation, use_bias, seed=4)
    switch = pyswitch.SwitchFFN(
        d,
        f,
        1,
        k=1,
        capacity_factor=None,
        eval_capacity_factor=None,
        activation=activation,
        use_bias=use_bias,
        aux_loss_coef=0.0,  # z-loss of one logit is L^2: it would add a router path to dx
        z_loss_coef=0.0,
        seed=4,
    )
    for key, p in dense.params.items():
        switch.params[key][0] = p
    rng = np.random.default_rng(5)
    x = rng.standard_normal((T, d)).astype(np.float32)
    dy = rng.standard_normal((T, d)).astype(np.float32)
    for training in (False, True):
        y_dense = dense.forward(x, training=training)
        y_switch = switch.forward(x, training=training)
        assert np.all(np.asarray(switch.last_plan.gate) == 1.0)
        assert_bits_equal(y_switch, y_dense, f"y training={training}")
    dx_dense = dense.backward(dy)
    switch.forward(x)
    dx_switch = switch.backward(dy)
    # Gates are exactly 1 with zero gradient wrt the router: the FFN gradients coincide.
    assert_close_scaled(dx_switch, dx_dense, 1e-6, "dx", elem_rtol=1e-6)
    for key in dense.grads:
        assert_close_scaled(switch.grads[key][0], dense.grads[key], 1e-6, key, elem_rtol=1e-6)


def test_dense_dropout_reproducible_and_eval_ignores_it():
    def run(seed):
        layer = pyswitch.DenseFFN(6, 16, dropout=0.5, seed=seed, init_scale=1.0)
        layer.params["w_in"][...] = np.random.default_rng(0).standard_normal((6, 16))
        x = np.random.default_rng(1).standard_normal((32, 6)).astype(np.float32)
        return layer, x, layer.forward(x, training=True), layer.forward(x)

    l1, x, tr1, ev1 = run(1)
    _, _, tr1b, ev1b = run(1)
    _, _, tr2, ev2 = run(2)
    assert_bits_equal(tr1b, tr1, "train same seed")
    assert_bits_equal(ev1b, ev1, "eval")
    assert not np.array_equal(tr1, ev1)
    l3 = pyswitch.DenseFFN(6, 16, dropout=0.0, seed=1, init_scale=1.0)
    for key in l1.params:
        l3.params[key][...] = l1.params[key]
    assert_bits_equal(l3.forward(x), ev1, "eval ignores dropout")


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def f32(*shape):
    return np.zeros(shape, dtype=np.float32)


def sw(*args, **kw):
    return lambda: pyswitch.SwitchFFN(*args, **kw)


def dn(*args, **kw):
    return lambda: pyswitch.DenseFFN(*args, **kw)


def sw_forward(x, **kw):
    return lambda: pyswitch.SwitchFFN(4, 8, 4, **kw).forward(x)


def sw_backward(dy, x=None):
    def call():
        layer = pyswitch.SwitchFFN(4, 8, 4)
        if x is not None:
            layer.forward(x)
        return layer.backward(dy)

    return call


def dn_call(x, dy=None, forward_first=True):
    def call():
        layer = pyswitch.DenseFFN(4, 8)
        if forward_first:
            layer.forward(f32(8, 4))
        if dy is None:
            return layer.forward(x)
        return layer.backward(dy)

    return call


BAD_CASES = [
    Case("d_model=0", sw(0, 8, 4), ValueError, ("d_model", "0")),
    Case("d_model<0", sw(-3, 8, 4), ValueError, ("d_model", "-3")),
    Case("d_ff=0", sw(4, 0, 4), ValueError, ("d_ff", "0")),
    Case("num_experts=0", sw(4, 8, 0), ValueError, ("num_experts", "0")),
    Case("activation", sw(4, 8, 4, activation="swish"), ValueError, ("activation", "swish")),
    Case("dtype", sw(4, 8, 4, dtype="float16"), ValueError, ("dtype", "float16")),
    Case("expert_dropout=1", sw(4, 8, 4, expert_dropout=1.0), ValueError, ("expert_dropout",)),
    Case(
        "expert_dropout<0", sw(4, 8, 4, expert_dropout=-0.1), ValueError, ("expert_dropout", "-0.1")
    ),
    Case("expert_dropout>1", sw(4, 8, 4, expert_dropout=1.5), ValueError, ("expert_dropout",)),
    Case("x wrong width", sw_forward(f32(8, 5)), ValueError, ("x must have shape", "(8, 5)")),
    Case("x 1-D", sw_forward(f32(8)), ValueError, ("x must have shape",)),
    Case("x 3-D", sw_forward(f32(2, 8, 4)), ValueError, ("x must have shape",)),
    Case("x float64", sw_forward(np.zeros((8, 4))), TypeError, ("x", "float64")),
    Case("x int32", sw_forward(np.zeros((8, 4), np.int32)), TypeError, ("x", "int32")),
    Case(
        "group_size not dividing T",
        sw_forward(f32(8, 4), group_size=3),
        ValueError,
        ("group_size", "3"),
    ),
    Case("k > E", sw_forward(f32(8, 4), k=5), ValueError, ("k", "5")),
    Case("backward before forward", sw_backward(f32(8, 4)), pyswitch.Error, ("forward",)),
    Case("dy wrong shape", sw_backward(f32(8, 3), x=f32(8, 4)), ValueError, ("dy", "(8, 3)")),
    Case("dy wrong T", sw_backward(f32(7, 4), x=f32(8, 4)), ValueError, ("dy", "(7, 4)")),
    Case("dy float64", sw_backward(np.zeros((8, 4)), x=f32(8, 4)), TypeError, ("dy", "float64")),
    Case(
        "dy bf16 after float32 forward",
        sw_backward(f32(8, 4).astype(BF16), x=f32(8, 4)),
        TypeError,
        ("dy", "bfloat16"),
    ),
    Case(
        "dy float32 after bf16 forward",
        sw_backward(f32(8, 4), x=f32(8, 4).astype(BF16)),
        TypeError,
        ("dy", "float32"),
    ),
    Case("dense d_model=0", dn(0, 8), ValueError, ("d_model", "0")),
    Case("dense d_ff=0", dn(4, 0), ValueError, ("d_ff", "0")),
    Case("dense activation", dn(4, 8, activation="silu"), ValueError, ("activation", "silu")),
    Case("dense dtype", dn(4, 8, dtype="float64"), ValueError, ("dtype", "float64")),
    Case("dense dropout=1", dn(4, 8, dropout=1.0), ValueError, ("dropout",)),
    Case("dense x shape", dn_call(f32(8, 3)), ValueError, ("x must have shape", "(8, 3)")),
    Case("dense x float64", dn_call(np.zeros((8, 4))), TypeError, ("x", "float64")),
    Case(
        "dense backward before forward",
        dn_call(None, dy=f32(8, 4), forward_first=False),
        pyswitch.Error,
        ("forward",),
    ),
    Case("dense dy shape", dn_call(None, dy=f32(8, 5)), ValueError, ("dy", "(8, 5)")),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_bad_input_raises(case):
    assert_raises_case(case)


def test_bad_input_table_is_large_enough():
    assert len(BAD_CASES) >= 12


def test_bad_inputs_do_not_crash_the_interpreter():
    """Run every row in a child process: a segfault or abort there is a failure here."""
    run_cases_in_child("test_layer", "BAD_CASES")
