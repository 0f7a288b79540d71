"""SwitchFFN and DenseFFN with device="cuda" against the same layers on the CPU.

Same seed, same initial weights (drawn on the host); forward outputs, input gradients, parameter
gradients and losses must agree within the tolerances below, and the routing plan must be the
same. Tolerances (relative to the largest magnitude of the reference): float32 1e-5 (cuBLAS with
float32 compute vs the CPU's FMA chains, both accumulating in float32 over d_model or d_ff
terms); bfloat16 2e-2 (a bf16 rounding of outputs that differ by float32 noise can move by one
bf16 ulp, 2^-8 relative)."""

import ml_dtypes
import numpy as np
import pytest

import pyswitch

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}


def rel_diff(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    scale = max(np.abs(want).max(), 1e-30)
    return float(np.abs(got - want).max() / scale)


def inputs(T, d, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, d)).astype(np.float32)
    dy = rng.standard_normal((T, d)).astype(np.float32)
    if dtype == "bfloat16":
        return x.astype(ml_dtypes.bfloat16), dy.astype(ml_dtypes.bfloat16)
    return x, dy


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "geglu"])
@pytest.mark.parametrize("training", [False, True])
def test_switch_ffn_on_cuda_matches_the_cpu(dtype, activation, training):
    kwargs = dict(
        k=2 if activation == "geglu" else 1,
        capacity_factor=1.0,
        activation=activation,
        use_bias=True,
        expert_dropout=0.1 if training else 0.0,
        dtype=dtype,
        seed=5,
    )
    cpu = pyswitch.SwitchFFN(64, 128, 8, **kwargs)
    gpu = pyswitch.SwitchFFN(64, 128, 8, device="cuda", **kwargs)
    for name, value in cpu.params.items():
        assert np.array_equal(gpu.params[name], value), name  # the same initial weights
    x, dy = inputs(300, 64, dtype, seed=1)
    y_cpu, y_gpu = cpu.forward(x, training), gpu.forward(x, training)
    assert y_gpu.dtype == y_cpu.dtype and y_gpu.shape == y_cpu.shape
    plan_cpu, plan_gpu = cpu.last_plan, gpu.last_plan
    assert np.array_equal(plan_gpu.expert_index, plan_cpu.expert_index)
    assert np.array_equal(plan_gpu.slot, plan_cpu.slot)
    tol = TOLERANCE[dtype]
    assert rel_diff(y_gpu, y_cpu) <= tol
    assert abs(gpu.aux_loss - cpu.aux_loss) <= 1e-6 * max(1.0, abs(cpu.aux_loss))
    assert abs(gpu.z_loss - cpu.z_loss) <= 1e-5 * max(1.0, abs(cpu.z_loss))
    dx_cpu, dx_gpu = cpu.backward(dy), gpu.backward(dy)
    assert rel_diff(dx_gpu, dx_cpu) <= tol
    for name, grad in cpu.grads.items():
        assert rel_diff(gpu.grads[name], grad) <= max(tol, 1e-4), name
    stats_cpu, stats_gpu = cpu.stats(), gpu.stats()
    assert np.array_equal(stats_gpu["tokens_per_expert"], stats_cpu["tokens_per_expert"])
    assert abs(stats_gpu["router_entropy"] - stats_cpu["router_entropy"]) <= 1e-5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_ffn_on_cuda_matches_the_cpu(dtype):
    cpu = pyswitch.DenseFFN(64, 256, activation="gelu", use_bias=True, dtype=dtype, seed=2)
    gpu = pyswitch.DenseFFN(
        64, 256, activation="gelu", use_bias=True, dtype=dtype, seed=2, device="cuda"
    )
    x, dy = inputs(77, 64, dtype, seed=4)
    tol = TOLERANCE[dtype]
    assert rel_diff(gpu.forward(x, True), cpu.forward(x, True)) <= tol
    assert rel_diff(gpu.backward(dy), cpu.backward(dy)) <= tol
    for name, grad in cpu.grads.items():
        assert rel_diff(gpu.grads[name], grad) <= max(tol, 1e-4), name


def test_cuda_layer_is_deterministic_run_to_run():
    x, dy = inputs(512, 64, "float32", seed=9)
    results = []
    for _ in range(2):
        layer = pyswitch.SwitchFFN(64, 128, 8, device="cuda", seed=1, use_bias=True)
        y = layer.forward(x, True)
        dx = layer.backward(dy)
        results.append((y.tobytes(), dx.tobytes(), layer.grads["w_in"].tobytes()))
    assert results[0] == results[1]


def test_cuda_layer_params_are_read_only_copies_and_refuse_a_communicator():
    layer = pyswitch.SwitchFFN(16, 32, 4, device="cuda")
    w = layer.params["w_in"]
    with pytest.raises(ValueError, match="read-only"):
        w[0, 0, 0] = 1.0
    group = pyswitch.comm.LocalGroup(1)
    with pytest.raises(pyswitch.DeviceError, match="expert parallelism on cuda"):
        group.run(lambda comm: pyswitch.SwitchFFN(16, 32, 4, device="cuda", comm=comm))


def test_device_info_checks_its_index():
    info = pyswitch.cuda.device_info(0)
    assert info["memory_bytes"] > 0 and len(info["compute_capability"]) == 2
    with pytest.raises(ValueError, match=r"device_info: device must be in \[0, "):
        pyswitch.cuda.device_info(pyswitch.cuda.device_count())
    with pytest.raises(TypeError, match="device"):
        pyswitch.cuda.device_info("0")
