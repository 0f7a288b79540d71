"""PNG plots of training runs (``metrics.jsonl``) and the comparison of runs against a dense one.

Uses matplotlib's Agg canvas directly (no pyplot, no display, no change to the global backend);
matplotlib is imported only when a plot is drawn. Not a live dashboard: it reads finished or
running run directories.

A run directory holds ``metrics.jsonl``, one JSON object per logged step with at least ``step``,
``loss`` and ``wall_time`` (seconds), ``val_loss`` when validated, and for Switch runs
``expert_load`` (per Switch layer, per expert: fraction of tokens routed there) and
``drop_fraction`` (a number, or one per Switch layer); and ``config.json`` with ``experts``
(0 for a dense model).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PLOTS_DIR = "plots"


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The logged records of a run, one per step, in step order.

    Tolerant of what a crash or a resume leaves: a last line cut short is skipped silently;
    another line that is not a JSON object is skipped with a warning; records without an integer
    ``step`` are ignored; records of the same step (a resumed run logging a step again) are
    merged, later keys winning.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory holding ``metrics.jsonl``.

    Returns
    -------
    list of dict
        Sorted by ``step``.

    Raises
    ------
    FileNotFoundError
        If ``run_dir/metrics.jsonl`` does not exist.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"read_metrics: {str(path)!r} does not exist")
    lines = path.read_bytes().split(b"\n")
    by_step: dict[int, dict] = {}
    bad = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict):
            if i != last:
                bad.append(i + 1)
            continue
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            continue
        by_step.setdefault(step, {}).update(record)
    if bad:
        warnings.warn(
            f"read_metrics: {str(path)!r}: skipped {len(bad)} line(s) that are not JSON objects "
            f"(line numbers {bad[:10]})",
            stacklevel=2,
        )
    return [by_step[s] for s in sorted(by_step)]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _series(records: list[dict], x_key: str, y_key: str) -> tuple[list[float], list[float]]:
    """(x, y) of the records where both are finite numbers."""
    pairs = [
        (r[x_key], r[y_key]) for r in records if _finite(r.get(x_key)) and _finite(r.get(y_key))
    ]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _figure(nrows: int = 1, height: float = 4.0, width: float = 7.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, format="png")
    return path


def _loss_plot(records, x_key: str, xlabel: str, title: str, path: Path) -> Path | None:
    train = _series(records, x_key, "loss")
    val = _series(records, x_key, "val_loss")
    if not train[0] and not val[0]:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    if train[0]:
        ax.plot(*train, label="train", linewidth=1.0, alpha=0.8)
    if val[0]:
        ax.plot(*val, label="validation", marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    # Bits per byte on the right: loss / ln 2.
    ax.secondary_yaxis("right", functions=(_to_bits, _to_nats)).set_ylabel("bits / byte")
    return _save(fig, path)


def _to_bits(x):
    return x / math.log(2)


def _to_nats(x):
    return x * math.log(2)


def _edges(steps: list[float]) -> list[float]:
    """Cell edges around sorted step values (midpoints; half a gap beyond each end)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [steps[0] - (mids[0] - steps[0])] + mids + [steps[-1] + (steps[-1] - mids[-1])]


def _expert_load_plot(records, path: Path) -> Path | None:
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    rows = [r for r in records if isinstance(r.get("expert_load"), list) and r["expert_load"]]
    if not rows:
        return None
    num_layers = max(len(r["expert_load"]) for r in rows)
    fig = _figure(num_layers, height=2.6)
    axes = fig.subplots(num_layers, 1, squeeze=False, sharex=True)[:, 0]
    for layer, ax in enumerate(axes):
        cols = [
            (r["step"], r["expert_load"][layer])
            for r in rows
            if layer < len(r["expert_load"]) and isinstance(r["expert_load"][layer], list)
        ]
        num_experts = max((len(c[1]) for c in cols), default=0)
        if not num_experts:
            ax.set_visible(False)
            continue
        grid = np.full((num_experts, len(cols)), np.nan)
        for j, (_, load) in enumerate(cols):
            for e, value in enumerate(load):
                if _finite(value):
                    grid[e, j] = value
        # Centre the colours on the balanced load 1/E: red is over-, blue under-loaded.
        balanced = 1.0 / num_experts
        top = max(2 * balanced, float(np.nanmax(grid)) if np.isfinite(grid).any() else 0.0)
        mesh = ax.pcolormesh(
            _edges([c[0] for c in cols]),
            np.arange(num_experts + 1) - 0.5,
            grid,
            cmap="coolwarm",
            norm=TwoSlopeNorm(vmin=0.0, vcenter=balanced, vmax=top),
            shading="flat",
        )
        ax.set_ylabel(f"layer {layer}\nexpert")
        if num_experts <= 16:
            ax.set_yticks(range(num_experts))
        fig.colorbar(mesh, ax=ax, label="token fraction")
    axes[0].set_title("Expert load per Switch layer (balanced = 1 / experts)")
    axes[-1].set_xlabel("step")
    return _save(fig, path)


def _drop_plot(records, path: Path) -> Path | None:
    rows = [r for r in records if "drop_fraction" in r and _finite(r.get("step"))]
    curves: dict[str, tuple[list, list]] = {}
    for r in rows:
        value = r["drop_fraction"]
        items = [("all", value)] if not isinstance(value, list) else list(enumerate(value))
        for key, v in items:
            if _finite(v):
                label = key if key == "all" else f"layer {key}"
                curves.setdefault(label, ([], []))
                curves[label][0].append(r["step"])
                curves[label][1].append(v)
    if not curves:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of tokens dropped")
    ax.set_ylim(bottom=0.0)
    ax.set_title("Tokens dropped (over expert capacity)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_run(run_dir: str | os.PathLike) -> list[Path]:
    """Draw the PNG plots of one run into ``run_dir/plots/``.

    Files (each only when its data is present): ``loss_vs_step.png`` and ``loss_vs_time.png``
    (train and validation loss, nats per byte with bits per byte on the right axis),
    ``expert_load.png`` (one heatmap per Switch layer: expert x step, token fraction, coloured
    around the balanced 1/experts), ``drop_fraction.png``.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory holding ``metrics.jsonl``.

    Returns
    -------
    list of pathlib.Path
        The files written, in the order above.

    Raises
    ------
    FileNotFoundError
        If there is no ``metrics.jsonl``.
    ValueError
        If it has no record with a ``step``.
    """
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(
            f"plot_run: {str(Path(run_dir) / METRICS_FILE)!r} holds no record with a step"
        )
    out = Path(run_dir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    name = Path(run_dir).resolve().name
    written = [
        _loss_plot(records, "step", "step", f"{name}: loss", out / "loss_vs_step.png"),
        _loss_plot(
            records, "wall_time", "wall time (s)", f"{name}: loss", out / "loss_vs_time.png"
        ),
        _expert_load_plot(records, out / "expert_load.png"),
        _drop_plot(records, out / "drop_fraction.png"),
    ]
    return [p for p in written if p is not None]


def _read_config(run_dir: Path) -> dict:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"compare_runs: {str(path)!r} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"compare_runs: {str(path)!r} must hold a JSON object")
    return config


def _first_step_at_or_below(steps: list[float], values: list[float], target: float):
    """The first step where the curve reaches ``target``, linearly interpolated between the
    last point above it and the first at or below it; the first step if it starts there;
    ``None`` if it never does."""
    for i, (s, v) in enumerate(zip(steps, values)):
        if v <= target:
            if i == 0:
                return float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            return s0 + (v0 - target) * (s - s0) / (v0 - v)
    return None


def compare_runs(run_dirs, out_png: str | os.PathLike) -> dict:
    """Overlay the validation curves of runs and measure each one's step speed-up over the
    dense run.

    The dense run is the first whose ``config.json`` has ``experts == 0``, or else the first
    run. Its final validation loss ``L`` (at its last validated step ``S``) is the target; a
    run's step to target is the first step at which its validation loss is ``<= L``, linearly
    interpolated between the validations around the crossing (the first validated step if it
    is already there); its speed-up is ``S / step_to_target`` (``None`` if it never gets
    there). The dense run's own entry is ``S`` and 1.0 by definition.

    Parameters
    ----------
    run_dirs : sequence of str or os.PathLike
        One or more run directories, each with ``metrics.jsonl``.
    out_png : str or os.PathLike
        The PNG to write (validation loss vs step and vs wall time); the same numbers go as a
        text table to ``out_png`` with the suffix ``.txt``.

    Returns
    -------
    dict
        ``dense_run`` (str), ``target_val_loss`` (L), ``dense_final_step`` (S), ``plot`` and
        ``table`` (paths as str), and ``runs``: a list, in the order given, of dicts with
        ``run``, ``experts`` (from config.json, or None), ``final_step``, ``final_val_loss``,
        ``step_to_target`` and ``speedup`` (float or None).

    Raises
    ------
    ValueError
        If ``run_dirs`` is empty, the dense run has no validation loss, or a config.json is
        not a JSON object.
    FileNotFoundError
        If a run has no ``metrics.jsonl``.
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ValueError("compare_runs: run_dirs must name at least one run directory, got none")
    out_png = Path(out_png)

    runs = []
    for d in run_dirs:
        records = read_metrics(d)
        config = _read_config(d)
        steps, vals = _series(records, "step", "val_loss")
        runs.append(
            {
                "dir": d,
                "records": records,
                "experts": config.get("experts"),
                "steps": steps,
                "vals": vals,
            }
        )
    dense = next((r for r in runs if r["experts"] == 0), runs[0])
    if not dense["steps"]:
        raise ValueError(
            f"compare_runs: the dense run {str(dense['dir'])!r} has no validation loss "
            "(no record with a finite val_loss)"
        )
    target = dense["vals"][-1]
    dense_step = dense["steps"][-1]

    results = []
    for r in runs:
        if r is dense:
            reach, speedup = float(dense_step), 1.0
        else:
            reach = _first_step_at_or_below(r["steps"], r["vals"], target)
            speedup = dense_step / reach if reach else None
        results.append(
            {
                "run": str(r["dir"]),
                "experts": r["experts"],
                "final_step": r["steps"][-1] if r["steps"] else None,
                "final_val_loss": r["vals"][-1] if r["vals"] else None,
                "step_to_target": reach,
                "speedup": speedup,
            }
        )

    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure(1, height=4.2, width=12.0)
    ax_step, ax_time = fig.subplots(1, 2)
    for r, res in zip(runs, results):
        label = f"{r['dir'].name} (experts={r['experts']})"
        (line,) = ax_step.plot(r["steps"], r["vals"], marker="o", markersize=3, label=label)
        if res["step_to_target"] is not None and r is not dense:
            ax_step.plot([res["step_to_target"]], [target], marker="x", color=line.get_color())
        ax_time.plot(
            *_series(r["records"], "wall_time", "val_loss"),
            marker="o",
            markersize=3,
            color=line.get_color(),
            label=label,
        )
    for ax, xlabel in ((ax_step, "step"), (ax_time, "wall time (s)")):
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="dense final")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats / byte)")
        ax.grid(True, alpha=0.3)
    ax_step.legend(fontsize=8)
    ax_step.set_title(f"target {target:.4f} at dense step {dense_step}")
    ax_time.set_title("validation loss vs wall time")
    _save(fig, out_png)

    table = out_png.with_suffix(".txt")
    table.write_text(_table(results, dense["dir"], target, dense_step), encoding="utf-8")
    return {
        "dense_run": str(dense["dir"]),
        "target_val_loss": target,
        "dense_final_step": dense_step,
        "plot": str(out_png),
        "table": str(table),
        "runs": results,
    }


def _table(results: list[dict], dense_dir: Path, target: float, dense_step) -> str:
    def fmt(value, spec):
        # A missing value keeps the column's width and alignment.
        width = spec.split(".")[0].rstrip("f")
        return format("-", width) if value is None else format(value, spec)

    lines = [
        f"dense run: {dense_dir}  final validation loss {target:.4f} at step {dense_step}",
        "",
        f"{'run':<40} {'experts':>7} {'final step':>10} {'final val':>9} "
        f"{'step to target':>14} {'speed-up':>8}",
    ]
    for r in results:
        lines.append(
            f"{Path(r['run']).name:<40} {fmt(r['experts'], '>7')} {fmt(r['final_step'], '>10')} "
            f"{fmt(r['final_val_loss'], '>9.4f')} {fmt(r['step_to_target'], '>14.1f')} "
            f"{fmt(r['speedup'], '>8.2f')}"
        )
    return "\n".join(lines) + "\n"
