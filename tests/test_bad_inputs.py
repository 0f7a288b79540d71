# Bad-input table for pyswitch.route / route_expert_choice / Router: exception type and message.
# Also checks that no bad input can crash the interpreter (the whole table runs in a child).
"""Every row: (id, call, exception type, message fragments).

The first fragment is checked with ``pytest.raises(match=...)``, the others must also appear in the
message; all are matched case-insensitively, and a fragment ending in a digit or ")" must not be
followed by another digit ("row 1" does not match "row 10").  Fragments are the argument's name
plus the received value, as DESIGN.md asks of messages.
"""

import math

import numpy as np
import pytest
from bad_input_utils import Case, assert_raises_case, fragment_pattern, run_cases_in_child

import pyswitch


def f32(*shape):
    return np.zeros(shape, dtype=np.float32)


def with_value(T, E, rows, value):
    a = np.arange(T * E, dtype=np.float32).reshape(T, E) / 10
    for r in rows:
        a[r, (r * 7) % E] = value
    return a


def route(logits, **kw):
    return lambda: pyswitch.route(logits, **kw)


def ec(logits, **kw):
    return lambda: pyswitch.route_expert_choice(logits, **kw)


ROUTE_CASES = [
    Case("3-D logits", route(f32(2, 3, 4)), ValueError, ("logits", "(2, 3, 4)")),
    Case("1-D logits", route(f32(4)), ValueError, ("logits",)),
    Case("0-D logits", route(f32()), ValueError, ("logits",)),
    Case("no tokens", route(f32(0, 4)), ValueError, ("logits", "(0, 4)")),
    Case("no experts", route(f32(3, 0)), ValueError, ("logits", "(3, 0)")),
    Case("k=0", route(f32(8, 4), k=0), ValueError, ("k", "0")),
    Case("k>E", route(f32(8, 4), k=5), ValueError, ("k", "5")),
    Case("k<0", route(f32(8, 4), k=-1), ValueError, ("k", "-1")),
    Case("group_size=0", route(f32(8, 4), group_size=0), ValueError, ("group_size", "0")),
    Case("group_size<0", route(f32(8, 4), group_size=-2), ValueError, ("group_size", "-2")),
    Case(
        "group_size not dividing T", route(f32(8, 4), group_size=3), ValueError, ("group_size", "3")
    ),
    Case("group_size > T", route(f32(8, 4), group_size=16), ValueError, ("group_size", "16")),
    Case(
        "capacity_factor=0",
        route(f32(8, 4), capacity_factor=0.0),
        ValueError,
        ("capacity_factor", "0"),
    ),
    Case(
        "capacity_factor<0",
        route(f32(8, 4), capacity_factor=-1.0),
        ValueError,
        ("capacity_factor", "-1"),
    ),
    Case(
        "capacity_factor=nan",
        route(f32(8, 4), capacity_factor=math.nan),
        ValueError,
        ("capacity_factor", "nan"),
    ),
    Case(
        "capacity_factor=inf",
        route(f32(8, 4), capacity_factor=math.inf),
        ValueError,
        ("capacity_factor", "inf"),
    ),
    Case("min_capacity<0", route(f32(8, 4), min_capacity=-1), ValueError, ("min_capacity", "-1")),
    Case(
        "unknown priority", route(f32(8, 4), priority="random"), ValueError, ("priority", "random")
    ),
    Case(
        "unknown capacity_rounding",
        route(f32(8, 4), capacity_rounding="round"),
        ValueError,
        ("capacity_rounding", "round"),
    ),
    Case(
        "normalize_gates with k=1",
        route(f32(8, 4), normalize_gates=True),
        ValueError,
        ("normalize_gates",),
    ),
    Case("nan in row 2", route(with_value(8, 4, [2], np.nan)), ValueError, ("row 2",)),
    Case("+inf in rows 5 and 1", route(with_value(8, 4, [5, 1], np.inf)), ValueError, ("row 1",)),
    Case("-inf in row 0", route(with_value(8, 4, [0], -np.inf)), ValueError, ("row 0",)),
    Case(
        "nan in row 10 of group 2",
        route(with_value(12, 4, [10], np.nan), group_size=4),
        ValueError,
        ("row 10",),
    ),
    Case("nan in last row, k=2", route(with_value(7, 3, [6], np.nan), k=2), ValueError, ("row 6",)),
    Case("float64 logits", route(np.zeros((8, 4))), TypeError, ("logits", "float64")),
    Case("int32 logits", route(np.zeros((8, 4), np.int32)), TypeError, ("logits", "int32")),
    Case("float16 logits", route(np.zeros((8, 4), np.float16)), TypeError, ("logits", "float16")),
    Case(
        "bfloat16 logits",
        route(np.zeros((8, 4), pyswitch.bfloat16)),
        TypeError,
        ("logits", "bfloat16"),
    ),
    Case("string logits", route("abc"), TypeError, ("logits",)),
    Case("None logits", route(None), TypeError, ("logits",)),
    Case("k as float", route(f32(8, 4), k=1.0), TypeError, ("k",)),
    Case("k as str", route(f32(8, 4), k="2"), TypeError, ("k",)),
    Case(
        "capacity_factor as str",
        route(f32(8, 4), capacity_factor="1.25"),
        TypeError,
        ("capacity_factor",),
    ),
    Case(
        "EC: capacity_factor=0",
        ec(f32(8, 4), capacity_factor=0.0),
        ValueError,
        ("capacity_factor", "0"),
    ),
    Case(
        "EC: capacity_factor=nan",
        ec(f32(8, 4), capacity_factor=math.nan),
        ValueError,
        ("capacity_factor", "nan"),
    ),
    Case(
        "EC: group_size not dividing T",
        ec(f32(8, 4), group_size=3),
        ValueError,
        ("group_size", "3"),
    ),
    Case("EC: 3-D logits", ec(f32(2, 3, 4)), ValueError, ("logits", "(2, 3, 4)")),
    Case("EC: no tokens", ec(f32(0, 4)), ValueError, ("logits", "(0, 4)")),
    Case("EC: float64 logits", ec(np.zeros((8, 4))), TypeError, ("logits", "float64")),
    Case("EC: inf in row 3", ec(with_value(8, 4, [3], np.inf)), ValueError, ("row 3",)),
]


def _router(**kw):
    return pyswitch.Router(4, 4, seed=0, **kw)


def _forward(x, **kw):
    def call():
        r = _router(**kw)
        return r.forward(x)

    return call


def _backward_before_forward():
    return _router().backward(np.zeros((8, 1), np.float32))


def _backward(d_gate, k=1):
    def call():
        r = _router(k=k)
        r.forward(np.ones((8, 4), np.float32))
        return r.backward(d_gate)

    return call


def _construct_and_forward(**kw):
    """Some arguments may be validated at construction or at the first forward: either is fine."""
    return _forward(np.ones((8, 4), np.float32), **kw)


ROUTER_CASES = [
    Case("Router d_model=0", lambda: pyswitch.Router(0, 4), ValueError, ("d_model", "0")),
    Case("Router d_model<0", lambda: pyswitch.Router(-3, 4), ValueError, ("d_model", "-3")),
    Case("Router num_experts=0", lambda: pyswitch.Router(4, 0), ValueError, ("num_experts", "0")),
    Case("Router num_experts<0", lambda: pyswitch.Router(4, -1), ValueError, ("num_experts", "-1")),
    Case(
        "Router dtype float16",
        lambda: pyswitch.Router(4, 4, dtype="float16"),
        ValueError,
        ("dtype", "float16"),
    ),
    Case("Router k>E", _construct_and_forward(k=5), ValueError, ("k", "5")),
    Case(
        "Router capacity_factor=0",
        _construct_and_forward(capacity_factor=0.0),
        ValueError,
        ("capacity_factor",),
    ),
    Case(
        "Router eval_capacity_factor<0",
        _construct_and_forward(eval_capacity_factor=-1.0),
        ValueError,
        ("capacity_factor",),
    ),
    Case(
        "Router jitter_eps<0", _construct_and_forward(jitter_eps=-0.1), ValueError, ("jitter_eps",)
    ),
    Case(
        "Router unknown priority", _construct_and_forward(priority="x"), ValueError, ("priority",)
    ),
    Case(
        "Router group_size not dividing T",
        _construct_and_forward(group_size=3),
        ValueError,
        ("group_size", "3"),
    ),
    Case("forward x wrong width", _forward(np.ones((3, 5), np.float32)), ValueError, ("(3, 5)",)),
    Case("forward x 1-D", _forward(np.ones(4, np.float32)), ValueError, ("x",)),
    Case("forward x 3-D", _forward(np.ones((2, 3, 4), np.float32)), ValueError, ("(2, 3, 4)",)),
    Case("forward x no tokens", _forward(np.ones((0, 4), np.float32)), ValueError, ("(0, 4)",)),
    Case("forward x int32", _forward(np.ones((8, 4), np.int32)), TypeError, ("int32",)),
    Case(
        "forward x with nan in row 5",
        _forward(with_value(8, 4, [5], np.nan)),
        ValueError,
        ("row 5",),
    ),
    Case("backward before forward", _backward_before_forward, pyswitch.Error, ("forward",)),
    Case(
        "backward d_gate too wide",
        _backward(np.zeros((8, 2), np.float32)),
        ValueError,
        ("d_gate", "(8, 2)"),
    ),
    Case(
        "backward d_gate too long",
        _backward(np.zeros((9, 1), np.float32)),
        ValueError,
        ("d_gate", "(9, 1)"),
    ),
    Case("backward d_gate 1-D", _backward(np.zeros(8, np.float32)), ValueError, ("d_gate",)),
    Case(
        "backward d_gate k=2 given (8, 1)",
        _backward(np.zeros((8, 1), np.float32), k=2),
        ValueError,
        ("d_gate", "(8, 1)"),
    ),
]

ALL_CASES = ROUTE_CASES + ROUTER_CASES


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_bad_input_raises(case):
    assert_raises_case(case)


def test_table_is_large_enough():
    assert len(ROUTE_CASES) >= 25


def test_bad_inputs_do_not_crash_the_interpreter():
    """Run every row in a child process: a segfault or abort there is a failure here."""
    run_cases_in_child("test_bad_inputs", "ALL_CASES")


def test_float64_router_input_is_rejected_or_cast():
    """Unspecified: a float64 x either raises TypeError or behaves like its float32 cast."""
    x = np.random.default_rng(0).standard_normal((8, 4))
    r = pyswitch.Router(4, 4, seed=0)
    try:
        plan = r.forward(x)
    except TypeError as e:
        assert "x" in str(e) or "float64" in str(e)
        return
    cast = pyswitch.Router(4, 4, seed=0).forward(x.astype(np.float32))
    np.testing.assert_array_equal(plan.expert_index, cast.expert_index)
    np.testing.assert_array_equal(plan.gate, cast.gate)


@pytest.mark.parametrize(
    "values",
    [
        np.array([[3.0e38, -3.0e38, 0.0], [-3.0e38, -3.0e38, -3.0e38], [1e-45, -1e-45, 0.0]]),
        np.array([[88.0, -104.0, 0.0], [-88.0, 88.0, 88.0], [1e30, 1e30 * (1 + 2**-20), 0]]),
        np.full((3, 3), 3.4028235e38),
    ],
    ids=["flt-max-range", "exp-overflow-range", "all-flt-max"],
)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_extreme_finite_logits_give_valid_plans(values, k):
    """Whatever the input, expert indices stay in [0, E) and gates in [0, 1]."""
    logits = values.astype(np.float32)
    T, E = logits.shape
    for fn in (
        lambda: pyswitch.route(logits, k=k, capacity_factor=None),
        lambda: pyswitch.route(
            logits, k=k, priority="batch_prioritized", min_capacity=1, normalize_gates=k > 1
        ),
    ):
        plan = fn()
        assert ((plan.expert_index >= 0) & (plan.expert_index < E)).all()
        for t in range(T):
            assert len(set(plan.expert_index[t].tolist())) == k
        assert not np.isnan(plan.gate).any()
        assert ((plan.gate >= 0) & (plan.gate <= 1)).all()
        assert int(plan.tokens_per_expert.sum()) == T * k
    ec = pyswitch.route_expert_choice(logits, capacity_factor=1.0)
    assert ((ec.token_index >= 0) & (ec.token_index < T)).all()
    assert not np.isnan(ec.gate).any()


@pytest.mark.parametrize("column", [0, 31, 66])
def test_first_non_finite_row_is_reported_on_every_isa_and_thread_count(column):
    """Large input (parallel / SIMD validation): still the FIRST bad row, in any column."""
    from isa_utils import all_configs, cpu_config

    logits = np.random.default_rng(0).standard_normal((4096, 67)).astype(np.float32)
    logits[3500, 5] = np.nan
    logits[3001, column] = -np.inf
    logits[4095, 66] = np.nan
    for isa, threads in all_configs():
        with cpu_config(isa=isa, threads=threads):
            with pytest.raises(ValueError, match=fragment_pattern("row 3001")):
                pyswitch.route(logits, k=2, group_size=512)
            with pytest.raises(ValueError, match=fragment_pattern("row 3001")):
                pyswitch.route_expert_choice(logits, group_size=1024)


def test_numpy_scalars_are_accepted_as_arguments():
    logits = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    a = pyswitch.route(
        logits,
        k=np.int64(2),
        capacity_factor=np.float64(1.25),
        min_capacity=np.int32(1),
        group_size=np.int64(4),
    )
    b = pyswitch.route(logits, k=2, capacity_factor=1.25, min_capacity=1, group_size=4)
    np.testing.assert_array_equal(a.slot, b.slot)
    np.testing.assert_array_equal(a.gate, b.gate)
