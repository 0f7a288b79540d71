# pyswitch.checkpoint: atomic safetensors checkpoints, verified on load.
"""Round trips (bit-exact for float32, bfloat16, int64 and more), keep-last-K, a crash injected
after every save stage (by exception, and by a real process exit) leaving a loadable latest
checkpoint, damaged checkpoints (flipped byte, truncation, missing or garbage files, random
mutations) raising CheckpointError and nothing else, no pickle, and argument errors."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pyswitch
from pyswitch import CheckpointError
from pyswitch import checkpoint as ckpt_mod
from pyswitch.checkpoint import (
    CRASH_STAGES,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)

BF16 = np.dtype(pyswitch.bfloat16)


def _tensors(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    w[0, :4] = [np.nan, -0.0, np.inf, -np.inf]
    bf = rng.integers(0, 2**16, size=(3, 4), dtype=np.uint16).view(BF16)  # every bit pattern
    return {
        "embed.weight": w,
        "blocks.0.ffn.w1": rng.standard_normal((4, 6)).astype(np.float32).T,  # not contiguous
        "blocks.0.router.bf16": bf,
        "optim.step": np.array(seed * 1000 + 7, dtype=np.int64),
        "optim.m.embed.weight": rng.standard_normal((5, 7)).astype(np.float32),
        "ints": np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max]),
        "i32": np.arange(-3, 3, dtype=np.int32),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "big_endian": np.arange(4, dtype=">f4"),
        "f64": np.array([1 / 3], dtype=np.float64),
    }


def _state(seed: int) -> dict:
    return {
        "rng": np.random.default_rng(seed).bit_generator.state,
        "data_position": {"seed": 17, "step": seed},
        "loss": 1.25,
        "note": "héllo",
    }


def _assert_same(loaded: dict, expected: dict):
    assert sorted(loaded) == sorted(expected)
    for name, want in expected.items():
        got = loaded[name]
        assert got.shape == want.shape, name
        assert got.dtype == want.dtype.newbyteorder("="), name
        assert got.flags.c_contiguous and got.flags.writeable, name
        assert got.tobytes() == np.ascontiguousarray(want).astype(got.dtype).tobytes(), name


def _snapshot(ckpt_dir: Path) -> dict:
    return {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}


def test_round_trip_bit_exact(tmp_path):
    tensors, state = _tensors(1), _state(1)
    path = save_checkpoint(tmp_path, 12, tensors, state)
    assert path == tmp_path / "ckpt" / "step_00000012"
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "state.json",
    ]
    loaded, loaded_state = load_checkpoint(path)
    _assert_same(loaded, tensors)
    assert loaded_state == {**state, "step": 12}
    # bfloat16 stays bfloat16, bit for bit (NaN payloads included).
    assert loaded["blocks.0.router.bf16"].dtype == BF16
    np.testing.assert_array_equal(
        loaded["blocks.0.router.bf16"].view(np.uint16),
        tensors["blocks.0.router.bf16"].view(np.uint16),
    )
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 12
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert latest_checkpoint(tmp_path) == path
    # The safetensors file is standard: the reference reader sees the same float32 tensor.
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="np") as f:
        np.testing.assert_array_equal(f.get_tensor("embed.weight"), tensors["embed.weight"])
        assert f.metadata()["step"] == "12"


def test_keep_last_k(tmp_path):
    for step in range(1, 7):
        save_checkpoint(tmp_path, step * 10, _tensors(step), _state(step), keep=3)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step_00000040", "step_00000050", "step_00000060"]
    save_checkpoint(tmp_path, 70, _tensors(7), _state(7), keep=1)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000070"]
    # Restarting from an older step: the new checkpoint is never pruned.
    save_checkpoint(tmp_path, 80, _tensors(8), _state(8), keep=1)
    save_checkpoint(tmp_path, 75, _tensors(9), _state(9), keep=2)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["step_00000075", "step_00000080"]
    save_checkpoint(tmp_path, 74, _tensors(10), _state(10), keep=1)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step_00000074"]


def test_same_step_twice_replaces(tmp_path):
    save_checkpoint(tmp_path, 5, _tensors(1), _state(1))
    path = save_checkpoint(tmp_path, 5, _tensors(2), _state(2))
    loaded, state = load_checkpoint(path)
    _assert_same(loaded, _tensors(2))
    assert state["data_position"]["step"] == 2
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step_00000005"]


def test_latest_ignores_incomplete_and_temporary(tmp_path):
    assert latest_checkpoint(tmp_path / "nowhere") is None
    assert latest_checkpoint(tmp_path) is None
    good = save_checkpoint(tmp_path, 3, _tensors(1), _state(1))
    root = tmp_path / "ckpt"
    # A finished-looking temporary directory of a higher step, a step dir without manifest, one
    # with a file of the wrong size, one whose manifest names another step, and a stray file.
    shutil.copytree(good, root / ".tmp-step_00000009-4242")
    (root / "step_00000010").mkdir()
    shutil.copy(good / "model.safetensors", root / "step_00000010")
    shutil.copytree(good, root / "step_00000011")
    with open(root / "step_00000011" / "model.safetensors", "ab") as f:
        f.write(b"x")
    shutil.copytree(good, root / "step_00000012")
    (root / "step_00000013").write_text("not a directory")
    (root / "step_0000001x").mkdir()
    assert latest_checkpoint(tmp_path) == good
    # The next save removes the temporary leftovers (not the foreign step dirs).
    save_checkpoint(tmp_path, 4, _tensors(2), _state(2), keep=5)
    assert not (root / ".tmp-step_00000009-4242").exists()
    assert latest_checkpoint(tmp_path) == root / "step_00000004"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_fsyncs_files_and_directories(tmp_path, monkeypatch):
    """Every file, the temporary directory (before the rename) and ckpt/ (after it) are
    fsynced: what makes the rename durable and not just atomic."""
    real_fsync, synced = os.fsync, []

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    path = save_checkpoint(tmp_path, 5, _tensors(1), _state(1))
    root = str((tmp_path / "ckpt").resolve())
    tmp = f"{root}/.tmp-step_00000005-{os.getpid()}"
    for name in ("model.safetensors", "state.json", "manifest.json"):
        assert f"{tmp}/{name}" in synced, (name, synced)
    assert tmp in synced
    assert synced.index(tmp) > synced.index(f"{tmp}/manifest.json")
    assert root in synced[synced.index(tmp) + 1 :]  # ckpt/ after the rename
    assert path.is_dir()


class _Crash(Exception):
    pass


def _crash_at(monkeypatch, stage):
    def hook(s):
        if s == stage:
            raise _Crash(s)

    monkeypatch.setattr(ckpt_mod, "_crash_hook", hook)


def _stages_of(monkeypatch, run) -> list:
    seen = []
    monkeypatch.setattr(ckpt_mod, "_crash_hook", seen.append)
    run()
    monkeypatch.setattr(ckpt_mod, "_crash_hook", lambda s: None)
    return seen


# Two scenarios: a new step with pruning (keep=1), and the same step saved again.
SCENARIOS = {
    "new_step": dict(first_step=1, second_step=2, keep=1),
    "same_step": dict(first_step=1, second_step=1, keep=3),
}


def test_crash_scenarios_cover_every_stage(tmp_path, monkeypatch):
    covered = set()
    for name, sc in SCENARIOS.items():
        run_dir = tmp_path / name
        save_checkpoint(run_dir, sc["first_step"], _tensors(1), _state(1), keep=sc["keep"])
        stages = _stages_of(
            monkeypatch,
            lambda run_dir=run_dir, sc=sc: save_checkpoint(
                run_dir, sc["second_step"], _tensors(2), _state(2), keep=sc["keep"]
            ),
        )
        assert stages == [s for s in CRASH_STAGES if s in stages]  # in the documented order
        assert {(name, s) for s in stages} == {c for c in CRASH_CASES if c[0] == name}
        covered |= set(stages)
    assert covered == set(CRASH_STAGES)


# Every (scenario, stage) pair that happens (checked by the test above).
CRASH_CASES = [
    (scenario, stage)
    for scenario in sorted(SCENARIOS)
    for stage in CRASH_STAGES
    if (scenario, stage) not in {("new_step", "old_moved"), ("same_step", "pruned")}
]


@pytest.mark.parametrize(("scenario", "stage"), CRASH_CASES)
def test_crash_at_every_stage(tmp_path, monkeypatch, scenario, stage):
    sc = SCENARIOS[scenario]
    first = save_checkpoint(tmp_path, sc["first_step"], _tensors(1), _state(1), keep=sc["keep"])
    before = _snapshot(first)

    _crash_at(monkeypatch, stage)
    with pytest.raises(_Crash):
        save_checkpoint(tmp_path, sc["second_step"], _tensors(2), _state(2), keep=sc["keep"])
    monkeypatch.setattr(ckpt_mod, "_crash_hook", lambda s: None)

    latest = latest_checkpoint(tmp_path)
    assert latest is not None
    tensors, state = load_checkpoint(latest)
    new_is_in = CRASH_STAGES.index(stage) >= CRASH_STAGES.index("renamed")
    if new_is_in:
        assert latest == tmp_path / "ckpt" / f"step_{sc['second_step']:08d}"
        _assert_same(tensors, _tensors(2))
    else:
        # The previous checkpoint, untouched (possibly set aside under .replaced-).
        _assert_same(tensors, _tensors(1))
        assert state["data_position"]["step"] == 1
        assert _snapshot(latest) == before

    # The next save repairs and tidies: only step_ directories remain.
    save_checkpoint(tmp_path, 3, _tensors(3), _state(3), keep=3)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert all(n.startswith("step_") for n in names), names
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt" / "step_00000003"
    if not new_is_in:
        # The set-aside old checkpoint is back under its own name.
        _assert_same(load_checkpoint(tmp_path / "ckpt" / "step_00000001")[0], _tensors(1))


_CHILD = """
import os, sys
import numpy as np
from pyswitch import checkpoint
stage = sys.argv[2]
def hook(s):
    if s == stage:
        os._exit(3)
checkpoint._crash_hook = hook
w = np.full((64, 64), 2.0, np.float32)
checkpoint.save_checkpoint(sys.argv[1], int(sys.argv[3]), {"w": w}, {"who": "child"})
"""


@pytest.mark.parametrize(("stage", "step"), [("tensors_written", 2), ("old_moved", 1)])
def test_real_process_death_mid_save(tmp_path, stage, step):
    first = save_checkpoint(tmp_path, 1, {"w": np.ones((64, 64), np.float32)}, {"who": "parent"})
    env = dict(os.environ, PYTHONPATH=str(Path(pyswitch.__file__).parent.parent))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), stage, str(step)],
        env=env,
        cwd=tmp_path,  # not the source tree: `-c` puts the working directory on sys.path
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 3, proc.stderr.decode()
    latest = latest_checkpoint(tmp_path)
    tensors, state = load_checkpoint(latest)
    assert state == {"who": "parent", "step": 1}
    np.testing.assert_array_equal(tensors["w"], np.ones((64, 64), np.float32))
    if stage == "old_moved":
        assert not first.exists() and latest.name.startswith(".replaced-step_00000001-")


def _damaged(tmp_path, name) -> Path:
    good = save_checkpoint(tmp_path / "src", 7, _tensors(1), _state(1))
    bad = tmp_path / name
    shutil.copytree(good, bad)
    return bad


def _rehash(path: Path):
    """Make the manifest agree with the files again, so the parsers see the damage."""
    manifest = json.loads((path / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (path / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "manifest.json").write_text(json.dumps(manifest))


def _flip(path: Path, offset: int):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path, keep: int):
    path.write_bytes(path.read_bytes()[:keep])


DAMAGE = {
    "flip_tensor_byte": (lambda p: _flip(p / "model.safetensors", -5), "sha256 .* does not match"),
    "flip_header_byte": (lambda p: _flip(p / "model.safetensors", 12), "sha256 .* does not match"),
    "flip_state_byte": (lambda p: _flip(p / "state.json", 3), "state.json is corrupted"),
    "truncate_tensors": (
        lambda p: _truncate(p / "model.safetensors", 100),
        "has 100 bytes, the manifest says",
    ),
    "empty_tensors": (lambda p: _truncate(p / "model.safetensors", 0), "has 0 bytes"),
    "delete_manifest": (lambda p: (p / "manifest.json").unlink(), "manifest.json is missing"),
    "delete_tensors": (
        lambda p: (p / "model.safetensors").unlink(),
        "model.safetensors is missing",
    ),
    "delete_state": (lambda p: (p / "state.json").unlink(), "state.json is missing"),
    "garbage_manifest": (
        lambda p: (p / "manifest.json").write_bytes(b"{not json"),
        "manifest.json is not valid JSON",
    ),
    "binary_manifest": (
        lambda p: (p / "manifest.json").write_bytes(b"\xff\xfe\x00"),
        "cannot read manifest.json",
    ),
    "manifest_list": (
        lambda p: (p / "manifest.json").write_text("[]"),
        "not a pyswitch-checkpoint",
    ),
    "manifest_bad_entry": (
        lambda p: (p / "manifest.json").write_text(
            json.dumps(
                {
                    "format": "pyswitch-checkpoint",
                    "version": 1,
                    "step": 7,
                    "files": {"model.safetensors": "abc", "state.json": {}},
                }
            )
        ),
        "must hold 'sha256'",
    ),
    "manifest_future_version": (
        lambda p: (p / "manifest.json").write_text(
            (p / "manifest.json").read_text().replace('"version": 1', '"version": 99')
        ),
        "version 99 is not supported",
    ),
    "garbage_state_rehashed": (
        lambda p: ((p / "state.json").write_bytes(b"{oops"), _rehash(p)),
        "state.json is not valid JSON",
    ),
    "state_wrong_step_rehashed": (
        lambda p: ((p / "state.json").write_text('{"step": 8}'), _rehash(p)),
        "must be an object with step 7",
    ),
    "truncated_safetensors_rehashed": (
        lambda p: (_truncate(p / "model.safetensors", 300), _rehash(p)),
        "not valid safetensors",
    ),
    "garbage_safetensors_rehashed": (
        lambda p: ((p / "model.safetensors").write_bytes(b"\xff" * 64), _rehash(p)),
        "not valid safetensors",
    ),
    "foreign_dtype_rehashed": (
        lambda p: ((p / "model.safetensors").write_bytes(_safetensors_f8()), _rehash(p)),
        "dtype 'F8_E4M3'",
    ),
}


def _safetensors_f8() -> bytes:
    header = json.dumps({"x": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})
    header = header.encode() + b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + b"\x01\x02"


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_raises_checkpoint_error(tmp_path, damage):
    mutate, message = DAMAGE[damage]
    bad = _damaged(tmp_path, damage)
    mutate(bad)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(bad)
    assert str(bad) in str(info.value)
    assert isinstance(info.value, pyswitch.Error)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load_checkpoint(tmp_path / "missing")


def test_directory_name_must_match_manifest(tmp_path):
    good = save_checkpoint(tmp_path, 7, _tensors(1), _state(1))
    moved = good.rename(good.with_name("step_00000009"))
    with pytest.raises(CheckpointError, match="name says step 9, its manifest says step 7"):
        load_checkpoint(moved)
    assert latest_checkpoint(tmp_path) is None
    # Any other name (a copy made by hand) is accepted.
    copy = shutil.copytree(moved, tmp_path / "backup")
    assert load_checkpoint(copy)[1]["step"] == 7


def test_random_damage_never_crashes(tmp_path):
    """Random flips and cuts, with the manifest re-hashed so the safetensors parser sees them:
    a load either raises CheckpointError or returns arrays; nothing else escapes."""
    good = save_checkpoint(tmp_path / "src", 7, _tensors(1), _state(1))
    size = (good / "model.safetensors").stat().st_size
    rng = np.random.default_rng(0)
    outcomes = {"error": 0, "loaded": 0}
    for i in range(60):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(good, bad)
        target = bad / "model.safetensors"
        if i % 2:
            _truncate(target, int(rng.integers(0, size)))
        else:
            for offset in rng.integers(0, min(size, 400), size=3):
                _flip(target, int(offset))
        _rehash(bad)
        try:
            tensors, _ = load_checkpoint(bad)
        except CheckpointError:
            outcomes["error"] += 1
        else:
            assert all(isinstance(v, np.ndarray) for v in tensors.values())
            outcomes["loaded"] += 1
    assert outcomes["error"] >= 30  # every truncation at least


def test_no_pickle(tmp_path, monkeypatch):
    source = Path(ckpt_mod.__file__).read_text()
    for forbidden in ("import pickle", "np.load(", "allow_pickle", "torch", "marshal", "eval("):
        assert forbidden not in source, forbidden

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    path = save_checkpoint(tmp_path, 1, _tensors(1), _state(1))
    (path / "model.pkl").write_bytes(pickle.dumps({"x": 1}))  # present but never opened
    _assert_same(load_checkpoint(path)[0], _tensors(1))


def test_argument_errors(tmp_path):
    t, s = _tensors(1), _state(1)
    cases = [
        (dict(step=-1), ValueError, "step must be >= 0, got -1"),
        (dict(keep=0), ValueError, "keep must be >= 1, got 0"),
        (dict(step=1.5), TypeError, "step must be an integer"),
        (dict(tensors=[1]), TypeError, "tensors must be a dict"),
        (dict(tensors={"x": [1.0]}), TypeError, r"tensors\['x'\] must be a numpy array"),
        (dict(tensors={"c": np.zeros(2, np.complex64)}), TypeError, "has dtype complex64"),
        (dict(tensors={"o": np.zeros(2, object)}), TypeError, "has dtype object"),
        (dict(tensors={"": np.zeros(2)}), ValueError, "non-empty strings"),
        (dict(tensors={"__metadata__": np.zeros(2)}), ValueError, "other than '__metadata__'"),
        (dict(state=[1]), TypeError, "state must be a dict"),
        (dict(state={"a": np.zeros(2)}), TypeError, "state must be JSON-serialisable"),
        (dict(state={"step": 4}), ValueError, r"state\['step'\] = 4 differs from step = 1"),
    ]
    for override, exc, message in cases:
        kwargs = dict(run_dir=tmp_path / "run", step=1, tensors=t, state=s, keep=2)
        kwargs.update(override)
        with pytest.raises(exc, match=message):
            save_checkpoint(**kwargs)
    assert not (tmp_path / "run").exists()  # nothing written on a bad argument
