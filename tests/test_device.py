"""Devices: CUDA availability is reported without error on a machine with no CUDA backend, and
asking a layer or model for device="cuda" gives pyswitch.DeviceError, never a crash."""

import numpy as np
import pytest

import pyswitch
from pyswitch import DenseFFN, SwitchFFN, _core
from pyswitch.models import SwitchLM, SwitchLMConfig


def test_cuda_is_reported_unavailable_without_the_backend():
    if pyswitch.build_info()["cuda"]:
        pytest.skip("this build has the CUDA backend")
    assert pyswitch.cuda.is_available() is False
    assert pyswitch.cuda.device_count() == 0


def test_device_error_is_a_pyswitch_runtime_error():
    assert issubclass(pyswitch.DeviceError, pyswitch.Error)
    assert issubclass(pyswitch.DeviceError, RuntimeError)


@pytest.mark.parametrize(
    "make",
    [
        lambda device: SwitchFFN(8, 16, 2, device=device),
        lambda device: DenseFFN(8, 16, device=device),
        lambda device: SwitchLM(
            SwitchLMConfig(d_model=16, num_layers=2, num_heads=2, d_ff=32, num_experts=2),
            device=device,
        ),
    ],
    ids=["SwitchFFN", "DenseFFN", "SwitchLM"],
)
def test_cuda_layers_raise_device_error_and_cpu_is_the_default(make):
    with pytest.raises(pyswitch.DeviceError, match="device 'cuda' is not available"):
        make("cuda")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        make("tpu")
    with pytest.raises(TypeError, match="device"):
        make(0)
    make("cpu")  # the default, spelled out


def test_options_carry_the_device_by_name():
    options = _core.SwitchFFNOptions(device="cpu")
    assert options.device == "cpu"
    options.device = "cuda"  # a valid name; the layer refuses it, not the options
    assert options.device == "cuda"
    with pytest.raises(ValueError, match="SwitchFFN: device must be 'cpu' or 'cuda'"):
        options.device = "gpu"


def test_a_cpu_layer_still_runs_after_a_refused_cuda_one():
    with pytest.raises(pyswitch.DeviceError):
        SwitchFFN(8, 16, 2, device="cuda")
    y = SwitchFFN(8, 16, 2).forward(np.ones((4, 8), np.float32))
    assert y.shape == (4, 8) and np.isfinite(y).all()
