# Dispatch / combine (SPEC section 2) against a float64 NumPy reference: layouts, forward,
# backward, adjoint identities, finite differences, ISA/thread bit-identity, memory, bad inputs.
"""Dispatch and combine properties.

The reference here is written from the definitions, independently of the C++ core:

* padded layout: expert buffers ``(E, G*C, d)``; token t's j-th kept choice lives at row
  ``slot[t, j]`` of expert ``expert_index[t, j]``; unused rows are zero;
* packed layout: the padded rows in the same (expert, group, slot) order with the unused rows
  removed, as one ``(rows, d)`` buffer;
* ``combine``: ``y[t] = sum over kept j of gate[t, j] * B[row(t, j)]``;
* ``combine_backward``: ``d_B[row(t, j)] = gate[t, j] * dy[t]``, ``d_gate[t, j] = <dy[t], B[row]>``;
* ``dispatch_backward``: ``dx[t] = sum over kept j of D[row(t, j)]``.

Routing plans come from ``pyswitch.route`` on logits drawn on the 1/8 grid (ties exact in
float32 and float64) and are first checked against ``reference.route``; the reference rows are
built from the *reference* plan.

Tolerances: dispatch is a copy, so it must be bit-exact.  Sums (combine, d_gate,
dispatch_backward) accumulate <= 16 float32 terms: ``|got - ref| <= 1e-5 * sum |terms|``
(elementwise; where every term is 0 the result must be exactly 0).  bfloat16 results are compared
to the float64 reference of the bf16 inputs rounded to bf16, within 1 bf16 ulp (plus the same
float32 accumulation slack).  A single product (one kept term, ``d_expert_out``) is a correctly
rounded float32 multiplication and must be exact in float32.
"""

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import pytest
import reference as ref
from array_utils import assert_bits_equal, bits
from bad_input_utils import Case as Bad
from bad_input_utils import assert_raises_case, run_cases_in_child
from hypothesis import given
from hypothesis import strategies as st
from isa_utils import SUPPORTED_ISAS, all_configs, cpu_config

import pyswitch

BF16 = np.dtype(pyswitch.bfloat16)
F32 = np.dtype(np.float32)
SUM_RTOL = 1e-5
ADJOINT_RTOL = 1e-4
GRID = 8
GRID_MAX = 32
# Dyadic factors (capacity exact in any precision); small ones make tokens drop.
CAPACITY_FACTORS = [None, 0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 2.0]
PRIORITIES = ["position", "batch_prioritized"]
DTYPES = [F32, BF16]

isa_param = pytest.mark.parametrize("isa", SUPPORTED_ISAS)


# ---------------------------------------------------------------------------------------------
# Float64 reference
# ---------------------------------------------------------------------------------------------


@dataclass
class RefLayout:
    """Reference layout in flat-row coordinates of the buffer (padded buffers flattened to 2-D)."""

    rows: np.ndarray  # int64 (T, k), -1 = dropped
    row_token: np.ndarray  # int64 (total_rows,), -1 = unused
    expert_offset: np.ndarray  # int64 (E + 1,)
    total_rows: int
    buffer_shape: tuple  # without d: (E, G*C) or (rows,)
    used: np.ndarray  # bool (E, G*C): padded rows holding a token


def ref_layout(expert_index, slot, E, G, C, packed):
    """Build the reference layout from a plan's (expert_index, slot)."""
    expert_index = np.asarray(expert_index, dtype=np.int64)
    slot = np.asarray(slot, dtype=np.int64)
    T, k = expert_index.shape
    R = G * C
    used = np.zeros((E, R), dtype=bool)
    padded_rows = np.full((T, k), -1, dtype=np.int64)
    for t in range(T):
        for j in range(k):
            if slot[t, j] >= 0:
                e, s = int(expert_index[t, j]), int(slot[t, j])
                assert 0 <= s < R and not used[e, s], "reference: slot out of range or reused"
                used[e, s] = True
                padded_rows[t, j] = e * R + s
    if not packed:
        rows = padded_rows
        total = E * R
        offset = np.arange(E + 1, dtype=np.int64) * R
        shape = (E, R)
    else:
        # Remove unused rows, keeping the (expert, group, slot) order.
        new_index = np.cumsum(used.ravel()) - 1
        rows = np.full((T, k), -1, dtype=np.int64)
        kept = padded_rows >= 0
        rows[kept] = new_index[padded_rows[kept]]
        total = int(used.sum())
        offset = np.concatenate([[0], np.cumsum(used.sum(axis=1))]).astype(np.int64)
        shape = (total,)
    row_token = np.full(total, -1, dtype=np.int64)
    for t in range(T):
        for j in range(k):
            if rows[t, j] >= 0:
                row_token[rows[t, j]] = t
    return RefLayout(rows, row_token, offset, total, shape, used)


def ref_dispatch(x, lay):
    x = np.asarray(x, dtype=np.float64)
    T, d = x.shape
    buf = np.zeros((lay.total_rows, d))
    for t in range(T):
        for r in lay.rows[t]:
            if r >= 0:
                buf[r] = x[t]
    return buf.reshape(lay.buffer_shape + (d,))


def ref_combine(B, gate, lay):
    """y (float64) and the elementwise magnitude sum |gate * B[row]| (for tolerances)."""
    d = B.shape[-1]
    Bf = np.asarray(B, dtype=np.float64).reshape(-1, d)
    g = np.asarray(gate, dtype=np.float64)
    T, k = g.shape
    y = np.zeros((T, d))
    mag = np.zeros((T, d))
    for t in range(T):
        for j in range(k):
            r = lay.rows[t, j]
            if r >= 0:
                y[t] += g[t, j] * Bf[r]
                mag[t] += np.abs(g[t, j] * Bf[r])
    return y, mag


def ref_combine_backward(dy, B, gate, lay):
    """(d_B float64 in buffer shape, d_gate float64 (T, k), |terms| sum of d_gate)."""
    d = B.shape[-1]
    Bf = np.asarray(B, dtype=np.float64).reshape(-1, d)
    dy = np.asarray(dy, dtype=np.float64)
    g = np.asarray(gate, dtype=np.float64)
    T, k = g.shape
    dB = np.zeros_like(Bf)
    dg = np.zeros((T, k))
    dg_mag = np.zeros((T, k))
    for t in range(T):
        for j in range(k):
            r = lay.rows[t, j]
            if r >= 0:
                dB[r] = g[t, j] * dy[t]
                dg[t, j] = float(np.dot(dy[t], Bf[r]))
                dg_mag[t, j] = float(np.sum(np.abs(dy[t] * Bf[r])))
    return dB.reshape(B.shape), dg, dg_mag


def ref_dispatch_backward(D, lay, T):
    d = D.shape[-1]
    Df = np.asarray(D, dtype=np.float64).reshape(-1, d)
    dx = np.zeros((T, d))
    mag = np.zeros((T, d))
    for t in range(T):
        for r in lay.rows[t]:
            if r >= 0:
                dx[t] += Df[r]
                mag[t] += np.abs(Df[r])
    return dx, mag


# ---------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------


def bf16_ulp(v):
    """Spacing of bfloat16 at |v| (2**16 times the float32 spacing)."""
    return np.spacing(np.abs(np.asarray(v, dtype=np.float64)).astype(np.float32)).astype(
        np.float64
    ) * float(2**16)


def assert_sum_close(got, ref64, mag, dtype, what):
    """Float32-accumulated sum vs its float64 reference (see module docstring)."""
    assert got.dtype == dtype, (what, got.dtype, dtype)
    assert got.shape == ref64.shape, (what, got.shape, ref64.shape)
    g = got.astype(np.float64)
    tol = SUM_RTOL * mag
    if dtype == BF16:
        rounded = ref64.astype(BF16).astype(np.float64)
        err = np.abs(g - rounded)
        tol = tol + np.maximum(bf16_ulp(rounded), bf16_ulp(g))
    else:
        err = np.abs(g - ref64)
    bad = np.argwhere(~(err <= tol))
    assert bad.size == 0, (
        f"{what}: {len(bad)} elements out of tolerance, first at {tuple(bad[0])}: "
        f"got {g[tuple(bad[0])]!r}, reference {ref64[tuple(bad[0])]!r}, "
        f"tol {tol[tuple(bad[0])]!r}"
    )


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    logits: np.ndarray
    kwargs: dict
    T: int
    E: int
    k: int
    d: int
    packed: bool
    dtype: np.dtype
    rng: np.random.Generator

    def values(self, shape, dtype=None):
        """Random normal values in ``dtype`` (default: the case's), with some exact zeros."""
        a = self.rng.standard_normal(shape).astype(np.float32)
        a[self.rng.random(shape) < 0.05] = 0.0
        return a.astype(dtype or self.dtype)


def remove_near_ties(logits, priority):
    if priority != "batch_prioritized":
        return logits
    return ref.copy_rows_to_remove_near_ties(logits, ref.top1_prob(logits))


@st.composite
def dispatch_cases(draw, dtypes=tuple(DTYPES), packed=(False, True)):
    E = draw(st.integers(1, 8))
    k = draw(st.integers(1, min(E, 4)))
    G = draw(st.integers(1, 4))
    S = draw(st.integers(1, 16))
    T = G * S
    d = draw(st.integers(1, 16))
    priority = draw(st.sampled_from(PRIORITIES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logits = (rng.integers(-GRID_MAX, GRID_MAX + 1, size=(T, E)) / GRID).astype(np.float32)
    logits = remove_near_ties(logits, priority)
    kwargs = dict(
        k=k,
        capacity_factor=draw(st.sampled_from(CAPACITY_FACTORS)),
        min_capacity=draw(st.integers(0, 4)),
        group_size=S if (G > 1 or draw(st.booleans())) else None,
        priority=priority,
        normalize_gates=draw(st.booleans()) if k > 1 else False,
    )
    return Case(
        logits=logits,
        kwargs=kwargs,
        T=T,
        E=E,
        k=k,
        d=d,
        packed=draw(st.sampled_from(packed)),
        dtype=draw(st.sampled_from(dtypes)),
        rng=rng,
    )


def plan_and_layouts(case, packed=None):
    """(plan, layout, reference layout); the implementation's plan must equal the reference's."""
    packed = case.packed if packed is None else packed
    plan = pyswitch.route(case.logits, **case.kwargs)
    rplan = ref.route(case.logits, **case.kwargs)
    assert plan.capacity == rplan.capacity, (plan.capacity, rplan.capacity)
    np.testing.assert_array_equal(plan.expert_index, rplan.expert_index, "routing: expert_index")
    np.testing.assert_array_equal(plan.slot, rplan.slot, "routing: slot")
    lay = pyswitch.dispatch_layout(plan, packed=packed)
    rlay = ref_layout(
        rplan.expert_index, rplan.slot, case.E, rplan.num_groups, rplan.capacity, packed
    )
    return plan, lay, rlay


def buffer_values(case, rlay, fill_unused=0.0):
    """A random expert-output buffer in the layout's shape; unused padded rows = fill_unused."""
    B = case.values(rlay.buffer_shape + (case.d,))
    if len(rlay.buffer_shape) == 2:  # padded
        B[~rlay.used] = fill_unused
    return B


def gates(case, plan, kind):
    """plan.gate, or random gates (nonzero at dropped positions too: still contribute nothing)."""
    if kind == "plan":
        return np.array(plan.gate)
    return case.rng.standard_normal((case.T, case.k)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


@given(case=dispatch_cases())
def test_layout_matches_reference(case):
    plan, lay, rlay = plan_and_layouts(case)
    assert bool(lay.packed) == case.packed
    assert int(lay.total_rows) == rlay.total_rows
    for name, got, exp, dt in [
        ("expert_offset", lay.expert_offset, rlay.expert_offset, np.int64),
        ("assignment_row", lay.assignment_row, rlay.rows, np.int64),
        ("row_token", lay.row_token, rlay.row_token, np.int32),
    ]:
        assert got.dtype == dt, (name, got.dtype)
        np.testing.assert_array_equal(got, exp, name)
    # Dropped assignments are exactly those with slot -1.
    np.testing.assert_array_equal(lay.assignment_row < 0, np.asarray(plan.slot) < 0)
    if case.packed:
        assert rlay.total_rows == case.T * case.k - int(plan.dropped)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@isa_param
@given(case=dispatch_cases())
def test_dispatch_matches_reference_exactly(isa, case):
    _, lay, rlay = plan_and_layouts(case)
    x = case.values((case.T, case.d))
    with cpu_config(isa=isa):
        buf = pyswitch.dispatch(x, lay)
    expected = ref_dispatch(x, rlay).astype(case.dtype)
    assert_bits_equal(buf, expected, "dispatch")


@isa_param
@given(case=dispatch_cases(), gate_kind=st.sampled_from(["plan", "random"]))
def test_combine_matches_reference(isa, case, gate_kind):
    plan, lay, rlay = plan_and_layouts(case)
    B = buffer_values(case, rlay)
    g = gates(case, plan, gate_kind)
    with cpu_config(isa=isa):
        y = pyswitch.combine(B, g, lay)
    y_ref, mag = ref_combine(B, g, rlay)
    assert_sum_close(y, y_ref, mag, case.dtype, "combine")
    # A token with a single kept assignment: one correctly rounded product.
    single = (rlay.rows >= 0).sum(axis=1) == 1
    if case.dtype == F32 and single.any():
        np.testing.assert_array_equal(y[single], y_ref[single].astype(np.float32))


@given(case=dispatch_cases(), gate_kind=st.sampled_from(["plan", "random"]))
def test_fully_dropped_tokens_get_exactly_zero(case, gate_kind):
    plan, lay, rlay = plan_and_layouts(case)
    g = gates(case, plan, gate_kind)
    dropped = rlay.rows < 0
    g[dropped] = np.nan  # whatever the gate of a dropped assignment, it contributes 0
    clean = buffer_values(case, rlay, fill_unused=0.0)
    B = clean.copy()
    if len(rlay.buffer_shape) == 2:
        B[~rlay.used] = np.nan  # unused padded rows are never read
    y = pyswitch.combine(B, g, lay)
    g_clean = np.where(dropped, np.float32(0), g).astype(np.float32)
    y_clean = pyswitch.combine(clean, g_clean, lay)
    assert_bits_equal(y, y_clean, "combine with NaN in dropped gates / unused rows")
    none_kept = dropped.all(axis=1)
    assert_bits_equal(y[none_kept], np.zeros((int(none_kept.sum()), case.d), case.dtype), "y")
    d_out, d_gate = pyswitch.combine_backward(case.values((case.T, case.d)), clean, g, lay)
    assert np.all(d_gate[dropped] == 0), d_gate[dropped]
    assert np.all(np.isfinite(d_out.astype(np.float32)))


@given(case=dispatch_cases())
def test_combine_of_dispatch_with_mean_gates_is_identity(case):
    _, lay, rlay = plan_and_layouts(case)
    x = case.values((case.T, case.d))
    kept = (rlay.rows >= 0).sum(axis=1)
    g = np.where(rlay.rows >= 0, 1.0 / np.maximum(kept, 1)[:, None], 1.0).astype(np.float32)
    y = pyswitch.combine(pyswitch.dispatch(x, lay), g, lay)
    assert y.dtype == case.dtype
    some = kept > 0
    x64 = x.astype(np.float64)
    assert_sum_close(y[some], x64[some], np.abs(x64[some]), case.dtype, "combine(dispatch(x))")
    exact = some & np.isin(kept, [1, 2, 4])  # gates 1, 1/2, 1/4: every step is exact
    assert_bits_equal(y[exact], x[exact], "combine(dispatch(x)), power-of-two counts")
    assert_bits_equal(y[~some], np.zeros((int((~some).sum()), case.d), case.dtype), "dropped")


@given(case=dispatch_cases(packed=(False,)), gate_kind=st.sampled_from(["plan", "random"]))
def test_packed_and_padded_agree(case, gate_kind):
    plan, pad, rpad = plan_and_layouts(case, packed=False)
    pk = pyswitch.dispatch_layout(plan, packed=True)
    x = case.values((case.T, case.d))
    B = buffer_values(case, rpad)  # padded, unused rows zero
    B_packed = B[rpad.used]
    g = gates(case, plan, gate_kind)
    dy = case.values((case.T, case.d))
    assert_bits_equal(pyswitch.dispatch(x, pk), pyswitch.dispatch(x, pad)[rpad.used], "dispatch")
    assert_bits_equal(pyswitch.combine(B_packed, g, pk), pyswitch.combine(B, g, pad), "combine")
    dB_pk, dg_pk = pyswitch.combine_backward(dy, B_packed, g, pk)
    dB_pad, dg_pad = pyswitch.combine_backward(dy, B, g, pad)
    assert_bits_equal(dB_pk, dB_pad[rpad.used], "d_expert_out")
    assert_bits_equal(dg_pk, dg_pad, "d_gate")
    assert_bits_equal(
        pyswitch.dispatch_backward(B_packed, pk),
        pyswitch.dispatch_backward(B, pad),
        "dispatch_backward",
    )


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@isa_param
@given(case=dispatch_cases(), gate_kind=st.sampled_from(["plan", "random"]))
def test_backward_matches_reference(isa, case, gate_kind):
    plan, lay, rlay = plan_and_layouts(case)
    B = buffer_values(case, rlay)
    g = gates(case, plan, gate_kind)
    dy = case.values((case.T, case.d))
    D = case.values(rlay.buffer_shape + (case.d,))
    with cpu_config(isa=isa):
        d_out, d_gate = pyswitch.combine_backward(dy, B, g, lay)
        dx = pyswitch.dispatch_backward(D, lay)
    dB_ref, dg_ref, dg_mag = ref_combine_backward(dy, B, g, rlay)

    # d_expert_out: one product per element (gate * dy), 0 on unused rows.
    assert d_out.shape == B.shape and d_out.dtype == case.dtype
    if case.dtype == F32:
        assert_bits_equal(d_out, dB_ref.astype(np.float32), "d_expert_out")
    else:
        assert_sum_close(d_out, dB_ref, np.abs(dB_ref), BF16, "d_expert_out")
        if len(rlay.buffer_shape) == 2:
            assert np.all(bits(d_out)[~rlay.used] == 0), "unused rows of d_expert_out"

    assert d_gate.dtype == F32 and d_gate.shape == (case.T, case.k)
    assert_sum_close(d_gate, dg_ref, dg_mag, F32, "d_gate")
    assert np.all(bits(d_gate)[rlay.rows < 0] == 0), "d_gate must be +0 where dropped"

    dx_ref, mag = ref_dispatch_backward(D, rlay, case.T)
    assert_sum_close(dx, dx_ref, mag, case.dtype, "dispatch_backward")


def inner(a, b):
    return float(np.sum(np.asarray(a, np.float64) * np.asarray(b, np.float64)))


def abs_inner(a, b):
    return float(np.sum(np.abs(np.asarray(a, np.float64) * np.asarray(b, np.float64))))


def assert_adjoint(lhs, rhs, scale, what, rtol):
    assert abs(lhs - rhs) <= rtol * scale, f"{what}: {lhs!r} vs {rhs!r} (scale {scale!r})"


@given(case=dispatch_cases(dtypes=(F32,)), gate_kind=st.sampled_from(["plan", "random"]))
def test_adjoint_identities(case, gate_kind):
    plan, lay, rlay = plan_and_layouts(case)
    B = buffer_values(case, rlay)
    g = gates(case, plan, gate_kind)
    dy = case.values((case.T, case.d))
    y = pyswitch.combine(B, g, lay)
    d_B, d_gate = pyswitch.combine_backward(dy, B, g, lay)
    _, mag = ref_combine(B, g, rlay)
    scale = float(np.sum(mag * np.abs(dy.astype(np.float64))))
    # combine is linear in B and in gate.
    assert_adjoint(inner(y, dy), inner(B, d_B), scale, "<combine(B,g),dy> vs <B,d_B>", ADJOINT_RTOL)
    g_kept = np.where(rlay.rows >= 0, g, 0).astype(np.float32)
    assert_adjoint(
        inner(y, dy), inner(g_kept, d_gate), scale, "<combine,dy> vs <g,d_gate>", ADJOINT_RTOL
    )
    x = case.values((case.T, case.d))
    D = case.values(rlay.buffer_shape + (case.d,))
    buf = pyswitch.dispatch(x, lay)
    dx = pyswitch.dispatch_backward(D, lay)
    scale = abs_inner(ref_dispatch(x, rlay), D)
    assert_adjoint(inner(buf, D), inner(x, dx), scale, "<dispatch(x),D> vs <x,dx>", ADJOINT_RTOL)


# ---------------------------------------------------------------------------------------------
# Finite differences of the float64 reference
# ---------------------------------------------------------------------------------------------

FD_CASES = [
    # (T, E, k, capacity_factor, min_capacity, group_size, priority, packed, d)
    (6, 3, 2, 0.5, 1, None, "position", False, 3),
    (6, 3, 2, 0.5, 1, None, "position", True, 3),
    (8, 4, 1, 0.5, 1, 4, "batch_prioritized", False, 2),
    (8, 2, 2, None, 4, 4, "position", True, 4),
    (5, 4, 3, 1.0, 1, None, "batch_prioritized", True, 2),
]


@pytest.mark.parametrize("spec", FD_CASES, ids=[str(i) for i in range(len(FD_CASES))])
def test_gradients_match_finite_differences(spec):
    T, E, k, cf, min_cap, S, priority, packed, d = spec
    rng = np.random.default_rng(1234 + T * 10 + E)
    logits = (rng.integers(-GRID_MAX, GRID_MAX + 1, size=(T, E)) / GRID).astype(np.float32)
    logits = remove_near_ties(logits, priority)
    kwargs = dict(k=k, capacity_factor=cf, min_capacity=min_cap, group_size=S, priority=priority)
    case = Case(logits, kwargs, T, E, k, d, packed, F32, rng)
    plan, lay, rlay = plan_and_layouts(case)
    if cf is not None:
        assert plan.dropped > 0, "the fixed case should drop something"
    B = buffer_values(case, rlay)
    g = rng.standard_normal((T, k)).astype(np.float32)
    dy = case.values((T, d))
    d_B, d_gate = pyswitch.combine_backward(dy, B, g, lay)

    def loss_of_gate(gv):
        return inner(ref_combine(B, gv, rlay)[0], dy)

    def loss_of_buffer(Bv):
        return inner(ref_combine(Bv, g, rlay)[0], dy)

    fd_gate = ref.central_difference(loss_of_gate, g, h=1e-4)
    fd_B = ref.central_difference(loss_of_buffer, B, h=1e-4)
    np.testing.assert_allclose(d_gate, fd_gate, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d_B, fd_B, rtol=1e-5, atol=1e-6)

    x = case.values((T, d))
    D = case.values(rlay.buffer_shape + (d,))
    fd_x = ref.central_difference(lambda xv: inner(ref_dispatch(xv, rlay), D), x, h=1e-4)
    np.testing.assert_allclose(pyswitch.dispatch_backward(D, lay), fd_x, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Every ISA and thread count: bit-identical
# ---------------------------------------------------------------------------------------------


def run_all(plan, x, B_by_packed, g, dy):
    out = {}
    for packed in (False, True):
        lay = pyswitch.dispatch_layout(plan, packed=packed)
        B = B_by_packed[packed]
        out[f"layout.assignment_row/{packed}"] = np.array(lay.assignment_row)
        out[f"layout.row_token/{packed}"] = np.array(lay.row_token)
        out[f"dispatch/{packed}"] = pyswitch.dispatch(x, lay)
        out[f"combine/{packed}"] = pyswitch.combine(B, g, lay)
        d_B, d_gate = pyswitch.combine_backward(dy, B, g, lay)
        out[f"d_expert_out/{packed}"] = d_B
        out[f"d_gate/{packed}"] = d_gate
        out[f"dispatch_backward/{packed}"] = pyswitch.dispatch_backward(B, lay)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
def test_bit_identical_across_isas_and_threads(dtype):
    T, E, k, d = 2048, 16, 2, 64
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    with cpu_config(isa="scalar", threads=1):
        plan = pyswitch.route(logits, k=k, capacity_factor=1.0, group_size=512)
    assert plan.dropped > 0
    x = rng.standard_normal((T, d)).astype(np.float32).astype(dtype)
    dy = rng.standard_normal((T, d)).astype(np.float32).astype(dtype)
    g = np.array(plan.gate)
    pad_rows = plan.num_experts * plan.num_groups * plan.capacity
    B = rng.standard_normal((pad_rows, d)).astype(np.float32).astype(dtype)
    buffers = {
        False: B.reshape(plan.num_experts, -1, d),
        True: B[: T * k - plan.dropped],
    }
    results = {}
    for isa, threads in all_configs():
        with cpu_config(isa=isa, threads=threads):
            results[(isa, threads)] = run_all(plan, x, buffers, g, dy)
    base_key = ("scalar", 1)
    base = results[base_key]
    for key, res in results.items():
        for name, arr in res.items():
            assert_bits_equal(arr, base[name], f"{name} on {key} vs {base_key}")


# ---------------------------------------------------------------------------------------------
# Memory: no one-hot (T, E, C) tensor
# ---------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = r"""
import json, resource
import numpy as np
import pyswitch

T, E, d, k = 2**18, 256, 8, 1
rng = np.random.default_rng(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
logits = rng.standard_normal((T, E), dtype=np.float32)
x = rng.standard_normal((T, d), dtype=np.float32)
plan = pyswitch.route(logits, k=k, capacity_factor=1.25)
layout = pyswitch.dispatch_layout(plan)
buf = pyswitch.dispatch(x, layout)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps(dict(before_kib=before, after_kib=after, capacity=int(plan.capacity),
                      rows=int(layout.total_rows), dropped=int(plan.dropped),
                      buffer_shape=list(buf.shape))))
"""


def test_dispatch_memory_is_linear_not_one_hot():
    T, E, d, k = 2**18, 256, 8, 1
    # The child must import the same pyswitch as this process: put its parent directory first,
    # and run from an empty directory so that `python -c` (which puts the working directory on
    # sys.path) cannot pick up an unbuilt source tree instead.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(pyswitch.__file__)))
    env = dict(os.environ, PYTHONPATH=package_parent)
    with tempfile.TemporaryDirectory() as empty_dir:
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT],
            env=env,
            cwd=empty_dir,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    info = json.loads(done.stdout.strip().splitlines()[-1])
    C = info["capacity"]
    rows = info["rows"]
    assert C == ref.capacity(T, E, k, 1.25, 4, "floor") == 1280
    assert rows == E * C and info["buffer_shape"] == [E, C, d]
    extra = (info["after_kib"] - info["before_kib"]) * 1024
    analytic = T * E * 4 + T * k * (4 + 4 + 4) + T * k * 8 + rows * 4 + rows * d * 4 + T * d * 4
    bound = 3 * analytic + 64 * 2**20
    one_hot = T * E * C * 4
    msg = (
        f"extra peak {extra / 2**20:.1f} MiB, analytic {analytic / 2**20:.1f} MiB, "
        f"bound {bound / 2**20:.1f} MiB, one-hot {one_hot / 2**30:.1f} GiB; {info}"
    )
    print(msg)
    assert extra <= bound, msg
    assert extra * 100 < one_hot, msg


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _small_plan():
    logits = (np.arange(8 * 4, dtype=np.float32).reshape(8, 4) % 5) / 4
    return pyswitch.route(logits, k=2, capacity_factor=0.5, min_capacity=1)


_PLAN = _small_plan()  # T=8, E=4, k=2
_PAD = pyswitch.dispatch_layout(_PLAN)
_PACK = pyswitch.dispatch_layout(_PLAN, packed=True)
_T, _K, _D = 8, 2, 3
_PAD_SHAPE = (4, _PLAN.num_groups * _PLAN.capacity, _D)
_PACK_SHAPE = (int(_PACK.total_rows), _D)


def z(shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


def _c(fn, *args):
    return lambda: fn(*args)


BAD_CASES = [
    Bad(
        "dispatch float64 x",
        _c(pyswitch.dispatch, z((_T, _D), np.float64), _PAD),
        TypeError,
        ("x", "float64"),
    ),
    Bad(
        "dispatch int32 x",
        _c(pyswitch.dispatch, z((_T, _D), np.int32), _PAD),
        TypeError,
        ("x", "int32"),
    ),
    Bad(
        "dispatch float16 x",
        _c(pyswitch.dispatch, z((_T, _D), np.float16), _PACK),
        TypeError,
        ("x", "float16"),
    ),
    Bad(
        "dispatch x wrong T",
        _c(pyswitch.dispatch, z((_T + 1, _D)), _PAD),
        ValueError,
        ("x must have shape", "(9, 3)"),
    ),
    Bad(
        "dispatch 1-D x",
        _c(pyswitch.dispatch, z((_T,)), _PAD),
        ValueError,
        ("x must have shape",),
    ),
    Bad(
        "dispatch 3-D x",
        _c(pyswitch.dispatch, z((_T, 1, _D)), _PACK),
        ValueError,
        ("x must have shape",),
    ),
    Bad(
        "dispatch d_model=0",
        _c(pyswitch.dispatch, z((_T, 0)), _PAD),
        ValueError,
        ("x must have shape", "(8, 0)"),
    ),
    Bad(
        "dispatch layout not a layout",
        _c(pyswitch.dispatch, z((_T, _D)), _PLAN),
        TypeError,
        ("dispatch",),
    ),
    Bad(
        "dispatch_layout of not a plan",
        lambda: pyswitch.dispatch_layout(z((_T, 4))),
        TypeError,
        ("plan",),
    ),
    Bad(
        "combine int32 gate",
        _c(pyswitch.combine, z(_PAD_SHAPE), z((_T, _K), np.int32), _PAD),
        TypeError,
        ("gate", "int32"),
    ),
    Bad(
        "combine float64 gate",
        _c(pyswitch.combine, z(_PAD_SHAPE), z((_T, _K), np.float64), _PAD),
        TypeError,
        ("gate", "float64"),
    ),
    Bad(
        "combine bfloat16 gate",
        _c(pyswitch.combine, z(_PAD_SHAPE, BF16), z((_T, _K), BF16), _PAD),
        TypeError,
        ("gate", "bfloat16"),
    ),
    Bad(
        "combine gate wrong k",
        _c(pyswitch.combine, z(_PAD_SHAPE), z((_T, _K + 1)), _PAD),
        ValueError,
        ("gate must have shape", "(8, 3)"),
    ),
    Bad(
        "combine gate wrong T",
        _c(pyswitch.combine, z(_PACK_SHAPE), z((_T - 1, _K)), _PACK),
        ValueError,
        ("gate must have shape", "(7, 2)"),
    ),
    Bad(
        "combine float64 expert_out",
        _c(pyswitch.combine, z(_PAD_SHAPE, np.float64), z((_T, _K)), _PAD),
        TypeError,
        ("expert_out", "float64"),
    ),
    Bad(
        "combine packed buffer to padded layout",
        _c(pyswitch.combine, z(_PACK_SHAPE), z((_T, _K)), _PAD),
        ValueError,
        ("expert_out must have shape",),
    ),
    Bad(
        "combine padded buffer to packed layout",
        _c(pyswitch.combine, z(_PAD_SHAPE), z((_T, _K)), _PACK),
        ValueError,
        ("expert_out must have shape",),
    ),
    Bad(
        "combine wrong number of experts",
        _c(pyswitch.combine, z((5,) + _PAD_SHAPE[1:]), z((_T, _K)), _PAD),
        ValueError,
        ("expert_out must have shape",),
    ),
    Bad(
        "combine packed buffer one row short",
        _c(pyswitch.combine, z((_PACK_SHAPE[0] - 1, _D)), z((_T, _K)), _PACK),
        ValueError,
        ("expert_out must have shape",),
    ),
    Bad(
        "combine_backward mixed dtypes",
        _c(pyswitch.combine_backward, z((_T, _D), BF16), z(_PAD_SHAPE), z((_T, _K)), _PAD),
        TypeError,
        ("dy", "bfloat16"),
    ),
    Bad(
        "combine_backward mixed dtypes (bf16 buffer)",
        _c(pyswitch.combine_backward, z((_T, _D)), z(_PACK_SHAPE, BF16), z((_T, _K)), _PACK),
        TypeError,
        ("dy", "float32"),
    ),
    Bad(
        "combine_backward float64 dy",
        _c(pyswitch.combine_backward, z((_T, _D), np.float64), z(_PAD_SHAPE), z((_T, _K)), _PAD),
        TypeError,
        ("dy", "float64"),
    ),
    Bad(
        "combine_backward dy wrong d_model",
        _c(pyswitch.combine_backward, z((_T, _D + 1)), z(_PAD_SHAPE), z((_T, _K)), _PAD),
        ValueError,
        ("dy must have shape", "(8, 3)"),
    ),
    Bad(
        "combine_backward dy wrong T",
        _c(pyswitch.combine_backward, z((_T * 2, _D)), z(_PACK_SHAPE), z((_T, _K)), _PACK),
        ValueError,
        ("dy must have shape", "(16, 3)"),
    ),
    Bad(
        "combine_backward gate wrong shape",
        _c(pyswitch.combine_backward, z((_T, _D)), z(_PAD_SHAPE), z((_K, _T)), _PAD),
        ValueError,
        ("gate must have shape", "(2, 8)"),
    ),
    Bad(
        "combine_backward int gate",
        _c(pyswitch.combine_backward, z((_T, _D)), z(_PAD_SHAPE), z((_T, _K), np.int64), _PAD),
        TypeError,
        ("gate", "int64"),
    ),
    Bad(
        "combine_backward expert_out wrong shape",
        _c(pyswitch.combine_backward, z((_T, _D)), z((_T, _D)), z((_T, _K)), _PAD),
        ValueError,
        ("expert_out must have shape",),
    ),
    Bad(
        "dispatch_backward wrong shape",
        _c(pyswitch.dispatch_backward, z(_PAD_SHAPE[:2]), _PAD),
        ValueError,
        ("d_buffer must have shape",),
    ),
    Bad(
        "dispatch_backward float16",
        _c(pyswitch.dispatch_backward, z(_PACK_SHAPE, np.float16), _PACK),
        TypeError,
        ("d_buffer", "float16"),
    ),
    Bad(
        "dispatch_backward d_model=0",
        _c(pyswitch.dispatch_backward, z(_PAD_SHAPE[:2] + (0,)), _PAD),
        ValueError,
        ("d_buffer must have shape",),
    ),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=[c.id for c in BAD_CASES])
def test_bad_input_raises(case):
    assert_raises_case(case)


def test_bad_input_table_is_large_enough():
    assert len(BAD_CASES) >= 10


def test_bad_inputs_do_not_crash_the_interpreter():
    """Run every row in a child process: a segfault or abort there is a failure here."""
    run_cases_in_child("test_dispatch", "BAD_CASES")
