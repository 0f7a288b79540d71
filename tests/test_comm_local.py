# pyswitch.comm.LocalGroup: the in-process thread-rank collectives (SPEC section 3).
"""Three parts.

1. Properties: every collective (all_to_all, all_to_all_v, all_reduce, all_gather,
   reduce_scatter, broadcast, barrier) against a plain NumPy reference computed from all ranks'
   inputs, which are generated up front; world sizes 1-4, tiny random shapes with zero rows and
   zero counts, every dtype, C / Fortran / strided / negative-stride / read-only inputs.
   Reductions are bit-exact: float32 is the left-to-right float32 sum in rank order, bfloat16
   accumulates in float32 in rank order and rounds once, integers wrap.
2. Faults, each repeated >= 10 times with short timeouts: a rank raising before or inside a
   sequence of collectives, a rank hanging past the timeout (CommTimeout on the others within
   timeout + 2 s), a slow rank within the timeout (succeeds), mismatched op / count / dtype
   (CommError on every rank naming the op and the ranks), use after failure, the root-cause
   exception re-raised by run() with its type, no leaked threads, and the group usable again.
3. Bad inputs: dtype (TypeError), send_counts / divisibility / op / root / world_size / timeout
   (ValueError), with the messages' fragments; the whole table also runs in a child process.
"""

import itertools
import re
import threading
import time

import numpy as np
import pytest
from array_utils import assert_bits_equal as _assert_bits_equal
from bad_input_utils import Case, assert_raises_case, run_cases_in_child
from hypothesis import given, note
from hypothesis import strategies as st

import pyswitch
from pyswitch.comm import LocalGroup

F32 = np.dtype(np.float32)
BF16 = np.dtype(pyswitch.bfloat16)
I32 = np.dtype(np.int32)
I64 = np.dtype(np.int64)
DTYPES = (F32, BF16, I32, I64)
REDUCE_OPS = ("sum", "max", "min", "mean")
COLLECTIVES = (
    "all_to_all",
    "all_to_all_v",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "broadcast",
    "barrier",
)
LAYOUTS = ("c", "fortran", "strided", "reversed", "readonly")
COUNT_KINDS = ("list", "tuple", "int64", "int32")

CommError = pyswitch.CommError
CommTimeout = pyswitch.CommTimeout


# --------------------------------------------------------------------------------------------
# Inputs and references
# --------------------------------------------------------------------------------------------


def make_values(rng, shape, dtype):
    """Random values of ``dtype``: small exact values, wide-range values, or extremes."""
    dtype = np.dtype(dtype)
    kind = int(rng.integers(0, 3))
    if dtype.kind == "i":
        info = np.iinfo(dtype)
        if kind == 0:
            v = rng.integers(-5, 6, size=shape)
        elif kind == 1:
            v = rng.integers(info.min, info.max, size=shape, dtype=np.int64, endpoint=True)
        else:
            v = rng.choice(np.array([info.min, info.max, -1, 0, 1], dtype=np.int64), size=shape)
        return np.asarray(v, dtype=np.int64).astype(dtype)
    if kind == 0:
        v = rng.integers(-4, 5, size=shape) / 4.0
    else:
        v = rng.standard_normal(size=shape) * 10.0 ** rng.uniform(-3, 3, size=shape)
    return np.asarray(v, dtype=np.float32).astype(dtype)


def with_layout(a, layout):
    """The same values as ``a`` in another memory layout (never C-contiguous-writable 'c')."""
    if layout == "c" or a.ndim == 0:
        out = a.copy()
    elif layout == "fortran":
        out = np.asfortranarray(a)
    elif layout == "strided":
        out = np.repeat(a, 2, axis=0)[::2]
    elif layout == "reversed":
        out = a[::-1].copy()[::-1]
    elif layout == "readonly":
        out = a.copy()
        out.setflags(write=False)
    else:
        raise AssertionError(layout)
    assert out.shape == a.shape and out.dtype == a.dtype
    assert out.tobytes() == a.tobytes()
    return out


def ref_reduce(xs, op):
    """Elementwise reduction over ranks in rank order, as the contract specifies."""
    dtype = xs[0].dtype
    world = len(xs)
    if op in ("max", "min"):
        f = np.maximum if op == "max" else np.minimum
        if dtype == BF16:  # exact: every value is a bfloat16
            acc = np.array(xs[0], dtype=np.float32)
            for x in xs[1:]:
                f(acc, x.astype(np.float32), out=acc)
            return acc.astype(BF16)
        acc = np.array(xs[0], copy=True)
        for x in xs[1:]:
            f(acc, x, out=acc)
        return acc
    if dtype.kind == "i":
        assert op == "sum", op
        acc = np.array(xs[0], copy=True)
        for x in xs[1:]:
            np.add(acc, x, out=acc)  # wraps
        return acc
    acc = np.array(xs[0], dtype=np.float32)  # float32 left-to-right, rank 0 first
    for x in xs[1:]:
        np.add(acc, x.astype(np.float32), out=acc)
    if op == "mean":
        np.divide(acc, np.float32(world), out=acc)
    return acc.astype(dtype)  # bfloat16: rounded once


def raw_bytes(a):
    return np.ascontiguousarray(a).tobytes()


def assert_bits_equal(actual, expected, what):
    assert isinstance(actual, np.ndarray), (what, type(actual))
    _assert_bits_equal(actual, expected, what)


class Step:
    """One collective call on every rank: per-rank (args, kwargs), expected per-rank results."""

    def __init__(self, op, world, calls, expected, pristine):
        self.op = op
        self.world = world
        self.calls = calls
        self.expected = expected
        self.pristine = pristine  # per rank: a copy of the input array (None for barrier)

    def __repr__(self):
        shapes = [None if p is None else (p.shape, str(p.dtype)) for p in self.pristine]
        kw = [c[1] for c in self.calls]
        return f"Step({self.op}, world={self.world}, inputs={shapes}, kwargs={kw})"


def make_step(
    op,
    world,
    seed=0,
    dtype=F32,
    rest=(3,),
    n=2,
    layouts=None,
    reduce_op="sum",
    explicit=True,
    counts=None,
    counts_kind="list",
    root=0,
):
    """A valid collective call for every rank of a ``world``-rank group, with its reference."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    rest = tuple(rest)
    layouts = layouts or ["c"] * world
    if op == "barrier":
        return Step(op, world, [((), {})] * world, [None] * world, [None] * world)
    if op == "all_to_all_v":
        if counts is None:
            counts = [[(s + 2 * d + seed) % 3 for d in range(world)] for s in range(world)]
        xs = [make_values(rng, (sum(counts[s]),) + rest, dtype) for s in range(world)]
        offsets = [np.concatenate([[0], np.cumsum(c)]).astype(int) for c in counts]
        expected = []
        for d in range(world):
            blocks = [xs[s][offsets[s][d] : offsets[s][d] + counts[s][d]] for s in range(world)]
            recv = np.array([counts[s][d] for s in range(world)], dtype=np.int64)
            expected.append((np.concatenate(blocks, axis=0), recv))
        send = []
        for s in range(world):
            c = counts[s]
            send.append(
                {
                    "list": list(c),
                    "tuple": tuple(c),
                    "int64": np.array(c, dtype=np.int64),
                    "int32": np.array(c, dtype=np.int32),
                }[counts_kind]
            )
        calls = [((with_layout(xs[r], layouts[r]), send[r]), {}) for r in range(world)]
        return Step(op, world, calls, expected, xs)
    if op in ("all_to_all", "reduce_scatter"):
        shape = (world * n,) + rest
    else:
        shape = (n,) + rest
    xs = [make_values(rng, shape, dtype) for _ in range(world)]
    kwargs = {}
    if op == "all_to_all":
        expected = [
            np.concatenate([xs[s][d * n : (d + 1) * n] for s in range(world)], axis=0)
            for d in range(world)
        ]
    elif op == "all_reduce":
        if explicit or reduce_op != "sum":
            kwargs = {"op": reduce_op}
        expected = [ref_reduce(xs, reduce_op)] * world
    elif op == "reduce_scatter":
        if explicit or reduce_op != "sum":
            kwargs = {"op": reduce_op}
        full = ref_reduce(xs, reduce_op)
        expected = [full[r * n : (r + 1) * n] for r in range(world)]
    elif op == "all_gather":
        expected = [np.stack(xs)] * world
    elif op == "broadcast":
        if explicit or root != 0:
            kwargs = {"root": root}
        expected = [xs[root]] * world
    else:
        raise AssertionError(op)
    calls = [((with_layout(xs[r], layouts[r]),), kwargs) for r in range(world)]
    return Step(op, world, calls, expected, xs)


def call_step(comm, step, x=None):
    """Rank ``comm.rank``'s call of ``step`` (``x`` replaces its input array when given)."""
    args, kwargs = step.calls[comm.rank]
    if x is not None:
        args = (x,) + tuple(args[1:])
    return getattr(comm, step.op)(*args, **kwargs)


def check_result(step, rank, result):
    what = f"{step!r} rank {rank}"
    if step.op == "barrier":
        return
    exp = step.expected[rank]
    if step.op == "all_to_all_v":
        assert isinstance(result, (tuple, list)) and len(result) == 2, (what, type(result))
        y, recv = result
        assert_bits_equal(y, exp[0], what + " y")
        assert isinstance(recv, np.ndarray), (what, type(recv))
        assert recv.dtype == np.int64 and recv.shape == (step.world,), (what, recv.dtype, recv)
        assert recv.tolist() == exp[1].tolist(), (what, recv, exp[1])
    else:
        assert_bits_equal(result, exp, what)


def check_inputs_untouched(step):
    for r, (args, _) in enumerate(step.calls):
        if step.pristine[r] is not None:
            assert raw_bytes(args[0]) == raw_bytes(step.pristine[r]), (
                f"{step!r}: rank {r}'s input changed"
            )


# --------------------------------------------------------------------------------------------
# Running groups
# --------------------------------------------------------------------------------------------


def wait_threads(before, grace=2.0):
    """threading.active_count() is back to ``before`` (allowing a short join)."""
    deadline = time.monotonic() + grace
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.005)
    assert threading.active_count() <= before, f"leaked threads: {threading.enumerate()}"


def run_steps(world, steps, group=None, timeout=30.0):
    """Run ``steps`` in order on every rank and check every result against its reference."""
    before = threading.active_count()
    group = group or LocalGroup(world, timeout=timeout)
    idents = [None] * world

    def fn(comm):
        assert comm.size == world
        idents[comm.rank] = threading.get_ident()
        return [call_step(comm, s) for s in steps]

    results = group.run(fn)
    wait_threads(before)
    assert isinstance(results, list) and len(results) == world, results
    assert len(set(idents)) == world, idents  # each rank in its own thread
    for i, step in enumerate(steps):
        for r in range(world):
            assert len(results[r]) == len(steps)
            check_result(step, r, results[r][i])
        check_inputs_untouched(step)
    return results


def fresh_run_ok(group, world, seed=0):
    """The group works again: every collective once, results checked."""
    run_steps(
        world, [make_step(op, world, seed=seed + i) for i, op in enumerate(COLLECTIVES)], group
    )


def attempt(record, key, f):
    """Call f(), recording (result or exception, elapsed seconds) under ``key``; re-raise."""
    t0 = time.monotonic()
    try:
        out = f()
    except BaseException as exc:
        record[key] = (exc, time.monotonic() - t0)
        raise
    record[key] = (out, time.monotonic() - t0)
    return out


def names_rank(message, rank):
    return re.search(rf"(?<!\d){rank}(?!\d)", message) is not None


def assert_comm_error(exc, ops, rank=None, what=""):
    """A CommError whose message names one of ``ops`` (and ``rank`` when given)."""
    assert isinstance(exc, CommError), (what, type(exc), exc)
    message = str(exc)
    assert any(op in message for op in ops), (what, ops, message)
    if rank is not None:
        assert names_rank(message, rank), (what, f"rank {rank} not named", message)


# --------------------------------------------------------------------------------------------
# 1. Properties
# --------------------------------------------------------------------------------------------


@st.composite
def steps_for(draw, op, world):
    """A random Step of ``op`` on ``world`` ranks (tiny shapes, zero rows / counts included)."""
    dtype = draw(st.sampled_from(DTYPES))
    rest = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    kwargs = dict(
        seed=draw(st.integers(0, 2**32 - 1)),
        dtype=dtype,
        rest=rest,
        n=draw(st.integers(0, 3)),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=world, max_size=world)),
        explicit=draw(st.booleans()),
    )
    if op in ("all_reduce", "reduce_scatter"):
        ops = REDUCE_OPS if dtype.kind == "f" or dtype == BF16 else ("sum", "max", "min")
        kwargs["reduce_op"] = draw(st.sampled_from(ops))
    if op == "all_to_all_v":
        row = st.lists(st.integers(0, 3), min_size=world, max_size=world)
        kwargs["counts"] = draw(st.lists(row, min_size=world, max_size=world))
        kwargs["counts_kind"] = draw(st.sampled_from(COUNT_KINDS))
    if op == "broadcast":
        kwargs["root"] = draw(st.integers(0, world - 1))
    return make_step(op, world, **kwargs)


@st.composite
def single_case(draw, op):
    world = draw(st.integers(1, 4))
    return world, draw(steps_for(op, world))


@st.composite
def sequence_case(draw):
    world = draw(st.integers(1, 4))
    ops = draw(st.lists(st.sampled_from(COLLECTIVES), min_size=1, max_size=5))
    return world, [draw(steps_for(op, world)) for op in ops]


@pytest.mark.parametrize("op", [c for c in COLLECTIVES if c != "barrier"])
@given(data=st.data())
def test_collective_matches_numpy_reference(op, data):
    world, step = data.draw(single_case(op))
    note(repr(step))
    run_steps(world, [step])


@given(sequence_case())
def test_sequence_of_collectives_matches_reference(case):
    """Several collectives back to back on the same ranks (buffers and call order reused)."""
    world, steps = case
    note(repr(steps))
    run_steps(world, steps)


@given(
    world=st.integers(1, 4),
    nbarriers=st.integers(1, 3),
    delays=st.lists(st.sampled_from([0.0, 0.0, 0.0005, 0.002]), min_size=12, max_size=12),
)
def test_barrier_separates_phases(world, nbarriers, delays):
    """No rank leaves barrier k before every rank has arrived at it."""
    log = []
    lock = threading.Lock()

    def fn(comm):
        for k in range(nbarriers):
            delay = delays[(comm.rank * 3 + k) % len(delays)]
            if delay:
                time.sleep(delay)
            with lock:
                log.append(("arrive", k, comm.rank))
            comm.barrier()
            with lock:
                log.append(("leave", k, comm.rank))
        return comm.rank

    before = threading.active_count()
    assert LocalGroup(world, timeout=30.0).run(fn) == list(range(world))
    wait_threads(before)
    for k in range(nbarriers):
        arrivals = [i for i, e in enumerate(log) if e[:2] == ("arrive", k)]
        leaves = [i for i, e in enumerate(log) if e[:2] == ("leave", k)]
        assert len(arrivals) == len(leaves) == world
        assert max(arrivals) < min(leaves), log


def test_rank_size_timeout_and_result_order():
    for world, timeout in ((1, 0.25), (3, 2.5), (4, 7)):
        group = LocalGroup(world, timeout=timeout)
        out = group.run(lambda c: (c.rank, c.size, c.timeout))
        assert out == [(r, world, timeout) for r in range(world)]
    assert LocalGroup(2).run(lambda c: c.timeout) == [30.0, 30.0]


def test_float32_sum_is_in_rank_order():
    """Columns where every other summation order gives another answer than rank order."""
    big = np.float32(2.0**25)
    for world in (3, 4):
        cols = []
        for i, j in itertools.permutations(range(world), 2):
            col = np.full(world, 1.0, dtype=np.float32)
            col[i], col[j] = big, -big
            cols.append(col)
        xs = [np.array([c[r] for c in cols], dtype=np.float32) for r in range(world)]
        expected = ref_reduce(xs, "sum")
        reverse = ref_reduce(xs[::-1], "sum")
        assert raw_bytes(expected) != raw_bytes(reverse)  # the data can tell the orders apart
        for op in ("sum", "mean"):
            exp = ref_reduce(xs, op)
            out = LocalGroup(world).run(lambda c, op=op, xs=xs: c.all_reduce(xs[c.rank], op=op))
            for r in range(world):
                assert_bits_equal(out[r], exp, f"all_reduce {op} world={world} rank {r}")
            out = LocalGroup(world).run(
                lambda c, op=op, xs=xs, w=world: c.reduce_scatter(
                    np.repeat(xs[c.rank][None], w, 0), op=op
                )
            )
            for r in range(world):
                assert_bits_equal(out[r], exp[None], f"reduce_scatter {op} world={world} rank {r}")


def test_bfloat16_sum_accumulates_in_float32_and_rounds_once():
    # 1 + 3 * 2^-9 in float32 rounds to 1 + 2^-7 in bfloat16; rounding after each add gives 1.
    xs = [np.array([1.0], dtype=BF16)] + [np.array([2.0**-9], dtype=BF16)] * 3
    out = LocalGroup(4).run(lambda c: c.all_reduce(xs[c.rank]))
    for y in out:
        assert y.dtype == BF16 and float(y[0]) == 1.0 + 2.0**-7, y


@pytest.mark.parametrize("dtype", [I32, I64], ids=str)
def test_integer_sum_wraps(dtype):
    info = np.iinfo(dtype)
    xs = [np.array([info.max, info.min, -1], dtype=dtype), np.array([1, -1, info.min], dtype=dtype)]
    out = LocalGroup(2).run(lambda c: c.all_reduce(xs[c.rank]))
    for y in out:
        assert y.dtype == dtype and y.tolist() == [info.min, info.max, info.max], y


@pytest.mark.parametrize("dtype", [I32, I64], ids=str)
def test_integer_mean_is_an_error_or_integer_division(dtype):
    """Contract: ValueError, or integer division (floor or truncation), consistently."""
    for world in (1, 2, 3, 4):
        xs = [np.array([7 * r - 5, r, -r, 13], dtype=dtype) for r in range(world)]
        total = ref_reduce(xs, "sum")
        before = threading.active_count()
        try:
            out = LocalGroup(world, timeout=5.0).run(
                lambda c, xs=xs: c.all_reduce(xs[c.rank], op="mean")
            )
        except ValueError as exc:
            assert "mean" in str(exc), exc
            wait_threads(before)
            continue
        wait_threads(before)
        floor = total // world
        trunc = (np.sign(total) * (np.abs(total) // world)).astype(dtype)
        for y in out:
            assert y.dtype == dtype, y.dtype
            assert raw_bytes(y) == raw_bytes(out[0])
            assert y.tolist() in (floor.tolist(), trunc.tolist()), (world, total, y)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_dimensional_arrays(dtype):
    """'any shape' includes 0-d arrays for all_reduce, all_gather and broadcast."""
    world = 3
    rng = np.random.default_rng(5)
    xs = [make_values(rng, (), dtype) for _ in range(world)]
    ops = REDUCE_OPS if dtype in (F32, BF16) else ("sum", "max", "min")

    def fn(comm):
        x = xs[comm.rank]
        return (
            [comm.all_reduce(x, op=op) for op in ops],
            comm.all_gather(x),
            comm.broadcast(x, root=2),
        )

    out = LocalGroup(world).run(fn)
    for r in range(world):
        reduced, gathered, bcast = out[r]
        for op, y in zip(ops, reduced):
            assert_bits_equal(y, ref_reduce(xs, op), f"0-d all_reduce {op} rank {r}")
        assert_bits_equal(gathered, np.stack(xs), f"0-d all_gather rank {r}")
        assert_bits_equal(bcast, xs[2], f"0-d broadcast rank {r}")


def test_larger_arrays():
    world = 4
    rng = np.random.default_rng(11)
    counts = rng.integers(0, 600, size=(world, world)).tolist()
    steps = [
        make_step("all_to_all_v", world, seed=1, rest=(33,), counts=counts),
        make_step("all_to_all_v", world, seed=2, dtype=BF16, rest=(8, 5), counts=counts),
        make_step("all_reduce", world, seed=3, n=512, rest=(65,)),
        make_step("all_reduce", world, seed=4, dtype=BF16, n=300, rest=(17,)),
        make_step("reduce_scatter", world, seed=5, n=129, rest=(31,), reduce_op="max"),
        make_step("all_to_all", world, seed=6, dtype=I64, n=257, rest=(9,)),
        make_step("all_gather", world, seed=7, dtype=I32, n=1000, rest=(7,)),
        make_step("broadcast", world, seed=8, n=777, rest=(13,), root=3),
    ]
    run_steps(world, steps)


def test_two_groups_run_concurrently():
    """Separate groups are independent, even while both run at once."""
    errors = []

    def worker(world, seed):
        try:
            for i in range(5):
                steps = [make_step(op, world, seed=seed + 10 * i) for op in COLLECTIVES]
                run_steps(world, steps)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w, s)) for w, s in ((2, 0), (3, 1000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


# --------------------------------------------------------------------------------------------
# 2. Faults
# --------------------------------------------------------------------------------------------

REPS = range(10)


class RankBoom(Exception):
    pass


class SecondaryError(Exception):
    pass


@pytest.mark.parametrize("rep", REPS)
def test_rank_raising_before_a_collective(rep):
    world = 2 + rep % 3
    bad = (rep * 7 + 1) % world
    op = COLLECTIVES[rep % len(COLLECTIVES)]
    timeout = 1.0
    step = make_step(op, world, seed=rep)
    record = {}

    def fn(comm):
        if comm.rank == bad:
            if rep % 2:
                time.sleep(0.05)  # the others are already waiting inside the collective
            raise RankBoom(f"boom from rank {comm.rank}")
        return attempt(record, comm.rank, lambda: call_step(comm, step))

    before = threading.active_count()
    group = LocalGroup(world, timeout=timeout)
    t0 = time.monotonic()
    with pytest.raises(RankBoom, match=f"boom from rank {bad}$"):
        group.run(fn)
    assert time.monotonic() - t0 < timeout + 2
    wait_threads(before)
    for r in range(world):
        if r != bad:
            exc, dt = record[r]
            assert_comm_error(exc, [op], bad, f"{op} rank {r}")
            assert dt < timeout + 2, (r, dt)
    fresh_run_ok(group, world, seed=rep)


SEQUENCE = (
    "all_reduce",
    "all_gather",
    "all_to_all",
    "broadcast",
    "reduce_scatter",
    "barrier",
    "all_to_all_v",
)


@pytest.mark.parametrize("rep", REPS)
def test_rank_raising_inside_a_sequence(rep):
    """Steps before the failure succeed everywhere; the others fail at the failing step."""
    world = 2 + rep % 3
    bad = rep % world
    k = 1 + rep % (len(SEQUENCE) - 1)  # steps 0..k-1 succeed; rank `bad` fails at step k
    by_bad_argument = rep % 2 == 1 and SEQUENCE[k] != "barrier"
    steps = [make_step(op, world, seed=100 * rep + i) for i, op in enumerate(SEQUENCE)]
    record = {}

    def fn(comm):
        out = []
        for i, step in enumerate(steps):
            if comm.rank == bad and i == k:
                if by_bad_argument:  # raises inside the collective call itself
                    wrong = step.pristine[comm.rank].astype(np.float64)
                    call_step(comm, step, x=wrong)
                    raise AssertionError("float64 was accepted")
                raise RankBoom(f"rank {comm.rank} fails at step {i}")
            out.append(attempt(record, (comm.rank, i), lambda s=step: call_step(comm, s)))
        return out

    before = threading.active_count()
    group = LocalGroup(world, timeout=1.5)
    expected_exc = TypeError if by_bad_argument else RankBoom
    with pytest.raises(expected_exc) as info:
        group.run(fn)
    if by_bad_argument:
        assert "float64" in str(info.value), info.value
    wait_threads(before)
    for r in range(world):
        for i in range(k):
            result, _ = record[(r, i)]
            assert not isinstance(result, BaseException), (r, i, result)
            check_result(steps[i], r, result)
        if r != bad:
            exc, dt = record[(r, k)]
            assert_comm_error(exc, [SEQUENCE[k]], bad, f"rank {r} step {k}")
            assert dt < 1.5 + 2, dt
        assert all(key[1] <= k for key in record if key[0] == r), sorted(record)
    fresh_run_ok(group, world, seed=rep)


@pytest.mark.parametrize("rep", REPS)
def test_rank_hanging_past_the_timeout(rep):
    world = 2 + rep % 3
    late = (rep + 1) % world
    op = COLLECTIVES[rep % len(COLLECTIVES)]
    timeout = 0.5
    mid_sequence = rep >= 5  # everyone passes a barrier first
    late_calls_after = rep % 2 == 1  # the late rank then calls the collective: use after failure
    step = make_step(op, world, seed=rep)
    record = {}

    def fn(comm):
        if mid_sequence:
            comm.barrier()
        if comm.rank == late:
            time.sleep(timeout + 0.4)
            if late_calls_after:
                return attempt(record, comm.rank, lambda: call_step(comm, step))
            return "late"
        return attempt(record, comm.rank, lambda: call_step(comm, step))

    before = threading.active_count()
    group = LocalGroup(world, timeout=timeout)
    t0 = time.monotonic()
    with pytest.raises(CommTimeout):
        group.run(fn)
    assert time.monotonic() - t0 < timeout + 0.4 + 2 + 1
    wait_threads(before)
    for r in range(world):
        if r == late:
            if late_calls_after:
                exc, dt = record[r]
                assert_comm_error(exc, [op], None, f"late rank {r} after the timeout")
                assert dt < timeout + 2, dt
            continue
        exc, dt = record[r]
        assert isinstance(exc, CommTimeout), (r, type(exc), exc)
        assert_comm_error(exc, [op], late, f"waiting rank {r}")
        assert timeout - 0.05 <= dt <= timeout + 2, (r, dt)
    fresh_run_ok(group, world, seed=rep)


@pytest.mark.parametrize("rep", REPS)
def test_slow_rank_within_the_timeout_succeeds(rep):
    world = 2 + rep % 3
    slow = rep % world
    op = COLLECTIVES[rep % len(COLLECTIVES)]
    step = make_step(op, world, seed=rep)

    def fn(comm):
        if comm.rank == slow:
            time.sleep(0.2)
        return [call_step(comm, step)]

    before = threading.active_count()
    out = LocalGroup(world, timeout=1.0).run(fn)
    wait_threads(before)
    for r in range(world):
        check_result(step, r, out[r][0])


@pytest.mark.parametrize("rep", REPS)
def test_timeout_is_per_call(rep):
    """A slow rank whose delays add up past the timeout, each within it, succeeds."""
    world = 2 + rep % 3
    slow = (rep + 1) % world
    ops = [COLLECTIVES[(rep + i) % len(COLLECTIVES)] for i in range(4)]
    steps = [make_step(op, world, seed=rep + i) for i, op in enumerate(ops)]

    def fn(comm):
        out = []
        for step in steps:
            if comm.rank == slow:
                time.sleep(0.15)
            out.append(call_step(comm, step))
        return out

    out = LocalGroup(world, timeout=0.4).run(fn)  # 4 * 0.15 s > 0.4 s in total
    for i, step in enumerate(steps):
        for r in range(world):
            check_result(step, r, out[r][i])


def f32(*shape):
    return np.ones(shape, dtype=np.float32)


# name -> (call(comm, odd) where rank `odd` disagrees with the others, ops any message may name)
MISMATCHES = {
    "op all_reduce vs all_gather": (
        lambda c, odd: c.all_gather(f32(2, 3)) if c.rank == odd else c.all_reduce(f32(2, 3)),
        ("all_reduce", "all_gather"),
    ),
    "op barrier vs all_reduce": (
        lambda c, odd: c.barrier() if c.rank == odd else c.all_reduce(f32(2)),
        ("barrier", "all_reduce"),
    ),
    "op all_to_all vs reduce_scatter": (
        lambda c, odd: (c.reduce_scatter if c.rank == odd else c.all_to_all)(f32(2 * c.size, 3)),
        ("all_to_all", "reduce_scatter"),
    ),
    "reduce op sum vs max": (
        lambda c, odd: c.all_reduce(f32(2, 3), op="max" if c.rank == odd else "sum"),
        ("all_reduce",),
    ),
    "dtype all_reduce float32 vs int32": (
        lambda c, odd: c.all_reduce(np.ones((2, 3), np.int32 if c.rank == odd else np.float32)),
        ("all_reduce",),
    ),
    "dtype all_gather float32 vs bfloat16": (
        lambda c, odd: c.all_gather(np.ones((2, 3), BF16 if c.rank == odd else np.float32)),
        ("all_gather",),
    ),
    "dtype all_to_all_v int64 vs int32": (
        lambda c, odd: c.all_to_all_v(
            np.ones((c.size, 2), np.int32 if c.rank == odd else np.int64), [1] * c.size
        ),
        ("all_to_all_v",),
    ),
    "count all_reduce 2 vs 3 rows": (
        lambda c, odd: c.all_reduce(f32(3 if c.rank == odd else 2, 3)),
        ("all_reduce",),
    ),
    "trailing shape all_reduce (2, 3) vs (2, 4)": (
        lambda c, odd: c.all_reduce(f32(2, 4 if c.rank == odd else 3)),
        ("all_reduce",),
    ),
    "count all_gather 1 vs 2 rows": (
        lambda c, odd: c.all_gather(f32(1 if c.rank == odd else 2, 3)),
        ("all_gather",),
    ),
    "count all_to_all n=2 vs n=1": (
        lambda c, odd: c.all_to_all(f32((2 if c.rank == odd else 1) * c.size, 3)),
        ("all_to_all",),
    ),
    "trailing shape all_to_all_v 3 vs 4": (
        lambda c, odd: c.all_to_all_v(f32(c.size, 4 if c.rank == odd else 3), [1] * c.size),
        ("all_to_all_v",),
    ),
    "count reduce_scatter n=2 vs n=1": (
        lambda c, odd: c.reduce_scatter(f32((2 if c.rank == odd else 1) * c.size, 3)),
        ("reduce_scatter",),
    ),
    "count broadcast non-root 3 vs root 2 rows": (
        lambda c, odd: c.broadcast(f32(3 if c.rank == odd else 2, 3), root=(odd + 1) % c.size),
        ("broadcast",),
    ),
    # Same element count, different trailing shape: the rows do not line up.
    "trailing shape all_reduce (2, 3) vs (3, 2)": (
        lambda c, odd: c.all_reduce(f32(3, 2) if c.rank == odd else f32(2, 3)),
        ("all_reduce",),
    ),
    "trailing shape all_gather (2, 3) vs (3, 2)": (
        lambda c, odd: c.all_gather(f32(3, 2) if c.rank == odd else f32(2, 3)),
        ("all_gather",),
    ),
    "trailing shape all_to_all (2W, 3) vs (3W, 2)": (
        lambda c, odd: c.all_to_all(f32(3 * c.size, 2) if c.rank == odd else f32(2 * c.size, 3)),
        ("all_to_all",),
    ),
    "trailing shape reduce_scatter (2W, 3) vs (3W, 2)": (
        lambda c, odd: c.reduce_scatter(
            f32(3 * c.size, 2) if c.rank == odd else f32(2 * c.size, 3)
        ),
        ("reduce_scatter",),
    ),
    "trailing shape broadcast (2, 3) vs (3, 2)": (
        lambda c, odd: c.broadcast(
            f32(3, 2) if c.rank == odd else f32(2, 3), root=(odd + 1) % c.size
        ),
        ("broadcast",),
    ),
    "trailing shape all_to_all_v zero rows (0, 3) vs (0, 4)": (
        lambda c, odd: c.all_to_all_v(f32(0, 4 if c.rank == odd else 3), [0] * c.size),
        ("all_to_all_v",),
    ),
    "op all_to_all vs all_to_all_v": (
        lambda c, odd: (
            c.all_to_all_v(np.ones((c.size, 2), np.int64), [1] * c.size)
            if c.rank == odd
            else c.all_to_all(np.ones((c.size,), np.int64))
        ),
        ("all_to_all", "all_to_all_v"),
    ),
    "dtype broadcast non-root int32": (
        lambda c, odd: c.broadcast(
            np.ones((2, 3), np.int32 if c.rank == odd else np.float32), root=(odd + 1) % c.size
        ),
        ("broadcast",),
    ),
}


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_mismatch_raises_comm_error_on_every_rank(name):
    call, ops = MISMATCHES[name]
    timeout = 3.0  # a mismatch is seen when the ranks meet, not by timing out
    for rep in REPS:
        world = 2 + rep % 3
        odd = rep % world
        record = {}

        def fn(comm, record=record, odd=odd):
            comm.barrier()  # a good call first: the mismatch is at call 2
            try:
                return attempt(record, (comm.rank, "call"), lambda: call(comm, odd))
            except CommError:
                # Use after failure, in the same run.
                attempt(record, (comm.rank, "after"), comm.barrier)
                raise AssertionError("barrier after a failed collective did not raise") from None

        before = threading.active_count()
        group = LocalGroup(world, timeout=timeout)
        t0 = time.monotonic()
        with pytest.raises(CommError) as info:
            group.run(fn)
        elapsed = time.monotonic() - t0
        wait_threads(before)
        for r in range(world):
            what = f"{name} (rep {rep}, world {world}, odd rank {odd}) rank {r}"
            exc, dt = record[(r, "call")]
            assert_comm_error(exc, ops, odd, what)
            assert not isinstance(exc, CommTimeout), (what, exc)
            assert dt < 1.5, (what, dt)
            exc, dt = record[(r, "after")]
            assert isinstance(exc, CommError), (what + " after", type(exc), exc)
            assert dt < timeout + 2, (what, dt)
        assert not isinstance(info.value, CommTimeout), info.value
        assert elapsed < 1.5, (name, rep, elapsed)
        fresh_run_ok(group, world, seed=rep)


@pytest.mark.parametrize("rep", REPS)
def test_use_after_failure(rep):
    """Once a peer failed, every further collective in that run raises CommError."""
    world = 2 + rep % 3
    bad = rep % world
    timeout = 1.0
    steps = {op: make_step(op, world, seed=rep) for op in COLLECTIVES}
    first = COLLECTIVES[rep % len(COLLECTIVES)]
    record = {}

    def fn(comm):
        if comm.rank == bad:
            raise RankBoom("root cause")
        try:
            call_step(comm, steps[first])
        except CommError:
            pass
        else:
            raise AssertionError("collective succeeded with a failed peer")
        for op in COLLECTIVES:
            try:
                attempt(record, (comm.rank, op), lambda op=op: call_step(comm, steps[op]))
            except CommError:
                pass
        return "done"

    before = threading.active_count()
    group = LocalGroup(world, timeout=timeout)
    with pytest.raises(RankBoom, match="root cause"):
        group.run(fn)
    wait_threads(before)
    for r in range(world):
        if r != bad:
            for op in COLLECTIVES:
                exc, dt = record[(r, op)]
                assert_comm_error(exc, [op], None, f"rank {r} {op} after failure")
                assert dt < timeout + 2, (r, op, dt)
    fresh_run_ok(group, world, seed=rep)


ROOT_TYPES = (
    ValueError,
    KeyError,
    ZeroDivisionError,
    RankBoom,
    TypeError,
    IndexError,
    AssertionError,
    OSError,
    RuntimeError,
    LookupError,
)


@pytest.mark.parametrize("rep", REPS)
def test_run_reraises_the_root_cause(rep):
    """First original exception by time, type kept; later and secondary exceptions are not it."""
    world = 2 + rep % 3
    first = rep % world
    second = (first + 1) % world
    root_type = ROOT_TYPES[rep]
    token = f"root-cause-{rep}"

    def fn(comm):
        if comm.rank == first:
            time.sleep(0.02)
            raise root_type(token)
        if comm.rank == second:
            time.sleep(0.3)
            raise SecondaryError("later, unrelated")
        try:
            comm.all_reduce(f32(4))
        except CommError as exc:
            raise SecondaryError("converted comm error") from exc
        raise AssertionError("all_reduce succeeded with a failed peer")

    before = threading.active_count()
    group = LocalGroup(world, timeout=2.0)
    with pytest.raises(Exception) as info:
        group.run(fn)
    assert type(info.value) is root_type, (type(info.value), info.value)
    assert token in str(info.value)
    wait_threads(before)
    fresh_run_ok(group, world, seed=rep)


@pytest.mark.parametrize("rep", REPS)
def test_root_cause_beats_secondary_comm_errors(rep):
    """Peers' CommErrors raised because of the root cause never replace it in run()."""
    world = 2 + rep % 3
    bad = (rep + 2) % world

    def fn(comm):
        if comm.rank == bad:
            time.sleep(0.01 * (rep % 3))
            raise ROOT_TYPES[rep](f"token {rep}")
        for _ in range(3):
            comm.all_gather(f32(2))  # the CommError propagates out of fn unchanged
        return "unreachable"

    with pytest.raises(Exception) as info:
        LocalGroup(world, timeout=2.0).run(fn)
    assert type(info.value) is ROOT_TYPES[rep], (type(info.value), info.value)  # not a CommError
    assert f"token {rep}" in str(info.value)


@pytest.mark.parametrize("rep", REPS)
def test_completed_collective_is_not_failed_by_a_later_error(rep):
    """A rank raising right AFTER a collective returned on it does not fail that collective on
    the ranks still leaving it: the collective completed (the error only hits later calls)."""
    world = 2 + rep % 3
    bad = rep % world
    op = COLLECTIVES[rep % len(COLLECTIVES)]
    for i in range(20):
        step = make_step(op, world, seed=rep * 100 + i)
        record = {}

        def fn(comm, record=record, step=step):
            out = attempt(record, comm.rank, lambda: call_step(comm, step))
            if comm.rank == bad:
                raise RankBoom("after the collective")
            return out

        with pytest.raises(RankBoom):
            LocalGroup(world, timeout=2.0).run(fn)
        for r in range(world):
            result, _ = record[r]
            assert not isinstance(result, BaseException), (f"iteration {i}", op, r, result)
            check_result(step, r, result)


@pytest.mark.parametrize("rep", REPS)
def test_no_leaked_threads_and_group_reusable(rep):
    """success, failure, success, timeout, success on one group: threads always come back."""
    world = 1 + rep % 4
    group = LocalGroup(world, timeout=0.3)
    start = threading.active_count()
    fresh_run_ok(group, world, seed=rep)
    wait_threads(start)

    def failing(comm):
        comm.barrier()
        if comm.rank == world - 1:
            raise RankBoom("x")
        comm.all_reduce(f32(3))
        return None

    with pytest.raises(RankBoom):
        group.run(failing)
    wait_threads(start)
    fresh_run_ok(group, world, seed=rep + 1)
    wait_threads(start)
    if world > 1:

        def hanging(comm):
            if comm.rank == 0:
                time.sleep(0.45)
                return None
            return comm.all_gather(f32(1))

        with pytest.raises(CommTimeout):
            group.run(hanging)
        wait_threads(start)
    fresh_run_ok(group, world, seed=rep + 2)
    wait_threads(start)


# --------------------------------------------------------------------------------------------
# 3. Bad inputs
# --------------------------------------------------------------------------------------------


def on_ranks(world, call):
    """Every rank of a fresh ``world``-rank group makes the same (bad) call."""
    return lambda: LocalGroup(world, timeout=5.0).run(call)


def arr(shape, dtype=np.float32):
    return np.zeros(shape, dtype=dtype)


BAD_CASES = [
    Case("world_size=0", lambda: LocalGroup(0), ValueError, ("world_size", "0")),
    Case("world_size=-3", lambda: LocalGroup(-3), ValueError, ("world_size", "-3")),
    Case("timeout=0", lambda: LocalGroup(2, timeout=0), ValueError, ("timeout", "0")),
    Case("timeout=-1.5", lambda: LocalGroup(2, timeout=-1.5), ValueError, ("timeout", "-1.5")),
    Case("timeout=nan", lambda: LocalGroup(2, timeout=float("nan")), ValueError, ("timeout",)),
]
for _w in (1, 2):
    BAD_CASES += [
        Case(
            f"all_reduce float64 (world {_w})",
            on_ranks(_w, lambda c: c.all_reduce(arr((2, 3), np.float64))),
            TypeError,
            ("float64",),
        ),
        Case(
            f"all_to_all float64 (world {_w})",
            on_ranks(_w, lambda c: c.all_to_all(arr((2 * c.size,), np.float64))),
            TypeError,
            ("float64",),
        ),
        Case(
            f"all_to_all_v float64 (world {_w})",
            on_ranks(_w, lambda c: c.all_to_all_v(arr((c.size, 2), np.float64), [1] * c.size)),
            TypeError,
            ("float64",),
        ),
        Case(
            f"all_gather float64 (world {_w})",
            on_ranks(_w, lambda c: c.all_gather(arr((1, 2), np.float64))),
            TypeError,
            ("float64",),
        ),
        Case(
            f"reduce_scatter float64 (world {_w})",
            on_ranks(_w, lambda c: c.reduce_scatter(arr((c.size, 2), np.float64))),
            TypeError,
            ("float64",),
        ),
        Case(
            f"broadcast float64 (world {_w})",
            on_ranks(_w, lambda c: c.broadcast(arr((2,), np.float64))),
            TypeError,
            ("float64",),
        ),
        Case(
            f"all_reduce float16 (world {_w})",
            on_ranks(_w, lambda c: c.all_reduce(arr((2,), np.float16))),
            TypeError,
            ("float16",),
        ),
        Case(
            f"all_gather int16 (world {_w})",
            on_ranks(_w, lambda c: c.all_gather(arr((2,), np.int16))),
            TypeError,
            ("int16",),
        ),
        Case(
            f"broadcast uint32 (world {_w})",
            on_ranks(_w, lambda c: c.broadcast(arr((2,), np.uint32))),
            TypeError,
            ("uint32",),
        ),
        Case(
            f"all_to_all bool (world {_w})",
            on_ranks(_w, lambda c: c.all_to_all(arr((c.size,), np.bool_))),
            TypeError,
            ("bool",),
        ),
        Case(
            f"all_to_all_v complex64 (world {_w})",
            on_ranks(_w, lambda c: c.all_to_all_v(arr((c.size,), np.complex64), [1] * c.size)),
            TypeError,
            ("complex64",),
        ),
        Case(
            f"send_counts too long (world {_w})",
            on_ranks(_w, lambda c: c.all_to_all_v(arr((c.size, 2)), [1] * c.size + [0])),
            ValueError,
            ("send_counts",),
        ),
        Case(
            f"send_counts negative (world {_w})",
            on_ranks(_w, lambda c: c.all_to_all_v(arr((2, 2)), [-1, 3][: c.size])),
            ValueError,
            ("send_counts", "-1"),
        ),
        Case(
            f"send_counts sum 1 short of 5 rows (world {_w})",
            on_ranks(_w, lambda c: c.all_to_all_v(arr((5, 2)), [4] + [0] * (c.size - 1))),
            ValueError,
            ("send_counts", "5"),
        ),
        Case(
            f"send_counts sum over 0 rows (world {_w})",
            on_ranks(_w, lambda c: c.all_to_all_v(arr((0, 2)), [1] * c.size)),
            ValueError,
            ("send_counts",),
        ),
        Case(
            f"all_reduce op='prod' (world {_w})",
            on_ranks(_w, lambda c: c.all_reduce(arr((2,)), op="prod")),
            ValueError,
            ("prod",),
        ),
        Case(
            f"all_reduce op='' (world {_w})",
            on_ranks(_w, lambda c: c.all_reduce(arr((2,)), op="")),
            ValueError,
            ("op",),
        ),
        Case(
            f"reduce_scatter op='avg' (world {_w})",
            on_ranks(_w, lambda c: c.reduce_scatter(arr((c.size,)), op="avg")),
            ValueError,
            ("avg",),
        ),
        Case(
            f"broadcast root=size (world {_w})",
            on_ranks(_w, lambda c: c.broadcast(arr((2,)), root=c.size)),
            ValueError,
            ("root", str(_w)),
        ),
        Case(
            f"broadcast root=-1 (world {_w})",
            on_ranks(_w, lambda c: c.broadcast(arr((2,)), root=-1)),
            ValueError,
            ("root", "-1"),
        ),
    ]
BAD_CASES += [
    Case(
        "send_counts too short (world 2)",
        on_ranks(2, lambda c: c.all_to_all_v(arr((2, 2)), [2])),
        ValueError,
        ("send_counts",),
    ),
    Case(
        "all_to_all 5 rows on 2 ranks",
        on_ranks(2, lambda c: c.all_to_all(arr((5, 3)))),
        ValueError,
        ("5",),
    ),
    Case(
        "all_to_all 1 row on 4 ranks",
        on_ranks(4, lambda c: c.all_to_all(arr((1,)))),
        ValueError,
        ("1",),
    ),
    Case(
        "reduce_scatter 3 rows on 2 ranks",
        on_ranks(2, lambda c: c.reduce_scatter(arr((3, 2)))),
        ValueError,
        ("3",),
    ),
]


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.id)
def test_bad_input(case):
    before = threading.active_count()
    assert_raises_case(case)
    wait_threads(before)


def test_bad_inputs_do_not_crash_the_interpreter():
    run_cases_in_child("test_comm_local", "BAD_CASES")


@pytest.mark.parametrize(
    ("threads", "world", "expect"),
    [(4, 3, [2, 1, 1]), (2, 2, [1, 1]), (2, 4, [1, 1, 1, 1]), (8, 1, [8]), (7, 2, [4, 3])],
)
def test_thread_ranks_split_the_pool(threads, world, expect):
    """Rank r of W gets floor(P / W) threads, one more for the first P mod W ranks, at least 1:
    W ranks never run W full teams. The share is the rank thread's own; the caller keeps P."""
    from pyswitch.comm import thread_shares

    assert thread_shares(threads, world) == expect
    saved = pyswitch.get_num_threads()
    try:
        pyswitch.set_num_threads(threads)
        seen = LocalGroup(world).run(lambda comm: pyswitch.get_num_threads())
        assert seen == expect
        assert pyswitch.get_num_threads() == threads
    finally:
        pyswitch.set_num_threads(saved)
