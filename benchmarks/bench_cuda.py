"""Benchmark: the CUDA backend against PyTorch CUDA and cuBLAS, same process, same GPU.

Three comparisons, each against a baseline timed in this run:

1. The Switch layer (SwitchFFN, bf16, forward + backward, device arrays through DLPack) against
   (a) the cuBLAS bf16 GEMM rate at the same total GEMM FLOPs (torch.matmul on bf16, the six
   GEMMs per expert of a forward + backward over T/E rows each), reported as pyswitch's GEMM
   FLOP rate / cuBLAS's; and (b) the index-based MoE layer people write in PyTorch (router in
   float32, argmax, cumsum-over-one-hot capacity, per-expert gather / FFN / scatter, autograd),
   reported as torch time / pyswitch time.
2. The router at T tokens, E experts (top-1, capacity 1.25, position priority) on CUDA logits:
   pyswitch.route(device="cuda") against the same router in torch on the GPU (softmax, argmax,
   cumsum over one_hot, capacity mask, aux and z losses) and torch.softmax + torch.topk alone.
   pyswitch returns its plan as host arrays (it finishes capacity on the host), so its time
   includes that copy; the torch router's outputs stay on the GPU.

Goals (issue 14, on an H200): layer >= 70% of the cuBLAS rate and >= 2x torch; router >= 10x
torch. Needs a CUDA device, torch with CUDA, and pyswitch built with its CUDA backend.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

NAME = "bench_cuda"
CAPACITY_FACTOR = 1.25
GOAL_GEMM_FRACTION = 0.70
GOAL_LAYER_VS_TORCH = 2.0
GOAL_ROUTER_VS_TORCH = 10.0
BASELINES = {
    "cublas_gemm": "torch.matmul on bfloat16 CUDA tensors (cuBLAS, float32 accumulation): the six "
    "GEMMs per expert of one forward + backward, T/E rows per expert",
    "torch_moe": "index-based Switch layer in PyTorch CUDA, bf16 (float32 router, argmax, "
    "cumsum(one_hot) capacity, per-expert index_select / FFN / index_add, autograd backward)",
    "torch_router": "the same router in PyTorch CUDA (softmax, argmax, cumsum(one_hot) positions, "
    "capacity mask, aux and z losses)",
    "torch_topk": "torch.softmax + torch.topk(k=1) alone (no capacity, no losses)",
}


def gpu_time(torch, fn, warmup: int, repeat: int) -> float:
    """Median seconds of fn() with the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def torch_moe_layer(torch, d, f, E, T):
    """The PyTorch baseline: parameters and a forward + backward closure on x (T, d) bf16."""
    F = torch.nn.functional
    dev = "cuda"
    router = (torch.randn(d, E, device=dev) * d**-0.5).requires_grad_()
    w_in = (torch.randn(E, d, f, device=dev, dtype=torch.bfloat16) * d**-0.5).requires_grad_()
    w_out = (torch.randn(E, f, d, device=dev, dtype=torch.bfloat16) * f**-0.5).requires_grad_()
    C = min(T, int(CAPACITY_FACTOR * T / E))

    def step(x, dy):
        logits = x.float() @ router
        probs = F.softmax(logits, dim=1)
        gate, expert = probs.max(dim=1)
        position = torch.cumsum(F.one_hot(expert, E), dim=0).gather(1, expert[:, None])[:, 0] - 1
        kept = position < C
        y = torch.zeros_like(x)
        for e in range(E):
            rows = torch.nonzero((expert == e) & kept)[:, 0]
            h = F.relu(x.index_select(0, rows) @ w_in[e])
            out = (h @ w_out[e]) * gate.index_select(0, rows)[:, None].to(x.dtype)
            y = y.index_add(0, rows, out)
        y.backward(dy)

    return step


def bench_layer(torch, ps, T, d, f, E, warmup, repeat):
    bf16 = torch.bfloat16
    x = torch.randn(T, d, device="cuda", dtype=bf16).requires_grad_()
    dy = torch.randn(T, d, device="cuda", dtype=bf16)
    result = {"shape": {"T": T, "d_model": d, "d_ff": f, "E": E}}

    # (a) cuBLAS: the GEMMs alone, T/E rows per expert.
    rows = T // E
    a = torch.randn(rows, d, device="cuda", dtype=bf16)
    w1 = torch.randn(d, f, device="cuda", dtype=bf16)
    w2 = torch.randn(f, d, device="cuda", dtype=bf16)
    h = torch.randn(rows, f, device="cuda", dtype=bf16)
    g = torch.randn(rows, d, device="cuda", dtype=bf16)

    def gemms():
        for _ in range(E):
            torch.matmul(a, w1)  # forward
            torch.matmul(h, w2)
            torch.matmul(g, w2.t())  # backward: d hidden, d w_out, d x, d w_in
            torch.matmul(h.t(), g)
            torch.matmul(h, w1.t())
            torch.matmul(a.t(), h)

    gemm_flops = 12.0 * rows * E * d * f
    gemm_s = gpu_time(torch, gemms, warmup, repeat)
    result["cublas_gemm_s"] = gemm_s
    result["cublas_tflops"] = gemm_flops / gemm_s / 1e12

    # pyswitch: the layer on device arrays.
    layer = ps.SwitchFFN(
        d, f, E, device="cuda", dtype="bfloat16", capacity_factor=CAPACITY_FACTOR, jitter_eps=0.0
    )
    xd = x.detach()
    y = torch.empty_like(xd)
    dx = torch.empty_like(xd)

    def pyswitch_step():
        layer.forward_into(xd, y, training=True)
        layer.backward_into(dy, dx)

    layer_s = gpu_time(torch, pyswitch_step, warmup, repeat)
    kept = T - int(layer.last_plan.dropped)
    result["pyswitch_s"] = layer_s
    result["pyswitch_kept_rows"] = kept
    result["pyswitch_gemm_tflops"] = 12.0 * kept * d * f / layer_s / 1e12
    result["ratio_vs_cublas_rate"] = result["pyswitch_gemm_tflops"] / result["cublas_tflops"]

    # (b) the torch index-based layer.
    step = torch_moe_layer(torch, d, f, E, T)
    torch_s = gpu_time(torch, lambda: step(x, dy), warmup, repeat)
    result["torch_moe_s"] = torch_s
    result["ratio_vs_torch"] = torch_s / layer_s
    return result


def torch_router(torch, logits, capacity):
    F = torch.nn.functional
    T, E = logits.shape
    probs = F.softmax(logits, dim=1)
    gate, expert = probs.max(dim=1)
    one_hot = F.one_hot(expert, E)
    position = torch.cumsum(one_hot, dim=0).gather(1, expert[:, None])[:, 0] - 1
    kept = position < capacity
    gate = torch.where(kept, gate, torch.zeros((), device=logits.device))
    slot = torch.where(kept, position, torch.full((), -1, device=logits.device))
    counts = one_hot.sum(dim=0)
    aux = E * torch.sum(probs.mean(dim=0) * counts.float() / T)
    z = torch.logsumexp(logits, dim=1).square().mean()
    return expert, gate, slot, aux, z


def bench_router(torch, ps, T, E, warmup, repeat):
    logits = torch.randn(T, E, device="cuda")
    capacity = max(4, int(CAPACITY_FACTOR * T / E))
    result = {"shape": {"T": T, "E": E}}
    result["pyswitch_s"] = gpu_time(
        torch,
        lambda: ps.route(logits, capacity_factor=CAPACITY_FACTOR, device="cuda"),
        warmup,
        repeat,
    )
    result["torch_router_s"] = gpu_time(
        torch, lambda: torch_router(torch, logits, capacity), warmup, repeat
    )
    result["torch_topk_s"] = gpu_time(
        torch, lambda: torch.topk(torch.softmax(logits, dim=1), 1, dim=1), warmup, repeat
    )
    result["ratio_vs_torch_router"] = result["torch_router_s"] / result["pyswitch_s"]
    result["ratio_vs_torch_topk"] = result["torch_topk_s"] / result["pyswitch_s"]
    # The plans must agree: the same experts and, where kept, the same slots.
    plan = ps.route(logits, capacity_factor=CAPACITY_FACTOR, device="cuda")
    expert, _, slot, _, _ = torch_router(torch, logits, plan.capacity)
    result["same_experts_as_torch"] = bool(
        np.array_equal(plan.expert_index[:, 0], expert.cpu().numpy())
    )
    result["same_slots_as_torch"] = bool(np.array_equal(plan.slot[:, 0], slot.cpu().numpy()))
    return result


def main(argv=None) -> int:
    args = common.make_parser(NAME, __doc__).parse_args(argv)
    ps = common.try_import_pyswitch()
    torch = common.try_import_torch()
    if ps is None or torch is None or not torch.cuda.is_available():
        print(f"{NAME}: needs pyswitch, torch with CUDA and a GPU; skipped", flush=True)
        return 0
    if not ps.cuda.is_available():
        print(f"{NAME}: pyswitch has no usable CUDA backend here; skipped", flush=True)
        return 0
    info = common.machine_info()
    info["gpu"] = ps.cuda.device_info(0)
    info["cuda_versions"] = ps.cuda.versions()
    info["torch"] = torch.__version__
    print(common.format_machine(info))
    print(f"GPU: {info['gpu']['name']}; {info['cuda_versions']}; torch {torch.__version__}")
    if args.quick:
        layer_shape = dict(T=4096, d=256, f=1024, E=8)
        router_shape = dict(T=65536, E=64)
        warmup, repeat = 1, 3
    else:
        layer_shape = dict(T=65536, d=1024, f=4096, E=8)
        router_shape = dict(T=1 << 20, E=64)
        warmup, repeat = 3, 10
    layer = bench_layer(torch, ps, warmup=warmup, repeat=repeat, **layer_shape)
    router = bench_router(torch, ps, warmup=warmup, repeat=repeat, **router_shape)
    rows = [
        [
            "SwitchFFN bf16 fwd+bwd",
            f"T={layer_shape['T']} d={layer_shape['d']} f={layer_shape['f']} E={layer_shape['E']}",
            f"{layer['pyswitch_s'] * 1e3:.2f}",
            f"cuBLAS GEMMs {layer['cublas_gemm_s'] * 1e3:.2f} ms "
            f"({layer['cublas_tflops']:.0f} TFLOP/s)",
            f"{layer['ratio_vs_cublas_rate']:.2f} of rate (goal {GOAL_GEMM_FRACTION})",
        ],
        [
            "",
            "",
            "",
            f"torch index MoE {layer['torch_moe_s'] * 1e3:.2f} ms",
            f"{layer['ratio_vs_torch']:.2f}x (goal {GOAL_LAYER_VS_TORCH}x)",
        ],
        [
            "route top-1 cf 1.25",
            f"T={router_shape['T']} E={router_shape['E']}",
            f"{router['pyswitch_s'] * 1e3:.2f}",
            f"torch router {router['torch_router_s'] * 1e3:.2f} ms",
            f"{router['ratio_vs_torch_router']:.2f}x (goal {GOAL_ROUTER_VS_TORCH}x)",
        ],
        [
            "",
            "",
            "",
            f"torch softmax+topk {router['torch_topk_s'] * 1e3:.2f} ms",
            f"{router['ratio_vs_torch_topk']:.2f}x",
        ],
    ]
    common.print_table(["case", "shape", "pyswitch ms", "baseline (same run)", "ratio"], rows)
    print(
        f"router plans: same experts as torch {router['same_experts_as_torch']}, "
        f"same slots {router['same_slots_as_torch']}"
    )
    path = common.write_json(
        NAME,
        {"machine": info, "baselines": BASELINES, "layer": layer, "router": router},
        args.json,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
