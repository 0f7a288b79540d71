"""Benchmark: training-step throughput of the Switch language model, pyswitch vs PyTorch (CPU).

One training step = forward, backward, global-norm clipping and an AdamW update, on a batch of
byte tokens from the default corpus; for pyswitch, one call of the C++ Trainer, as in
`pyswitch train`. Baseline, same process and same weights: the same model
written in PyTorch in this file (tied embedding, RMSNorm, RoPE, causal attention through
scaled_dot_product_attention, top-1 Switch FFN in the index style of today's HF code with
capacity, dense FFNs elsewhere, float32 router, CE + aux + z losses, torch.optim.AdamW with
foreach), in float32 and in bfloat16 (torch.autocast; the router stays float32). Both get the
same number of threads. Before timing, the first step's loss of the two is compared (jitter
off, so the routing is the same). Goal (issue 5): >= 1.5x PyTorch.
"""

from __future__ import annotations

import math
import time

import numpy as np

try:
    import _common as common
except ImportError:  # run as a module from the repository root
    from benchmarks import _common as common

NAME = "bench_train"
GOAL = 1.5


def torch_model(torch, ps_model, config, dtype):
    """A PyTorch copy of a pyswitch SwitchLM (same weights) and its training step."""
    F = torch.nn.functional
    c = config
    d, H = c.d_model, c.num_heads
    Dh = d // H
    params = {n: torch.tensor(np.array(p), requires_grad=True) for n, p in ps_model.params.items()}
    switch_layers = set(ps_model.switch_layers)
    half = Dh // 2
    inv = torch.tensor(c.rope_base ** (-2.0 * np.arange(half) / Dh), dtype=torch.float64)

    def rope_tables(S):
        angles = torch.arange(S, dtype=torch.float64)[:, None] * inv[None, :]
        return torch.cos(angles).float(), torch.sin(angles).float()

    def rmsnorm(x, w):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + c.norm_eps)).to(x.dtype) * w

    def rope(x, cos, sin):  # x (B, H, S, Dh), half-split layout
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def switch(x, prefix):
        T = x.shape[0]
        E = c.num_experts
        logits = x.float() @ params[prefix + "router"]
        probs = F.softmax(logits, dim=-1)
        expert = torch.argmax(logits, dim=-1)
        one_hot = F.one_hot(expert, E)
        cap = min(T, max(4, math.floor(c.capacity_factor * T / E)))
        kept = one_hot * (torch.cumsum(one_hot, dim=0) <= cap)
        gate = probs.gather(1, expert[:, None])
        f = one_hot.sum(0).float() / T
        aux = E * torch.sum(f * probs.mean(0))
        zl = torch.logsumexp(logits, -1).square().mean()
        out = torch.zeros_like(x)
        w_in, w_out = params[prefix + "w_in"], params[prefix + "w_out"]
        for e in range(E):
            idx = kept[:, e].bool()
            h = F.relu(x[idx] @ w_in[e])
            out[idx] = (gate[idx] * (h @ w_out[e])).to(out.dtype)
        return out, c.aux_loss_coef * aux + c.z_loss_coef * zl

    def loss_fn(tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        B, S = inputs.shape
        cos, sin = rope_tables(S)
        h = params["embed"][inputs].reshape(B * S, d)
        extra = 0.0
        for l in range(c.num_layers):
            p = f"layers.{l}."
            a = rmsnorm(h, params[p + "attn_norm"])
            qkv = (a @ params[p + "w_qkv"]).reshape(B, S, 3, H, Dh).permute(2, 0, 3, 1, 4)
            q, k, v = rope(qkv[0], cos, sin), rope(qkv[1], cos, sin), qkv[2]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            h = h + o.permute(0, 2, 1, 3).reshape(B * S, d) @ params[p + "w_o"]
            f = rmsnorm(h, params[p + "ffn_norm"])
            if l in switch_layers:
                y, more = switch(f, p + "ffn.")
                extra = extra + more
            else:
                y = F.relu(f @ params[p + "ffn.w_in"]) @ params[p + "ffn.w_out"]
            h = h + y
        z = rmsnorm(h, params["final_norm"])
        logits = z.float() @ params["embed"].t()
        ce = F.cross_entropy(logits, targets.reshape(-1))
        return ce, ce + extra

    leaves = list(params.values())
    opt = torch.optim.AdamW(
        leaves, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True
    )

    def step(tokens_np):
        tokens = torch.from_numpy(tokens_np.astype(np.int64))
        opt.zero_grad(set_to_none=True)
        if dtype == "bfloat16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ce, total = loss_fn(tokens)
        else:
            ce, total = loss_fn(tokens)
        total.backward()
        torch.nn.utils.clip_grad_norm_(leaves, 1.0, foreach=True)
        opt.step()
        return float(ce.detach())

    return step


def pyswitch_step(ps, model):
    """The step `pyswitch train` runs: one Trainer call (AdamW, clip 1.0, constant lr 1e-3).
    A build without the C++ Trainer (older versions, for before/after runs) gets the same step
    written in Python."""
    from pyswitch import _core

    if hasattr(_core, "Trainer"):
        options = _core.TrainerOptions(peak_lr=1e-3, warmup_steps=0, decay="constant", clip=1.0)
        trainer = _core.Trainer(model._impl, options)
        counter = iter(range(1 << 62))

        def step(tokens):
            n = tokens.shape[0] * (tokens.shape[1] - 1)
            return trainer.step(tokens, next(counter), 1 << 40, n)["ce"]

        return step

    from pyswitch.optim import AdamW, clip_grad_norm

    opt = AdamW(model.params, model.decay_params)
    grads = list(model.grads.values())

    def step(tokens):
        loss = model.loss_and_grad(tokens)
        clip_grad_norm(grads, 1.0)
        opt.step(model.grads, 1e-3)
        return loss["ce"]

    return step


def main(argv=None) -> int:
    parser = common.make_parser(NAME, __doc__)
    parser.add_argument(
        "--dtypes",
        default="float32,bfloat16",
        help="comma-separated model dtypes to time (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if not set(args.dtypes.split(",")) <= {"float32", "bfloat16"}:
        parser.error(f"--dtypes: expected float32 and/or bfloat16, got {args.dtypes!r}")
    threads = common.set_threads(args.threads)
    ps = common.try_import_pyswitch()
    torch_module = common.try_import_torch()
    if ps is None:
        print(f"pyswitch not importable ({common.pyswitch_import_error()})")
        return 1
    from pyswitch.data import ByteCorpus, batch
    from pyswitch.models import SwitchLM, SwitchLMConfig

    info = common.machine_info()
    print(__doc__.strip())
    print(common.format_machine(info))
    batch_size, seq_len = (8, 128) if args.quick else (16, 256)
    corpus = ByteCorpus(seq_len=seq_len)
    batches = [batch(corpus.train, batch_size, seq_len, 0, s) for s in range(64)]
    repeat, warmup = (2, 1) if args.quick else (6, 2)
    rows, results, problems = [], [], []
    notes = []
    for experts in (8, 0):
        for dtype in args.dtypes.split(","):
            torch = common.torch_for(torch_module, dtype)
            if torch_module is not None and torch is None:
                notes.append(common.TORCH_BF16_SKIPPED)
            base = dict(num_experts=experts, dtype=dtype)
            if args.quick:
                base.update(d_model=128, d_ff=512, num_layers=2)
            label = f"{'Switch E=8' if experts else 'dense'}, {dtype}"
            # Agreement first: jitter off, so both route the same tokens.
            check = SwitchLM(SwitchLMConfig(jitter_eps=0.0, **base))
            ours = check.loss(batches[0], training=True)["ce"]
            theirs = None
            if torch is not None:
                theirs = torch_model(torch, check, check.config, dtype)(batches[0])
                rel = abs(ours - theirs) / abs(theirs)
                tol = 1e-4 if dtype == "float32" else 2e-2
                if not rel <= tol:
                    problems.append(f"{label}: first-step loss {ours:.6f} vs torch {theirs:.6f}")
            model = SwitchLM(SwitchLMConfig(**base))
            step_ps = pyswitch_step(ps, model)
            times = {}
            samples = {"pyswitch": []}
            for i in range(warmup + repeat):
                t0 = time.perf_counter()
                step_ps(batches[i + 1])
                if i >= warmup:
                    samples["pyswitch"].append(time.perf_counter() - t0)
            if torch is not None:
                step_torch = torch_model(torch, model, model.config, dtype)
                samples["torch"] = []
                for i in range(warmup + repeat):
                    t0 = time.perf_counter()
                    step_torch(batches[i + 1])
                    if i >= warmup:
                        samples["torch"].append(time.perf_counter() - t0)
            tokens = batch_size * seq_len
            for name, values in samples.items():
                times[name] = float(np.median(values))
            ktok = {k: tokens / v / 1e3 for k, v in times.items()}
            ratio = times["torch"] / times["pyswitch"] if "torch" in times else None
            goal = "-" if ratio is None else ("met" if ratio >= GOAL else "MISSED")
            rows.append(
                [
                    label,
                    f"{ktok['pyswitch']:.2f}",
                    f"{ktok['torch']:.2f}" if "torch" in ktok else "-",
                    f"{ratio:.2f}x" if ratio else "-",
                    f">={GOAL}x torch: {goal}",
                ]
            )
            results.append(
                {
                    "case": label,
                    "experts": experts,
                    "dtype": dtype,
                    "config": model.config.to_dict(),
                    "batch_size": batch_size,
                    "seq_len": seq_len,
                    "step_s": times,
                    "ktokens_per_s": ktok,
                    "ratio_vs_torch": ratio,
                    "first_step_loss": {"pyswitch": ours, "torch": theirs},
                }
            )
    print()
    common.print_table(
        ["case (train step)", "pyswitch ktok/s", "torch ktok/s", "ratio", "goal"], rows
    )
    path = common.write_json(
        NAME,
        {
            "machine": info,
            "threads": threads,
            "baseline": "the same model in PyTorch (this file), torch.optim.AdamW(foreach)",
            "results": results,
        },
        args.json,
    )
    if torch_module is None:
        notes.append("torch not installed: pyswitch rows only")
    common.print_run_summary(info, rows, sorted(set(notes)), problems)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
