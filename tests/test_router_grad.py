# pyswitch.Router forward/backward against the float64 hand-written reference and central finite
# differences; jitter, precision and capacity-factor behaviour of the router layer.
"""Router layer tests (SPEC section 1: selective precision, jitter, losses, backward).

Tolerances.  The implementation works in float32, the reference in float64.  Gradients are sums of
products whose terms can cancel, so each gradient is compared against an error scale: the same
sum with absolute values (``|x|^T |dL|`` for the weight gradient, ``|dL| |W|^T`` for dx).  Float32
rounding is ~6e-8 relative per operation; we allow 2e-5 of that scale plus 1e-4 relative.  With
bfloat16 input the returned dx is bfloat16 (8 significant bits, rounding error <= 2^-8 relative),
so dx is compared with rtol 1e-2 and atol 1e-2 * max|dx|; the weight gradient stays tight because
a bfloat16 x is exact in float32.

Finite differences use the float64 reference with h = 1e-6; inputs are chosen so that no logit
gap (which decides top-k and priority) is below 1e-3, so routing decisions do not change within h.
"""

import numpy as np
import pytest
import reference as ref
from hypothesis import given
from hypothesis import strategies as st
from isa_utils import SUPPORTED_ISAS, cpu_config

import pyswitch

GRAD_SCALE_TOL = 2e-5
GRAD_RTOL = 1e-4
FD_H = 1e-6


def route_kwargs(cfg):
    return {key: cfg[key] for key in ref.ROUTE_KEYS if key in cfg}


def make_router(d_model, E, cfg, seed, **extra):
    """A router whose weight has std ~1 (init_scale = d_model) so that gates vary."""
    return pyswitch.Router(
        d_model, E, init_scale=float(d_model), seed=seed, **route_kwargs(cfg), **extra
    )


def assert_grad_close(actual, expected, scale, what, rtol=GRAD_RTOL, scale_tol=GRAD_SCALE_TOL):
    actual = np.asarray(actual, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = np.abs(actual - expected)
    tol = scale_tol * float(np.max(scale, initial=0.0)) + rtol * np.abs(expected) + 1e-7
    bad = err > tol
    if bad.any():
        idx = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} entries off; first at {idx}: got {actual[idx]!r}, "
            f"expected {expected[idx]!r}, tol {np.broadcast_to(tol, err.shape)[idx]!r}"
        )


def well_separated(logits, cfg, gap=1e-3):
    """True if no two logits of a row and (batch-prioritized) no two top-1 probs are close."""
    L = np.asarray(logits, dtype=np.float64)
    srt = np.sort(L, axis=1)
    if L.shape[1] > 1 and np.min(np.diff(srt, axis=1)) < gap:
        return False
    if cfg.get("priority") == "batch_prioritized":
        p1 = np.sort(ref.top1_prob(L))
        if p1.size > 1 and np.min(np.diff(p1)) < 1e-4:
            return False
    return True


def separated_case(cfg, T, d_model, E, seed):
    """(router, x, d_gate): well-separated logits, drops unless dropless; scans seeds."""
    for s in range(seed, seed + 1000):
        rng = np.random.default_rng(s)
        x = rng.standard_normal((T, d_model)).astype(np.float32)
        router = make_router(d_model, E, cfg, seed=s, jitter_eps=0.0)
        L = x.astype(np.float64) @ router.weight.astype(np.float64)
        drops = ref.route(L, **route_kwargs(cfg)).dropped > 0
        if well_separated(L, cfg) and (drops or cfg.get("capacity_factor") is None):
            d_gate = rng.standard_normal((T, cfg.get("k", 1))).astype(np.float32)
            return router, x, d_gate
    raise AssertionError("no well-separated case found")


CONFIGS = [
    pytest.param(dict(k=1, capacity_factor=1.0, min_capacity=0), id="k1-drops"),
    pytest.param(dict(k=1, capacity_factor=None), id="k1-dropless"),
    pytest.param(
        dict(k=2, capacity_factor=1.0, min_capacity=0, normalize_gates=True),
        id="k2-normalized-drops",
    ),
    pytest.param(dict(k=2, capacity_factor=None, group_size=4), id="k2-dropless-groups"),
    pytest.param(
        dict(
            k=2,
            capacity_factor=0.5,
            min_capacity=1,
            group_size=4,
            priority="batch_prioritized",
            normalize_gates=True,
        ),
        id="k2-batch-prioritized-normalized",
    ),
    pytest.param(
        dict(
            k=3,
            capacity_factor=0.75,
            min_capacity=0,
            capacity_rounding="ceil",
            normalize_gates=True,
        ),
        id="k3-ceil-normalized",
    ),
]
COEFS = [(0.0, 0.0), (0.7, 0.0), (0.0, 0.3), (0.5, 0.25)]
T_FD, D_FD, E_FD = 8, 4, 4


# ---------------------------------------------------------------------------------------------
# The reference's own chain rule against finite differences (no pyswitch involved)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coefs", COEFS, ids=lambda c: f"aux{c[0]}-z{c[1]}")
@pytest.mark.parametrize("cfg", CONFIGS)
def test_reference_backward_matches_finite_differences(cfg, coefs):
    aux_c, z_c = coefs
    rng = np.random.default_rng(5)
    for _ in range(100):
        x = rng.standard_normal((T_FD, D_FD))
        W = rng.standard_normal((D_FD, E_FD))
        if well_separated(x @ W, cfg):
            break
    else:
        raise AssertionError("no well-separated case found")
    d_gate = rng.standard_normal((T_FD, cfg["k"]))
    kw = route_kwargs(cfg)
    got = ref.router_backward(x, W, d_gate, aux_loss_coef=aux_c, z_loss_coef=z_c, **kw)
    if cfg.get("capacity_factor") is not None:
        assert got.plan.dropped > 0, "config meant to drop assignments"

    def J_of_W(w):
        return ref.router_objective(x, w, d_gate, aux_loss_coef=aux_c, z_loss_coef=z_c, **kw)

    def J_of_x(xx):
        return ref.router_objective(xx, W, d_gate, aux_loss_coef=aux_c, z_loss_coef=z_c, **kw)

    np.testing.assert_allclose(
        got.d_weight, ref.central_difference(J_of_W, W, FD_H), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(
        got.dx, ref.central_difference(J_of_x, x, FD_H), rtol=1e-6, atol=1e-7
    )


# ---------------------------------------------------------------------------------------------
# The implementation against the reference and against finite differences
# ---------------------------------------------------------------------------------------------


def check_router_against_reference(router, x, d_gate, cfg, aux_c, z_c, *, training, fd=False):
    """Run forward/backward on the router; compare with the reference; return (plan, dx)."""
    T, d_model = x.shape
    plan = router.forward(x, training=training)
    L = np.asarray(router.last_logits)
    assert L.dtype == np.float32 and L.shape == (T, router.weight.shape[1])
    x64 = np.asarray(x, dtype=np.float32).astype(np.float64)
    W64 = router.weight.astype(np.float64)
    np.testing.assert_allclose(
        L, x64 @ W64, rtol=1e-5, atol=1e-5 * float((np.abs(x64) @ np.abs(W64)).max())
    )

    kw = route_kwargs(cfg)
    expected = ref.router_backward(
        x64, W64, d_gate, logits=L, aux_loss_coef=aux_c, z_loss_coef=z_c, **kw
    )
    np.testing.assert_array_equal(plan.expert_index, expected.plan.expert_index)
    np.testing.assert_array_equal(plan.slot, expected.plan.slot)
    np.testing.assert_allclose(plan.gate, expected.plan.gate, rtol=0, atol=1e-6)
    assert abs(plan.aux_loss - expected.plan.aux_loss) <= 1e-5 * (1 + expected.plan.aux_loss)
    assert abs(plan.z_loss - expected.plan.z_loss) <= 1e-5 * (1 + expected.plan.z_loss)

    dx = router.backward(d_gate, aux_loss_coef=aux_c, z_loss_coef=z_c)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert set(router.grads) == {"weight"}
    dW = router.grads["weight"]
    assert dW.dtype == np.float32 and dW.shape == router.weight.shape

    absL = np.abs(expected.d_logits)
    w_scale = np.abs(x64).T @ absL
    x_scale = absL @ np.abs(W64).T
    assert_grad_close(dW, expected.d_weight, w_scale, "grads['weight'] vs reference")
    if x.dtype == np.float32:
        assert_grad_close(dx, expected.dx, x_scale, "dx vs reference")
    else:  # bfloat16 output: 8 significant bits
        dx32 = pyswitch.to_float32(dx).astype(np.float64)
        np.testing.assert_allclose(
            dx32, expected.dx, rtol=1e-2, atol=1e-2 * np.abs(expected.dx).max() + 1e-7
        )

    if fd:

        def J_of_W(w):
            return ref.router_objective(x64, w, d_gate, aux_loss_coef=aux_c, z_loss_coef=z_c, **kw)

        def J_of_x(xx):
            return ref.router_objective(xx, W64, d_gate, aux_loss_coef=aux_c, z_loss_coef=z_c, **kw)

        assert_grad_close(
            dW,
            ref.central_difference(J_of_W, W64, FD_H),
            w_scale,
            "grads['weight'] vs finite differences",
            scale_tol=5e-5,
        )
        if x.dtype == np.float32:
            assert_grad_close(
                dx,
                ref.central_difference(J_of_x, x64, FD_H),
                x_scale,
                "dx vs finite differences",
                scale_tol=5e-5,
            )
    return plan, dx


@pytest.mark.parametrize("coefs", COEFS, ids=lambda c: f"aux{c[0]}-z{c[1]}")
@pytest.mark.parametrize("cfg", CONFIGS)
def test_router_backward_matches_reference_and_finite_differences(cfg, coefs):
    aux_c, z_c = coefs
    router, x, d_gate = separated_case(cfg, T_FD, D_FD, E_FD, seed=11)
    results = {}
    for isa in SUPPORTED_ISAS:
        with cpu_config(isa=isa):
            plan, dx = check_router_against_reference(
                router, x, d_gate, cfg, aux_c, z_c, training=True, fd=(isa == "scalar")
            )
            results[isa] = (
                dx.tobytes(),
                router.grads["weight"].tobytes(),
                router.last_logits.tobytes(),
            )
    if cfg.get("capacity_factor") is not None:
        assert int(plan.dropped) > 0, "config meant to drop assignments"
    for isa, got in results.items():
        assert got == results["scalar"], f"{isa} gradients differ from scalar"


@st.composite
def router_cases(draw):
    d_model = draw(st.integers(1, 6))
    E = draw(st.integers(1, 8))
    k = draw(st.integers(1, min(E, 3)))
    G = draw(st.integers(1, 3))
    S = draw(st.integers(1, 8))
    cfg = dict(
        k=k,
        capacity_factor=draw(st.sampled_from([None, 0.5, 1.0, 1.25, 2.0])),
        min_capacity=draw(st.integers(0, 3)),
        group_size=S if (G > 1 or draw(st.booleans())) else None,
        priority="position",
        capacity_rounding=draw(st.sampled_from(["floor", "ceil"])),
        normalize_gates=draw(st.booleans()) if k > 1 else False,
    )
    coefs = (draw(st.sampled_from([0.0, 0.01, 1.0])), draw(st.sampled_from([0.0, 1e-3, 0.5])))
    seed = draw(st.integers(0, 2**31 - 1))
    return d_model, E, G * S, cfg, coefs, seed


@pytest.mark.parametrize("isa", SUPPORTED_ISAS)
@given(case=router_cases())
def test_router_backward_property(isa, case):
    d_model, E, T, cfg, (aux_c, z_c), seed = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d_model)).astype(np.float32)
    d_gate = rng.standard_normal((T, cfg["k"])).astype(np.float32)
    router = make_router(d_model, E, cfg, seed=seed % 1000, jitter_eps=0.0)
    with cpu_config(isa=isa):
        check_router_against_reference(router, x, d_gate, cfg, aux_c, z_c, training=True)


def test_router_backward_bfloat16_input():
    cfg = dict(k=2, capacity_factor=1.0, min_capacity=0, normalize_gates=True)
    router, x, d_gate = separated_case(cfg, 16, 8, 4, seed=21)
    x_bf = pyswitch.to_bfloat16(x)
    for isa in SUPPORTED_ISAS:
        with cpu_config(isa=isa):
            plan, dx = check_router_against_reference(
                router, x_bf, d_gate, cfg, 0.5, 0.1, training=True
            )
            assert dx.dtype == pyswitch.bfloat16
    # Selective precision: the logits are float32(x) @ W, the same as for the float32 copy.
    router.forward(pyswitch.to_float32(x_bf), training=False)
    from_f32 = router.last_logits.copy()
    router.forward(x_bf, training=False)
    np.testing.assert_array_equal(router.last_logits, from_f32)


def test_dropped_assignments_get_no_gradient():
    cfg = dict(k=2, capacity_factor=0.5, min_capacity=0)
    router, x, d_gate = separated_case(cfg, 16, 4, 4, seed=31)
    plan = router.forward(x, training=True)  # jitter_eps=0: every forward is the same
    dropped = np.asarray(plan.slot) < 0
    assert dropped.any() and (~dropped).any()
    dx1 = router.backward(d_gate, aux_loss_coef=0.1, z_loss_coef=0.1).copy()
    g1 = router.grads["weight"].copy()
    d_gate2 = d_gate.copy()
    d_gate2[dropped] = 1e3  # gates of dropped assignments are constant 0
    router.forward(x, training=True)
    dx2 = router.backward(d_gate2, aux_loss_coef=0.1, z_loss_coef=0.1)
    np.testing.assert_array_equal(dx2, dx1)
    np.testing.assert_array_equal(router.grads["weight"], g1)
    # Only dropped assignments carry an upstream gradient, no losses: no gradient at all.
    d_gate3 = np.where(dropped, d_gate, 0).astype(np.float32)
    router.forward(x, training=True)
    dx3 = router.backward(d_gate3)
    assert not dx3.any() and not router.grads["weight"].any()


# ---------------------------------------------------------------------------------------------
# Jitter, capacity factors, parameters
# ---------------------------------------------------------------------------------------------


def test_jitter_is_seeded_and_deterministic():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 8)).astype(np.float32)
    a = pyswitch.Router(8, 4, seed=3, jitter_eps=0.05)
    b = pyswitch.Router(8, 4, seed=3, jitter_eps=0.05)
    np.testing.assert_array_equal(a.weight, b.weight)
    pa, pb = a.forward(x, training=True), b.forward(x, training=True)
    la = a.last_logits.copy()
    np.testing.assert_array_equal(la, b.last_logits)
    np.testing.assert_array_equal(pa.expert_index, pb.expert_index)
    np.testing.assert_array_equal(pa.gate, pb.gate)
    np.testing.assert_array_equal(a.backward(pa.gate), b.backward(pb.gate))
    np.testing.assert_array_equal(a.grads["weight"], b.grads["weight"])
    # The generator advances: the next training step draws new noise, identically on both.
    a.forward(x, training=True)
    b.forward(x, training=True)
    np.testing.assert_array_equal(a.last_logits, b.last_logits)
    assert not np.array_equal(a.last_logits, la)

    # A different seed gives different weights and, with the same weights, different noise.
    c = pyswitch.Router(8, 4, seed=4, jitter_eps=0.05)
    assert not np.array_equal(c.weight, a.weight)
    fresh = pyswitch.Router(8, 4, seed=3, jitter_eps=0.05)
    c.weight[...] = fresh.weight
    fresh.forward(x, training=True)
    c.forward(x, training=True)
    assert not np.array_equal(c.last_logits, fresh.last_logits)


def test_no_jitter_in_eval_or_with_zero_eps():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 6)).astype(np.float32)
    a = pyswitch.Router(6, 5, seed=7, jitter_eps=0.1)
    a.forward(x, training=False)
    first = a.last_logits.copy()
    a.forward(x, training=False)
    np.testing.assert_array_equal(a.last_logits, first)
    np.testing.assert_allclose(
        first, x.astype(np.float64) @ a.weight.astype(np.float64), rtol=1e-5, atol=1e-6
    )
    z = pyswitch.Router(6, 5, seed=8, jitter_eps=0.0)
    z.weight[...] = a.weight
    z.forward(x, training=True)
    np.testing.assert_array_equal(z.last_logits, first)


def test_jitter_bounds_and_backward_uses_forward_noise():
    """Recover the noise from the logits (E > d_model, W full rank) and check the backward."""
    eps = 0.1
    d_model, E, T = 3, 6, 24
    cfg = dict(k=2, capacity_factor=1.0, min_capacity=0, normalize_gates=True)
    rng = np.random.default_rng(2)
    x = (
        rng.choice([-1.0, 1.0], size=(T, d_model)) * rng.uniform(0.5, 2.0, size=(T, d_model))
    ).astype(np.float32)
    d_gate = rng.standard_normal((T, 2)).astype(np.float32)
    router = make_router(d_model, E, cfg, seed=5, jitter_eps=eps)
    router.forward(x, training=True)
    L = router.last_logits.astype(np.float64)
    W = router.weight.astype(np.float64)
    xj = L @ np.linalg.pinv(W)  # (x * u) @ W = L
    u = xj / x.astype(np.float64)
    assert u.min() >= 1 - eps - 1e-3 and u.max() <= 1 + eps + 1e-3, (u.min(), u.max())
    assert u.std() > eps / 4, "jitter does not look uniform on (1 - eps, 1 + eps)"

    dx = router.backward(d_gate, aux_loss_coef=0.3, z_loss_coef=0.2)
    expected = ref.router_backward(
        x, W, d_gate, logits=L, jitter=u, aux_loss_coef=0.3, z_loss_coef=0.2, **route_kwargs(cfg)
    )
    no_jitter = ref.router_backward(
        x, W, d_gate, logits=L, aux_loss_coef=0.3, z_loss_coef=0.2, **route_kwargs(cfg)
    )
    scale = np.abs(expected.d_weight).max()
    np.testing.assert_allclose(
        router.grads["weight"], expected.d_weight, rtol=1e-3, atol=1e-3 * scale
    )
    np.testing.assert_allclose(dx, expected.dx, rtol=1e-3, atol=1e-3 * np.abs(expected.dx).max())
    # Sanity: the check can tell the jittered from the un-jittered gradient.
    assert np.abs(no_jitter.dx - expected.dx).max() > 1e-2 * np.abs(expected.dx).max()


@pytest.mark.parametrize("k", [1, 2])
def test_eval_and_training_capacity_factors(k):
    T, E = 32, 4
    router = pyswitch.Router(
        4, E, k=k, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0, seed=0
    )
    x = np.random.default_rng(3).standard_normal((T, 4)).astype(np.float32)
    train = router.forward(x, training=True)
    assert int(train.capacity) == min(T, int(1.0 * k * T / E))
    ev = router.forward(x, training=False)
    assert int(ev.capacity) == min(T, int(2.0 * k * T / E))
    default = pyswitch.Router(4, E, k=k, seed=0)  # 1.25 / 2.0 / min_capacity 4
    assert int(default.forward(x, training=True).capacity) == max(4, int(1.25 * k * T / E))
    assert int(default.forward(x, training=False).capacity) == min(T, int(2.0 * k * T / E))


@pytest.mark.parametrize("training", [False, True])
def test_forward_plan_equals_route_of_last_logits(training):
    kw = dict(
        k=2,
        min_capacity=1,
        group_size=8,
        priority="batch_prioritized",
        capacity_rounding="ceil",
        normalize_gates=True,
    )
    router = pyswitch.Router(5, 6, capacity_factor=0.75, eval_capacity_factor=1.5, seed=9, **kw)
    x = np.random.default_rng(4).standard_normal((24, 5)).astype(np.float32)
    plan = router.forward(x, training=training)
    again = pyswitch.route(router.last_logits, capacity_factor=0.75 if training else 1.5, **kw)
    for name in ("expert_index", "gate", "slot", "tokens_per_expert"):
        np.testing.assert_array_equal(getattr(plan, name), getattr(again, name), err_msg=name)
    for name in ("capacity", "dropped", "aux_loss", "z_loss", "num_groups", "group_size"):
        assert getattr(plan, name) == getattr(again, name), name


def test_weight_init_truncated_normal():
    d_model, E = 256, 64
    router = pyswitch.Router(d_model, E, init_scale=0.1, seed=0)
    w = router.weight
    assert w.dtype == np.float32 and w.shape == (d_model, E)
    std = np.sqrt(0.1 / d_model)
    assert np.abs(w).max() <= 2 * std * (1 + 1e-6), "values beyond 2 std"
    assert np.abs(w).max() > 1.8 * std
    # A normal(0, std) truncated at +-2 std has standard deviation 0.8796 * std.
    assert 0.85 * std < w.std() < 0.91 * std, w.std() / std
    assert abs(w.mean()) < 0.03 * std
    same = pyswitch.Router(d_model, E, init_scale=0.1, seed=0)
    np.testing.assert_array_equal(same.weight, w)
    other = pyswitch.Router(d_model, E, init_scale=0.1, seed=1)
    assert not np.array_equal(other.weight, w)
    bigger = pyswitch.Router(d_model, E, init_scale=0.4, seed=0)
    assert 1.7 < bigger.weight.std() / w.std() < 2.3


def test_params_are_live():
    router = pyswitch.Router(4, 3, seed=0)
    assert set(router.params) == {"weight"}
    assert np.shares_memory(router.params["weight"], router.weight)
    x = np.eye(4, dtype=np.float32)
    new = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    router.weight[...] = new
    router.forward(x)
    np.testing.assert_allclose(router.last_logits, new, rtol=0, atol=1e-7)
    router.params["weight"][1, 2] = 5.0
    assert router.weight[1, 2] == 5.0
    router.forward(x)
    assert router.last_logits[1, 2] == 5.0


def test_backward_grads_shapes_and_k2_defaults():
    router = pyswitch.Router(6, 4, k=2, seed=0)
    x = np.random.default_rng(8).standard_normal((8, 6)).astype(np.float32)
    plan = router.forward(x, training=True)
    assert plan.expert_index.shape == (8, 2)
    dx = router.backward(np.ones((8, 2), np.float32))
    assert dx.shape == (8, 6) and dx.dtype == np.float32
    assert router.grads["weight"].shape == (6, 4)
    assert np.isfinite(dx).all() and np.isfinite(router.grads["weight"]).all()


def test_router_accepts_strided_inputs():
    cfg = dict(k=2, capacity_factor=1.0, min_capacity=0, normalize_gates=True)
    router, x, d_gate = separated_case(cfg, 16, 4, 4, seed=41)
    plan = router.forward(x, training=True)
    logits = router.last_logits.copy()
    dx = router.backward(d_gate, aux_loss_coef=0.2, z_loss_coef=0.1).copy()
    dw = router.grads["weight"].copy()
    x_view = np.ascontiguousarray(x[::-1])[::-1]  # negative row stride
    x_fortran = np.asfortranarray(x)
    d_view = np.asfortranarray(d_gate)[::1]
    for xv in (x_view, x_fortran):
        p2 = router.forward(xv, training=True)
        np.testing.assert_array_equal(router.last_logits, logits)
        np.testing.assert_array_equal(p2.slot, plan.slot)
        np.testing.assert_array_equal(
            router.backward(d_view, aux_loss_coef=0.2, z_loss_coef=0.1), dx
        )
        np.testing.assert_array_equal(router.grads["weight"], dw)


def test_bfloat16_router_dtype():
    """dtype="bfloat16": the router itself stays float32 (selective precision)."""
    router = pyswitch.Router(8, 4, dtype="bfloat16", seed=0)
    ref32 = pyswitch.Router(8, 4, dtype="float32", seed=0)
    assert router.weight.dtype == np.float32
    np.testing.assert_array_equal(router.weight, ref32.weight)
    x = pyswitch.to_bfloat16(np.random.default_rng(6).standard_normal((8, 8)).astype(np.float32))
    plan = router.forward(x)
    ref32.forward(x)
    assert router.last_logits.dtype == np.float32
    np.testing.assert_array_equal(router.last_logits, ref32.last_logits)
    dx = router.backward(np.ones(plan.gate.shape, np.float32))
    assert dx.dtype == pyswitch.bfloat16 and dx.shape == x.shape


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_router_bit_identical_across_isas_and_threads_large(dtype):
    """DESIGN: kernels are deterministic whatever the ISA and thread count."""
    from isa_utils import all_configs

    T, d_model, E = 2048, 96, 16
    rng = np.random.default_rng(12)
    x = rng.standard_normal((T, d_model)).astype(np.float32)
    if dtype == "bfloat16":
        x = pyswitch.to_bfloat16(x)
    d_gate = rng.standard_normal((T, 2)).astype(np.float32)
    results = {}
    for isa, threads in all_configs():
        with cpu_config(isa=isa, threads=threads):
            router = pyswitch.Router(d_model, E, k=2, group_size=256, seed=3, jitter_eps=0.01)
            plan = router.forward(x, training=True)
            dx = router.backward(d_gate, aux_loss_coef=0.01, z_loss_coef=1e-3)
            results[(isa, threads)] = (
                router.last_logits.tobytes(),
                plan.gate.tobytes(),
                plan.slot.tobytes(),
                np.asarray(dx).tobytes(),
                router.grads["weight"].tobytes(),
            )
    names = ("last_logits", "gate", "slot", "dx", "grads['weight']")
    for cfg, got in results.items():
        diff = [n for n, a, b in zip(names, got, results[("scalar", 1)]) if a != b]
        assert not diff, f"{cfg} differs from ('scalar', 1) in {diff}"
