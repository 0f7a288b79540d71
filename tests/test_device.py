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
    if not pyswitch.cuda.is_available():
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
    if pyswitch.cuda.is_available():
        pytest.skip("CUDA is available here: nothing is refused")
    with pytest.raises(pyswitch.DeviceError):
        SwitchFFN(8, 16, 2, device="cuda")
    y = SwitchFFN(8, 16, 2).forward(np.ones((4, 8), np.float32))
    assert y.shape == (4, 8) and np.isfinite(y).all()


def test_route_on_cuda_without_cuda_is_a_device_error_and_the_name_is_checked():
    logits = np.zeros((4, 3), np.float32)
    if not pyswitch.cuda.is_available():
        with pytest.raises(pyswitch.DeviceError, match="route: device 'cuda' is not available"):
            pyswitch.route(logits, device="cuda")
    with pytest.raises(ValueError, match="route: device must be 'cpu' or 'cuda', got 'gpu'"):
        pyswitch.route(logits, device="gpu")


def test_the_model_refuses_cuda_with_a_clear_error_where_cuda_exists():
    if not pyswitch.cuda.is_available():
        pytest.skip("no CUDA here: the refusal is the availability one, tested above")
    with pytest.raises(pyswitch.DeviceError, match="SwitchLM: device 'cuda' is not supported"):
        SwitchLM(
            SwitchLMConfig(d_model=16, num_layers=2, num_heads=2, d_ff=32, num_experts=2),
            device="cuda",
        )


def test_device_array_methods_need_a_cuda_layer():
    layer = SwitchFFN(8, 16, 2)
    x = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="SwitchFFN.forward_into: device arrays need a "):
        layer.forward_into(x, x)
    with pytest.raises(ValueError, match="DenseFFN.backward_into: device arrays need a "):
        DenseFFN(8, 16).backward_into(x, x)


def test_cuda_module_reports_no_device_cleanly_when_built():
    if not pyswitch.build_info()["cuda"]:
        pytest.skip("this build has no CUDA backend")
    import pyswitch._cuda as cuda_module

    assert cuda_module.device_count() >= 0
    assert cuda_module.versions().startswith("CUDA runtime 13.")
    if cuda_module.device_count() == 0:
        with pytest.raises(pyswitch.DeviceError, match="no CUDA device is visible"):
            cuda_module.backend_capsule()


def test_device_info_argument_and_availability_errors():
    with pytest.raises(TypeError, match="pyswitch.cuda.device_info: device must be an integer"):
        pyswitch.cuda.device_info(1.5)
    if not pyswitch.cuda.is_available():
        with pytest.raises(pyswitch.DeviceError, match="device 'cuda' is not available"):
            pyswitch.cuda.device_info(0)
