# Expert parallelism (SPEC section 3): SwitchFFN(comm=...) on LocalGroup thread ranks against one
# rank holding every expert, bit for bit.
"""Expert-parallel SwitchFFN tests.

Reference.  The reference is an independent one-rank ``SwitchFFN`` (no ``comm``) that holds all
``E`` experts and sees the concatenation of the ranks' tokens in rank order, routed as the same
groups (``group_size`` = tokens per rank).  Both sides get the same parameters: a global set of
O(1) random float32 arrays (so that routing, capacity drops and gradients are not trivial), the
router copied whole onto every rank and each rank's ``[r*E/W, (r+1)*E/W)`` slice of the expert
arrays copied into its local experts.

Tolerances.
* y, dx, ``aux_loss``, ``z_loss`` and expert gradients (the ranks' local gradients concatenated
  along the expert axis): bit-identical, float32 and bfloat16 (SPEC section 3 invariant).
* Router gradient: each rank holds its tokens' share; the float64 sum of the shares equals the
  one-rank gradient within ``ROUTER_RTOL * max|g| + ROUTER_ATOL`` (float32 summation order over
  the tokens).  After ``sum_gradients`` every rank holds the same bits, which are the float32
  rank-order sum of the shares.
* Several groups per rank: aux / z agree within 1e-12 relative (the per-group terms are summed
  in another order); y and expert gradients stay bit-identical, and dx too when the aux / z
  coefficients are 0 (else within ``GRAD_RTOL`` of its largest magnitude).
* Unequal token counts, dropless, against one group on one rank: bit-identical for k=1; for
  k=2 the expert gradients are within ``GRAD_RTOL`` (each expert's rows come in another order).
* Token counts that are not multiples of any GEMM block (1, 8, 33, 65 per rank): still
  bit-identical, dx included (the router's dx is computed row by row for exactly this reason).
* Gradient scale: the global-loss convention against the one-rank gradients, and the per-rank
  mean convention as a negative control (expert gradients W times too large).
* Faults (a rank raising, a NaN input, mismatched calls), each 10 times: ``run`` re-raises the
  root cause, every other rank got ``CommError``, within the timeout + 2 s, no leaked threads.
"""

import threading
import time

import numpy as np
import pytest
from array_utils import assert_bits_equal

import pyswitch
from pyswitch.comm import LocalGroup, average_gradients, sum_gradients

BF16 = np.dtype(pyswitch.bfloat16)
F32 = np.dtype(np.float32)

D, F, E = 16, 32, 8
T_PER = 32
EXPERT_KEYS = ("w_in", "w_out", "w_gate", "b_in", "b_out")
ROUTER_RTOL = 1e-6
ROUTER_ATOL = 1e-12
LOSS_RTOL_GROUPS = 1e-12
GRAD_RTOL = 1e-5  # float32 gradients summed in another order
FAULT_TIMEOUT = 5.0
FAULT_REPEATS = 10

CommError = pyswitch.CommError

# Layer configurations for the invariant: (constructor kwargs, training flag).
CONFIGS = {
    "eval_k1_relu": (dict(k=1, activation="relu"), False),
    "train_k2_gelu_jitter_dropout": (
        dict(k=2, activation="gelu", jitter_eps=0.05, expert_dropout=0.25),
        True,
    ),
    "train_geglu_bias_drops": (
        dict(
            k=2,
            activation="geglu",
            use_bias=True,
            capacity_factor=0.5,
            min_capacity=1,
            jitter_eps=0.02,
            expert_dropout=0.1,
        ),
        True,
    ),
}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def f64(a):
    return np.asarray(a).astype(np.float64)


def global_params(rng, cfg, num_experts=E):
    """O(1) float32 values for every parameter of a one-rank layer with ``cfg``."""
    probe = pyswitch.SwitchFFN(D, F, num_experts, **cfg)
    out = {}
    for key, p in probe.params.items():
        std = 1.0 if key == "router" else (0.2 if key.startswith("b_") else 0.5)
        out[key] = (rng.standard_normal(p.shape) * std).astype(np.float32)
    return out


def load_params(layer, params):
    """Copy the global ``params`` into ``layer``: the router whole, the experts' local slice."""
    assert set(layer.params) == set(params), (sorted(layer.params), sorted(params))
    lo, n = layer.first_expert, layer.local_experts
    for key, p in layer.params.items():
        p[...] = params[key] if key == "router" else params[key][lo : lo + n]


def make_tokens(rng, counts, dtype):
    """Per-rank x and dy arrays of ``dtype`` with the given token counts."""
    xs = [rng.standard_normal((n, D)).astype(np.float32).astype(dtype) for n in counts]
    dys = [rng.standard_normal((n, D)).astype(np.float32).astype(dtype) for n in counts]
    return xs, dys


def concat(arrays):
    return np.concatenate(arrays, axis=0)


def run_one_rank(cfg, params, xs, dys, training, group_size, steps=1, lr=None):
    """The reference: one rank holding every expert, over the ranks' tokens in rank order.

    ``xs`` / ``dys`` are lists (one per step) of per-rank lists.  With ``lr``, after each step
    the expert parameters take an SGD step (the router is left alone).
    """
    layer = pyswitch.SwitchFFN(D, F, E, group_size=group_size, **cfg)
    load_params(layer, params)
    out = []
    for step in range(steps):
        y = layer.forward(concat(xs[step]), training=training)
        dx = layer.backward(concat(dys[step]))
        out.append(step_record(layer, y, dx))
        if lr is not None:
            for key in EXPERT_KEYS:
                if key in layer.params:
                    layer.params[key][...] -= np.float32(lr) * layer.grads[key]
    return out


def step_record(layer, y, dx, **extra) -> dict:
    """What the tests compare after one step of a layer (copies, not live views)."""
    return dict(
        y=y.copy(),
        dx=dx.copy(),
        aux=layer.aux_loss,
        z=layer.z_loss,
        grads={
            k: v.copy()
            for k, v in layer.grads.items()
            if k != "router" or "router_share" not in extra
        },
        dropped=int(layer.last_plan.dropped),
        **extra,
    )


def sgd(layer, lr):
    """A plain SGD update of the expert weights (the router is left as it is)."""
    for key in EXPERT_KEYS:
        if key in layer.params:
            layer.params[key][...] -= np.float32(lr) * layer.grads[key]


def ep_steps(comm, layer, xs, dys, training, lr=None):
    """Forward and backward of an expert-parallel layer on this rank's rows of each step's
    tokens, summing the router's shares over ranks; per step, what the tests compare."""
    out = []
    for x_step, dy_step in zip(xs, dys):
        y = layer.forward(x_step[comm.rank], training=training)
        dx = layer.backward(dy_step[comm.rank])
        share = layer.grads["router"].copy()
        sum_gradients(comm, {"router": layer.grads["router"]})
        out.append(
            step_record(
                layer, y, dx, router_share=share, router_summed=layer.grads["router"].copy()
            )
        )
        if lr is not None:
            sgd(layer, lr)
    return out


def run_ep(world, cfg, params, xs, dys, training, steps=1, lr=None, group_size=None):
    """The same on ``world`` thread ranks; returns per rank a list (per step) of results."""

    def fn(comm):
        layer = pyswitch.SwitchFFN(D, F, E, comm=comm, group_size=group_size, **cfg)
        assert layer.local_experts == E // world, (comm.rank, layer.local_experts)
        assert layer.first_expert == comm.rank * (E // world), (comm.rank, layer.first_expert)
        load_params(layer, params)
        return ep_steps(comm, layer, xs[:steps], dys[:steps], training, lr)

    return LocalGroup(world, timeout=30).run(fn)


def assert_close_scaled(got, expected, rtol, what, atol=0.0):
    """|got - expected| <= rtol * max|expected| + atol, elementwise."""
    got, expected = f64(got), f64(expected)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    scale = float(np.max(np.abs(expected), initial=0.0))
    tol = rtol * scale + atol
    err = np.abs(got - expected)
    assert float(err.max(initial=0.0)) <= tol, (
        f"{what}: max |err| {float(err.max())!r} > tol {tol!r} (max |expected| {scale!r}); "
        f"first bad at {tuple(np.argwhere(err > tol)[0])}"
    )


def assert_router_close(got, expected, what):
    """The router gradient within float32 summation-order rounding of the one-rank one."""
    scale = float(np.max(np.abs(f64(expected)), initial=0.0))
    assert_close_scaled(got, expected, ROUTER_RTOL, what, atol=ROUTER_ATOL)
    assert scale > 0, (what, "an all-zero router gradient compares nothing")


def assert_ep_matches(
    ref, per_rank, counts, what, *, losses=True, dx=True, router=True, grads_exact=True
):
    """Compare one step of the expert-parallel run (``per_rank``) with the one-rank ``ref``."""
    bounds = np.concatenate([[0], np.cumsum(counts)])
    world = len(per_rank)
    for r, res in enumerate(per_rank):
        lo, hi = bounds[r], bounds[r + 1]
        assert_bits_equal(res["y"], ref["y"][lo:hi], f"{what}: y of rank {r}")
        if dx:
            assert_bits_equal(res["dx"], ref["dx"][lo:hi], f"{what}: dx of rank {r}")
        if losses:
            assert_bits_equal(np.float64(res["aux"]), np.float64(ref["aux"]), f"{what}: aux r{r}")
            assert_bits_equal(np.float64(res["z"]), np.float64(ref["z"]), f"{what}: z_loss r{r}")
    for key in ref["grads"]:
        if key == "router":
            continue
        got = concat([res["grads"][key] for res in per_rank])
        if grads_exact:
            assert_bits_equal(got, ref["grads"][key], f"{what}: grad {key} (ranks concatenated)")
        else:
            assert_close_scaled(got, ref["grads"][key], GRAD_RTOL, f"{what}: grad {key}")
    if router:
        total = np.zeros(ref["grads"]["router"].shape, np.float64)
        for res in per_rank:
            total += f64(res["router_share"])
        assert_router_close(total, ref["grads"]["router"], f"{what}: sum of router shares")
        rank_order = per_rank[0]["router_share"].copy()
        for res in per_rank[1:]:
            rank_order = rank_order + res["router_share"]  # float32, rank order
        for r in range(world):
            assert_bits_equal(
                per_rank[r]["router_summed"], rank_order, f"{what}: summed router grad, rank {r}"
            )


# ---------------------------------------------------------------------------------------------
# 1. The invariant
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_expert_parallel_equals_one_rank_with_groups_in_rank_order(world, dtype, config):
    base, training = CONFIGS[config]
    cfg = dict(base, dtype=dtype, seed=7)
    rng = np.random.default_rng([world, len(config), dtype == "bfloat16"])
    params = global_params(rng, cfg)
    counts = [T_PER] * world
    xs, dys = make_tokens(rng, counts, BF16 if dtype == "bfloat16" else F32)

    ref = run_one_rank(cfg, params, [xs], [dys], training, group_size=T_PER)[0]
    per_rank = [steps[0] for steps in run_ep(world, cfg, params, [xs], [dys], training)]

    what = f"W={world} {dtype} {config}"
    assert_ep_matches(ref, per_rank, counts, what)
    assert per_rank[0]["y"].dtype == xs[0].dtype
    if config == "train_geglu_bias_drops":
        dropped = sum(res["dropped"] for res in per_rank)
        assert dropped > 0, f"{what}: the case should drop assignments, dropped={dropped}"
        assert dropped == ref["dropped"], (what, dropped, ref["dropped"])


# ---------------------------------------------------------------------------------------------
# 2. Initial parameters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize(
    "cfg", [dict(activation="relu"), dict(activation="geglu", use_bias=True, seed=11)]
)
def test_initial_params_are_the_slices_of_a_one_rank_layer(world, cfg):
    full = pyswitch.SwitchFFN(D, F, E, **cfg)
    full_params = {k: v.copy() for k, v in full.params.items()}

    def fn(comm):
        layer = pyswitch.SwitchFFN(D, F, E, comm=comm, **cfg)
        return (
            layer.first_expert,
            layer.local_experts,
            {k: v.copy() for k, v in layer.params.items()},
        )

    results = LocalGroup(world, timeout=30).run(fn)
    n = E // world
    for r, (first, local, params) in enumerate(results):
        assert (first, local) == (r * n, n), (r, first, local)
        assert set(params) == set(full_params), (sorted(params), sorted(full_params))
        assert_bits_equal(params["router"], full_params["router"], f"router of rank {r}")
        for key in set(params) - {"router"}:
            assert params[key].shape[0] == n, (key, params[key].shape)
            assert_bits_equal(
                params[key], full_params[key][r * n : (r + 1) * n], f"{key} of rank {r}"
            )
    # The experts are not all the same (else the slices would match trivially).
    assert not np.array_equal(full_params["w_in"][0], full_params["w_in"][-1])


# ---------------------------------------------------------------------------------------------
# 3. Several steps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("world", [2, 4])
def test_several_training_steps_stay_bit_identical(world, dtype):
    cfg = dict(k=2, activation="gelu", jitter_eps=0.05, expert_dropout=0.2, dtype=dtype, seed=3)
    rng = np.random.default_rng([30, world])
    params = global_params(rng, cfg)
    counts = [T_PER] * world
    steps = 3
    xs, dys = [], []
    for _ in range(steps):
        x, dy = make_tokens(rng, counts, BF16 if dtype == "bfloat16" else F32)
        xs.append(x)
        dys.append(dy)

    ref = run_one_rank(cfg, params, xs, dys, True, group_size=T_PER, steps=steps, lr=0.05)
    ep = run_ep(world, cfg, params, xs, dys, True, steps=steps, lr=0.05)
    for step in range(steps):
        assert_ep_matches(
            ref[step], [r[step] for r in ep], counts, f"W={world} {dtype} step {step}"
        )


# ---------------------------------------------------------------------------------------------
# 4. Several groups per rank, zero-token ranks, unequal token counts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coefs", ["losses_on", "losses_off"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("world", [2, 4])
def test_several_groups_per_rank(world, dtype, coefs):
    """group_size below the rank's token count: y and expert gradients stay bit-identical; the
    global aux / z losses sum their per-group terms in another order (relative 1e-12), and so
    dx, which carries their gradient, is bit-identical only with the coefficients at 0."""
    group = 16
    t_per = 48  # three groups per rank
    cfg = dict(k=2, activation="relu", jitter_eps=0.05, expert_dropout=0.1, dtype=dtype, seed=5)
    if coefs == "losses_off":
        cfg.update(aux_loss_coef=0.0, z_loss_coef=0.0)
    rng = np.random.default_rng([40, world, dtype == "bfloat16"])
    params = global_params(rng, cfg)
    counts = [t_per] * world
    xs, dys = make_tokens(rng, counts, BF16 if dtype == "bfloat16" else F32)

    ref = run_one_rank(cfg, params, [xs], [dys], True, group_size=group)[0]
    per_rank = [s[0] for s in run_ep(world, cfg, params, [xs], [dys], True, group_size=group)]

    what = f"W={world} {dtype} group_size={group} {coefs}"
    # dx carries the aux / z gradients, whose per-group terms are summed in another order.
    assert_ep_matches(ref, per_rank, counts, what, losses=False, dx=coefs == "losses_off")
    for r, res in enumerate(per_rank):
        for name in ("aux", "z"):
            got, expected = res[name], ref[name]
            assert abs(got - expected) <= LOSS_RTOL_GROUPS * abs(expected), (what, r, name)
            assert res[name] == per_rank[0][name], (what, "losses differ between ranks", r)
        if coefs == "losses_off":
            assert res["aux"] == 0.0 and res["z"] == 0.0
        else:
            assert ref["aux"] > 0 and ref["z"] > 0
            assert_close_scaled(
                res["dx"], ref["dx"][r * t_per : (r + 1) * t_per], GRAD_RTOL, f"{what}: dx r{r}"
            )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_token_ranks_are_absent_from_the_one_rank_layer(dtype):
    world = 4
    cfg = dict(k=2, activation="geglu", use_bias=True, jitter_eps=0.05, dtype=dtype, seed=9)
    rng = np.random.default_rng(50)
    params = global_params(rng, cfg)
    counts = [T_PER, 0, T_PER, 0]
    xs, dys = make_tokens(rng, counts, BF16 if dtype == "bfloat16" else F32)

    ref = run_one_rank(cfg, params, [xs], [dys], True, group_size=T_PER)[0]
    per_rank = [steps[0] for steps in run_ep(world, cfg, params, [xs], [dys], True)]

    assert_ep_matches(ref, per_rank, counts, f"{dtype} ranks 1 and 3 empty")
    for r in (1, 3):
        assert per_rank[r]["y"].shape == (0, D) and per_rank[r]["dx"].shape == (0, D), r
        assert np.all(per_rank[r]["router_share"] == 0), r  # x^T dlogits with no rows
    # The empty ranks' experts still receive tokens from the others.
    for r in range(world):
        assert np.any(per_rank[r]["grads"]["w_in"] != 0), r


# (world, tokens per rank) where some rank's rows fall into a GEMM call of another height than
# in the one-rank layer (see test_small_counts_float32_dx_is_bit_identical).
ODD_COUNTS = [(2, 1), (2, 8), (4, 4), (4, 33), (2, 65)]


def _odd_count_case(world, t_per, dtype, config):
    base, training = CONFIGS[config]
    cfg = dict(base, dtype=dtype, seed=21)
    rng = np.random.default_rng([95, world, t_per, dtype == "bfloat16", len(config)])
    params = global_params(rng, cfg)
    counts = [t_per] * world
    xs, dys = make_tokens(rng, counts, BF16 if dtype == "bfloat16" else F32)
    ref = run_one_rank(cfg, params, [xs], [dys], training, group_size=t_per)[0]
    per_rank = [steps[0] for steps in run_ep(world, cfg, params, [xs], [dys], training)]
    return ref, per_rank, counts


@pytest.mark.parametrize("config", ["eval_k1_relu", "train_k2_gelu_jitter_dropout"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("world", "t_per"), ODD_COUNTS)
def test_small_and_odd_token_counts(world, t_per, dtype, config):
    """The invariant at token counts that are not multiples of the GEMM blocks: y, losses, dx,
    expert and router gradients bit-identical. (A GEMM library picks kernels by the number of
    rows in a call; a rank's rows fall into calls of other heights than in the one-rank layer.)"""
    ref, per_rank, counts = _odd_count_case(world, t_per, dtype, config)
    what = f"W={world} T_per={t_per} {dtype} {config}"
    assert_ep_matches(ref, per_rank, counts, what, dx=True)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unequal_token_counts_dropless(dtype, k):
    """Ranks with different token counts (one with none), dropless routing, no aux / z losses:
    the same as one rank routing the concatenation as a single group (training, with jitter).

    Not bit-identical by construction, so compared within float32 rounding instead:
    * k=2 expert gradients: a group's buffer holds its first choices in token order, then its
      second choices; one global group interleaves the ranks' tokens differently from W
      per-rank groups, so each expert sums the same rows in another order.
    * expert dropout is left out: its mask is drawn per element of the expert buffers, whose
      row layout differs between W groups and one group (the equal-count tests cover dropout).
    """
    world = 4
    cfg = dict(
        k=k,
        activation="relu",
        capacity_factor=None,
        eval_capacity_factor=None,
        aux_loss_coef=0.0,
        z_loss_coef=0.0,
        jitter_eps=0.05,
        dtype=dtype,
        seed=13,
    )
    rng = np.random.default_rng([60, k])
    params = global_params(rng, cfg)
    counts = [40, 24, 0, 56]
    xs, dys = make_tokens(rng, counts, BF16 if dtype == "bfloat16" else F32)

    ref = run_one_rank(cfg, params, [xs], [dys], True, group_size=None)[0]
    per_rank = [steps[0] for steps in run_ep(world, cfg, params, [xs], [dys], True)]

    what = f"{dtype} k={k} counts {counts} dropless"
    assert ref["dropped"] == 0 and all(res["dropped"] == 0 for res in per_rank), what
    assert_ep_matches(ref, per_rank, counts, what, grads_exact=k == 1)
    assert all(res["aux"] == 0.0 and res["z"] == 0.0 for res in per_rank), what


# ---------------------------------------------------------------------------------------------
# 5. Gradient scale
# ---------------------------------------------------------------------------------------------


def _scale_case(world):
    # Aux / z coefficients large enough that their share of the router gradient is visible.
    cfg = dict(k=1, activation="relu", aux_loss_coef=0.5, z_loss_coef=0.05, seed=17)
    rng = np.random.default_rng([70, world])
    params = global_params(rng, cfg)
    counts = [T_PER] * world
    xs, _ = make_tokens(rng, counts, F32)
    return cfg, params, xs


def _one_rank_global_loss_grads(cfg, params, xs, t_global, dy_scale=None):
    """Gradients of L = (1/T_global) sum_t 0.5 |y_t|^2 + aux + z on one rank."""
    layer = pyswitch.SwitchFFN(D, F, E, group_size=T_PER, **cfg)
    load_params(layer, params)
    y = layer.forward(concat(xs))
    scale = np.float32(1.0 / t_global) if dy_scale is None else dy_scale
    layer.backward(y * scale)
    return {k: v.copy() for k, v in layer.grads.items()}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_loss_convention_gives_the_one_rank_gradients(world):
    """Each rank back-propagates dy = y / T_global (its tokens' share of the global loss
    L = (1/T_global) sum over all tokens of 0.5 |y_t|^2, plus the layer's global aux and z
    losses, counted once); expert gradients are then complete without any reduction, and
    ``sum_gradients`` on the router gives the gradient of L (pyswitch.comm "Gradient scale")."""
    cfg, params, xs = _scale_case(world)
    t_global = T_PER * world
    ref = _one_rank_global_loss_grads(cfg, params, xs, t_global)

    def fn(comm):
        layer = pyswitch.SwitchFFN(D, F, E, comm=comm, **cfg)
        load_params(layer, params)
        y = layer.forward(xs[comm.rank])
        layer.backward(y * np.float32(1.0 / t_global))
        sum_gradients(comm, {"router": layer.grads["router"]})
        return {k: v.copy() for k, v in layer.grads.items()}

    results = LocalGroup(world, timeout=30).run(fn)
    for key in ref:
        if key == "router":
            for r, g in enumerate(results):
                assert_router_close(g["router"], ref["router"], f"W={world} router, rank {r}")
        else:
            got = concat([g[key] for g in results])
            assert_bits_equal(got, ref[key], f"W={world} expert grad {key}")


@pytest.mark.parametrize("world", [2, 4])
def test_per_rank_mean_convention_scales_expert_grads_by_world(world):
    """Negative control for the bug class the global-loss convention avoids.

    Under the usual pure data-parallel convention each rank's loss is the mean over its *own*
    tokens (dy = y / T_local) and gradients are averaged over ranks.  With expert parallelism a
    rank's experts collect the contributions of every rank's tokens, each scaled by
    1 / T_local = W / T_global, so the expert gradients come out W times the one-rank gradients
    of the global mean loss (they are complete already; averaging would not apply to them).
    The router, averaged, gets the dy part right but the aux / z part (already global, and split
    among the ranks' shares) divided by W.
    """
    cfg, params, xs = _scale_case(world)
    t_global = T_PER * world
    ref = _one_rank_global_loss_grads(cfg, params, xs, t_global)
    # The aux / z part of the router gradient: the same layer with dy = 0.
    aux_only = _one_rank_global_loss_grads(cfg, params, xs, t_global, dy_scale=np.float32(0))

    def fn(comm):
        layer = pyswitch.SwitchFFN(D, F, E, comm=comm, **cfg)
        load_params(layer, params)
        y = layer.forward(xs[comm.rank])
        layer.backward(y * np.float32(1.0 / len(y)))
        average_gradients(comm, layer.grads, keys=["router"])
        return {k: v.copy() for k, v in layer.grads.items()}

    results = LocalGroup(world, timeout=30).run(fn)
    for key in ref:
        if key == "router":
            continue
        got = f64(concat([g[key] for g in results]))
        expected = f64(ref[key])
        mask = np.abs(expected) > 1e-3 * np.max(np.abs(expected))
        ratio = got[mask] / expected[mask]
        np.testing.assert_allclose(ratio, world, rtol=1e-5, err_msg=f"W={world} {key} ratio")
    assert np.max(np.abs(aux_only["router"])) > 1e-3 * np.max(np.abs(ref["router"]))
    expected_router = f64(ref["router"]) - (1.0 - 1.0 / world) * f64(aux_only["router"])
    tol = 1e-5 * float(np.max(np.abs(ref["router"])))
    for r, g in enumerate(results):
        err = float(np.max(np.abs(f64(g["router"]) - expected_router)))
        assert err <= tol, (f"W={world} rank {r}: averaged router grad is not dy part + aux/W", err)
        # ... and so differs from the gradient of the global loss.
        assert np.max(np.abs(f64(g["router"]) - f64(ref["router"]))) > 10 * err


# ---------------------------------------------------------------------------------------------
# 6. Errors and faults
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("world", "num_experts"), [(4, 6), (3, 8), (2, 3)])
def test_experts_not_divisible_by_world_size(world, num_experts):
    def fn(comm):
        pyswitch.SwitchFFN(D, F, num_experts, comm=comm)

    with pytest.raises(ValueError, match="divisible"):
        LocalGroup(world, timeout=FAULT_TIMEOUT).run(fn)


@pytest.mark.parametrize("bad", ["comm", 0, object()])
def test_comm_of_the_wrong_type(bad):
    with pytest.raises(TypeError, match="comm"):
        pyswitch.SwitchFFN(D, F, E, comm=bad)


def _run_fault(world, fn):
    """Run ``fn`` on a fresh group; returns (exception raised by run, elapsed seconds)."""
    start = time.monotonic()
    with pytest.raises(BaseException) as info:
        LocalGroup(world, timeout=FAULT_TIMEOUT).run(fn)
    return info.value, time.monotonic() - start


class RankFailure(Exception):
    pass


def _fault_body(kind, world, bad_rank, outcomes):
    rng = np.random.default_rng(80)
    xs = [rng.standard_normal((8, D)).astype(np.float32) for _ in range(world)]
    xs[bad_rank][5, 3] = np.nan

    def fn(comm):
        try:
            layer = pyswitch.SwitchFFN(D, F, E, comm=comm, min_capacity=1)
            if kind == "raise_before_forward" and comm.rank == bad_rank:
                raise RankFailure(f"rank {comm.rank} gives up")
            x = xs[comm.rank] if kind == "nan_input" else np.nan_to_num(xs[comm.rank])
            training = kind == "mismatched_training" and comm.rank == bad_rank
            y = layer.forward(x, training=training)
            layer.backward(np.ones_like(y))
        except BaseException as exc:
            outcomes[comm.rank] = exc
            raise
        outcomes[comm.rank] = None

    return fn


@pytest.mark.parametrize("kind", ["raise_before_forward", "nan_input", "mismatched_training"])
@pytest.mark.parametrize("world", [2, 4])
def test_faults_release_every_rank(world, kind):
    threads_before = threading.active_count()
    for rep in range(FAULT_REPEATS):
        bad_rank = rep % world
        outcomes = [None] * world
        exc, elapsed = _run_fault(world, _fault_body(kind, world, bad_rank, outcomes))
        what = f"W={world} {kind} bad rank {bad_rank} rep {rep}"
        assert elapsed < FAULT_TIMEOUT + 2.0, (what, elapsed)
        if kind == "raise_before_forward":
            assert type(exc) is RankFailure, (what, exc)
        elif kind == "nan_input":
            assert type(exc) is ValueError, (what, exc)
            assert "row 5" in str(exc), (what, str(exc))
        else:
            assert isinstance(exc, CommError), (what, type(exc), exc)
        for r, got in enumerate(outcomes):
            if kind != "mismatched_training" and r == bad_rank:
                assert got is exc, (what, r, got)
            else:
                assert isinstance(got, CommError), (what, r, type(got), got)
        assert threading.active_count() == threads_before, (what, threading.active_count())


def test_group_is_usable_after_a_fault():
    # A fresh group after a failed one runs the layer normally (nothing left poisoned).
    outcomes = [None] * 2
    _run_fault(2, _fault_body("raise_before_forward", 2, 0, outcomes))
    cfg = dict(k=1, seed=2)
    rng = np.random.default_rng(90)
    params = global_params(rng, cfg)
    xs, dys = make_tokens(rng, [T_PER, T_PER], F32)
    ref = run_one_rank(cfg, params, [xs], [dys], False, group_size=T_PER)[0]
    per_rank = [s[0] for s in run_ep(2, cfg, params, [xs], [dys], False)]
    assert_ep_matches(ref, per_rank, [T_PER, T_PER], "after a fault")
