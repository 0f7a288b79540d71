# MPIComm collectives (SPEC section 3) under mpiexec: NumPy references, the thread-rank backend
# (LocalGroup) as a second implementation, and cross-rank agreement, bit for bit.
"""Every collective on ``MPIComm`` against

1. a NumPy reference (tests/test_comm_local.py's ``make_step``: every rank regenerates every
   rank's inputs from the case's seed, so each can build the expected result of all of them),
2. ``LocalGroup(world_size)`` run inside each process on the same inputs: the two backends must
   give the same bits (reductions in rank order, bfloat16 accumulating in float32), and
3. the other ranks: each rank's results are reduced to 63-bit digests, all-gathered, and every
   rank checks every rank's digests against the references (so all ranks hold bit-identical
   reductions).

Cases are plain seeded loops (the same on every rank): random dtypes, shapes with 0 rows and
0-sized trailing dimensions, all_to_all_v counts with zeros (and all zero), every reduce op and
root, non-C-contiguous and read-only inputs. Checks record failures and raise them on every
rank at the end (mpi_utils.Failures), so a wrong result never desynchronises the ranks.
"""

import inspect
import itertools
import socket
import time

import numpy as np
import pytest
from mpi_utils import Failures, digest, gather_ints
from test_comm_local import (
    BF16,
    COLLECTIVES,
    COUNT_KINDS,
    DTYPES,
    F32,
    I32,
    I64,
    LAYOUTS,
    REDUCE_OPS,
    call_step,
    check_inputs_untouched,
    check_result,
    make_step,
    make_values,
    ref_reduce,
)

import pyswitch
from pyswitch.comm import LocalGroup, MPIComm

CASES = 20  # per collective (all_reduce and reduce_scatter: every op x dtype, twice)


def _ops_for(dtype):
    # Integer "mean" is checked on its own (test_integer_mean_agrees_with_local_group).
    return REDUCE_OPS if np.dtype(dtype) in (F32, BF16) else ("sum", "max", "min")


def random_steps(op, world):
    """The cases of ``op`` for ``world`` ranks: the same list on every rank."""
    op_index = COLLECTIVES.index(op)
    if op in ("all_reduce", "reduce_scatter"):
        combos = [(d, r) for d in DTYPES for r in _ops_for(d)] * 2
    else:
        combos = [(DTYPES[i % len(DTYPES)], "sum") for i in range(CASES)]
    steps = []
    for case, (dtype, reduce_op) in enumerate(combos):
        rng = np.random.default_rng([17, op_index, world, case])
        rest = tuple(int(d) for d in rng.integers(0, 4, size=int(rng.integers(0, 3))))
        if case % 5 == 1:
            rest = (int(rng.integers(1, 200)),)  # wider rows
        n = 0 if case % 7 == 0 else int(rng.integers(0, 5))
        counts = rng.integers(0, 4, size=(world, world)) * (rng.random((world, world)) < 0.7)
        if case % 6 == 0:
            counts[:] = 0  # nobody sends anything
        elif case % 6 == 3:
            counts[case % world] = 0  # one rank sends nothing
        steps.append(
            make_step(
                op,
                world,
                seed=1000 * op_index + case,
                dtype=dtype,
                rest=rest,
                n=n,
                layouts=[str(s) for s in rng.choice(LAYOUTS, size=world)],
                reduce_op=reduce_op,
                explicit=bool(case % 2),
                counts=counts.tolist(),
                counts_kind=COUNT_KINDS[case % len(COUNT_KINDS)],
                root=case % world,
            )
        )
    return steps


def result_digest(op, result):
    if op == "barrier":
        assert result is None, result
        return 0
    if op == "all_to_all_v":
        return digest(*result)
    return digest(result)


def expected_digests(steps):
    """(size, cases): the digest of every rank's expected result of every step."""
    world = steps[0].world
    return np.array(
        [[result_digest(s.op, s.expected[r]) for s in steps] for r in range(world)], np.int64
    )


def run_and_compare(comm, steps, failures, label):
    """Run ``steps`` on ``comm`` and check them three ways (see the module docstring)."""
    world, rank = comm.size, comm.rank
    results = []
    for i, step in enumerate(steps):
        try:
            results.append(call_step(comm, step))
        except pyswitch.CommError:
            raise  # the group failed: nothing further can be compared
        except Exception as exc:  # noqa: BLE001 - a local error fails the test on every rank
            failures.add(f"{label} case {i} {step!r}", exc)
            results.append(None)
    for i, (step, result) in enumerate(zip(steps, results)):
        if result is not None or step.op == "barrier":
            with failures.check(f"{label} case {i}: MPI vs NumPy"):
                check_result(step, rank, result)
    with failures.check(f"{label}: inputs untouched"):
        for step in steps:
            check_inputs_untouched(step)

    local = LocalGroup(world, timeout=60).run(lambda c: [call_step(c, s) for s in steps])
    for i, step in enumerate(steps):
        with failures.check(f"{label} case {i}: LocalGroup vs NumPy"):
            for r in range(world):
                check_result(step, r, local[r][i])
    mine = [
        result_digest(s.op, res) if res is not None or s.op == "barrier" else -1
        for s, res in zip(steps, results)
    ]
    every = gather_ints(comm, mine)
    expected = expected_digests(steps)
    local_digests = np.array(
        [[result_digest(s.op, local[r][i]) for i, s in enumerate(steps)] for r in range(world)],
        np.int64,
    )
    with failures.check(f"{label}: every rank's MPI results (digests) vs NumPy"):
        bad = np.argwhere(every != expected)
        assert bad.size == 0, f"(rank, case) differing: {bad.tolist()[:10]}"
    with failures.check(f"{label}: every rank's MPI results (digests) vs LocalGroup"):
        bad = np.argwhere(every != local_digests)
        assert bad.size == 0, f"(rank, case) differing: {bad.tolist()[:10]}"
    return results


@pytest.mark.parametrize("op", COLLECTIVES)
def test_collective_matches_numpy_and_local_group(comm, op):
    steps = random_steps(op, comm.size)
    assert len(steps) >= CASES
    failures = Failures(comm.rank)
    run_and_compare(comm, steps, failures, op)
    failures.raise_on_all(comm)


def test_reductions_are_identical_on_every_rank(comm):
    """all_reduce of every op and dtype: the ranks' results are the same bits (digests), and
    reduce_scatter's blocks put together are the all_reduce."""
    world = comm.size
    failures = Failures(comm.rank)
    rng = np.random.default_rng([23, world])
    mine, blocks = [], []
    for dtype in DTYPES:
        for op in _ops_for(dtype):
            xs = [make_values(rng, (world * 3, 5), dtype) for _ in range(world)]
            y = comm.all_reduce(xs[comm.rank], op=op)
            mine.append(digest(y))
            block = comm.reduce_scatter(xs[comm.rank], op=op)
            with failures.check(f"{dtype} {op}"):
                assert y.dtype == np.dtype(dtype) and y.shape == xs[0].shape
                expected = ref_reduce(xs, op)
                assert digest(y) == digest(expected), f"all_reduce {op} {dtype}"
                assert digest(block) == digest(expected[comm.rank * 3 : comm.rank * 3 + 3])
            blocks.append(comm.all_gather(block))
            with failures.check(f"{dtype} {op}: reduce_scatter blocks"):
                assert digest(blocks[-1].reshape(y.shape)) == digest(y)
    every = gather_ints(comm, mine)
    with failures.check("digests equal across ranks"):
        assert (every == every[0]).all(), every
    failures.raise_on_all(comm)


def test_float32_sum_is_in_rank_order(comm):
    """Columns in which another summation order gives another float32 (world >= 3); bfloat16
    accumulates in float32 and rounds once."""
    world = comm.size
    failures = Failures(comm.rank)
    big = np.float32(2.0**25)
    cols = []
    for i, j in itertools.permutations(range(world), 2):
        col = np.full(world, 1.0, dtype=np.float32)
        col[i], col[j] = big, -big
        cols.append(col)
    xs = [np.array([c[r] for c in cols], dtype=np.float32) for r in range(world)]
    if world >= 3:
        assert ref_reduce(xs, "sum").tobytes() != ref_reduce(xs[::-1], "sum").tobytes()
    for op in ("sum", "mean"):
        y = comm.all_reduce(xs[comm.rank], op=op)
        z = comm.reduce_scatter(np.repeat(xs[comm.rank][None], world, 0), op=op)
        with failures.check(f"float32 {op}"):
            assert y.tobytes() == ref_reduce(xs, op).tobytes(), (y, ref_reduce(xs, op))
            assert z.tobytes() == ref_reduce(xs, op)[None].tobytes()
    # 1 + (W-1) * 2^-9 in float32, rounded once to bfloat16; rounding after every add gives 1.
    xb = [np.array([1.0], dtype=BF16)] + [np.array([2.0**-9], dtype=BF16)] * (world - 1)
    y = comm.all_reduce(xb[comm.rank])
    with failures.check("bfloat16 rounds once"):
        expected = np.array([1.0 + (world - 1) * 2.0**-9], np.float32).astype(BF16)
        assert y.dtype == BF16 and y.tobytes() == expected.tobytes(), (y, expected)
    failures.raise_on_all(comm)


@pytest.mark.parametrize("dtype", [I32, I64], ids=str)
def test_integer_sum_wraps_and_mean_agrees_with_local_group(comm, dtype):
    """Integer sums wrap; integer "mean" does what LocalGroup does (ValueError on every rank,
    or the same integers), and a ValueError leaves the communicator usable."""
    world = comm.size
    failures = Failures(comm.rank)
    info = np.iinfo(dtype)
    xs = [np.array([info.max, info.min, -1, 7 * r - 5], dtype=dtype) for r in range(world)]
    y = comm.all_reduce(xs[comm.rank])
    with failures.check("wrap"):
        assert y.tobytes() == ref_reduce(xs, "sum").tobytes(), y

    def mean(c):
        try:
            return c.all_reduce(xs[c.rank], op="mean")
        except ValueError as exc:
            return exc

    got = mean(comm)
    local = LocalGroup(world, timeout=60).run(mean)[comm.rank]
    with failures.check("integer mean"):
        if isinstance(local, ValueError):
            assert isinstance(got, ValueError), (type(got), got)
            assert "mean" in str(got), got
        else:
            assert isinstance(got, np.ndarray), got
            assert got.tobytes() == local.tobytes(), (got, local)
    # Still usable (every rank raised the same ValueError before communicating, or none did).
    y = comm.all_reduce(xs[comm.rank], op="max")
    with failures.check("usable after"):
        assert y.tobytes() == ref_reduce(xs, "max").tobytes(), y
    failures.raise_on_all(comm)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_dimensional_arrays(comm, dtype):
    world = comm.size
    failures = Failures(comm.rank)
    rng = np.random.default_rng([5, world])
    xs = [make_values(rng, (), dtype) for _ in range(world)]
    for op in _ops_for(dtype):
        y = comm.all_reduce(xs[comm.rank], op=op)
        with failures.check(f"0-d all_reduce {op}"):
            assert y.shape == () and y.tobytes() == ref_reduce(xs, op).tobytes(), y
    g = comm.all_gather(xs[comm.rank])
    b = comm.broadcast(xs[comm.rank], root=world - 1)
    with failures.check("0-d all_gather / broadcast"):
        assert g.shape == (world,) and g.tobytes() == np.stack(xs).tobytes(), g
        assert b.shape == () and b.tobytes() == xs[world - 1].tobytes(), b
    failures.raise_on_all(comm)


def test_larger_arrays(comm):
    """Messages past the eager limits (MPI's rendezvous protocol), with the same references."""
    world = comm.size
    rng = np.random.default_rng([11, world])
    counts = rng.integers(0, 600, size=(world, world))
    counts[0, world - 1] = 0
    steps = [
        make_step("all_to_all_v", world, seed=1, rest=(33,), counts=counts.tolist()),
        make_step("all_to_all_v", world, seed=2, dtype=BF16, rest=(8, 5), counts=counts.tolist()),
        make_step("all_reduce", world, seed=3, n=512, rest=(65,)),
        make_step("all_reduce", world, seed=4, dtype=BF16, n=300, rest=(17,), reduce_op="mean"),
        make_step("reduce_scatter", world, seed=5, n=129, rest=(31,), reduce_op="max"),
        make_step("all_to_all", world, seed=6, dtype=I64, n=257, rest=(9,)),
        make_step("all_gather", world, seed=7, dtype=I32, n=1000, rest=(7,)),
        make_step("broadcast", world, seed=8, n=777, rest=(13,), root=world - 1),
    ]
    failures = Failures(comm.rank)
    run_and_compare(comm, steps, failures, "larger arrays")
    failures.raise_on_all(comm)


def test_all_reduce_out_and_sum_gradients_in_place(comm):
    """``out=`` (when offered) and ``sum_gradients`` on live arrays give the plain result."""
    world = comm.size
    failures = Failures(comm.rank)
    rng = np.random.default_rng([29, world])
    xs = [make_values(rng, (6, 7), F32) for _ in range(world)]
    expected = ref_reduce(xs, "sum")
    g = xs[comm.rank].copy()
    view = g  # a live array, as layer.grads holds
    out = pyswitch.comm.sum_gradients(comm, {"g": g})
    with failures.check("sum_gradients"):
        assert out["g"] is g and view.tobytes() == expected.tobytes()
    strided = np.repeat(xs[comm.rank], 2, axis=0)[::2]  # not contiguous: reduced through a copy
    pyswitch.comm.sum_gradients(comm, {"s": strided})
    with failures.check("sum_gradients non-contiguous"):
        assert strided.tobytes() == expected.tobytes()
    failures.raise_on_all(comm)


def test_barrier_waits_for_every_rank(comm):
    """Ranks arrive at staggered times; nobody leaves before the last one arrived."""
    world = comm.size
    same_host = gather_ints(comm, [digest(np.frombuffer(socket.gethostname().encode(), np.uint8))])
    times = []
    for k in range(3):
        time.sleep(0.05 * ((comm.rank + k) % world))
        arrive = time.time_ns()
        comm.barrier()
        leave = time.time_ns()
        times += [arrive, leave]
    every = gather_ints(comm, times).reshape(world, 3, 2)
    if (same_host == same_host[0]).all():  # one clock
        for k in range(3):
            assert every[:, k, 0].max() <= every[:, k, 1].min(), (k, every[:, k].tolist())


def test_two_communicators_interleaved(make_comm):
    """Two MPIComms over the same ranks are independent: interleaved calls, own timeouts."""
    a, b = make_comm(30.0), make_comm(45.0)
    world = a.size
    assert (a.rank, a.size, a.timeout) == (b.rank, world, 30.0) and b.timeout == 45.0
    failures = Failures(a.rank)
    sa = [make_step(op, world, seed=i) for i, op in enumerate(COLLECTIVES)]
    sb = [make_step(op, world, seed=50 + i, dtype=BF16) for i, op in enumerate(COLLECTIVES)]
    for step_a, step_b in zip(sa, sb[::-1]):
        ra = call_step(a, step_a)
        rb = call_step(b, step_b)
        with failures.check(f"{step_a!r} / {step_b!r}"):
            check_result(step_a, a.rank, ra)
            check_result(step_b, b.rank, rb)
    failures.raise_on_all(a)


def test_mpi4py_communicator_with_reordered_ranks(comm):
    """MPIComm(mpi4py_comm) over a communicator whose ranks are the world's reversed."""
    from mpi4py import MPI

    world = comm.size
    reversed_comm = MPI.COMM_WORLD.Split(0, world - 1 - comm.rank)  # collective, every rank
    try:
        rc = MPIComm(reversed_comm, timeout=30)
        failures = Failures(comm.rank)
        with failures.check("rank / size"):
            assert (rc.rank, rc.size) == (world - 1 - comm.rank, world)
            assert rc.mpi4py_comm is reversed_comm
        steps = [make_step(op, world, seed=70 + i) for i, op in enumerate(COLLECTIVES)]
        for step in steps:
            result = call_step(rc, step)
            with failures.check(repr(step)):
                check_result(step, rc.rank, result)
        failures.raise_on_all(comm)
        del rc
    finally:
        reversed_comm.Free()


def test_attributes_and_bad_arguments(comm):
    """rank / size / timeout; a bad timeout or communicator fails before any communication."""
    from mpi4py import MPI

    assert comm.size == MPI.COMM_WORLD.Get_size() and comm.rank == MPI.COMM_WORLD.Get_rank()
    assert comm.timeout == 60.0
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            MPIComm(timeout=bad)
    with pytest.raises(TypeError, match="timeout"):
        MPIComm(timeout="1")
    with pytest.raises(TypeError, match="mpi4py_comm"):
        MPIComm(object(), timeout=5)
    with pytest.raises(ValueError, match="COMM_NULL"):
        MPIComm(MPI.COMM_NULL, timeout=5)


def _takes_out(method):
    return "out" in inspect.signature(method).parameters


def test_out_buffers(comm):
    """``out=`` where offered: all_reduce in place; all_to_all_v into a larger buffer (y is a
    view of its first rows) or, when the buffer is too small, into a new array."""
    if not (_takes_out(MPIComm.all_reduce) and _takes_out(MPIComm.all_to_all_v)):
        pytest.skip("this pyswitch has no out= on all_reduce / all_to_all_v")
    world = comm.size
    failures = Failures(comm.rank)
    rng = np.random.default_rng([31, world])
    xs = [make_values(rng, (4, 3), F32) for _ in range(world)]
    x = xs[comm.rank].copy()
    y = comm.all_reduce(x, out=x)
    with failures.check("all_reduce out=x"):
        assert y is x and x.tobytes() == ref_reduce(xs, "sum").tobytes()
    counts = rng.integers(0, 4, size=(world, world))
    step = make_step("all_to_all_v", world, seed=3, rest=(5,), counts=counts.tolist())
    x, send = step.calls[comm.rank][0]
    recv_rows = int(counts[:, comm.rank].sum())
    for extra in (0, 3, -1):
        # Every rank makes the call (the buffer size may differ by rank, the calls may not).
        buf = np.full((max(recv_rows + extra, 0), 5), -7.0, np.float32)
        y, recv = comm.all_to_all_v(x, send, out=buf)
        with failures.check(f"all_to_all_v out with {extra} spare rows"):
            check_result(step, comm.rank, (y, recv))
            if buf.shape[0] >= recv_rows:
                assert np.shares_memory(y, buf) or y.size == 0, "y is not a view of out"
                assert (buf[recv_rows:] == -7.0).all(), "rows past y were written"
            else:
                assert not np.shares_memory(y, buf) and (buf == -7.0).all()
    failures.raise_on_all(comm)
