"""Before/after: the benchmark steps of two pyswitch builds and of PyTorch, interleaved by step.

Why: on a shared VM the machine's speed drifts by 10-20% between runs a few minutes apart, and
torch's with it, so "ratio before" and "ratio after" from two separate runs of bench_layer or
bench_train differ by more than most changes do. Here three worker processes (the "before"
build, the "after" build and torch) each build the same case once, then take turns: one step of
each per round, in a rotating order, so the three see the same machine state. Reported: the
median step time of each, after / before (same round), and each build's ratio to torch.

Cases: the SwitchFFN layer step of bench_layer (T=8192, d_model 512, d_ff 2048, forward +
backward, float32; torch-index baseline) at E=8 and E=64 (a "-bf16" suffix, say layer-e64-bf16,
runs bench_layer's bfloat16 row instead), and the training step of bench_train (batch 16 x 256,
float32; its PyTorch model) for the Switch E=8 and the dense model.

    python benchmarks/ab_compare.py --before /path/to/old/venv/bin/python [--after PYTHON]
        [--cases layer-e8,layer-e64,train-switch,train-dense] [--rounds 15] [--no-torch]

Each Python must import its own pyswitch (and numpy); torch runs under --after. Environment for
the before build (say LD_LIBRARY_PATH) goes through --before-env KEY=VALUE.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CASES = ("layer-e8", "layer-e64", "train-switch", "train-dense")
THREADS = 2


def build_step(impl: str, case: str, threads: int):
    """The step closure of one implementation ("pyswitch" or "torch") for one case."""
    sys.path.insert(0, str(HERE))
    if case.startswith("layer"):
        import bench_layer as bl

        parts = case.split("-")  # layer, e<E>[, bf16]
        E = int(parts[1][1:])
        dtype = "bfloat16" if parts[2:] == ["bf16"] else "float32"
        T, d, f = 8192, 512, 2048
        x, dy = bl.make_inputs(T, d, dtype)
        if impl == "pyswitch":
            import pyswitch as ps

            ps.set_num_threads(threads)
            layer = bl.make_pyswitch_layer(ps, d, f, E, dtype)

            def step():
                layer.forward(x, training=True)
                layer.backward(dy)

            return step
        import torch

        torch.set_num_threads(threads)
        model = bl.TorchMoE(torch, "index", bl.numpy_weights(d, f, E), dtype)
        xt, dyt = bl.to_torch(torch, x).requires_grad_(True), bl.to_torch(torch, dy)
        return lambda: model.train_step(xt, dyt)

    import bench_train as bt

    import pyswitch as ps
    from pyswitch.data import ByteCorpus, batch
    from pyswitch.models import SwitchLM, SwitchLMConfig

    ps.set_num_threads(threads)
    corpus = ByteCorpus(seq_len=256)
    batches = [batch(corpus.train, 16, 256, 0, s) for s in range(8)]
    model = SwitchLM(SwitchLMConfig(num_experts=8 if case == "train-switch" else 0))
    if impl == "pyswitch":
        inner = bt.pyswitch_step(ps, model)
    else:
        import torch

        torch.set_num_threads(threads)
        inner = bt.torch_model(torch, model, model.config, "float32")
    counter = iter(range(1 << 40))
    return lambda: inner(batches[next(counter) % len(batches)])


def worker(impl: str, case: str, threads: int) -> int:
    step = build_step(impl, case, threads)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t0 = time.perf_counter()
        step()
        print(time.perf_counter() - t0, flush=True)
    return 0


class Worker:
    def __init__(self, python: str, impl: str, case: str, env: dict):
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", impl, case],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(HERE.parent),
        )
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"worker {impl} {case} failed to start (said {line!r})")

    def step(self) -> float:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", help="python of the 'before' build (required)")
    p.add_argument("--before-env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--after", default=sys.executable, help="python of the 'after' build")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--no-torch", action="store_true", help="time the two builds only")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], args.worker[1], THREADS)
    if not args.before:
        p.error("--before is required: the python of the build to compare against")
    sys.path.insert(0, str(HERE))
    import _common as common

    print(__doc__.split("\n\n")[0])
    print(common.format_machine(common.machine_info()))
    print(f"threads per worker: {THREADS}; baseline: torch (bench_layer's torch-index model, "
          "bench_train's PyTorch model) in its own worker, interleaved\n")  # fmt: skip
    before_env = dict(os.environ)
    before_env.update(kv.split("=", 1) for kv in args.before_env)
    results = []
    print(f"{'case':14s} {'before ms':>10s} {'after ms':>10s} {'torch ms':>10s} "
          f"{'after/before':>12s} {'before vs torch':>15s} {'after vs torch':>14s}")  # fmt: skip
    for case in args.cases.split(","):
        workers = {
            "before": Worker(args.before, "pyswitch", case, before_env),
            "after": Worker(args.after, "pyswitch", case, dict(os.environ)),
        }
        if not args.no_torch:
            workers["torch"] = Worker(args.after, "torch", case, dict(os.environ))
        names = list(workers)
        times = {n: [] for n in names}
        for r in range(args.warmup + args.rounds):
            k = r % len(names)
            order = names[k:] + names[:k]  # rotate, so no build always goes first
            for n in order:
                t = workers[n].step()
                if r >= args.warmup:
                    times[n].append(t)
        for w in workers.values():
            w.close()
        med = {n: float(np.median(v)) for n, v in times.items()}
        speedup = [b / a for b, a in zip(times["before"], times["after"])]
        torch_s = med.get("torch", float("nan"))
        row = {
            "case": case,
            "median_s": med,
            "after_over_before_speed": float(np.median(speedup)),
            "before_vs_torch": torch_s / med["before"],
            "after_vs_torch": torch_s / med["after"],
            "rounds": args.rounds,
            "samples_s": times,
        }
        results.append(row)

        def ratio(value: float, width: int) -> str:
            # Without the torch worker there is no baseline: a dash, not "nanx".
            return f"{value:{width}.2f}x" if np.isfinite(value) else f"{'-':>{width + 1}}"

        torch_ms = f"{1e3 * torch_s:10.1f}" if np.isfinite(torch_s) else f"{'-':>10}"
        print(
            f"{case:14s} {1e3 * med['before']:10.1f} {1e3 * med['after']:10.1f} "
            f"{torch_ms} {row['after_over_before_speed']:11.3f}x "
            f"{ratio(row['before_vs_torch'], 14)} {ratio(row['after_vs_torch'], 13)}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
