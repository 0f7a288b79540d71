# pyswitch.train: the training loop's run directory, bit-exact resume, thread ranks (expert x data
# parallel) against one rank, a crash injected mid-checkpoint, and option errors.
"""Training-loop tests on a tiny model (d_model 32, 2 layers, 2 heads, d_ff 64, 4 experts, batch 8
of 32 bytes, a ~9 KB text file): every run takes a fraction of a second.

Ranks.  With ``ranks > 1`` each rank routes its own tokens as its own group (expert parallelism),
so the capacity (per group), the load-balancing loss (a mean over groups) and hence the loss
curve legitimately differ from one rank's whenever tokens are dropped or ``aux_loss_coef > 0``.
With dropless routing and no aux loss the forward of every token is the same, so step 1's loss
(before any update) differs only in how its float64 sum over tokens is associated (each rank
sums its own rows, then the ranks' sums are added): within ``STEP1_RTOL`` = 1e-13, far below
the ~1e-7 any float32 difference in the forward would show. Later steps differ by the float32
order in which the replicated gradients are summed over ranks too: within ``RANKS_RTOL`` = 1e-6
relative (observed ~3e-9 after 8 steps). With the default options the curves agree within 1e-2
(observed ~7e-4).
"""

import dataclasses
import json
import math
import shutil

import numpy as np
import pytest
from array_utils import assert_bits_equal

from pyswitch import checkpoint as ckpt_mod
from pyswitch.checkpoint import latest_checkpoint, load_checkpoint
from pyswitch.models import SwitchLMConfig
from pyswitch.train import TrainOptions, evaluate, load_model, train

STEP1_RTOL = 1e-13
RANKS_RTOL = 1e-6
RANKS_DEFAULT_RTOL = 1e-2
WORDS = (
    "the quick brown fox jumps over a lazy dog while switch transformers route every token "
    "to one expert and the router learns to balance the load"
).split()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=8)) for _ in range(200)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def tiny_config(**change):
    return SwitchLMConfig(
        **{**dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, num_experts=4), **change}
    )


# Dropless, no load-balancing loss: the forward of a token does not depend on the rank split.
EXACT = dict(capacity_factor=None, eval_capacity_factor=None, aux_loss_coef=0.0)


def options(data, out, **change):
    base = dict(
        steps=8,
        minutes=None,
        batch_size=8,
        seq_len=32,
        warmup_steps=2,
        data=data,
        out=str(out),
        progress=False,
        plots=False,
        log_every=1,
        eval_every=4,
        eval_batches=16,
        ckpt_every=4,
    )
    return TrainOptions(**{**base, **change})


def quiet(*args):
    pass


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_records(run_dir):
    """The last logged training record of each step (a resumed run logs some steps again)."""
    return {r["step"]: r for r in records(run_dir) if "loss" in r}


def weights(run_dir):
    model, _, state = load_model(run_dir)
    return {k: v.copy() for k, v in model.params.items()}, state


def assert_same_tensors(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        assert_bits_equal(b[k], a[k], f"{what}: {k}")


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------


def test_run_directory_contents(data_file, tmp_path):
    out = tmp_path / "run"
    config = tiny_config()
    opts = options(data_file, out, steps=6, eval_every=3, ckpt_every=3)
    lines = []
    summary = train(config, opts, log=lines.append)
    # config.json: the experts count at the top, the model and the options.
    saved = json.loads((out / "config.json").read_text())
    assert saved["experts"] == 4
    assert saved["model"] == config.to_dict()
    assert saved["train"] == dataclasses.asdict(opts)
    # metrics.jsonl: steps 1..6 with finite training losses, validation at 3 and 6 (and a final
    # validation record).
    recs = records(out)
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4, 5, 6]
    for r in train_recs:
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "lr", "wall_time"):
            assert math.isfinite(r[key]), (key, r)
        assert 0 < r["loss"] < 7
        assert len(r["expert_load"]) == 1 and len(r["expert_load"][0]) == 4
        assert sum(r["expert_load"][0]) == pytest.approx(1.0)
        assert len(r["drop_fraction"]) == 1 and 0 <= r["drop_fraction"][0] <= 1
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert [r["lr"] for r in train_recs[:2]] == pytest.approx([1e-3, 2e-3])  # warmup of 2
    val_steps = [r["step"] for r in recs if "val_loss" in r]
    assert val_steps[:2] == [3, 6] and set(val_steps) == {3, 6}
    for r in recs:
        if "val_loss" in r:
            assert math.isfinite(r["val_loss"])
            assert r["val_bpb"] == pytest.approx(r["val_loss"] / math.log(2))
    # Checkpoints at 3 and 6; summary.json is the returned summary.
    assert sorted(p.name for p in (out / "ckpt").iterdir()) == ["step_00000003", "step_00000006"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 8 * 32
    assert summary["val_loss"] == [r for r in recs if "val_loss" in r][-1]["val_loss"]
    assert summary["run_dir"] == str(out)
    assert not (out / "plots").exists()
    # The checkpoint holds the final model: evaluate() reproduces the final validation exactly.
    model, record, state = load_model(out)
    assert state["step"] == 6 and state["optimizer_steps"] == 6
    assert state["model_training_steps"] == 6
    assert summary["parameters"] == model.num_parameters
    assert evaluate(out)["val_loss"] == summary["val_loss"]
    assert any("done: 6 steps" in line for line in lines)


def test_dense_adafactor_run_and_plots(data_file, tmp_path):
    out = tmp_path / "dense"
    summary = train(
        tiny_config(num_experts=0),
        options(data_file, out, steps=4, optimizer="adafactor", plots=True, decay="linear"),
        log=quiet,
    )
    assert json.loads((out / "config.json").read_text())["experts"] == 0
    recs = [r for r in records(out) if "loss" in r]
    assert all("expert_load" not in r for r in recs)
    assert all(math.isfinite(r["loss"]) for r in recs)
    names = sorted(p.name for p in (out / "plots").iterdir())
    assert "loss_vs_step.png" in names and "loss_vs_time.png" in names
    assert sorted(summary["plots"]) == sorted(str(out / "plots" / n) for n in names)
    for name in names:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, state = weights(out)
    assert state["optimizer"] == "adafactor"


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(data_file, tmp_path_factory):
    """8 steps in one go, constant schedule after a warmup of 2 (so a 4-step run is a prefix)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_config(), options(data_file, out, decay="constant"), log=quiet)
    return out


@pytest.fixture(scope="module")
def half_run(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("half") / "run"
    train(tiny_config(), options(data_file, out, steps=4, decay="constant"), log=quiet)
    return out


def _resume(data_file, src, dst, **change):
    shutil.copytree(src, dst)
    lines = []
    train(
        tiny_config(),
        options(data_file, dst, decay="constant", resume=True, **change),
        log=lines.append,
    )
    return lines


def test_resume_is_bit_exact(data_file, straight_run, half_run, tmp_path):
    out = tmp_path / "resumed"
    lines = _resume(data_file, half_run, out)
    assert any("resuming" in line and "from step 4" in line for line in lines)
    w_straight, s_straight = weights(straight_run)
    w_resumed, s_resumed = weights(out)
    assert_same_tensors(w_straight, w_resumed, "weights")
    # Optimizer state and the random state too.
    t1, _ = load_checkpoint(latest_checkpoint(straight_run))
    t2, _ = load_checkpoint(latest_checkpoint(out))
    assert_same_tensors(t1, t2, "checkpoint tensors")
    for key in ("step", "optimizer_steps", "model_training_steps"):
        assert s_resumed[key] == s_straight[key] == 8
    a, b = train_records(straight_run), train_records(out)
    for step in range(5, 9):
        for key in ("loss", "aux_loss", "z_loss", "grad_norm", "lr", "expert_load"):
            assert a[step][key] == b[step][key], (step, key)
    assert (
        json.loads((out / "summary.json").read_text())["val_loss"]
        == json.loads((straight_run / "summary.json").read_text())["val_loss"]
    )


def test_resume_with_other_data_seed_differs(data_file, straight_run, half_run, tmp_path):
    """Resuming with another data seed is refused (the batches depend on it). Negative control:
    forced through (the run's recorded seed edited), the weights differ, so the comparison
    above is sensitive to the batches drawn after step 4."""
    with pytest.raises(ValueError, match="seed"):
        _resume(data_file, half_run, tmp_path / "refused", seed=1)
    forced = tmp_path / "forced"
    shutil.copytree(half_run, forced)
    record = json.loads((forced / "config.json").read_text())
    record["train"]["seed"] = 1
    (forced / "config.json").write_text(json.dumps(record))
    _resume(data_file, forced, tmp_path / "other_seed", seed=1)
    w_straight, _ = weights(straight_run)
    w_other, _ = weights(tmp_path / "other_seed")
    assert any(not np.array_equal(w_other[k], w_straight[k]) for k in w_straight)


def test_resume_without_random_state_differs(
    data_file, straight_run, half_run, tmp_path, monkeypatch
):
    """Negative control: the jitter's random state (training_steps) matters, so restoring it is
    what makes the resume bit-exact."""
    from pyswitch import train as train_mod

    original = train_mod._Run._restore

    def restore_but_forget_rng(self, tensors, state):
        original(self, tensors, state)
        self.model.training_steps = 0

    monkeypatch.setattr(train_mod._Run, "_restore", restore_but_forget_rng)
    _resume(data_file, half_run, tmp_path / "no_rng")
    w_straight, _ = weights(straight_run)
    w_other, _ = weights(tmp_path / "no_rng")
    assert any(not np.array_equal(w_other[k], w_straight[k]) for k in w_straight)


def test_resume_changed_model_is_rejected(data_file, half_run, tmp_path):
    out = tmp_path / "changed"
    shutil.copytree(half_run, out)
    with pytest.raises(ValueError, match="model options differ"):
        train(
            tiny_config(d_ff=128),
            options(data_file, out, decay="constant", resume=True),
            log=quiet,
        )


def test_resume_without_checkpoint_starts_fresh(data_file, tmp_path):
    out = tmp_path / "fresh"
    summary = train(tiny_config(), options(data_file, out, steps=2, resume=True), log=quiet)
    assert summary["steps"] == 2


# ---------------------------------------------------------------------------------------------
# Thread ranks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rank_runs(data_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    runs = {}
    for kind, model in (("exact", EXACT), ("default", {})):
        for ranks in (1, 2, 4):
            out = root / f"{kind}-{ranks}"
            summary = train(tiny_config(**model), options(data_file, out, ranks=ranks), log=quiet)
            runs[kind, ranks] = (out, summary)
    return runs


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_match_one_rank(rank_runs, ranks):
    one, _ = rank_runs["exact", 1]
    many, _ = rank_runs["exact", ranks]
    a, b = train_records(one), train_records(many)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    # Step 1: the forward before any update, the same for every token; only the association of
    # the float64 sum over tokens depends on the rank split.
    assert b[1]["loss"] == pytest.approx(a[1]["loss"], rel=STEP1_RTOL, abs=0)
    for step in range(2, 9):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=RANKS_RTOL), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-4), step
    va = [r["val_loss"] for r in records(one) if "val_loss" in r]
    vb = [r["val_loss"] for r in records(many) if "val_loss" in r]
    assert vb == pytest.approx(va, rel=RANKS_RTOL)
    # Checkpoints hold whole tensors (experts gathered over the ranks).
    wa, _ = weights(one)
    wb, _ = weights(many)
    for k in wa:
        assert wb[k].shape == wa[k].shape
        scale = np.abs(wa[k]).max()
        assert np.abs(wb[k] - wa[k]).max() <= 1e-4 * scale, k


@pytest.mark.parametrize("ranks", [2, 4])
def test_ranks_default_options_close_to_one_rank(rank_runs, ranks):
    """Per-rank routing groups change capacities and the aux loss: close, not equal."""
    a = train_records(rank_runs["default", 1][0])
    b = train_records(rank_runs["default", ranks][0])
    for step in range(1, 9):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=RANKS_DEFAULT_RTOL), step


def test_ranks_summary_parameters(rank_runs):
    counts = {ranks: rank_runs["exact", ranks][1]["parameters"] for ranks in (1, 2, 4)}
    assert counts[2] == counts[1] and counts[4] == counts[1], counts


def test_ranks_resume_bit_exact_and_across_rank_counts(data_file, rank_runs, tmp_path):
    """A ranks=2 run interrupted after its step-4 checkpoint resumes bit for bit on 2 ranks, and
    resumes on 1 rank too (whole tensors in the checkpoint)."""
    straight2, _ = rank_runs["exact", 2]
    straight1, _ = rank_runs["exact", 1]
    half = tmp_path / "half"
    # Stop after the step-4 checkpoint: a crash right after it was made durable.
    crash_after_first_save(train, tiny_config(**EXACT), options(data_file, half, ranks=2))
    assert latest_checkpoint(half).name == "step_00000004"
    for ranks, straight, exact in ((2, straight2, True), (1, straight1, False)):
        out = tmp_path / f"resumed-{ranks}"
        shutil.copytree(half, out)
        train(tiny_config(**EXACT), options(data_file, out, ranks=ranks, resume=True), log=quiet)
        wa, _ = weights(straight)
        wb, state = weights(out)
        assert state["step"] == 8
        if exact:
            assert_same_tensors(wa, wb, "ranks=2 resumed on 2")
        else:
            for k in wa:
                assert np.abs(wb[k] - wa[k]).max() <= 1e-4 * np.abs(wa[k]).max(), k


# ---------------------------------------------------------------------------------------------
# A crash in the middle of a checkpoint save
# ---------------------------------------------------------------------------------------------


class InjectedCrash(Exception):
    pass


def crash_after_first_save(train_fn, config, opts, stage="parent_synced", save_number=1):
    """Run ``train_fn`` with ``_crash_hook`` raising at ``stage`` of save number
    ``save_number`` (1-based); returns after the crash."""
    saves = {"n": 0}
    original = ckpt_mod._crash_hook

    def hook(at):
        if at == "tmp_created":
            saves["n"] += 1
        if at == stage and saves["n"] == save_number:
            raise InjectedCrash(at)

    ckpt_mod._crash_hook = hook
    try:
        with pytest.raises(InjectedCrash):
            train_fn(config, opts, log=quiet)
    finally:
        ckpt_mod._crash_hook = original


@pytest.fixture(scope="module")
def cosine_straight(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cosine") / "run"
    train(tiny_config(), options(data_file, out), log=quiet)
    return out


@pytest.mark.parametrize(
    "stage, survivor",
    [("tensors_written", 4), ("manifest_written", 4), ("tmp_synced", 4), ("renamed", 8)],
)
def test_crash_mid_save_then_resume(data_file, cosine_straight, tmp_path, stage, survivor):
    out = tmp_path / "run"
    # The second save is step 8's (saves at 4 and 8; the final save of step 8 comes after).
    crash_after_first_save(train, tiny_config(), options(data_file, out), stage, save_number=2)
    latest = latest_checkpoint(out)
    assert latest is not None and latest.name == f"step_{survivor:08d}"
    model, _, state = load_model(out)  # loadable and verified
    assert state["step"] == survivor
    lines = []
    train(tiny_config(), options(data_file, out, resume=True), log=lines.append)
    assert any(f"from step {survivor}" in line for line in lines)
    # The resumed run ends exactly where the uninterrupted one did.
    wa, _ = weights(cosine_straight)
    wb, state = weights(out)
    assert state["step"] == 8
    assert_same_tensors(wa, wb, f"crash at {stage}")
    a, b = train_records(cosine_straight), train_records(out)
    assert {s: b[s]["loss"] for s in b} == {s: a[s]["loss"] for s in a}
    # The crashed save's leftovers were tidied by the next save (or never made).
    leftovers = [p.name for p in (out / "ckpt").iterdir() if not p.name.startswith("step_")]
    assert leftovers == [] or survivor == 8


# ---------------------------------------------------------------------------------------------
# Option errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model, change, message",
    [
        ({}, dict(batch_size=6, ranks=4), "batch_size=6 must be divisible by ranks=4"),
        ({}, dict(batch_size=6, ranks=3), "experts=4 must be divisible by ranks=3"),
        ({}, dict(steps=0), "steps must be an integer >= 1"),
        ({}, dict(steps=2.0), "steps must be an integer >= 1"),
        ({}, dict(batch_size=0), "batch_size"),
        ({}, dict(seq_len=-1), "seq_len"),
        ({}, dict(ranks=0), "ranks"),
        ({}, dict(ckpt_every=0), "ckpt_every"),
        ({}, dict(optimizer="sgd"), "optimizer must be"),
        ({}, dict(lr=-1.0), "lr must be > 0"),
        ({}, dict(lr=math.nan), "lr must be > 0"),
        ({}, dict(clip=0.0), "clip must be > 0"),
        ({}, dict(steps=None, minutes=None), "give steps or minutes"),
        ({}, dict(minutes=-1.0), "minutes must be > 0"),
        ({}, dict(seq_len=100000), "seq_len"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else None,
)
def test_bad_options(data_file, tmp_path, model, change, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        train(tiny_config(**model), options(data_file, out, **change), log=quiet)
    assert not (out / "metrics.jsonl").exists()


def test_missing_data_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        train(tiny_config(), options(str(tmp_path / "nope.txt"), tmp_path / "run"), log=quiet)


def test_existing_run_needs_resume(data_file, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(), options(data_file, out, steps=1), log=quiet)
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(tiny_config(), options(data_file, out, steps=1), log=quiet)
    assert (out / "metrics.jsonl").read_text() == before
