# pyswitch._core.Trainer (C++ pyswitch::model::Trainer): one training step in one call, checked
# against the step written out in Python on the model's forward/backward, NumPy float64 norms
# and the optimizers' per-tensor updates; the number of Python -> _core calls per step.
import math
import sys
import threading

import numpy as np
import pytest

from pyswitch import _core
from pyswitch.comm import LocalGroup
from pyswitch.data import ByteCorpus
from pyswitch.models import SwitchLM, SwitchLMConfig
from pyswitch.optim import Adafactor, AdamW, learning_rate
from pyswitch.train import TrainOptions, _Run, _trainer_options, train

CONFIG = dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, num_experts=4, seed=3)
TEXT = "switch transformers route every token to one expert and learn to balance\n" * 40


def tokens_for(step, rows=4, seq_len=16):
    rng = np.random.default_rng(step)
    return rng.integers(0, 256, size=(rows, seq_len + 1), dtype=np.int32)


def reference_step(model, opt, tokens, step, total, o):
    """The training step spelled out: float64 NumPy norm, float32 clip scale, schedule, update."""
    model.loss_and_grad(tokens)
    grads = model.grads
    norm = math.sqrt(
        sum(float(np.dot(g.ravel().astype(np.float64), g.ravel())) for g in grads.values())
    )
    if norm > o.clip:
        scale = np.float32(o.clip / norm)
        for g in grads.values():
            g *= scale
    lr = learning_rate(step, o.peak_lr(), o.warmup_steps, total, o.decay)
    opt.step(grads, lr)
    return norm, lr


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("clip", [0.05, 100.0])
def test_trainer_step_matches_the_python_reference(optimizer, clip):
    o = TrainOptions(optimizer=optimizer, clip=clip, warmup_steps=2, weight_decay=0.1)
    ours = SwitchLM(SwitchLMConfig(**CONFIG))
    ref = SwitchLM(SwitchLMConfig(**CONFIG))
    trainer = _core.Trainer(ours._impl, _trainer_options(o))
    opt_class = AdamW if optimizer == "adamw" else Adafactor
    opt = opt_class(ref.params, ref.decay_params, weight_decay=o.weight_decay)
    total = 5
    for step in range(4):
        tokens = tokens_for(step)
        info = trainer.step(tokens, step, total, tokens.shape[0] * (tokens.shape[1] - 1))
        norm, lr = reference_step(ref, opt, tokens, step, total, o)
        assert info["updated"]
        assert info["grad_norm"] == pytest.approx(norm, rel=1e-6)
        assert info["lr"] == lr
        for name, p in ref.params.items():
            np.testing.assert_allclose(ours.params[name], p, rtol=2e-5, atol=1e-6, err_msg=name)
    assert trainer.optimizer_steps == 4
    state = {name: view for name, view, _ in trainer.state()}
    assert set(state) == set(opt.state)
    for name, value in opt.state.items():
        assert state[name].shape == value.shape, name
        np.testing.assert_allclose(state[name], value, rtol=1e-4, atol=1e-9, err_msg=name)


def test_trainer_rejects_bad_options():
    model = SwitchLM(SwitchLMConfig(**CONFIG))

    def options(**change):
        t = _core.TrainerOptions()
        for key, value in change.items():
            setattr(t, key, value)
        return t

    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'adafactor', got 'sgd'"):
        _core.Trainer(model._impl, options(optimizer="sgd"))
    with pytest.raises(ValueError, match="clip must be finite and > 0, got 0"):
        _core.Trainer(model._impl, options(clip=0.0))
    with pytest.raises(ValueError, match="peak_lr must be finite and > 0"):
        _core.Trainer(model._impl, options(peak_lr=float("nan")))
    with pytest.raises(ValueError, match="decay"):
        _core.Trainer(model._impl, options(decay="exponential"))
    trainer = _core.Trainer(model._impl, options())
    with pytest.raises(ValueError, match=r"tokens must have shape \(batch, seq_len \+ 1\)"):
        trainer.step(np.zeros((2,), np.int32), 0, 10, 2)
    with pytest.raises(ValueError, match="optimizer_steps must be >= 0"):
        trainer.optimizer_steps = -1


class CoreCallCounter:
    """Counts Python -> pyswitch._core calls, on every thread or on the creating thread only.

    Python <= 3.11: sys.setprofile ``c_call`` events. From 3.12 a pybind11 method called on an
    object raises no ``c_call`` event, so there the counter listens to sys.monitoring ``CALL``
    events instead (process-wide; filtered by thread when asked)."""

    def __init__(self, this_thread_only: bool = False):
        self.calls = []
        self.lock = threading.Lock()
        self.thread = threading.get_ident() if this_thread_only else None
        self.monitoring = getattr(sys, "monitoring", None)

    @staticmethod
    def _is_core(fn, self_obj=None) -> bool:
        owner = getattr(fn, "__self__", None)
        return (
            getattr(fn, "__module__", None) == "pyswitch._core"
            or (owner is not None and type(owner).__module__ == "pyswitch._core")
            or (self_obj is not None and type(self_obj).__module__ == "pyswitch._core")
        )

    def _record(self, fn):
        if self.thread is not None and threading.get_ident() != self.thread:
            return
        with self.lock:
            self.calls.append(getattr(fn, "__qualname__", repr(fn)))

    def profile(self, frame, event, arg):
        if event == "c_call" and self._is_core(arg):
            self._record(arg)

    def on_call(self, code, offset, fn, arg0):
        self_obj = None if arg0 is self.monitoring.MISSING else arg0
        if self._is_core(fn, self_obj):
            self._record(fn)

    # sys.monitoring has one profiler slot per process: counters active at once (one per rank
    # thread) share it through this set.
    _active: set = set()
    _active_lock = threading.Lock()

    @classmethod
    def _dispatch(cls, code, offset, fn, arg0):
        for counter in list(cls._active):
            counter.on_call(code, offset, fn, arg0)

    def __enter__(self):
        if self.monitoring is not None:
            m = self.monitoring
            with CoreCallCounter._active_lock:
                if not CoreCallCounter._active:
                    m.use_tool_id(m.PROFILER_ID, "pyswitch-tests")
                    m.register_callback(m.PROFILER_ID, m.events.CALL, CoreCallCounter._dispatch)
                    m.set_events(m.PROFILER_ID, m.events.CALL)
                CoreCallCounter._active.add(self)
        elif self.thread is not None:
            sys.setprofile(self.profile)
        else:
            threading.setprofile(self.profile)
            sys.setprofile(self.profile)
        return self

    def __exit__(self, *exc):
        if self.monitoring is not None:
            m = self.monitoring
            with CoreCallCounter._active_lock:
                CoreCallCounter._active.discard(self)
                if not CoreCallCounter._active:
                    m.set_events(m.PROFILER_ID, 0)
                    m.register_callback(m.PROFILER_ID, m.events.CALL, None)
                    m.free_tool_id(m.PROFILER_ID)
        else:
            sys.setprofile(None)
            threading.setprofile(None)


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_training_step_makes_at_most_three_core_calls(ranks, tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    corpus = ByteCorpus(tmp_path / "corpus.txt", seq_len=16)
    config = SwitchLMConfig(**CONFIG)
    o = TrainOptions(batch_size=4, seq_len=16, ranks=ranks, minutes=10.0, progress=False)
    per_rank = []

    def body(comm):
        run = _Run(config, o, corpus, comm, None)
        run.train_step(0, 10)  # warm: first-call setup is not a step's cost
        with CoreCallCounter(this_thread_only=True) as counter:
            run.train_step(1, 10)
        per_rank.append(counter.calls)

    if ranks == 1:
        body(None)
    else:
        LocalGroup(ranks).run(body)
    assert len(per_rank) == ranks
    for calls in per_rank:
        assert 1 <= len(calls) <= 3, calls


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_training_loop_makes_at_most_three_core_calls_per_step(ranks, tmp_path):
    """The whole loop of `pyswitch train` (batch, the rank agreement on time-based stopping and
    validation, the step, logging), counted as the difference between a 5-step and a 2-step run
    of the same configuration, so setup, the final validation and the checkpoint cancel out.
    Under 2 ranks each rank makes 3: the agreement's call check and broadcast, and the step."""
    (tmp_path / "corpus.txt").write_text(TEXT)
    config = SwitchLMConfig(**CONFIG)

    def calls_for(steps):
        o = TrainOptions(
            steps=steps,
            minutes=None,
            batch_size=4,
            seq_len=16,
            ranks=ranks,
            data=str(tmp_path / "corpus.txt"),
            out=str(tmp_path / f"run{steps}"),
            progress=False,
            plots=False,
            eval_every=1000,
            ckpt_every=1000,
            log_every=1000,
        )
        with CoreCallCounter() as counter:
            train(config, o, log=lambda *a: None)
        return len(counter.calls)

    # Counted over all rank threads; each rank makes its own crossings.
    per_rank_step = (calls_for(5) - calls_for(2)) / 3 / ranks
    assert 1 <= per_rank_step <= 3, per_rank_step
