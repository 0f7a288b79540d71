# pyswitch.plots: PNG plots of a run's metrics.jsonl, and the comparison against a dense run.
"""Synthetic run directories: the plots are written as real PNG files, read_metrics tolerates a
cut-off last line and merges re-logged steps, and compare_runs' step speed-up matches values
computed by hand."""

import json
import math
import struct
import warnings
from pathlib import Path

import pytest

from pyswitch.plots import compare_runs, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: Path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 300 and height >= 200, (path, width, height)
    assert len(data) > 5000, (path, len(data))  # something drawn, not a blank canvas
    assert data.endswith(b"IEND\xaeB`\x82")


def _write_run(run_dir: Path, records: list, config: dict = None, tail: str = ""):
    run_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + tail
    (run_dir / "metrics.jsonl").write_text(text)
    if config is not None:
        (run_dir / "config.json").write_text(json.dumps(config))


def _switch_records(steps=40, layers=2, experts=4):
    records = []
    for i in range(steps):
        step = (i + 1) * 10
        load = [
            [(1 + 0.5 * math.sin(i / 5 + e + layer)) / experts for e in range(experts)]
            for layer in range(layers)
        ]
        load = [[v / sum(row) for v in row] for row in load]
        r = {
            "step": step,
            "loss": 5.0 * math.exp(-i / 15) + 1.0,
            "wall_time": 0.5 * step,
            "expert_load": load,
            "drop_fraction": [0.1 * math.exp(-i / 10), 0.05],
        }
        if i % 5 == 4:
            r["val_loss"] = r["loss"] + 0.1
        records.append(r)
    return records


def test_plot_run_switch(tmp_path):
    _write_run(tmp_path, _switch_records(), tail='{"step": 410, "loss": 1.')
    written = plot_run(tmp_path)
    names = [p.name for p in written]
    assert names == ["loss_vs_step.png", "loss_vs_time.png", "expert_load.png", "drop_fraction.png"]
    for p in written:
        assert p.parent == tmp_path / "plots"
        _assert_png(p)


def test_plot_run_dense_scalar_drop(tmp_path):
    records = [
        {"step": s, "loss": 3.0 / s, "wall_time": float(s), "drop_fraction": 0.0}
        for s in range(1, 30)
    ]
    records[-1]["val_loss"] = 0.2
    _write_run(tmp_path, records)
    names = [p.name for p in plot_run(tmp_path)]
    assert names == ["loss_vs_step.png", "loss_vs_time.png", "drop_fraction.png"]
    assert not (tmp_path / "plots" / "expert_load.png").exists()


def test_plot_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)
    _write_run(tmp_path, [{"event": "start"}])
    with pytest.raises(ValueError, match="no record with a step"):
        plot_run(tmp_path)


def test_read_metrics_tolerance(tmp_path):
    records = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    _write_run(tmp_path, records, tail='{"step": 3, "lo')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a cut-off last line is not worth a warning
        assert read_metrics(tmp_path) == records

    # A resumed run: step 2 logged again (with validation), a corrupt line in the middle,
    # and a non-step record.
    lines = [
        '{"step": 1, "loss": 2.0}',
        '{"step": 2, "loss": 1.5}',
        '{"step": 3, "lo{"step": 2, "loss": 1.4, "val_loss": 1.6}',
        '{"event": "resumed"}',
        '{"step": 2, "loss": 1.4, "val_loss": 1.6}',
        '{"step": 3, "loss": 1.3}',
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match=r"skipped 1 line.*\[3\]"):
        got = read_metrics(tmp_path)
    assert got == [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.4, "val_loss": 1.6},
        {"step": 3, "loss": 1.3},
    ]


def _val_run(run_dir: Path, steps, vals, experts):
    records = [
        {"step": s, "loss": v, "val_loss": v, "wall_time": 2.0 * s} for s, v in zip(steps, vals)
    ]
    records.insert(1, {"step": steps[0] + 1, "loss": 9.9, "wall_time": 1.0})  # no val_loss
    _write_run(run_dir, records, config={"experts": experts})


def test_compare_runs_speedup(tmp_path):
    steps = [100, 200, 300, 400]
    _val_run(tmp_path / "moe8", steps, [2.8, 2.3, 1.9, 1.7], experts=8)
    _val_run(tmp_path / "dense", steps, [3.0, 2.5, 2.2, 2.0], experts=0)
    _val_run(tmp_path / "slow", steps, [3.5, 3.0, 2.6, 2.1], experts=2)
    _val_run(tmp_path / "early", steps, [1.9, 1.8, 1.7, 1.6], experts=4)
    out = tmp_path / "cmp" / "compare.png"
    dirs = [tmp_path / n for n in ("moe8", "dense", "slow", "early")]
    result = compare_runs(dirs, out)

    assert result["dense_run"] == str(tmp_path / "dense")
    assert result["target_val_loss"] == 2.0
    assert result["dense_final_step"] == 400
    runs = {Path(r["run"]).name: r for r in result["runs"]}
    assert [Path(r["run"]).name for r in result["runs"]] == ["moe8", "dense", "slow", "early"]
    # moe8 crosses 2.0 between (200, 2.3) and (300, 1.9): 200 + 100 * 0.3 / 0.4 = 275.
    assert runs["moe8"]["step_to_target"] == pytest.approx(275.0)
    assert runs["moe8"]["speedup"] == pytest.approx(400 / 275)
    assert runs["slow"]["step_to_target"] is None and runs["slow"]["speedup"] is None
    assert runs["early"]["step_to_target"] == 100.0 and runs["early"]["speedup"] == 4.0
    assert runs["dense"]["speedup"] == 1.0 and runs["dense"]["step_to_target"] == 400.0
    assert runs["moe8"]["experts"] == 8 and runs["moe8"]["final_val_loss"] == 1.7
    assert runs["moe8"]["final_step"] == 400

    _assert_png(out)
    table = Path(result["table"]).read_text()
    assert result["table"] == str(out.with_suffix(".txt"))
    assert "1.45" in table and "275.0" in table and "4.00" in table
    assert table.count("\n") == 3 + 4


def test_compare_runs_dense_defaults_to_first(tmp_path):
    _val_run(tmp_path / "a", [10, 20], [3.0, 2.0], experts=4)
    _val_run(tmp_path / "b", [10, 20, 30], [2.5, 1.5, 1.0], experts=8)
    (tmp_path / "b" / "config.json").unlink()
    result = compare_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "c.png")
    assert result["dense_run"] == str(tmp_path / "a")
    b = result["runs"][1]
    assert b["experts"] is None
    # (10, 2.5) -> (20, 1.5) crosses 2.0 at 15: speed-up 20 / 15.
    assert b["step_to_target"] == pytest.approx(15.0)
    assert b["speedup"] == pytest.approx(20 / 15)


def test_compare_runs_errors(tmp_path):
    with pytest.raises(ValueError, match="at least one run"):
        compare_runs([], tmp_path / "x.png")
    _write_run(tmp_path / "noval", [{"step": 1, "loss": 1.0}], config={"experts": 0})
    with pytest.raises(ValueError, match="has no validation loss"):
        compare_runs([tmp_path / "noval"], tmp_path / "x.png")
    _val_run(tmp_path / "badcfg", [1], [1.0], experts=0)
    (tmp_path / "badcfg" / "config.json").write_text("{nope")
    with pytest.raises(ValueError, match="config.json' is not valid JSON"):
        compare_runs([tmp_path / "badcfg"], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError):
        compare_runs([tmp_path / "missing"], tmp_path / "x.png")
