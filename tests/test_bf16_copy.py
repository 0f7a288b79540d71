# The bf16 compute copy of the FFN weights (moe::ExpertWeights): kept between forwards and
# re-rounded only when the masters may have changed. Every test writes the float32 masters some
# way and checks the next bf16 forward bit for bit against a fresh layer holding the same masters.
import numpy as np
import pytest

from pyswitch import _core
from pyswitch.layers import DenseFFN, SwitchFFN
from pyswitch.models import SwitchLM, SwitchLMConfig
from pyswitch.train import TrainOptions, _trainer_options

D, F, E = 16, 32, 4


def switch(seed=5, **kw):
    kw.setdefault("activation", "geglu")
    kw.setdefault("use_bias", True)
    return SwitchFFN(D, F, E, dtype="bfloat16", capacity_factor=4.0, seed=seed, **kw)


def dense(seed=5):
    return DenseFFN(D, F, activation="geglu", dtype="bfloat16", seed=seed)


def tokens(seed=0, T=24):
    return np.random.default_rng(seed).standard_normal((T, D)).astype(np.float32)


def fresh_like(layer, make):
    """A new layer (another seed, so that its own init differs) given layer's masters."""
    other = make(seed=99)
    src = layer.params
    dst = other.params
    for name, value in src.items():
        dst[name][...] = value
    return other


def assert_same_forward(layer, make, x):
    y = layer.forward(x)
    ref = fresh_like(layer, make).forward(x)
    np.testing.assert_array_equal(y, ref)
    return y


@pytest.mark.parametrize("make", [switch, dense], ids=["switch", "dense"])
def test_the_copy_is_reused_while_no_view_is_alive(make):
    layer = make()
    x = tokens()
    y0 = layer.forward(x)
    first = layer._impl._copy_refreshes
    assert first == 1
    for _ in range(3):
        np.testing.assert_array_equal(layer.forward(x), y0)
    assert layer._impl._copy_refreshes == first  # no view alive, nothing written: no rounding


@pytest.mark.parametrize("make", [switch, dense], ids=["switch", "dense"])
def test_writing_a_whole_master_through_a_view_is_seen(make):
    layer = make()
    x = tokens()
    y0 = layer.forward(x)
    rng = np.random.default_rng(1)
    for name in ("w_in", "w_gate", "w_out"):
        w = layer.params[name]
        layer.params[name][...] = rng.standard_normal(w.shape).astype(np.float32) * 0.3
        del w
        y = assert_same_forward(layer, make, tokens())
        assert not np.array_equal(layer.forward(x), y0)
        y0 = layer.forward(x)
        del y


def test_a_slice_of_a_slice_keeps_the_view_alive_and_is_seen():
    layer = switch()
    x = tokens()
    layer.forward(x)
    view = layer.params["w_out"]
    part = view[1:][:, 2:7, ::2]  # a view of a view: NumPy gives it the first view's base
    del view
    before = layer._impl._copy_refreshes
    layer.forward(x)  # part is alive: this forward re-rounds
    assert layer._impl._copy_refreshes == before + 1
    part[...] += np.float32(0.25)  # written after a forward, through a still-live slice
    assert_same_forward(layer, switch, x)
    part *= np.float32(-2.0)
    del part  # the last holder goes: the copy is marked stale
    assert_same_forward(layer, switch, x)
    layer.forward(x)  # re-rounds once: assert_same_forward read the masters through views
    n = layer._impl._copy_refreshes
    layer.forward(x)
    layer.forward(x)
    assert layer._impl._copy_refreshes == n  # nothing alive, nothing written: cached again


def test_a_held_params_dict_forces_rounding_and_stays_correct():
    layer = switch()
    x = tokens()
    params = layer.params  # held across forwards, e.g. by a Python optimizer
    for step in range(3):
        layer.forward(x)
        params["w_in"][step] += np.float32(0.5)
        assert_same_forward(layer, switch, x)
    n = layer._impl._copy_refreshes
    layer.forward(x)
    assert layer._impl._copy_refreshes == n + 1
    del params
    layer.forward(x)
    n = layer._impl._copy_refreshes
    layer.forward(x)
    assert layer._impl._copy_refreshes == n


def test_backward_uses_the_forwards_weights():
    # A write between forward and backward must not change what backward differentiates.
    layer = switch(use_bias=False)
    ref = fresh_like(layer, lambda seed: switch(seed=seed, use_bias=False))
    x = tokens()
    dy = tokens(7)
    layer.forward(x)
    ref.forward(x)
    layer.params["w_in"][...] *= np.float32(3.0)
    np.testing.assert_array_equal(layer.backward(dy), ref.backward(dy))
    for name in ("w_in", "w_gate", "w_out", "router"):
        np.testing.assert_array_equal(layer.grads[name], ref.grads[name], err_msg=name)


def test_float32_layers_have_no_copy():
    layer = SwitchFFN(D, F, E, seed=5)
    layer.forward(tokens())
    layer.forward(tokens())
    assert layer._impl._copy_refreshes == 0


MODEL = dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, num_experts=4, seed=3)


def model_tokens(step, rows=4, seq_len=16):
    rng = np.random.default_rng(step)
    return rng.integers(0, 256, size=(rows, seq_len + 1), dtype=np.int32)


def fresh_model_like(model, config):
    other = SwitchLM(config)
    src, dst = model.params, other.params
    for name, value in src.items():
        dst[name][...] = value
    return other


@pytest.mark.parametrize("experts", [4, 0], ids=["switch", "dense"])
def test_model_params_written_through_views_are_seen(experts):
    config = SwitchLMConfig(**{**MODEL, "num_experts": experts}, dtype="bfloat16")
    model = SwitchLM(config)
    t = model_tokens(0)
    model.logits(t)
    for name in ("layers.1.ffn.w_in", "layers.0.ffn.w_out"):
        view = model.params[name]
        view[..., :3] = np.float32(0.125)
        del view
        np.testing.assert_array_equal(
            model.logits(t), fresh_model_like(model, config).logits(t), err_msg=name
        )
    model.logits(t)  # re-rounds once: fresh_model_like read the masters through views
    n = model._impl._copy_refreshes
    model.logits(t)
    assert model._impl._copy_refreshes == n


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("experts", [4, 0], ids=["switch", "dense"])
def test_trainer_refreshes_the_copy_in_its_update(optimizer, experts):
    config = SwitchLMConfig(**{**MODEL, "num_experts": experts}, dtype="bfloat16")
    model = SwitchLM(config)
    trainer = _core.Trainer(model._impl, _trainer_options(TrainOptions(optimizer=optimizer)))
    for step in range(2):
        t = model_tokens(step)
        info = trainer.step(t, step, 5, t.shape[0] * (t.shape[1] - 1))
        assert info["updated"]
    n = model._impl._copy_refreshes
    probe = model_tokens(9)
    logits = model.logits(probe)  # on the copy the optimizer wrote: no rounding pass
    assert model._impl._copy_refreshes == n
    # Only now read the masters (which makes the next forward re-round).
    np.testing.assert_array_equal(logits, fresh_model_like(model, config).logits(probe))
    np.testing.assert_array_equal(model.logits(probe), logits)
