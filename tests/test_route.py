# Property tests of pyswitch.route / pyswitch.route_expert_choice against the float64 reference.
# Routing only: the Router layer's gradients are in test_router_grad.py, bad inputs elsewhere.
"""Routing properties (SPEC section 1).

Logits are drawn on a coarse grid (multiples of 1/8 in [-4, 4]) so that ties are exact in both
float32 (implementation) and float64 (reference) and non-ties are well separated.  Where routing
compares probabilities *across tokens* (batch-prioritized order, expert choice), rows whose keys
agree to 1e-5 without being identical are replaced by copies (see
``reference.copy_rows_to_remove_near_ties``): those ties become exact instead of being decided by
float rounding.

Tolerances: integer outputs must be equal.  Gates are float32 probabilities: abs 1e-6.  Losses are
float32 sums whose magnitude reaches E (aux) or ~50 (z), so abs 1e-6 plus rel 4e-6
(a few float32 ulps accumulated over <= 64 tokens).
"""

import struct

import numpy as np
import pytest
import reference as ref
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from isa_utils import SUPPORTED_ISAS, all_configs, cpu_config

import pyswitch

GATE_ATOL = 1e-6
LOSS_ATOL = 1e-6
LOSS_RTOL = 4e-6
GRID = 8  # logits are integers / GRID
GRID_MAX = 32  # |integer| <= 32, i.e. logits in [-4, 4]
# Dyadic factors: capacity_factor * k * S / E is then computed exactly in any precision.
CAPACITY_FACTORS = [None, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]
PRIORITIES = ["position", "batch_prioritized"]

isa_param = pytest.mark.parametrize("isa", SUPPORTED_ISAS)


# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def grid_logits(draw, T, E, distinct_in_row=False, alphabet=None):
    """(T, E) float32 logits on the 1/8 grid; optionally distinct values within each row."""
    if distinct_in_row:
        rows = draw(
            st.lists(
                st.lists(st.integers(-GRID_MAX, GRID_MAX), min_size=E, max_size=E, unique=True),
                min_size=T,
                max_size=T,
            )
        )
        ints = np.array(rows, dtype=np.int64).reshape(T, E)
    else:
        elements = (
            st.sampled_from(alphabet) if alphabet is not None else st.integers(-GRID_MAX, GRID_MAX)
        )
        ints = draw(arrays(np.int64, (T, E), elements=elements))
    return (ints / GRID).astype(np.float32)


def remove_near_ties(logits, priority):
    if priority != "batch_prioritized":
        return logits
    return ref.copy_rows_to_remove_near_ties(logits, ref.top1_prob(logits))


@st.composite
def route_cases(
    draw,
    max_groups=4,
    max_S=16,
    max_E=10,
    max_k=4,
    priorities=tuple(PRIORITIES),
    capacity_factors=tuple(CAPACITY_FACTORS),
    distinct_in_row=False,
    min_groups=1,
):
    """(logits, kwargs) for pyswitch.route, covering groups, k, capacity and priority."""
    E = draw(st.integers(1, max_E))
    k = draw(st.integers(1, min(E, max_k)))
    G = draw(st.integers(min_groups, max_groups))
    S = draw(st.integers(1, max_S))
    T = G * S
    priority = draw(st.sampled_from(priorities))
    logits = draw(grid_logits(T, E, distinct_in_row=distinct_in_row))
    logits = remove_near_ties(logits, priority)
    kwargs = dict(
        k=k,
        capacity_factor=draw(st.sampled_from(capacity_factors)),
        min_capacity=draw(st.integers(0, 5)),
        group_size=S if (G > 1 or draw(st.booleans())) else None,
        priority=priority,
        capacity_rounding=draw(st.sampled_from(["floor", "ceil"])),
        normalize_gates=draw(st.booleans()) if k > 1 else False,
    )
    return logits, kwargs


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def losses_close(actual, expected):
    return abs(float(actual) - expected) <= LOSS_ATOL + LOSS_RTOL * abs(expected)


def check_plan_invariants(plan, T, E, k):
    """Structural properties every plan must have, whatever the input."""
    assert plan.expert_index.dtype == np.int32 and plan.expert_index.shape == (T, k)
    assert plan.gate.dtype == np.float32 and plan.gate.shape == (T, k)
    assert plan.slot.dtype == np.int32 and plan.slot.shape == (T, k)
    assert plan.tokens_per_expert.dtype == np.int64 and plan.tokens_per_expert.shape == (E,)
    assert int(plan.num_experts) == E and int(plan.k) == k
    G, S, C = int(plan.num_groups), int(plan.group_size), int(plan.capacity)
    assert G * S == T

    ei, slot, gate = plan.expert_index, plan.slot, plan.gate
    assert ((ei >= 0) & (ei < E)).all(), "expert index outside [0, E)"
    for t in range(T):
        assert len(set(ei[t].tolist())) == k, f"token {t} picked an expert twice: {ei[t]}"
    kept = slot >= 0
    assert (slot >= -1).all()
    assert (gate[~kept] == 0.0).all(), "dropped assignment with a non-zero gate"
    assert (gate[kept] > 0.0).all() and (gate <= 1.0).all()
    assert int(plan.dropped) == int((~kept).sum())
    assert int(kept.sum()) + int(plan.dropped) == T * k
    assert int(plan.tokens_per_expert.sum()) == T * k
    np.testing.assert_array_equal(plan.tokens_per_expert, np.bincount(ei.ravel(), minlength=E))
    for g in range(G):
        rows = slice(g * S, (g + 1) * S)
        for e in range(E):
            mine = (ei[rows] == e) & kept[rows]
            got = np.sort(slot[rows][mine])
            n = got.size
            assert n <= C, f"group {g} expert {e}: {n} kept > capacity {C}"
            np.testing.assert_array_equal(
                got, g * C + np.arange(n), err_msg=f"slots of group {g}, expert {e}"
            )


def check_plan_matches_reference(plan, expected):
    np.testing.assert_array_equal(plan.expert_index, expected.expert_index)
    np.testing.assert_array_equal(plan.slot, expected.slot)
    assert int(plan.capacity) == expected.capacity
    assert int(plan.dropped) == expected.dropped
    np.testing.assert_array_equal(plan.tokens_per_expert, expected.tokens_per_expert)
    np.testing.assert_allclose(plan.gate, expected.gate, rtol=0, atol=GATE_ATOL)
    assert losses_close(plan.aux_loss, expected.aux_loss), (plan.aux_loss, expected.aux_loss)
    assert losses_close(plan.z_loss, expected.z_loss), (plan.z_loss, expected.z_loss)
    assert int(plan.num_groups) == expected.num_groups
    assert int(plan.group_size) == expected.group_size


def float_bits(x):
    return struct.pack("<d", float(x))


def plan_fingerprint(plan):
    """Everything a plan holds, as exact bytes (for bit-identity comparisons)."""
    return (
        plan.expert_index.tobytes(),
        plan.gate.view(np.uint32).tobytes(),
        plan.slot.tobytes(),
        int(plan.capacity),
        plan.tokens_per_expert.tobytes(),
        int(plan.dropped),
        float_bits(plan.aux_loss),
        float_bits(plan.z_loss),
        int(plan.num_groups),
        int(plan.group_size),
    )


def ec_fingerprint(plan):
    return (
        plan.token_index.tobytes(),
        plan.gate.view(np.uint32).tobytes(),
        int(plan.capacity),
        plan.experts_per_token.tobytes(),
        float_bits(plan.z_loss),
        int(plan.num_groups),
        int(plan.group_size),
    )


def assert_same_on_every_config(fn, fingerprint):
    """fn() under every (isa, threads) must equal fn() under (scalar, 1), bit for bit."""
    results = {}
    for isa, threads in all_configs():
        with cpu_config(isa=isa, threads=threads):
            results[(isa, threads)] = fingerprint(fn())
    oracle = results[("scalar", 1)]
    for cfg, got in results.items():
        if got != oracle:
            diff = [i for i, (a, b) in enumerate(zip(got, oracle)) if a != b]
            raise AssertionError(f"{cfg} differs from ('scalar', 1) in fingerprint fields {diff}")


# ---------------------------------------------------------------------------------------------
# Tokens choose experts: reference, invariants, bit identity
# ---------------------------------------------------------------------------------------------


@isa_param
@given(case=route_cases())
def test_route_matches_reference(isa, case):
    logits, kwargs = case
    T, E = logits.shape
    before = logits.copy()
    with cpu_config(isa=isa):
        plan = pyswitch.route(logits, **kwargs)
    np.testing.assert_array_equal(logits, before)  # input untouched
    check_plan_invariants(plan, T, E, kwargs["k"])
    check_plan_matches_reference(plan, ref.route(logits, **kwargs))


@isa_param
@given(data=st.data())
def test_route_matches_reference_arbitrary_float_logits(isa, data):
    """Position priority only depends on exact logit comparisons: any finite float32 works."""
    E = data.draw(st.integers(1, 10))
    T = data.draw(st.integers(1, 48))
    k = data.draw(st.integers(1, min(E, 3)))
    logits = data.draw(
        arrays(np.float32, (T, E), elements=st.floats(-30, 30, width=32, allow_subnormal=True))
    )
    kwargs = dict(
        k=k,
        capacity_factor=data.draw(st.sampled_from(CAPACITY_FACTORS)),
        min_capacity=data.draw(st.integers(0, 4)),
    )
    with cpu_config(isa=isa):
        plan = pyswitch.route(logits, **kwargs)
    check_plan_invariants(plan, T, E, k)
    check_plan_matches_reference(plan, ref.route(logits, **kwargs))


@given(case=route_cases())
def test_route_bit_identical_across_isas_and_threads(case):
    logits, kwargs = case
    assert_same_on_every_config(lambda kw=kwargs: pyswitch.route(logits, **kw), plan_fingerprint)


@given(data=st.data())
def test_any_finite_logits_give_a_valid_plan(data):
    """Extreme magnitudes (up to FLT_MAX, subnormals): indices stay in range on every ISA."""
    E = data.draw(st.integers(1, 8))
    T = data.draw(st.integers(1, 16))
    k = data.draw(st.integers(1, min(E, 3)))
    logits = data.draw(
        arrays(
            np.float32, (T, E), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)
        )
    )
    kwargs = dict(
        k=k,
        capacity_factor=data.draw(st.sampled_from(CAPACITY_FACTORS)),
        min_capacity=1,
        priority=data.draw(st.sampled_from(PRIORITIES)),
        normalize_gates=k > 1,
    )

    def run():
        plan = pyswitch.route(logits, **kwargs)
        ei = plan.expert_index
        assert ((ei >= 0) & (ei < E)).all()
        assert all(len(set(row.tolist())) == k for row in ei)
        assert not np.isnan(plan.gate).any() and ((plan.gate >= 0) & (plan.gate <= 1)).all()
        assert (plan.gate[plan.slot < 0] == 0).all()
        np.testing.assert_array_equal(plan.tokens_per_expert, np.bincount(ei.ravel(), minlength=E))
        # Top-k on the logits themselves is exact whatever the magnitudes.
        for t in range(T):
            want = np.argsort(-logits[t].astype(np.float64), kind="stable")[:k]
            np.testing.assert_array_equal(ei[t], want)
        return plan

    assert_same_on_every_config(run, plan_fingerprint)
    ec = pyswitch.route_expert_choice(logits)
    assert ((ec.token_index >= 0) & (ec.token_index < T)).all()
    assert not np.isnan(ec.gate).any()


@pytest.mark.parametrize("priority", PRIORITIES)
@pytest.mark.parametrize("k", [1, 2])
def test_route_bit_identical_large(priority, k):
    """Big enough for the thread pool and the SIMD main loops to engage; arbitrary floats."""
    rng = np.random.default_rng(1234 + k)
    logits = (rng.standard_normal((4096, 67)) * 3).astype(np.float32)
    for group_size in (None, 512):
        kwargs = dict(k=k, group_size=group_size, priority=priority, normalize_gates=k > 1)
        assert_same_on_every_config(
            lambda kw=kwargs: pyswitch.route(logits, **kw), plan_fingerprint
        )
    plan = pyswitch.route(logits, k=k, group_size=512)
    check_plan_invariants(plan, 4096, 67, k)


# ---------------------------------------------------------------------------------------------
# Tie-breaking and priority orders
# ---------------------------------------------------------------------------------------------


@isa_param
@given(data=st.data())
def test_topk_ties_go_to_lowest_expert_index(isa, data):
    E = data.draw(st.integers(1, 12))
    T = data.draw(st.integers(1, 24))
    k = data.draw(st.integers(1, E))
    # Two or three distinct values: most rows have ties at the top-k boundary.
    alphabet = data.draw(st.sampled_from([[0], [0, 1], [-3, 2, 2, 5], [-32, 32]]))
    logits = data.draw(grid_logits(T, E, alphabet=alphabet))
    with cpu_config(isa=isa):
        plan = pyswitch.route(logits, k=k, capacity_factor=None)
    for t in range(T):
        expected = np.argsort(-logits[t].astype(np.float64), kind="stable")[:k]
        np.testing.assert_array_equal(plan.expert_index[t], expected, err_msg=f"row {t}")


def test_topk_tie_examples(isa):
    logits = np.array([[1, 3, 3, 0], [2, 2, 2, 2], [0, 0, 5, 5], [-1, -1, -1, 7]], dtype=np.float32)
    plan = pyswitch.route(logits, k=3, capacity_factor=None)
    np.testing.assert_array_equal(plan.expert_index, [[1, 2, 0], [0, 1, 2], [2, 3, 0], [3, 0, 1]])
    # -0.0 and +0.0 are equal logits: a tie, so the lower index wins either way.
    signed_zeros = np.array([[-0.0, 0.0, -1], [0.0, -0.0, -1]], dtype=np.float32)
    plan = pyswitch.route(signed_zeros, k=1, capacity_factor=None)
    np.testing.assert_array_equal(plan.expert_index, [[0], [0]])


def test_position_priority_example(isa):
    # k=2, E=2, 3 tokens; capacity 2.  Token order of first choices: t0->0, t1->0, t2->1;
    # second choices: t0->1, t1->1, t2->0.  Expert 0: t0 (slot 0), t1 (1), t2's second choice
    # dropped.  Expert 1: t2 first choice (slot 0) beats t0's second choice (slot 1); t1 dropped.
    logits = np.array([[2, 1], [3, 0], [0, 4]], dtype=np.float32)
    plan = pyswitch.route(logits, k=2, capacity_factor=0.5, min_capacity=2)
    assert int(plan.capacity) == 2
    np.testing.assert_array_equal(plan.expert_index, [[0, 1], [0, 1], [1, 0]])
    np.testing.assert_array_equal(plan.slot, [[0, 1], [1, -1], [0, -1]])
    assert int(plan.dropped) == 2
    assert plan.gate[1, 1] == 0.0 and plan.gate[2, 1] == 0.0
    np.testing.assert_array_equal(plan.tokens_per_expert, [3, 3])


def test_batch_prioritized_example(isa):
    # All 4 tokens pick expert 0 (k=1); capacity 2.  Top-1 probabilities: t2 > t0 > t3 > t1.
    logits = np.array([[2, 0], [0.5, 0], [4, 0], [1, 0]], dtype=np.float32)
    kw = dict(k=1, capacity_factor=1.0, min_capacity=0, group_size=None)
    pos = pyswitch.route(logits, priority="position", **kw)
    bp = pyswitch.route(logits, priority="batch_prioritized", **kw)
    assert int(pos.capacity) == int(bp.capacity) == 2
    np.testing.assert_array_equal(pos.slot[:, 0], [0, 1, -1, -1])
    np.testing.assert_array_equal(bp.slot[:, 0], [1, -1, 0, -1])
    # The order is per group: with two groups of two, each group keeps its better token first.
    bpg = pyswitch.route(
        logits, priority="batch_prioritized", k=1, capacity_factor=1.0, min_capacity=1, group_size=2
    )
    assert int(bpg.capacity) == 1
    np.testing.assert_array_equal(bpg.slot[:, 0], [0, -1, 1, -1])


def test_batch_prioritized_second_choices_after_all_first(isa):
    # k=2, E=3, capacity 1.  t1 is more confident (top-1 prob .95 vs .71).  First choices:
    # t0->0, t1->2, both kept.  Second choices t0->1 and t1->1 compete for expert 1's slot:
    # position order gives it to t0, batch-prioritized order to t1.
    logits = np.array([[3, 2, 0], [-4, 1, 4]], dtype=np.float32)
    kw = dict(k=2, capacity_factor=0.25, min_capacity=1)
    pos = pyswitch.route(logits, priority="position", **kw)
    bp = pyswitch.route(logits, priority="batch_prioritized", **kw)
    assert int(pos.capacity) == int(bp.capacity) == 1
    np.testing.assert_array_equal(pos.expert_index, [[0, 1], [2, 1]])
    np.testing.assert_array_equal(bp.expert_index, [[0, 1], [2, 1]])
    np.testing.assert_array_equal(pos.slot, [[0, 0], [0, -1]])
    np.testing.assert_array_equal(bp.slot, [[0, -1], [0, 0]])
    assert bp.gate[0, 1] == 0.0 and pos.gate[1, 1] == 0.0


def test_batch_prioritized_uses_raw_top1_probability_not_normalized_gate(isa):
    # Token 0: raw top-1 prob .531, normalized over its k=2 gates .531.
    # Token 1: raw top-1 prob .475, normalized .731.  SPEC orders by the top-1 *probability*:
    # token 0 first, so it gets expert 0's only slot.
    logits = np.array([[1, 0.875, -9, -9], [1, 0, 0, 0]], dtype=np.float32)
    kw = dict(
        k=2,
        capacity_factor=0.25,
        min_capacity=1,
        priority="batch_prioritized",
        normalize_gates=True,
    )
    plan = pyswitch.route(logits, **kw)
    assert int(plan.capacity) == 1
    np.testing.assert_array_equal(plan.expert_index, [[0, 1], [0, 1]])
    np.testing.assert_array_equal(plan.slot, [[0, 0], [-1, -1]])
    expected = ref.route(logits, **kw)
    np.testing.assert_allclose(plan.gate, expected.gate, atol=GATE_ATOL)


@isa_param
@given(data=st.data())
def test_batch_prioritized_exact_ties_by_position(isa, data):
    """A few well-separated row templates; tokens sharing a template tie exactly."""
    E = data.draw(st.integers(2, 6))
    n_templates = data.draw(st.integers(1, 4))
    templates = data.draw(grid_logits(n_templates, E))
    templates = ref.copy_rows_to_remove_near_ties(templates, ref.top1_prob(templates))
    S = data.draw(st.integers(1, 16))
    G = data.draw(st.integers(1, 3))
    which = data.draw(arrays(np.int64, (G * S,), elements=st.integers(0, n_templates - 1)))
    logits = np.ascontiguousarray(templates[which])
    k = data.draw(st.integers(1, min(E, 2)))
    kwargs = dict(
        k=k,
        capacity_factor=data.draw(st.sampled_from(CAPACITY_FACTORS[1:])),
        min_capacity=data.draw(st.integers(0, 3)),
        group_size=S,
        priority="batch_prioritized",
    )
    with cpu_config(isa=isa):
        plan = pyswitch.route(logits, **kwargs)
    check_plan_invariants(plan, G * S, E, k)
    check_plan_matches_reference(plan, ref.route(logits, **kwargs))


@isa_param
@given(case=route_cases(max_k=1))
def test_priority_keeps_the_first_c_tokens_in_priority_order(isa, case):
    """k=1, reference-free: per group and expert, kept tokens = first C in priority order."""
    logits, kwargs = case
    T, E = logits.shape
    with cpu_config(isa=isa):
        plan = pyswitch.route(logits, **kwargs)
    S, C = int(plan.group_size), int(plan.capacity)
    p1 = ref.top1_prob(logits)
    for g in range(T // S):
        tokens = list(range(g * S, (g + 1) * S))
        if kwargs["priority"] == "batch_prioritized":
            tokens.sort(key=lambda t: (-p1[t], t))
        for e in range(E):
            mine = [t for t in tokens if plan.expert_index[t, 0] == e]
            for rank, t in enumerate(mine):
                want = g * C + rank if rank < C else -1
                assert plan.slot[t, 0] == want, (g, e, t, rank)


# ---------------------------------------------------------------------------------------------
# Groups, permutations
# ---------------------------------------------------------------------------------------------


@isa_param
@given(case=route_cases(min_groups=2))
def test_groups_are_independent(isa, case):
    logits, kwargs = case
    S = kwargs["group_size"]
    T, E = logits.shape
    G = T // S
    with cpu_config(isa=isa):
        whole = pyswitch.route(logits, **kwargs)
        parts = [
            pyswitch.route(
                np.ascontiguousarray(logits[g * S : (g + 1) * S]), **{**kwargs, "group_size": None}
            )
            for g in range(G)
        ]
    C = int(whole.capacity)
    if kwargs["capacity_factor"] is None:
        assert C == max(int(p.capacity) for p in parts)
    else:
        assert all(int(p.capacity) == C for p in parts)
    for g, part in enumerate(parts):
        rows = slice(g * S, (g + 1) * S)
        np.testing.assert_array_equal(whole.expert_index[rows], part.expert_index)
        # Per-token softmax does not depend on other tokens: the gates are the same bits.
        np.testing.assert_array_equal(whole.gate[rows], part.gate)
        np.testing.assert_array_equal(
            whole.slot[rows], np.where(part.slot >= 0, part.slot + g * C, -1)
        )
    np.testing.assert_array_equal(whole.tokens_per_expert, sum(p.tokens_per_expert for p in parts))
    assert int(whole.dropped) == sum(int(p.dropped) for p in parts)
    assert int(whole.num_groups) == G and int(whole.group_size) == S
    assert losses_close(whole.aux_loss, float(np.mean([p.aux_loss for p in parts])))
    assert losses_close(whole.z_loss, float(np.mean([p.z_loss for p in parts])))


@isa_param
@given(case=route_cases(distinct_in_row=True), data=st.data())
def test_permuting_experts_permutes_expert_index(isa, case, data):
    logits, kwargs = case
    T, E = logits.shape
    perm = np.array(data.draw(st.permutations(range(E))), dtype=np.int64)
    inv = np.argsort(perm)
    permuted = np.ascontiguousarray(logits[:, perm])  # new expert j == old expert perm[j]
    with cpu_config(isa=isa):
        a = pyswitch.route(logits, **kwargs)
        b = pyswitch.route(permuted, **kwargs)
    np.testing.assert_array_equal(b.expert_index, inv[a.expert_index])
    np.testing.assert_array_equal(b.slot, a.slot)
    np.testing.assert_allclose(b.gate, a.gate, rtol=0, atol=GATE_ATOL)
    np.testing.assert_array_equal(b.tokens_per_expert, a.tokens_per_expert[perm])
    assert int(b.dropped) == int(a.dropped) and int(b.capacity) == int(a.capacity)
    assert losses_close(b.aux_loss, float(a.aux_loss))
    assert losses_close(b.z_loss, float(a.z_loss))


@isa_param
@given(case=route_cases(priorities=("position",)), data=st.data())
def test_permuting_tokens_within_groups(isa, case, data):
    logits, kwargs = case
    T, E = logits.shape
    S = kwargs["group_size"] or T
    perm = np.concatenate(
        [
            g * S + np.array(data.draw(st.permutations(range(S))), dtype=np.int64)
            for g in range(T // S)
        ]
    )
    permuted = np.ascontiguousarray(logits[perm])  # new token i == old token perm[i]
    with cpu_config(isa=isa):
        a = pyswitch.route(logits, **kwargs)
        b = pyswitch.route(permuted, **kwargs)
    np.testing.assert_array_equal(b.expert_index, a.expert_index[perm])
    np.testing.assert_array_equal(b.tokens_per_expert, a.tokens_per_expert)
    assert int(b.capacity) == int(a.capacity)
    both = (a.slot[perm] >= 0) & (b.slot >= 0)
    np.testing.assert_array_equal(b.gate[both], a.gate[perm][both])
    # Which assignments are kept follows the new token order, exactly as the reference says.
    check_plan_matches_reference(b, ref.route(permuted, **kwargs))
    assert losses_close(b.aux_loss, float(a.aux_loss))
    assert losses_close(b.z_loss, float(a.z_loss))


# ---------------------------------------------------------------------------------------------
# Losses, dropless
# ---------------------------------------------------------------------------------------------


@isa_param
@given(
    E=st.sampled_from([1, 2, 4, 8, 16]),
    log_k=st.integers(0, 2),
    S=st.sampled_from([1, 2, 4, 8, 16, 32]),
    G=st.integers(1, 3),
    value=st.integers(-GRID_MAX, GRID_MAX),
    cf=st.sampled_from(CAPACITY_FACTORS),
    priority=st.sampled_from(PRIORITIES),
)
def test_uniform_probabilities_give_aux_loss_exactly_one(isa, E, log_k, S, G, value, cf, priority):
    """Uniform probs: aux = E * sum_i f_i / E = sum_i f_i = 1 whatever the assignment.

    With E, k, S powers of two every intermediate (1/E, counts/(S*k)) is exact in float32.
    """
    k = 2**log_k
    assume(k <= E)
    logits = np.full((G * S, E), value / GRID, dtype=np.float32)
    with cpu_config(isa=isa):
        plan = pyswitch.route(logits, k=k, capacity_factor=cf, group_size=S, priority=priority)
    assert float(plan.aux_loss) == 1.0
    np.testing.assert_array_equal(plan.expert_index, np.tile(np.arange(k), (G * S, 1)))


@isa_param
@given(
    E=st.integers(1, 12),
    k=st.integers(1, 3),
    reps=st.integers(1, 4),
    G=st.integers(1, 3),
    margin=st.integers(1, 24),
)
def test_balanced_cyclic_assignment_aux_loss_is_one(isa, E, k, reps, G, margin):
    """Token t prefers experts t, t+1, .. (mod E): f_i = 1/E and, by symmetry, P_i = 1/E."""
    assume(k <= E)
    S = E * reps
    base = np.zeros(E)
    base[:k] = (margin / GRID) * np.arange(k, 0, -1)  # distinct top-k, rest tied at 0
    group = np.stack([np.roll(base, t) for t in range(S)])
    logits = np.tile(group, (G, 1)).astype(np.float32)
    with cpu_config(isa=isa):
        plan = pyswitch.route(logits, k=k, capacity_factor=None, group_size=S)
    np.testing.assert_array_equal(plan.tokens_per_expert, np.full(E, G * reps * k))
    assert abs(float(plan.aux_loss) - 1.0) <= 1e-6


@isa_param
@given(case=route_cases(capacity_factors=(None,)))
def test_dropless_drops_nothing(isa, case):
    logits, kwargs = case
    T, E = logits.shape
    k = kwargs["k"]
    with cpu_config(isa=isa):
        plan = pyswitch.route(logits, **kwargs)
    S = kwargs["group_size"] or T
    assert int(plan.dropped) == 0 and (plan.slot >= 0).all()
    counts = np.stack(
        [
            np.bincount(plan.expert_index[g * S : (g + 1) * S].ravel(), minlength=E)
            for g in range(T // S)
        ]
    )
    assert int(plan.capacity) == int(counts.max())
    probs = ref.softmax(logits)
    raw = np.take_along_axis(probs, plan.expert_index.astype(np.int64), axis=1)
    if kwargs["normalize_gates"]:
        raw = raw / raw.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(plan.gate, raw, rtol=0, atol=GATE_ATOL)
    check_plan_invariants(plan, T, E, k)


@pytest.mark.parametrize(
    "S,E,k,cf,min_cap,rounding,expected",
    [
        (16, 4, 1, 1.25, 4, "floor", 5),
        (16, 4, 1, 1.25, 4, "ceil", 5),
        (10, 4, 1, 1.25, 0, "floor", 3),  # 3.125
        (10, 4, 1, 1.25, 0, "ceil", 4),
        (10, 4, 1, 1.25, 4, "floor", 4),  # min_capacity wins
        (3, 4, 1, 1.25, 4, "floor", 3),  # capped at S
        (64, 8, 2, 1.0, 0, "floor", 16),
        (64, 8, 2, 0.5, 0, "floor", 8),
        (7, 3, 2, 0.5, 0, "floor", 2),  # 2.333
        (7, 3, 2, 0.5, 0, "ceil", 3),
        (8, 16, 1, 1.0, 0, "floor", 0),  # everything dropped
    ],
)
def test_capacity_formula(S, E, k, cf, min_cap, rounding, expected):
    assert ref.capacity(S, E, k, cf, min_cap, rounding) == expected
    logits = np.zeros((S, E), dtype=np.float32)
    plan = pyswitch.route(
        logits, k=k, capacity_factor=cf, min_capacity=min_cap, capacity_rounding=rounding
    )
    assert int(plan.capacity) == expected
    check_plan_invariants(plan, S, E, k)


# ---------------------------------------------------------------------------------------------
# Memory layouts
# ---------------------------------------------------------------------------------------------


def strided_views(a):
    """Non-contiguous / negative-stride / misaligned views holding a (T, E) array's values."""
    T, E = a.shape
    views = {}
    wide = np.zeros((T, 2 * E), dtype=a.dtype)
    wide[:, ::2] = a
    views["column stride 2"] = wide[:, ::2]
    tall = np.zeros((2 * T, E), dtype=a.dtype)
    tall[::2] = a
    views["row stride 2"] = tall[::2]
    views["reversed rows"] = np.ascontiguousarray(a[::-1])[::-1]
    views["reversed columns"] = np.ascontiguousarray(a[:, ::-1])[:, ::-1]
    views["fortran order"] = np.asfortranarray(a)
    buf = np.zeros(a.size * 4 + 2, dtype=np.uint8)
    mis = np.ndarray(a.shape, dtype=a.dtype, buffer=buf, offset=2)
    mis[...] = a
    views["misaligned"] = mis
    for name, v in views.items():
        assert np.array_equal(v, a), name
    return views


@isa_param
@given(case=route_cases(max_groups=2, max_S=8))
def test_route_accepts_strided_views(isa, case):
    logits, kwargs = case
    with cpu_config(isa=isa):
        expected = plan_fingerprint(pyswitch.route(logits, **kwargs))
        for name, view in strided_views(logits).items():
            snapshot = view.copy()
            assert plan_fingerprint(pyswitch.route(view, **kwargs)) == expected, name
            np.testing.assert_array_equal(view, snapshot)


def test_route_negative_stride_view_of_other_data(isa):
    rng = np.random.default_rng(7)
    base = rng.integers(-32, 33, size=(12, 6)).astype(np.float32) / 8
    view = base[::-1, ::-1]
    assert view.strides[0] < 0 and view.strides[1] < 0
    a = pyswitch.route(view, k=2, capacity_factor=1.0, group_size=4)
    b = pyswitch.route(np.ascontiguousarray(view), k=2, capacity_factor=1.0, group_size=4)
    assert plan_fingerprint(a) == plan_fingerprint(b)


# ---------------------------------------------------------------------------------------------
# Expert choice
# ---------------------------------------------------------------------------------------------


@st.composite
def expert_choice_cases(draw, max_groups=3, max_S=16, max_E=8):
    E = draw(st.integers(1, max_E))
    G = draw(st.integers(1, max_groups))
    S = draw(st.integers(1, max_S))
    logits = draw(grid_logits(G * S, E))
    logits = ref.copy_rows_to_remove_near_ties(logits, ref.softmax(logits))
    kwargs = dict(
        capacity_factor=draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0, 4.0, 16.0])),
        group_size=S if (G > 1 or draw(st.booleans())) else None,
    )
    return logits, kwargs


def check_ec_invariants(plan, T, E):
    G, S, C = int(plan.num_groups), int(plan.group_size), int(plan.capacity)
    assert G * S == T and 1 <= C <= S
    assert plan.token_index.dtype == np.int32 and plan.token_index.shape == (E, G * C)
    assert plan.gate.dtype == np.float32 and plan.gate.shape == (E, G * C)
    assert plan.experts_per_token.dtype == np.int32 and plan.experts_per_token.shape == (T,)
    ti, gate = plan.token_index, plan.gate
    for e in range(E):
        for g in range(G):
            cols = slice(g * C, (g + 1) * C)
            toks, gs = ti[e, cols], gate[e, cols]
            assert ((toks >= g * S) & (toks < (g + 1) * S)).all(), (e, g, toks)
            assert len(set(toks.tolist())) == C
            # Probability descending, ties by lower token index.
            for c in range(C - 1):
                assert gs[c] > gs[c + 1] or (gs[c] == gs[c + 1] and toks[c] < toks[c + 1])
    assert ((gate > 0) & (gate <= 1)).all()
    np.testing.assert_array_equal(plan.experts_per_token, np.bincount(ti.ravel(), minlength=T))


@isa_param
@given(case=expert_choice_cases())
def test_expert_choice_matches_reference(isa, case):
    logits, kwargs = case
    T, E = logits.shape
    before = logits.copy()
    with cpu_config(isa=isa):
        plan = pyswitch.route_expert_choice(logits, **kwargs)
    np.testing.assert_array_equal(logits, before)
    check_ec_invariants(plan, T, E)
    expected = ref.route_expert_choice(logits, **kwargs)
    assert int(plan.capacity) == expected.capacity
    np.testing.assert_array_equal(plan.token_index, expected.token_index)
    np.testing.assert_allclose(plan.gate, expected.gate, rtol=0, atol=GATE_ATOL)
    np.testing.assert_array_equal(plan.experts_per_token, expected.experts_per_token)
    assert losses_close(plan.z_loss, expected.z_loss)
    assert int(plan.num_groups) == expected.num_groups
    assert int(plan.group_size) == expected.group_size


@given(case=expert_choice_cases())
def test_expert_choice_bit_identical_across_isas_and_threads(case):
    logits, kwargs = case
    assert_same_on_every_config(
        lambda: pyswitch.route_expert_choice(logits, **kwargs), ec_fingerprint
    )


def test_expert_choice_bit_identical_large():
    rng = np.random.default_rng(99)
    logits = (rng.standard_normal((4096, 64)) * 2).astype(np.float32)
    for group_size in (None, 1024):
        assert_same_on_every_config(
            lambda gs=group_size: pyswitch.route_expert_choice(logits, group_size=gs),
            ec_fingerprint,
        )


@isa_param
@given(case=expert_choice_cases(), data=st.data())
def test_expert_choice_groups_are_independent(isa, case, data):
    logits, kwargs = case
    T, E = logits.shape
    S = data.draw(st.sampled_from([s for s in range(1, T + 1) if T % s == 0]))
    G = T // S
    with cpu_config(isa=isa):
        whole = pyswitch.route_expert_choice(
            logits, capacity_factor=kwargs["capacity_factor"], group_size=S
        )
        parts = [
            pyswitch.route_expert_choice(
                np.ascontiguousarray(logits[g * S : (g + 1) * S]),
                capacity_factor=kwargs["capacity_factor"],
            )
            for g in range(G)
        ]
    C = int(whole.capacity)
    for g, part in enumerate(parts):
        assert int(part.capacity) == C
        cols = slice(g * C, (g + 1) * C)
        np.testing.assert_array_equal(whole.token_index[:, cols], part.token_index + g * S)
        np.testing.assert_array_equal(whole.gate[:, cols], part.gate)
    assert losses_close(whole.z_loss, float(np.mean([p.z_loss for p in parts])))


@pytest.mark.parametrize(
    "S,E,cf,expected",
    [
        (16, 4, 2.0, 8),
        (16, 4, 1.0, 4),
        (16, 4, 8.0, 16),
        (10, 4, 1.0, 2),
        (3, 8, 1.0, 1),
        (5, 1, 0.5, 2),
        (4, 2, 0.25, 1),
    ],
)
def test_expert_choice_capacity(S, E, cf, expected):
    assert ref.expert_choice_capacity(S, E, cf) == expected
    plan = pyswitch.route_expert_choice(np.zeros((S, E), np.float32), capacity_factor=cf)
    assert int(plan.capacity) == expected
    # All probabilities equal: every expert picks the lowest token indices.
    np.testing.assert_array_equal(plan.token_index, np.tile(np.arange(expected), (E, 1)))


def test_expert_choice_default_capacity_factor_and_example(isa):
    logits = np.array([[0, 1], [2, 0], [1, 1], [3, -1]], dtype=np.float32)
    plan = pyswitch.route_expert_choice(logits)  # capacity_factor=2.0 -> C = min(4, 4) = 4
    assert int(plan.capacity) == 4
    p = ref.softmax(logits)
    # expert 0: p[:,0] = .27, .88, .5, .98 -> tokens 3, 1, 2, 0
    np.testing.assert_array_equal(plan.token_index[0], [3, 1, 2, 0])
    np.testing.assert_array_equal(plan.token_index[1], [0, 2, 1, 3])
    np.testing.assert_allclose(plan.gate[0], p[[3, 1, 2, 0], 0], atol=GATE_ATOL)
    np.testing.assert_array_equal(plan.experts_per_token, [2, 2, 2, 2])
    half = pyswitch.route_expert_choice(logits, capacity_factor=0.5)  # C = 1
    np.testing.assert_array_equal(half.token_index, [[3], [0]])
    np.testing.assert_array_equal(half.experts_per_token, [1, 0, 0, 1])


@isa_param
@given(case=expert_choice_cases(max_groups=2, max_S=8))
def test_expert_choice_accepts_strided_views(isa, case):
    logits, kwargs = case
    with cpu_config(isa=isa):
        expected = ec_fingerprint(pyswitch.route_expert_choice(logits, **kwargs))
        for name, view in strided_views(logits).items():
            got = ec_fingerprint(pyswitch.route_expert_choice(view, **kwargs))
            assert got == expected, name
