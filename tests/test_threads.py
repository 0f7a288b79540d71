"""Python threads sharing pyswitch objects: no deadlock between the GIL and an object's mutex, and
no torn results. Each scenario runs in a child process under a timeout, so a deadlock fails its
test instead of hanging the suite."""

import threading

import numpy as np
import pytest
from array_utils import assert_bits_equal
from child_utils import run_python

import pyswitch

# A passing scenario takes a few seconds on two cores; a deadlock never ends.
TIMEOUT_S = 90
T, D, F, E = 1024, 128, 256, 8
STEPS = 12
READS = ("aux_loss", "z_loss", "last_plan", "stats")


def _run_child(call):
    """Run ``test_threads.<call>`` in a child process; fail if it raises or does not finish."""
    code = f"import test_threads as t\nt.{call}\nprint('finished')\n"
    done = run_python(code, TIMEOUT_S)
    if done is None:
        pytest.fail(
            f"{call}: no result after {TIMEOUT_S} s, child killed: the threads deadlocked",
            pytrace=False,
        )
    assert done.returncode == 0, (call, done.returncode, done.stderr[-4000:])
    assert "finished" in done.stdout, (call, done.stdout[-2000:], done.stderr[-2000:])


def _run_threads(*targets):
    """Run each target in its own thread, join them all, re-raise the first exception."""
    errors = []

    def body(fn):
        try:
            fn()
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(fn,), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _random(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def _read(layer, what):
    """What a reader sees through ``what``, as a hashable value (a torn read would be new)."""
    if what == "aux_loss":
        return layer.aux_loss
    if what == "z_loss":
        return layer.z_loss
    if what == "last_plan":
        p = layer.last_plan
        if p is None:
            return None
        return (
            p.num_tokens,
            p.dropped,
            p.aux_loss,
            p.z_loss,
            p.expert_index.tobytes(),
            p.slot.tobytes(),
            p.gate.tobytes(),
            p.tokens_per_expert.tobytes(),
        )
    try:
        s = layer.stats()
    except pyswitch.Error:  # before the first forward
        return "no forward"
    return (s["tokens_per_expert"].tobytes(), s["drop_fraction"], s["router_entropy"])


def _train(layer, seed, steps=STEPS):
    """Training steps with SGD on ``layer``; returns each step's results and the final params."""
    rng = np.random.default_rng(seed)
    steps_out = []
    for _ in range(steps):
        x, dy = _random(rng, (T, D)), _random(rng, (T, D))
        y = layer.forward(x, training=True)
        seen = {what: _read(layer, what) for what in READS}
        dx = layer.backward(dy)
        grads = {name: g.copy() for name, g in layer.grads.items()}
        for name, p in layer.params.items():
            p -= np.float32(0.01) * layer.grads[name]
        steps_out.append((y, dx, seen, grads))
    return steps_out, {name: p.copy() for name, p in layer.params.items()}


def _assert_same_run(got, expected, what):
    (got_steps, got_params), (exp_steps, exp_params) = got, expected
    assert len(got_steps) == len(exp_steps), what
    for i, (g, e) in enumerate(zip(got_steps, exp_steps)):
        assert_bits_equal(g[0], e[0], f"{what} step {i} y")
        assert_bits_equal(g[1], e[1], f"{what} step {i} dx")
        assert g[2] == e[2], f"{what} step {i}: aux_loss / z_loss / last_plan / stats differ"
        for name in e[3]:
            assert_bits_equal(g[3][name], e[3][name], f"{what} step {i} grads[{name}]")
    for name in exp_params:
        assert_bits_equal(got_params[name], exp_params[name], f"{what} final params[{name}]")


def _poll(layer, reads, stop, seen):
    """Read ``layer`` through each of ``reads`` until ``stop`` is set; collect what was seen."""
    polls = 0
    while not stop.is_set() or polls == 0:
        for what in reads:
            seen.add((what, _read(layer, what)))
        polls += 1


def _layer(kind, seed):
    if kind == "switch":
        return pyswitch.SwitchFFN(D, F, E, seed=seed)
    return pyswitch.DenseFFN(D, F, seed=seed)


# ---- scenarios (run in the child) -----------------------------------------------------------


def train_while_reading(reads, layers=1):
    """``layers`` threads each train their own SwitchFFN while readers poll layer 0 through
    ``reads``. Every trainer's results must be bitwise those of the same steps run alone, and
    every read must be a state some step left (or the initial one)."""
    alone = [_train(_layer("switch", 10 + i), seed=100 + i) for i in range(layers)]

    shared = [_layer("switch", 10 + i) for i in range(layers)]
    initial = {(what, _read(shared[0], what)) for what in reads}
    results = [None] * layers
    stop = threading.Event()
    seen = [set() for _ in reads]

    def trainer(i):
        def body():
            try:
                results[i] = _train(shared[i], seed=100 + i)
            finally:
                if i == 0:
                    stop.set()

        return body

    readers = [
        (lambda what=what, s=s: _poll(shared[0], (what,), stop, s)) for what, s in zip(reads, seen)
    ]
    _run_threads(*[trainer(i) for i in range(layers)], *readers)

    for i in range(layers):
        _assert_same_run(results[i], alone[i], f"layer {i}")
    valid = initial | {(what, step[2][what]) for step in alone[0][0] for what in reads}
    for what, s in zip(reads, seen):
        torn = s - valid
        assert not torn, f"{what}: {len(torn)} reads match no state of the layer"


def backward_race(kind):
    """Two threads call ``backward`` on one layer (one forward), with different ``dy``; each dx
    must be bitwise that of the same backward alone, and the grads those of one of them."""
    rng = np.random.default_rng(1)
    x, dys = _random(rng, (T, D)), [_random(rng, (T, D)) for _ in range(2)]
    layer = _layer(kind, 3)
    layer.forward(x)
    want = []
    for dy in dys:
        dx = layer.backward(dy)
        want.append((dx, {name: g.copy() for name, g in layer.grads.items()}))

    def caller(first):
        def body():
            for i in range(STEPS):
                j = (first + i) % 2
                assert_bits_equal(layer.backward(dys[j]), want[j][0], f"{kind} dx of dy{j}")

        return body

    _run_threads(caller(0), caller(1))
    assert any(all(np.array_equal(layer.grads[n], grads[n]) for n in grads) for _, grads in want), (
        "grads are those of neither backward"
    )


def router_race():
    """One thread runs Router forward / backward on two inputs in turn while another polls
    ``last_logits``; dx must be bitwise that of the serial run, each read one input's logits."""
    rng = np.random.default_rng(2)
    xs = [_random(rng, (T, D)) for _ in range(2)]
    d_gate = _random(rng, (T, 1))
    router = pyswitch.Router(D, E, seed=4)
    want = []
    for x in xs:
        router.forward(x)
        want.append((router.last_logits.tobytes(), router.backward(d_gate, aux_loss_coef=0.01)))

    stop = threading.Event()
    seen = set()

    def trainer():
        try:
            for i in range(3 * STEPS):
                router.forward(xs[i % 2])
                dx = router.backward(d_gate, aux_loss_coef=0.01)
                assert_bits_equal(dx, want[i % 2][1], f"Router dx of x{i % 2}")
        finally:
            stop.set()

    def reader():
        while not stop.is_set() or not seen:
            seen.add(router.last_logits.tobytes())

    _run_threads(trainer, reader)
    assert seen <= {logits for logits, _ in want}, "last_logits: a read matches neither input"


# ---- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("what", READS)
def test_backward_while_reading(what):
    _run_child(f"train_while_reading(({what!r},))")


@pytest.mark.parametrize("kind", ["switch", "dense"])
def test_two_threads_backward_same_layer(kind):
    _run_child(f"backward_race({kind!r})")


def test_router_backward_while_reading_last_logits():
    _run_child("router_race()")


def test_two_layers_in_two_threads_with_readers():
    _run_child(f"train_while_reading({READS!r}, layers=2)")
