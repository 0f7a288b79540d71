# MPIComm under faults (SPEC section 3): a failing, hanging, slow or disagreeing rank makes the
# others raise CommError (or CommTimeout) promptly, never hang.
"""Each scenario runs REPS times, each repetition on a fresh ``MPIComm(timeout=...)`` (after a
``CommError`` an MPIComm is unusable); every repetition, measured from the communicator's
construction on, takes less than ``timeout + 5`` s on every rank.

(a) a rank raises inside ``comm.run`` before an all_to_all (after some good collectives):
    it sees its own exception, the others a CommError naming it, well before the timeout;
(b) a rank's EP forward raises (NaN in its x -> ValueError), with and without ``comm.run``
    (the layer poisons the group itself); a rank passing another ``training`` flag;
(c) a rank sleeps past the timeout: the others raise CommTimeout after ~timeout s, and the late
    rank's call raises CommError instead of hanging;
(d) a rank slow within the timeout (timeout / 4): the call succeeds with the right data;
(e) mismatched op / reduce op / row count / dtype / shape / root: CommError on every rank, no
    timeout, naming the op and the odd rank; also straight at the C++ descriptor check;
(f) after a failure every collective raises CommError at once, on every rank, and a fresh
    MPIComm works.

Every rank constructs the same MPIComms in the same order whatever happens (construction is
collective), records its failures, and raises them on every rank at the end of the test.
"""

import time

import numpy as np
import pytest
from mpi_utils import Failures, names_rank, timed
from test_comm_local import COLLECTIVES, call_step, check_result, f32, make_step
from test_comm_local import MISMATCHES as THREAD_RANK_MISMATCHES

import pyswitch

CommError = pyswitch.CommError
CommTimeout = pyswitch.CommTimeout

REPS = 10
SLACK = 5.0  # every repetition ends within timeout + SLACK seconds
PROMPT = 1.5  # a failure that does not wait for the timeout is seen within this


class RankBoom(Exception):
    pass


def bad_rank(rep, size):
    """Rank 1 on even repetitions, the others in turn on odd ones (rank 0 included)."""
    return 1 if rep % 2 == 0 else (rep // 2) % size


def repeat(make_comm, timeout, body):
    """Run ``body(comm, rep, failures)`` REPS times on fresh communicators; then check the time
    of each repetition and raise every rank's failures on every rank."""
    failures = None
    for rep in range(REPS):
        t0 = time.monotonic()
        comm = make_comm(timeout)  # collective: every rank, every repetition
        if failures is None:
            failures = Failures(comm.rank)
        with failures.check(f"rep {rep}"):
            body(comm, rep, failures)
        elapsed = time.monotonic() - t0
        with failures.check(f"rep {rep} took {elapsed:.2f} s"):
            assert elapsed < timeout + SLACK
        del comm
    failures.raise_on_all(make_comm(60.0))


def assert_comm_error(exc, ops, rank=None, *, timeout_ok=False):
    assert isinstance(exc, CommError), (type(exc), exc)
    if not timeout_ok:
        assert not isinstance(exc, CommTimeout), exc
    message = str(exc)
    assert any(op in message for op in ops), (ops, message)
    if rank is not None:
        assert names_rank(message, rank), (f"rank {rank} not named", message)


# --------------------------------------------------------------------------------------------
# (a) a rank raises before a collective
# --------------------------------------------------------------------------------------------


def test_a_rank_raising_before_all_to_all(make_comm):
    timeout = 3.0

    def body(comm, rep, failures):
        bad = bad_rank(rep, comm.size)
        good = [make_step(op, comm.size, seed=rep * 10 + i) for i, op in enumerate(COLLECTIVES)]
        good = good[: rep % 4]  # 0-3 good collectives first
        step = make_step("all_to_all", comm.size, seed=rep)
        # Every rank has returned from the good collectives before `bad` raises: they meet at a
        # barrier of another group first (see test_a_completed_collective_is_not_failed_...).
        sync = make_comm(timeout)

        def fn(c):
            for s in good:
                check_result(s, c.rank, call_step(c, s))
            sync.barrier()
            if c.rank == bad:
                if rep % 3 == 1:
                    time.sleep(0.05)  # the others are already waiting inside the all_to_all
                raise RankBoom(f"boom from rank {c.rank}")
            return call_step(c, step)

        result, exc, dt = timed(comm.run, fn)
        if comm.rank == bad:
            assert isinstance(exc, RankBoom) and str(exc) == f"boom from rank {bad}", exc
        else:
            assert result is None, "all_to_all succeeded with a failed peer"
            assert_comm_error(exc, ["all_to_all"], bad)
            assert "RankBoom" in str(exc) or "boom" in str(exc), exc
            assert dt < PROMPT, dt

    repeat(make_comm, timeout, body)


# --------------------------------------------------------------------------------------------
# (b) a rank fails inside the expert-parallel layer
# --------------------------------------------------------------------------------------------

D, F = 16, 32


def ep_forward(comm, x, *, training=False, through_run):
    layer = pyswitch.SwitchFFN(D, F, 2 * comm.size, comm=comm, min_capacity=1)

    def fn(c):
        y = layer.forward(x, training=training)
        layer.backward(np.ones_like(y))
        return y

    return comm.run(fn) if through_run else fn(comm)


def test_b_rank_raising_inside_the_ep_forward(make_comm):
    timeout = 3.0

    def body(comm, rep, failures):
        bad = bad_rank(rep, comm.size)
        x = np.random.default_rng([80, comm.rank]).standard_normal((8, D)).astype(np.float32)
        if comm.rank == bad:
            x[5, 3] = np.nan
        _, exc, dt = timed(ep_forward, comm, x, through_run=rep % 2 == 1)
        if comm.rank == bad:
            assert type(exc) is ValueError and "row 5" in str(exc), (type(exc), exc)
        else:
            assert_comm_error(exc, ["all_", "reduce", "broadcast", "barrier"], bad)
            assert dt < PROMPT, dt

    repeat(make_comm, timeout, body)


def test_b_rank_passing_another_training_flag(make_comm):
    timeout = 3.0

    def body(comm, rep, failures):
        odd = bad_rank(rep, comm.size)
        x = np.random.default_rng([81, comm.rank]).standard_normal((8, D)).astype(np.float32)
        _, exc, dt = timed(ep_forward, comm, x, training=comm.rank == odd, through_run=False)
        assert_comm_error(exc, ["all_", "reduce", "broadcast", "barrier"])
        assert dt < PROMPT, dt

    repeat(make_comm, timeout, body)


def test_a_completed_collective_is_not_failed_by_a_later_error(make_comm):
    """A rank raising (inside comm.run) right after a collective returned on it does not fail
    that collective on the ranks still leaving it, as with LocalGroup: it completed. (The
    poison message carries the last call its sender completed; before it did, about one in ten
    all_to_all_v calls here failed on the other rank at W=2, and the abandoned request then
    wrote into freed buffers.)"""
    timeout = 3.0

    def body(comm, rep, failures):
        bad = bad_rank(rep, comm.size)
        # One group per collective, all made first: construction is collective, and a failed
        # check below must not make this rank skip one.
        comms = [comm] + [make_comm(timeout) for _ in COLLECTIVES[1:]]
        for i, (op, comm_i) in enumerate(zip(COLLECTIVES, comms)):
            step = make_step(op, comm.size, seed=1000 * rep + i, rest=(64,), n=8)

            def fn(c, step=step):
                out = call_step(c, step)
                if c.rank == bad:
                    raise RankBoom("after the collective")
                return out

            result, exc, _ = timed(comm_i.run, fn)
            with failures.check(f"rep {rep} {op}"):
                if comm.rank == bad:
                    assert isinstance(exc, RankBoom), exc
                else:
                    assert exc is None, exc
                    check_result(step, comm.rank, result)

    repeat(make_comm, timeout, body)


# --------------------------------------------------------------------------------------------
# (c) a rank past the timeout, (d) a rank slow within it
# --------------------------------------------------------------------------------------------


def test_c_rank_sleeping_past_the_timeout(make_comm):
    timeout = 2.0

    def body(comm, rep, failures):
        late = bad_rank(rep, comm.size)
        op = COLLECTIVES[rep % len(COLLECTIVES)]
        step = make_step(op, comm.size, seed=rep)
        if rep >= REPS // 2:
            comm.barrier()  # mid-sequence: a good call first
        if comm.rank == late:
            time.sleep(timeout + 0.5)
            _, exc, dt = timed(call_step, comm, step)
            assert_comm_error(exc, [op], timeout_ok=True)  # not a hang, not a success
            assert dt < timeout + SLACK, dt
        else:
            _, exc, dt = timed(call_step, comm, step)
            assert_comm_error(exc, [op], timeout_ok=True)
            if comm.size == 2:
                assert isinstance(exc, CommTimeout), (type(exc), exc)
            else:
                # The first rank to time out poisons the group; the others may see that first
                # (a CommError quoting its timeout) rather than time out themselves.
                assert isinstance(exc, CommTimeout) or "timed out" in str(exc), exc
            assert timeout - 0.1 <= dt < timeout + SLACK, dt

    repeat(make_comm, timeout, body)


def test_d_slow_rank_within_the_timeout(make_comm):
    timeout = 2.0

    def body(comm, rep, failures):
        slow = bad_rank(rep, comm.size)
        op = COLLECTIVES[rep % len(COLLECTIVES)]
        step = make_step(op, comm.size, seed=100 + rep)
        if comm.rank == slow:
            time.sleep(timeout / 4)
        check_result(step, comm.rank, call_step(comm, step))
        # Still usable: a second, different call.
        step = make_step(COLLECTIVES[(rep + 1) % len(COLLECTIVES)], comm.size, seed=200 + rep)
        check_result(step, comm.rank, call_step(comm, step))

    repeat(make_comm, timeout, body)


def test_d_delays_adding_up_past_the_timeout(make_comm):
    """The timeout is per call: four calls each delayed by timeout / 4 + a bit succeed."""
    comm = make_comm(1.0)
    failures = Failures(comm.rank)
    steps = [make_step(op, comm.size, seed=300 + i) for i, op in enumerate(COLLECTIVES[:4])]
    for i, step in enumerate(steps):
        if comm.rank == i % comm.size:
            time.sleep(0.3)
        result = call_step(comm, step)
        with failures.check(repr(step)):
            check_result(step, comm.rank, result)
    failures.raise_on_all(comm)


# --------------------------------------------------------------------------------------------
# (e) mismatched calls
# --------------------------------------------------------------------------------------------


# The thread-rank suite's table of mismatched calls (every one goes through the public API,
# so it applies to MPI unchanged), plus a root mismatch.
MISMATCHES = dict(THREAD_RANK_MISMATCHES)
MISMATCHES["broadcast root"] = (
    lambda c, odd: c.broadcast(f32(2, 3), root=odd if c.rank == odd else (odd + 1) % c.size),
    ("broadcast",),
)


def _raw(c, odd, kind):
    """Straight at the core (no Python-level check): the C++ descriptor must catch it."""
    impl = c._impl
    if kind == "count":
        x = f32(3 if c.rank == odd else 2)
        return impl.all_reduce(x, np.empty_like(x), x.size, "sum")
    if kind == "dtype":
        x = np.ones(2, np.int32 if c.rank == odd else np.float32)
        return impl.all_gather(x, np.empty((c.size, 2), x.dtype), x.size)
    if kind == "op":
        x = f32(c.size)
        if c.rank == odd:
            return impl.all_gather(x, np.empty((c.size, c.size), np.float32), x.size)
        return impl.all_to_all(x, np.empty_like(x), 1)
    if kind == "root":
        return impl.broadcast(f32(2), 2, 0 if c.rank == odd else c.size - 1)
    raise AssertionError(kind)


for _kind in ("count", "dtype", "op", "root"):
    MISMATCHES[f"core {_kind}"] = (
        lambda c, odd, kind=_kind: _raw(c, odd, kind),
        ("all_reduce", "all_gather", "all_to_all", "broadcast"),
    )


@pytest.mark.parametrize("name", list(MISMATCHES))
def test_e_mismatched_calls(make_comm, name):
    call, ops = MISMATCHES[name]
    timeout = 3.0

    def body(comm, rep, failures):
        odd = bad_rank(rep, comm.size)
        if rep % 2:
            comm.barrier()  # a good call first
        _, exc, dt = timed(call, comm, odd)
        assert_comm_error(exc, ops, odd if comm.size == 2 else None)
        assert dt < PROMPT, dt
        # (f) use after failure, within the same repetition
        _, exc, dt = timed(comm.barrier)
        assert isinstance(exc, CommError), (type(exc), exc)
        assert dt < PROMPT, dt

    repeat(make_comm, timeout, body)


# --------------------------------------------------------------------------------------------
# (f) use after failure
# --------------------------------------------------------------------------------------------


def test_f_use_after_failure(make_comm):
    """After a failure (a rank's exception, or a mismatch) every collective raises CommError at
    once on every rank, the failing rank included; a fresh MPIComm then works."""
    timeout = 3.0

    def body(comm, rep, failures):
        bad = bad_rank(rep, comm.size)
        first = COLLECTIVES[rep % len(COLLECTIVES)]
        steps = {op: make_step(op, comm.size, seed=rep) for op in COLLECTIVES}
        if rep % 2 == 0:

            def fn(c):
                if c.rank == bad:
                    raise RankBoom("root cause")
                return call_step(c, steps[first])

            _, exc, _ = timed(comm.run, fn)
            assert isinstance(exc, RankBoom if comm.rank == bad else CommError), exc
        else:
            _, exc, _ = timed(MISMATCHES["reduce op sum vs max"][0], comm, bad)
            assert isinstance(exc, CommError), exc
        for op in COLLECTIVES:
            _, exc, dt = timed(call_step, comm, steps[op])
            assert_comm_error(exc, [op], timeout_ok=True)
            assert not isinstance(exc, CommTimeout), (op, exc)
            assert dt < PROMPT, (op, dt)

    repeat(make_comm, timeout, body)
    fresh = make_comm(timeout)
    failures = Failures(fresh.rank)
    for i, op in enumerate(COLLECTIVES):
        step = make_step(op, fresh.size, seed=900 + i)
        result = call_step(fresh, step)
        with failures.check(f"fresh MPIComm: {op}"):
            check_result(step, fresh.rank, result)
    failures.raise_on_all(fresh)
