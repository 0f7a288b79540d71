"""The training loop behind ``pyswitch train``: data, ranks, optimizer, validation, checkpoints,
metrics and plots. The model's forward and backward and the optimizer updates run in the C++
core; this module orchestrates them.

Parallelism (``ranks > 1``): thread ranks of one process (:class:`pyswitch.comm.LocalGroup`).
The experts of every Switch layer are sharded over the ranks (expert parallelism) and the
other parameters are replicated (data parallelism): each rank takes an equal slice of the
global batch, back-propagates its share of the global loss (the cross-entropy is averaged over
the global token count) and the replicated gradients are summed over the ranks, so the update
is that of one rank on the whole batch up to float32 summation order (see "Gradient scale" in
:mod:`pyswitch.comm`). Checkpoints hold whole tensors (experts gathered), so a run may resume
on another number of ranks.

Determinism: batch ``step`` is a pure function of ``(seed, step)``, the model's random state
(jitter) is saved with each checkpoint, and every kernel is deterministic, so a resumed run
reproduces the uninterrupted one bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import _core
from . import checkpoint as ckpt
from .data import ByteCorpus, batch, bits_per_byte, eval_batches
from .models import SwitchLM, SwitchLMConfig

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


@dataclasses.dataclass
class TrainOptions:
    """How to train (the model's sizes are a :class:`SwitchLMConfig`)."""

    steps: int | None = None  # None: as many as fit in `minutes`
    minutes: float | None = 10.0
    batch_size: int = 16
    seq_len: int = 256
    optimizer: str = "adamw"
    lr: float | None = None  # None: 2e-3 for AdamW, 1e-2 for Adafactor
    warmup_steps: int = 100
    decay: str = "cosine"
    clip: float = 1.0
    weight_decay: float = 0.1
    seed: int = 0
    ranks: int = 1
    data: str | None = None
    out: str | None = None
    resume: bool = False
    log_every: int = 10
    eval_every: int = 200
    eval_minutes: float | None = 2.0  # also validate after this much wall time (None: off)
    eval_batches: int = 16
    ckpt_every: int = 500
    keep: int = 3
    progress: bool = True
    plots: bool = True

    def peak_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 2e-3 if self.optimizer == "adamw" else 1e-2


def _trainer_options(o: TrainOptions):
    """The C++ Trainer's options (bound by field name) for these training options."""
    t = _core.TrainerOptions()
    t.optimizer = o.optimizer
    t.peak_lr = o.peak_lr()
    t.warmup_steps = o.warmup_steps
    t.decay = o.decay
    t.clip = o.clip
    t.weight_decay = o.weight_decay
    return t


def _check_options(o: TrainOptions, c: SwitchLMConfig) -> None:
    def positive(name, value):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"train: {name} must be an integer >= 1, got {value!r}")

    for name in ("batch_size", "seq_len", "ranks", "log_every", "eval_every", "eval_batches"):
        positive(name, getattr(o, name))
    positive("ckpt_every", o.ckpt_every)
    positive("keep", o.keep)
    if o.steps is not None:
        positive("steps", o.steps)
    if o.minutes is not None and not (o.minutes > 0 and math.isfinite(o.minutes)):
        raise ValueError(f"train: minutes must be > 0, got {o.minutes!r}")
    if o.eval_minutes is not None and not (o.eval_minutes > 0 and math.isfinite(o.eval_minutes)):
        raise ValueError(f"train: eval_minutes must be > 0 or None, got {o.eval_minutes!r}")
    if o.steps is None and o.minutes is None:
        raise ValueError("train: give steps or minutes (or both: whichever comes first)")
    if o.batch_size % o.ranks:
        raise ValueError(
            f"train: batch_size={o.batch_size} must be divisible by ranks={o.ranks} (each rank "
            "takes an equal slice of the global batch)"
        )
    if c.num_experts and c.num_experts % o.ranks:
        raise ValueError(
            f"train: experts={c.num_experts} must be divisible by ranks={o.ranks} (experts are "
            "sharded over the ranks)"
        )
    if c.d_model % c.num_heads or (c.d_model // c.num_heads) % 2:
        raise ValueError(
            "train: d_model must split into num_heads heads of even size (rotary positions "
            f"rotate pairs), got d_model={c.d_model} and num_heads={c.num_heads}"
        )
    if o.optimizer not in ("adamw", "adafactor"):
        raise ValueError(f"train: optimizer must be 'adamw' or 'adafactor', got {o.optimizer!r}")
    if o.lr is not None and not (o.lr > 0 and math.isfinite(o.lr)):
        raise ValueError(f"train: lr must be > 0, got {o.lr!r}")
    if not (o.clip > 0):
        raise ValueError(f"train: clip must be > 0, got {o.clip!r}")


def default_run_dir(config: SwitchLMConfig) -> Path:
    kind = "dense" if config.dense else f"switch-e{config.num_experts}"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}"


class _Run:
    """The state of one rank's training: model, optimizer, and (rank 0) the run directory."""

    def __init__(self, config, options, corpus, comm, start_state):
        self.config, self.options, self.corpus, self.comm = config, options, corpus, comm
        self.rank = comm.rank if comm else 0
        self.world = comm.size if comm else 1
        self.model = SwitchLM(config, comm)
        # The whole step (forward, backward, gradient reduction, clipping, schedule, update)
        # is one C++ call: pyswitch::model::Trainer.
        self.trainer = _core.Trainer(self.model._impl, _trainer_options(options))
        self.opt_state = {name: view for name, view, _expert in self.trainer.state()}
        if start_state is not None:
            self._restore(*start_state)

    def total_parameters(self) -> int:
        """The model's parameter count over all ranks (experts are sharded)."""
        sizes = {n: int(p.size) for n, p in self.model.params.items()}
        expert = sum(sizes[n] for n in self.model.expert_params)
        return sum(sizes.values()) - expert + expert * self.world

    # ---- checkpoint tensors: whole tensors, experts gathered in rank order ---------------------
    def _is_expert_key(self, key: str) -> bool:
        base = key.split(".", 1)[1] if key.startswith("optim.") else key
        return any(base == n or base.startswith(n + ".") for n in self.model.expert_params)

    def gather_tensors(self) -> dict:
        out = {}
        items = [(n, p) for n, p in self.model.params.items()]
        items += [(f"optim.{k}", v) for k, v in self.opt_state.items()]
        for key, value in items:
            if self.comm is not None and self._is_expert_key(key):
                gathered = self.comm.all_gather(np.ascontiguousarray(value))
                value = gathered.reshape((-1,) + value.shape[1:])
            out[key] = np.array(value, copy=True)
        return out

    def _restore(self, tensors: dict, state: dict) -> None:
        targets = dict(self.model.params)
        targets.update({f"optim.{k}": v for k, v in self.opt_state.items()})
        missing = sorted(set(targets) - set(tensors))
        if missing:
            raise ValueError(f"resume: the checkpoint lacks {missing[:5]} (another model?)")
        for key, dst in targets.items():
            src = tensors[key]
            if self.comm is not None and self._is_expert_key(key):
                n = dst.shape[0] if dst.ndim else 0
                src = src[self.rank * n : (self.rank + 1) * n]
            if src.shape != dst.shape:
                raise ValueError(
                    f"resume: {key} has shape {src.shape} in the checkpoint, the model wants "
                    f"{dst.shape} (another model configuration?)"
                )
            dst[...] = src
        self.trainer.optimizer_steps = int(state["optimizer_steps"])
        self.model.training_steps = int(state["model_training_steps"])

    # ---- one step --------------------------------------------------------------------------
    def train_step(self, step: int, total_steps: int) -> dict:
        """One step on this rank's slice of global batch ``step``: a single call into the core
        (see pyswitch::model::Trainer for the reduction, clipping and update rules)."""
        o = self.options
        tokens = batch(self.corpus.train, o.batch_size, o.seq_len, o.seed, step)
        share = o.batch_size // self.world
        mine = tokens[self.rank * share : (self.rank + 1) * share]
        return self.trainer.step(mine, step, total_steps, o.batch_size * o.seq_len)

    def validate(self) -> float:
        o = self.options
        total, count = 0.0, 0
        share = max(1, o.batch_size // self.world)
        for tokens in eval_batches(self.corpus.val, o.batch_size, o.seq_len, o.eval_batches):
            rows = tokens[self.rank * share : (self.rank + 1) * share]
            if self.comm is not None and rows.shape[0] == 0:
                rows = tokens[:1]  # every rank must take part; its loss is not counted
                result, n = self.model.loss(rows), 0
            else:
                result = self.model.loss(rows)
                n = rows.shape[0] * (rows.shape[1] - 1)
            total += result["ce"] * n
            count += n
        if self.comm is not None:
            total, count = _sum_over_ranks(self.comm, [total, float(count)])
        return total / max(count, 1)


def _sum_over_ranks(comm, values: list[float]) -> list[float]:
    """Float64 values summed over the ranks in rank order, the same on every rank (they travel
    as int64 bit patterns: the collectives reduce float32 at most)."""
    bits = np.array(values, np.float64).view(np.int64)
    every = comm.all_gather(bits).view(np.float64)
    return [float(sum(every[r, i] for r in range(every.shape[0]))) for i in range(len(values))]


def _load_or_write_config(run_dir: Path, config: SwitchLMConfig, options: TrainOptions):
    path = run_dir / CONFIG_FILE
    record = {
        "experts": config.num_experts,
        "model": config.to_dict(),
        "train": dataclasses.asdict(options),
    }
    if options.resume and path.is_file():
        saved = json.loads(path.read_text())
        model = SwitchLMConfig.from_dict(saved["model"])
        if model != config:
            changed = {
                k: (v, getattr(config, k))
                for k, v in saved["model"].items()
                if getattr(config, k) != v
            }
            raise ValueError(
                f"resume: the model options differ from the run's config.json: {changed} "
                "(saved, given); resume with the same model options"
            )
        if int(saved.get("train", {}).get("seed", options.seed)) != options.seed:
            raise ValueError(
                f"resume: the run was trained with seed {saved['train']['seed']}, not "
                f"{options.seed}; the data order depends on it"
            )
        return saved
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    return record


# Set by the usual MPI launchers (MPICH/Hydra, Open MPI, MVAPICH, Slurm's PMI) in each process.
_MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def mpi_launch_size() -> int:
    """The number of processes an MPI launcher started this one with (1 when not launched)."""
    for name in _MPI_SIZE_VARIABLES:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def train(config: SwitchLMConfig, options: TrainOptions, *, log=print) -> dict:
    """Train a model and return a summary dict (also written to ``summary.json``).

    Under ``mpiexec -n N`` (and ``ranks=1``) the N processes train together over the MPI
    backend, exactly as N thread ranks would; rank 0 writes the run directory.
    """
    comm = None
    if options.ranks == 1 and mpi_launch_size() > 1:
        from .comm import MPIComm

        comm = MPIComm(timeout=600.0)
        options = dataclasses.replace(options, ranks=comm.size)
        if comm.rank != 0:
            log = _silent  # noqa: F811 - only rank 0 reports
    _check_options(options, config)
    run_dir = Path(options.out) if options.out else default_run_dir(config)
    if comm is not None:  # every rank must use rank 0's directory name
        name = np.frombuffer(str(run_dir).encode().ljust(4096, b"\0")[:4096], np.uint8).copy()
        run_dir = Path(bytes(comm.broadcast(name.view(np.int32))).rstrip(b"\0").decode())
    if not options.resume and (run_dir / METRICS_FILE).exists():
        raise ValueError(
            f"train: {str(run_dir)!r} already holds a run; pass --resume to continue it or "
            "choose another --out"
        )
    corpus = ByteCorpus(options.data, seq_len=options.seq_len)
    if comm is None or comm.rank == 0:
        _load_or_write_config(run_dir, config, options)
    if comm is not None:
        comm.barrier()
    start_step, start_state, start_elapsed = 0, None, 0.0
    if options.resume:
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is not None:
            tensors, state = ckpt.load_checkpoint(latest)
            start_step = int(state["step"])
            start_elapsed = float(state.get("elapsed_s", 0.0))
            start_state = (tensors, state)
            log(f"resuming {run_dir} from step {start_step} ({latest.name})")
    backend = "MPI" if comm is not None else "thread"
    log(
        f"pyswitch train: {'dense' if config.dense else f'Switch E={config.num_experts}'} model, "
        f"d_model={config.d_model}, layers={config.num_layers}, {config.dtype}, "
        f"{options.ranks} {backend} rank(s); corpus: {corpus.description}; run dir: {run_dir}"
    )

    def rank_body(c):
        return _train_rank(
            c, config, options, corpus, run_dir, start_step, start_state, start_elapsed, log
        )

    if comm is not None:
        result = comm.run(rank_body)
        if comm.rank != 0:
            return result
    elif options.ranks == 1:
        result = rank_body(None)
    else:
        from .comm import LocalGroup

        result = LocalGroup(options.ranks, timeout=600.0).run(rank_body)[0]
    (run_dir / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _silent(*_args, **_kwargs) -> None:
    pass


def _train_rank(
    comm, config, options, corpus, run_dir, start_step, start_state, start_elapsed, log
):
    run = _Run(config, options, corpus, comm, start_state)
    lead = run.rank == 0
    o = options
    tokens_per_step = o.batch_size * o.seq_len
    # The schedule needs the run's length: given, or estimated from the first steps' speed.
    total_steps = o.steps
    started = time.monotonic() - start_elapsed
    deadline = None if o.minutes is None else started + 60.0 * o.minutes
    metrics_file = open(run_dir / METRICS_FILE, "a", buffering=1) if lead else None  # noqa: SIM115
    bar = _progress(o, lead, start_step, total_steps)
    step = start_step
    last_val, last_log_time, last_log_step = None, time.monotonic(), step
    # Validation also runs every eval_minutes of wall time, so a slow machine's timed run
    # still gets a validation curve.
    eval_interval = None if o.eval_minutes is None else 60.0 * o.eval_minutes
    last_eval_time = time.monotonic()
    try:
        while True:
            if total_steps is None and step - start_step == 3:
                # Fix the schedule's length once the speed is known (deterministic given it).
                per_step = (time.monotonic() - last_log_time) / max(step - last_log_step, 1)
                remaining = max(1.0, deadline - time.monotonic())
                total_steps = step + max(1, int(remaining / max(per_step, 1e-6)))
                if comm is not None:
                    total_steps = int(comm.broadcast(np.array([total_steps], np.int64))[0])
                if bar is not None:
                    bar.total = total_steps
            if total_steps is not None and step >= total_steps:
                break
            now = time.monotonic()
            stop = deadline is not None and now >= deadline
            due = eval_interval is not None and now - last_eval_time >= eval_interval
            if comm is not None and (deadline is not None or eval_interval is not None):
                stop, due = _agree(comm, stop, due)
            if stop:
                break
            info = run.train_step(step, total_steps or max(step + 1, o.warmup_steps * 10))
            step += 1
            record = None
            if step % o.log_every == 0 or step == 1:
                now = time.monotonic()
                tok_s = (step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
                last_log_time, last_log_step = now, step
                record = _record(step, info, tok_s, now - started)
            if step % o.eval_every == 0 or due:
                last_val = run.validate()
                last_eval_time = time.monotonic()
                record = record or _record(step, info, None, time.monotonic() - started)
                record["val_loss"] = last_val
                record["val_bpb"] = bits_per_byte(last_val)
            if lead and record is not None:
                metrics_file.write(json.dumps(record) + "\n")
            if bar is not None:
                bar.update(1)
                if record is not None:
                    bar.set_postfix(_postfix(record, last_val), refresh=False)
            if step % o.ckpt_every == 0:
                _save(run, run_dir, step, time.monotonic() - started, lead)
        # The end: a final validation, checkpoint and plots.
        if step > start_step or last_val is None:
            last_val = run.validate()
            if lead:
                metrics_file.write(
                    json.dumps(
                        {
                            "step": step,
                            "wall_time": time.monotonic() - started,
                            "val_loss": last_val,
                            "val_bpb": bits_per_byte(last_val),
                        }
                    )
                    + "\n"
                )
        if step > start_step:
            _save(run, run_dir, step, time.monotonic() - started, lead)
    finally:
        if bar is not None:
            bar.close()
        if metrics_file is not None:
            metrics_file.close()
    elapsed = time.monotonic() - started
    summary = {
        "run_dir": str(run_dir),
        "steps": step,
        "tokens": step * tokens_per_step,
        "val_loss": last_val,
        "val_bits_per_byte": bits_per_byte(last_val),
        "elapsed_s": elapsed,
        "tokens_per_s": (step - start_step) * tokens_per_step / max(elapsed - start_elapsed, 1e-9),
        "parameters": run.total_parameters(),
    }
    if lead and o.plots:
        try:
            from .plots import plot_run

            summary["plots"] = [str(p) for p in plot_run(run_dir)]
        except ImportError as exc:  # matplotlib is an extra
            summary["plots"] = f"skipped: {exc} (pip install 'pyswitch[train]')"
    if lead:
        log(
            f"done: {step} steps, {summary['tokens']:,} tokens in {elapsed / 60:.1f} min "
            f"({summary['tokens_per_s']:,.0f} tokens/s); validation loss {last_val:.4f} nats "
            f"= {summary['val_bits_per_byte']:.3f} bits/byte; run dir {run_dir}"
        )
    return summary


def _agree(comm, stop: bool, validate: bool) -> tuple[bool, bool]:
    """Rank 0's decisions (stop for time, validate for time), so every rank takes them at the
    same step."""
    flags = comm.broadcast(np.array([int(stop), int(validate)], np.int64))
    return bool(flags[0]), bool(flags[1])


def _record(step, info, tok_s, wall) -> dict:
    record = {
        "step": step,
        "loss": info["ce"],
        "aux_loss": info["aux"],
        "z_loss": info["z"],
        "grad_norm": info["grad_norm"],
        "lr": info["lr"],
        "wall_time": wall,
    }
    if tok_s is not None:
        record["tokens_per_s"] = tok_s
    stats = info["stats"]
    if stats:
        loads = []
        for s in stats:
            counts = np.asarray(s["tokens_per_expert"], np.float64)
            loads.append((counts / max(counts.sum(), 1.0)).tolist())
        record["expert_load"] = loads
        record["drop_fraction"] = [float(s["drop_fraction"]) for s in stats]
    return record


def _postfix(record, last_val) -> dict:
    out = {"loss": f"{record.get('loss', float('nan')):.3f}"}
    if "aux_loss" in record:
        out["aux"] = f"{record['aux_loss']:.4f}"
    if "drop_fraction" in record:
        out["drop"] = f"{float(np.mean(record['drop_fraction'])):.3f}"
    if "tokens_per_s" in record:
        out["tok/s"] = f"{record['tokens_per_s']:,.0f}"
    if last_val is not None:
        out["val"] = f"{last_val:.3f}"
    return out


def _progress(options, lead, start_step, total_steps):
    if not (options.progress and lead):
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(
        total=total_steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        desc="train",
    )


def _save(run, run_dir, step, elapsed, lead):
    tensors = run.gather_tensors()  # collective under ranks: every rank takes part
    if not lead:
        return
    state = {
        "optimizer": run.options.optimizer,
        "optimizer_steps": run.trainer.optimizer_steps,
        "model_training_steps": run.model.training_steps,
        "data_seed": run.options.seed,
        "elapsed_s": elapsed,
    }
    ckpt.save_checkpoint(run_dir, step, tensors, state, keep=run.options.keep)


def load_model(run_dir, *, step: int | None = None) -> tuple[SwitchLM, dict, dict]:
    """The model of a run directory at its latest checkpoint (or ``step``): (model, config
    record, checkpoint state). Raises CheckpointError for a damaged checkpoint, ValueError
    when there is none."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE})")
    record = json.loads(path.read_text())
    config = SwitchLMConfig.from_dict(record["model"])
    if step is None:
        latest = ckpt.latest_checkpoint(run_dir)
    else:
        latest = run_dir / "ckpt" / f"step_{step:08d}"
    if latest is None or not latest.exists():
        raise ValueError(f"{str(run_dir)!r} has no checkpoint to load")
    tensors, state = ckpt.load_checkpoint(latest)
    model = SwitchLM(config)
    for name, dst in model.params.items():
        if name not in tensors or tensors[name].shape != dst.shape:
            raise ValueError(f"{latest}: tensor {name} is missing or has another shape")
        dst[...] = tensors[name]
    return model, record, state


def evaluate(run_dir, *, data=None, batches: int = 64) -> dict:
    """Validation loss and bits per byte of a run's latest checkpoint."""
    model, record, state = load_model(run_dir)
    train = record.get("train", {})
    seq_len = int(train.get("seq_len", 256))
    bs = int(train.get("batch_size", 16))
    corpus = ByteCorpus(data if data is not None else train.get("data"), seq_len=seq_len)
    total, count = 0.0, 0
    for tokens in eval_batches(corpus.val, bs, seq_len, batches):
        n = tokens.shape[0] * (tokens.shape[1] - 1)
        total += model.loss(tokens)["ce"] * n
        count += n
    loss = total / max(count, 1)
    return {
        "run_dir": str(run_dir),
        "step": int(state["step"]),
        "val_loss": loss,
        "val_bits_per_byte": bits_per_byte(loss),
        "tokens": count,
    }
