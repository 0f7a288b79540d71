"""The ``pyswitch`` command line.

``pyswitch train`` trains a Switch Transformer byte-level language model on the Python
standard library's source (or ``--data``), with progress, validation, checkpoints and plots;
``eval`` scores a run's checkpoint, ``generate`` samples from it, ``compare`` overlays runs and
measures the Switch models' step speed-up over a dense one, ``bench`` lists the benchmarks and
``info`` prints the build.
"""

from __future__ import annotations

import argparse
import json
import sys


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _capacity(text: str):
    if text.lower() in ("none", "dropless"):
        return None
    return _positive_float(text)


def _add_train(sub) -> None:
    from .models import SwitchLMConfig
    from .train import TrainOptions

    m, t = SwitchLMConfig(), TrainOptions()
    p = sub.add_parser(
        "train",
        help="train a Switch Transformer language model (the main job)",
        description="Train a byte-level Switch Transformer LM. With no options: the default "
        f"model for {t.minutes:g} minutes on the Python standard library's source.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=_positive_int, default=m.d_model)
    g.add_argument("--layers", type=_positive_int, default=m.num_layers)
    g.add_argument("--heads", type=_positive_int, default=m.num_heads)
    g.add_argument("--d-ff", type=_positive_int, default=m.d_ff)
    g.add_argument(
        "--experts",
        type=_non_negative_int,
        default=m.num_experts,
        help="experts per Switch layer; 0 = the dense FLOP-matched baseline (default %(default)s)",
    )
    g.add_argument("--k", type=_positive_int, default=m.k, help="experts per token")
    g.add_argument(
        "--capacity-factor",
        type=_capacity,
        default=m.capacity_factor,
        help="training capacity factor, or 'none' for dropless (default %(default)s)",
    )
    g.add_argument("--eval-capacity-factor", type=_capacity, default=m.eval_capacity_factor)
    g.add_argument("--expert-every", type=_positive_int, default=m.expert_every)
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default=m.dtype)
    g.add_argument("--aux-loss-coef", type=float, default=m.aux_loss_coef)
    g.add_argument("--z-loss-coef", type=float, default=m.z_loss_coef)
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=None, help="stop after this many steps")
    g.add_argument(
        "--minutes",
        type=_positive_float,
        default=None,
        help=f"stop after this long (default {t.minutes:g} when --steps is not given)",
    )
    g.add_argument("--optimizer", choices=("adamw", "adafactor"), default=t.optimizer)
    g.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate")
    g.add_argument("--warmup-steps", type=_non_negative_int, default=t.warmup_steps)
    g.add_argument("--batch-size", type=_positive_int, default=t.batch_size)
    g.add_argument("--seq-len", type=_positive_int, default=t.seq_len)
    g.add_argument("--seed", type=_non_negative_int, default=t.seed)
    g.add_argument(
        "--ranks",
        type=_positive_int,
        default=t.ranks,
        help="thread ranks: experts sharded over them, the rest data parallel",
    )
    g.add_argument("--data", default=None, help="a text file or a directory of text files")
    g.add_argument("--out", default=None, help="run directory (default runs/<time>-<kind>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--eval-every", type=_positive_int, default=t.eval_every, help="steps")
    g.add_argument(
        "--eval-minutes",
        type=_positive_float,
        default=t.eval_minutes,
        help="also validate after this many minutes since the last validation",
    )
    g.add_argument("--ckpt-every", type=_positive_int, default=t.ckpt_every)
    g.add_argument("--log-every", type=_positive_int, default=t.log_every)
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--threads", type=_positive_int, default=None, help="core threads")


def _cmd_train(args) -> int:
    import pyswitch

    from .models import SwitchLMConfig
    from .train import TrainOptions, train

    if args.resume and not args.out:
        raise ValueError("--resume needs --out DIR (the run to continue)")
    if args.threads:
        pyswitch.set_num_threads(args.threads)
    config = SwitchLMConfig(
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        d_ff=args.d_ff,
        num_experts=args.experts,
        k=args.k,
        capacity_factor=args.capacity_factor,
        eval_capacity_factor=args.eval_capacity_factor,
        expert_every=args.expert_every,
        dtype=args.dtype,
        aux_loss_coef=args.aux_loss_coef,
        z_loss_coef=args.z_loss_coef,
        seed=args.seed,
    )
    minutes = args.minutes
    if args.steps is None and minutes is None:
        minutes = TrainOptions().minutes
    options = TrainOptions(
        steps=args.steps,
        minutes=minutes,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        optimizer=args.optimizer,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        ranks=args.ranks,
        data=args.data,
        out=args.out,
        resume=args.resume,
        eval_every=args.eval_every,
        eval_minutes=args.eval_minutes,
        ckpt_every=args.ckpt_every,
        log_every=args.log_every,
        progress=not args.no_progress,
    )
    summary = train(config, options)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_eval(args) -> int:
    from .train import evaluate

    print(json.dumps(evaluate(args.run, data=args.data, batches=args.batches), indent=2))
    return 0


def _cmd_generate(args) -> int:
    from .train import load_model

    model, _, _ = load_model(args.run)
    out = model.generate(
        args.prompt.encode("utf-8"),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    )
    sys.stdout.write(args.prompt + out.decode("utf-8", errors="replace") + "\n")
    return 0


def _cmd_compare(args) -> int:
    from .plots import compare_runs

    result = compare_runs(args.runs, args.out)
    print(result["table"])
    print(f"plot: {result['plot']}")
    return 0


def _cmd_bench(args) -> int:
    print(
        "The benchmarks live in the source tree's benchmarks/ directory:\n"
        "  python benchmarks/bench_router.py   router and bf16 conversion vs NumPy / PyTorch\n"
        "  python benchmarks/bench_layer.py    SwitchFFN layer vs PyTorch\n"
        "  python benchmarks/bench_comm.py     collectives (thread ranks, MPI) and expert "
        "parallelism\n"
        "Each prints a table and writes JSON to benchmarks/results/."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyswitch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print build information")
    _add_train(sub)
    p = sub.add_parser("eval", help="validation loss and bits per byte of a run")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--data", default=None, help="score another corpus")
    p.add_argument("--batches", type=_positive_int, default=64)
    p = sub.add_parser("generate", help="sample text from a run's model")
    p.add_argument("--run", required=True)
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=_positive_int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=_positive_int, default=40)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p = sub.add_parser("compare", help="overlay runs; step speed-up over the dense run")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default="compare.png", help="plot file (a .txt table goes next to it)")
    sub.add_parser("bench", help="where the benchmarks are and what they measure")
    args = parser.parse_args(argv)
    commands = {
        "train": _cmd_train,
        "eval": _cmd_eval,
        "generate": _cmd_generate,
        "compare": _cmd_compare,
        "bench": _cmd_bench,
    }
    if args.command == "info":
        import pyswitch

        print(json.dumps(pyswitch.build_info(), indent=2))
        return 0
    from . import CheckpointError

    try:
        return commands[args.command](args)
    except (ValueError, TypeError, OSError, CheckpointError) as exc:
        # Bad options, missing or damaged files: a message, not a traceback.
        print(f"pyswitch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyswitch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
