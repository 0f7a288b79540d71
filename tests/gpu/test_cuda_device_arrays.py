"""The device-array path: forward_into / backward_into and route() on CUDA arrays borrowed
through DLPack (torch here), against the NumPy path of the same layer."""

import numpy as np
import pytest

import pyswitch

torch = pytest.importorskip("torch")


def on_gpu(array, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(array)).cuda()
    return t.to(dtype) if dtype is not None else t


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_into_and_backward_into_equal_the_numpy_path(dtype):
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 32)).astype(np.float32)
    dy = rng.standard_normal((200, 32)).astype(np.float32)
    a = pyswitch.SwitchFFN(32, 64, 4, device="cuda", dtype=dtype, seed=3)
    b = pyswitch.SwitchFFN(32, 64, 4, device="cuda", dtype=dtype, seed=3)
    x_t, dy_t = on_gpu(x, torch_dtype), on_gpu(dy, torch_dtype)
    y_t, dx_t = torch.empty_like(x_t), torch.empty_like(x_t)
    a.forward_into(x_t, y_t, training=True)
    a.backward_into(dy_t, dx_t)
    torch.cuda.synchronize()
    x_np = x_t.cpu().float().numpy()
    dy_np = dy_t.cpu().float().numpy()
    if dtype == "bfloat16":
        import ml_dtypes

        x_np, dy_np = x_np.astype(ml_dtypes.bfloat16), dy_np.astype(ml_dtypes.bfloat16)
    y = b.forward(x_np, training=True)
    dx = b.backward(dy_np)
    assert np.array_equal(y_t.cpu().float().numpy(), y.astype(np.float32))
    assert np.array_equal(dx_t.cpu().float().numpy(), dx.astype(np.float32))


def test_device_arrays_are_checked():
    layer = pyswitch.SwitchFFN(32, 64, 4, device="cuda")
    x = torch.zeros((8, 32), device="cuda")
    with pytest.raises(ValueError, match=r"must both have shape \(tokens, 32\)"):
        layer.forward_into(x, torch.zeros((8, 31), device="cuda"))
    with pytest.raises(TypeError, match="must have the dtype of x"):
        layer.forward_into(x, torch.zeros((8, 32), device="cuda", dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="must live on a CUDA device"):
        layer.forward_into(torch.zeros((8, 32)), x)
    with pytest.raises(ValueError, match="C-contiguous"):
        layer.forward_into(torch.zeros((32, 8), device="cuda").t(), x)


def test_route_reads_cuda_logits_in_place():
    logits = np.random.default_rng(1).standard_normal((1000, 16)).astype(np.float32)
    a = pyswitch.route(on_gpu(logits), k=2, device="cuda")
    b = pyswitch.route(logits, k=2)
    assert np.array_equal(a.expert_index, b.expert_index)
    assert np.array_equal(a.slot, b.slot)
    assert np.array_equal(a.gate.view(np.uint32), b.gate.view(np.uint32))
