# The pyswitch command line: train, eval, generate, compare, bench and info, mostly in-process
# through pyswitch.cli.main (fast), plus `python -m pyswitch.cli` in a subprocess for the entry
# point and its exit status.
"""CLI tests on tiny runs (d_model 32, 2 layers, 4 steps of 8 x 32 bytes, a ~9 KB text file).

``main()`` returns the exit status for errors it reports (2, a one-line message on stderr) and
argparse raises ``SystemExit(2)`` for options it rejects itself.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import pyswitch
from pyswitch.cli import main
from pyswitch.train import load_model

WORDS = "switch transformers route each token to one expert of many in a sparse layer".split()
TINY = [
    "--d-model", "32", "--layers", "2", "--heads", "2", "--d-ff", "64",
    "--batch-size", "8", "--seq-len", "32", "--warmup-steps", "1",
    "--eval-every", "2", "--ckpt-every", "2", "--no-progress",
]  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(WORDS, size=7)) for _ in range(220)]
    path = tmp_path_factory.mktemp("cli-data") / "text.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def summary_of(stdout: str) -> dict:
    """The JSON summary printed last by `pyswitch train` (after its log lines)."""
    return json.loads(stdout[stdout.index("\n{") + 1 :] if not stdout.startswith("{") else stdout)


def run_train(capsys, data, out, *extra):
    code = main(["train", *TINY, "--data", data, "--out", str(out), "--steps", "4", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return summary_of(captured.out), captured


@pytest.fixture(scope="module")
def runs(data_file, tmp_path_factory):
    """A Switch run and a dense run, trained through the CLI (module-scoped: about 2 s)."""
    root = tmp_path_factory.mktemp("cli-runs")
    out = {}
    for name, experts in (("switch", "4"), ("dense", "0")):
        code = main(
            ["train", *TINY, "--data", data_file, "--out", str(root / name), "--steps", "4",
             "--experts", experts, "--seed", "3"]
        )  # fmt: skip
        assert code == 0
        out[name] = root / name
    return out


def test_train_writes_a_run(runs, capsys):
    run = runs["switch"]
    config = json.loads((run / "config.json").read_text())
    assert config["experts"] == 4 and config["model"]["d_model"] == 32
    assert config["model"]["seed"] == 3 and config["train"]["seed"] == 3
    assert json.loads((runs["dense"] / "config.json").read_text())["experts"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens"] == 4 * 8 * 32
    assert np.isfinite(summary["val_loss"])
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == ["step_00000002", "step_00000004"]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Default --log-every 10: step 1, then the validation steps 2 and 4 carry the train loss.
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 4]
    assert [r["step"] for r in steps if "val_loss" in r] == [2, 4, 4]  # and a final validation
    assert (run / "plots" / "loss_vs_step.png").read_bytes()[:8] == PNG


def test_train_prints_summary_and_resumes(data_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("pyswitch.plots.plot_run", lambda run_dir: [])  # tested elsewhere
    out = tmp_path / "run"
    summary, captured = run_train(capsys, data_file, out)
    assert summary["steps"] == 4 and summary["run_dir"] == str(out)
    assert "pyswitch train:" in captured.out and "done: 4 steps" in captured.out
    assert captured.err == ""  # --no-progress: no bar
    # The same --out again without --resume is refused; with --resume it continues.
    code = main(["train", *TINY, "--data", data_file, "--out", str(out), "--steps", "6"])
    err = capsys.readouterr().err
    assert code == 2 and "already holds a run" in err and "--resume" in err
    summary, captured = run_train(capsys, data_file, out, "--steps", "6", "--resume")
    assert "resuming" in captured.out and "from step 4" in captured.out
    assert summary["steps"] == 6


def test_eval(runs, capsys):
    assert main(["eval", "--run", str(runs["switch"])]) == 0
    result = json.loads(capsys.readouterr().out)
    summary = json.loads((runs["switch"] / "summary.json").read_text())
    assert result["step"] == 4
    # The same validation windows as the run's final validation: the same loss.
    assert result["val_loss"] == summary["val_loss"]
    assert result["val_bits_per_byte"] == pytest.approx(result["val_loss"] / np.log(2))
    assert result["tokens"] > 0
    # Another corpus.
    assert main(["eval", "--run", str(runs["switch"]), "--data", __file__, "--batches", "1"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert other["tokens"] == 8 * 32 and other["val_loss"] != result["val_loss"]


def test_generate(runs, capsys):
    args = ["generate", "--run", str(runs["switch"]), "--prompt", "switch ",
            "--max-new-tokens", "20", "--seed", "5"]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("switch ") and len(first) > len("switch ")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # deterministic in the seed
    # Greedy: what the loaded model generates at temperature 0.
    assert main([*args, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    model, _, _ = load_model(runs["switch"])
    expected = model.generate(b"switch ", 20, temperature=0)
    assert greedy == "switch " + expected.decode("utf-8", errors="replace") + "\n"


def test_compare(runs, tmp_path, capsys):
    png = tmp_path / "cmp.png"
    assert main(["compare", str(runs["dense"]), str(runs["switch"]), "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG
    table = png.with_suffix(".txt")
    text = table.read_text()
    assert f"dense run: {runs['dense']}" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[3:] if line.strip()}
    assert rows["dense"][:2] == ["0", "4"] and rows["switch"][:2] == ["4", "4"]
    assert rows["dense"][-1] == "1.00"
    # stdout names the table file (not its contents; see the report) and the plot.
    assert out.splitlines() == [str(table), f"plot: {png}"]


def test_bench_and_info(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert "bench_router.py" in out and "bench_layer.py" in out
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == pyswitch.__version__
    assert "compiled_isas" in info and "num_threads" in info


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--steps", "0"], "--steps: expected an integer >= 1, got 0"),
        (["train", "--batch-size", "x"], "--batch-size: expected an integer"),
        (["train", "--experts", "-1"], "--experts: expected an integer >= 0"),
        (["train", "--capacity-factor", "-1"], "--capacity-factor: expected a finite number"),
        (["train", "--lr", "nan"], "--lr: expected a finite number > 0"),
        (["train", "--dtype", "float16"], "--dtype: invalid choice"),
        (["train", "--optimizer", "sgd"], "--optimizer: invalid choice"),
        (["eval"], "--run"),
        (["generate", "--run", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_argparse_errors_exit_2(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ranks", "3", "--batch-size", "8"], "batch_size=8 must be divisible by ranks=3"),
        (["--ranks", "3", "--batch-size", "6"], "experts=8 must be divisible by ranks=3"),
        (["--resume"], "--resume needs --out"),
        (["--heads", "3"], "d_model must split into num_heads"),
        (["--k", "9"], "k must be in [1, num_experts=8]"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_train_errors_exit_2(data_file, tmp_path, capsys, extra, message):
    args = ["train", "--steps", "1", "--seq-len", "32", "--data", data_file, "--no-progress"]
    if "--resume" not in extra:
        args += ["--out", str(tmp_path / "run")]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyswitch train: error: ")
    assert message in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_and_generate_errors_exit_2(tmp_path, capsys):
    assert main(["eval", "--run", str(tmp_path / "missing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["generate", "--run", str(tmp_path / "missing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_generate_bad_temperature_exit_2(runs, capsys):
    assert main(["generate", "--run", str(runs["dense"]), "--temperature", "-1"]) == 2
    assert "temperature must be a number >= 0" in capsys.readouterr().err


def test_compare_missing_run_exit_2(runs, tmp_path, capsys):
    code = main(["compare", str(runs["dense"]), str(tmp_path / "missing"), "--out",
                 str(tmp_path / "c.png")])  # fmt: skip
    assert code == 2


# ---------------------------------------------------------------------------------------------
# The module entry point in a subprocess
# ---------------------------------------------------------------------------------------------


def _subprocess(args, cwd):
    env = dict(os.environ)
    # The pyswitch this process imported (a source checkout is not importable from cwd=tmp).
    root = os.path.dirname(os.path.dirname(os.path.abspath(pyswitch.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "pyswitch.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_module_entry_point(tmp_path):
    done = _subprocess(["info"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == pyswitch.__version__
    done = _subprocess(["train", "--resume", "--steps", "1"], tmp_path)
    assert done.returncode == 2
    assert "pyswitch train: error: --resume needs --out" in done.stderr
    done = _subprocess(["train", "--steps", "0"], tmp_path)
    assert done.returncode == 2 and "expected an integer >= 1" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/ directory left behind
