"""Training checkpoints: safetensors tensors + JSON state, written atomically, verified on load.

Not a model format: no architecture is stored here (``pyswitch train`` keeps it in the run's
``config.json``). No pickle anywhere: tensors are safetensors, everything else is JSON.

Layout of one checkpoint, ``RUN_DIR/ckpt/step_00001200/``::

    model.safetensors   every tensor passed in, by name (model parameters; optimizer state under
                        names starting with ``optim.``, e.g. ``optim.m.blocks.0.w1``); header
                        metadata ``{"format": "pyswitch-checkpoint", "step": "1200"}``
    state.json          the JSON state (RNG state, data position, losses ...) plus ``"step"``
    manifest.json       written last: {"format", "version", "step",
                        "files": {name: {"sha256", "bytes"}}} for the two files above

A directory under ``ckpt/`` named ``step_N`` with a readable manifest that lists files present at
their recorded sizes is *complete*; nothing else is ever returned by :func:`latest_checkpoint`.

Atomic save (one writer per run directory, e.g. rank 0): everything is written into
``ckpt/.tmp-step_N-<pid>/`` with each file and the directory fsynced, then renamed to
``ckpt/step_N`` with ``os.replace`` and ``ckpt/`` fsynced. Saving a step that already exists
first renames the old directory to ``ckpt/.replaced-step_N-<pid>``; should the process die
between the two renames, :func:`latest_checkpoint` still finds the old one there, and the next
save puts it back. Old checkpoints beyond ``keep`` are renamed to ``.del-...`` before being
deleted, so a half-deleted directory never carries a ``step_N`` name. Leftovers (``.tmp-``,
``.del-``) of a crashed save are removed by the next save.

Crash testing: the module-level ``_crash_hook(stage)`` is called after each stage of a save
(see :data:`CRASH_STAGES`); it does nothing, and tests monkeypatch it to raise or to
``os._exit``. A save that raises leaves its files as a crash at that point would (no clean-up),
which is what makes an exception a faithful stand-in for a crash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
from ml_dtypes import bfloat16

from ._core import CheckpointError
from .runtime import _as_int

FORMAT = "pyswitch-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
#: Prefix of optimizer-state tensor names (a convention of the trainer; stored like any other).
OPTIM_PREFIX = "optim."

#: Stages after which ``_crash_hook(stage)`` is called, in order. ``"old_moved"`` only happens
#: when the step being saved already has a checkpoint; ``"pruned"`` only when one was deleted.
CRASH_STAGES = (
    "tmp_created",
    "tensors_written",
    "state_written",
    "manifest_written",
    "tmp_synced",
    "old_moved",
    "renamed",
    "parent_synced",
    "pruned",
)

_STEP_DIR = re.compile(r"step_(\d+)")
_REPLACED_DIR = re.compile(r"\.replaced-step_(\d+)-\d+")
_CHUNK = 1 << 20

# safetensors dtype codes <-> NumPy. bfloat16 is stored as a real BF16 tensor (readable by other
# safetensors readers); safetensors.numpy can write it but not read it back, so loading maps the
# codes itself.
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAVABLE = tuple(_DTYPES.values())


def _crash_hook(stage: str) -> None:
    """Called after each stage of :func:`save_checkpoint`; a no-op. Tests replace it."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_and_sync(path: Path) -> dict:
    """sha256 and size of a file just written, after forcing it to disk."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return {"sha256": digest.hexdigest(), "bytes": size}


def _write_synced(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _read_manifest(ckpt: Path) -> dict:
    """The manifest of a checkpoint directory, checked for shape; raises CheckpointError."""
    path = ckpt / MANIFEST_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: {MANIFEST_FILE} is missing (incomplete checkpoint)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: cannot read {MANIFEST_FILE}: {exc}"
        ) from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: {MANIFEST_FILE} is not valid JSON ({exc})"
        ) from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    step = manifest.get("step") if isinstance(manifest, dict) else None
    if (
        not isinstance(files, dict)
        or set(files) != {MODEL_FILE, STATE_FILE}
        or isinstance(step, bool)
        or not isinstance(step, int)
        or manifest.get("format") != FORMAT
    ):
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: {MANIFEST_FILE} is not a {FORMAT} manifest with "
            f"an integer step and files {MODEL_FILE}, {STATE_FILE}; got {text[:200]!r}"
        )
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: manifest version {manifest.get('version')!r} is not "
            f"supported (expected {VERSION})"
        )
    for name, entry in files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int)
        ):
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r}: manifest entry for {name} must hold 'sha256' (str) "
                f"and 'bytes' (int), got {entry!r}"
            )
    return manifest


def _is_complete(ckpt: Path, step: int) -> bool:
    """Cheap completeness check (no hashing): a manifest for ``step`` whose files exist at their
    recorded sizes. :func:`load_checkpoint` verifies the contents."""
    try:
        manifest = _read_manifest(ckpt)
        if manifest["step"] != step:
            return False
        return all(
            (ckpt / name).stat().st_size == entry["bytes"]
            for name, entry in manifest["files"].items()
        )
    except (CheckpointError, OSError):
        return False


def _scan(ckpt_root: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    """Complete ``step_N`` directories and complete ``.replaced-step_N-*`` ones, by step."""
    steps: dict[int, Path] = {}
    replaced: dict[int, Path] = {}
    try:
        entries = sorted(ckpt_root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return steps, replaced
    for entry in entries:
        for pattern, found in ((_STEP_DIR, steps), (_REPLACED_DIR, replaced)):
            match = pattern.fullmatch(entry.name)
            if match and entry.is_dir() and _is_complete(entry, int(match.group(1))):
                found.setdefault(int(match.group(1)), entry)
    return steps, replaced


def _tidy(ckpt_root: Path) -> None:
    """Repair what a crashed save left: restore replaced checkpoints whose new version never
    arrived, and delete temporary and half-deleted directories."""
    for entry in sorted(ckpt_root.iterdir()):
        match = _REPLACED_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            step = int(match.group(1))
            final = ckpt_root / _dir_name(step)
            if _is_complete(final, step) or not _is_complete(entry, step):
                shutil.rmtree(entry, ignore_errors=True)
            else:
                if final.exists():
                    os.replace(final, ckpt_root / f".del-{final.name}-{os.getpid()}")
                os.replace(entry, final)
    for entry in sorted(ckpt_root.iterdir()):
        if entry.name.startswith((".tmp-", ".del-")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    _fsync_dir(ckpt_root)


def _check_tensors(tensors) -> dict[str, np.ndarray]:
    if not isinstance(tensors, dict):
        raise TypeError(
            f"save_checkpoint: tensors must be a dict of str -> numpy array, got "
            f"{type(tensors).__name__}"
        )
    out = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(
                f"save_checkpoint: tensor names must be non-empty strings other than "
                f"'__metadata__', got {name!r}"
            )
        if isinstance(value, np.generic):
            value = np.asarray(value)
        if not isinstance(value, np.ndarray):
            raise TypeError(
                f"save_checkpoint: tensors[{name!r}] must be a numpy array, got "
                f"{type(value).__name__}"
            )
        little = value.dtype.newbyteorder("<")
        if not any(little == d for d in _SAVABLE):
            raise TypeError(
                f"save_checkpoint: tensors[{name!r}] has dtype {value.dtype}; expected one of "
                "float64, float32, float16, bfloat16, (u)int8..64, bool"
            )
        # safetensors reads the raw buffer: it must be C-contiguous and little-endian
        # (np.ascontiguousarray would turn a 0-d array into shape (1,)).
        out[name] = value.astype(little, order="C", copy=False)
    return out


def save_checkpoint(
    run_dir: str | os.PathLike, step: int, tensors: dict, state: dict, keep: int = 3
) -> Path:
    """Write checkpoint ``step`` of a run atomically and keep the last ``keep`` checkpoints.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory; checkpoints go to ``run_dir/ckpt/step_{step:08d}/`` (created).
    step : int
        >= 0: the number of optimizer steps taken.
    tensors : dict of str -> numpy.ndarray
        Any shapes; dtypes float32, bfloat16, float16, float64, (u)int8..64 or bool. Model
        parameters by name; optimizer state under names starting with ``"optim."`` (the
        trainer's convention, stored like the rest). Saved bit-exactly.
    state : dict
        JSON-serialisable: RNG state, data position, anything else. Stored in ``state.json``
        together with ``"step"`` (a ``"step"`` key in ``state`` must equal ``step``).
    keep : int
        >= 1: checkpoints kept after this save: this one and the ``keep - 1`` highest other
        steps. Older ones are deleted; the new one never is, even if its step is not the
        highest (after a restart from an older checkpoint).

    Returns
    -------
    pathlib.Path
        The checkpoint directory, ``run_dir/ckpt/step_{step:08d}``.

    Raises
    ------
    TypeError, ValueError
        On bad arguments (before anything is written).
    OSError
        If writing fails; the previous checkpoints are left as they were.
    """
    step = _as_int("save_checkpoint", "step", step)
    keep = _as_int("save_checkpoint", "keep", keep)
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"save_checkpoint: keep must be >= 1, got {keep}")
    tensors = _check_tensors(tensors)
    if not isinstance(state, dict):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    if "step" in state and state["step"] != step:
        raise ValueError(
            f"save_checkpoint: state['step'] = {state['step']!r} differs from step = {step}"
        )
    try:
        state_bytes = json.dumps({**state, "step": step}, sort_keys=True, indent=1).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(f"save_checkpoint: state must be JSON-serialisable: {exc}") from None

    from safetensors.numpy import save_file

    ckpt_root = Path(run_dir) / "ckpt"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _tidy(ckpt_root)

    name = _dir_name(step)
    final = ckpt_root / name
    tmp = ckpt_root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    _crash_hook("tmp_created")

    save_file(tensors, tmp / MODEL_FILE, metadata={"format": FORMAT, "step": str(step)})
    files = {MODEL_FILE: _hash_and_sync(tmp / MODEL_FILE)}
    _crash_hook("tensors_written")
    files[STATE_FILE] = _write_synced(tmp / STATE_FILE, state_bytes)
    _crash_hook("state_written")
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
    _write_synced(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    _crash_hook("manifest_written")
    _fsync_dir(tmp)
    _crash_hook("tmp_synced")

    old = None
    if final.exists() or final.is_symlink():
        old = ckpt_root / f".replaced-{name}-{os.getpid()}"
        os.replace(final, old)
        _crash_hook("old_moved")
    os.replace(tmp, final)
    _crash_hook("renamed")
    _fsync_dir(ckpt_root)
    _crash_hook("parent_synced")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

    steps, _ = _scan(ckpt_root)
    others = sorted((s for s in steps if s != step), reverse=True)
    doomed = others[keep - 1 :]
    for s in doomed:
        trash = ckpt_root / f".del-{steps[s].name}-{os.getpid()}"
        os.replace(steps[s], trash)
        shutil.rmtree(trash, ignore_errors=True)
    if doomed:
        _fsync_dir(ckpt_root)
        _crash_hook("pruned")
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of a run with the highest step, or ``None``.

    Temporary directories of an unfinished save and incomplete directories (no manifest, a
    listed file missing or of the wrong size) are ignored. A checkpoint set aside while the
    same step was being saved again (``.replaced-step_N-*``) counts when its ``step_N`` is
    missing. Contents are not hashed here; :func:`load_checkpoint` verifies them.

    Parameters
    ----------
    run_dir : str or os.PathLike
        The run directory (the one holding ``ckpt/``). Need not exist.
    """
    steps, replaced = _scan(Path(run_dir) / "ckpt")
    for step, path in replaced.items():
        steps.setdefault(step, path)
    if not steps:
        return None
    return steps[max(steps)]


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read and verify a checkpoint directory written by :func:`save_checkpoint`.

    Every file is checked against the manifest (size and sha256) before it is parsed. Only
    safetensors and JSON are read; nothing is unpickled.

    Parameters
    ----------
    path : str or os.PathLike
        A checkpoint directory, e.g. ``latest_checkpoint(run_dir)``.

    Returns
    -------
    tensors : dict of str -> numpy.ndarray
        As saved: same names, shapes, dtypes and bits (writable copies; bfloat16 as
        :data:`pyswitch.bfloat16`), in name order.
    state : dict
        The saved state, with ``"step"``.

    Raises
    ------
    pyswitch.CheckpointError
        If the directory or a file is missing, unreadable, truncated, altered (hash mismatch),
        or not valid safetensors / JSON; the message names the path and the fault.
    """
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {str(ckpt)!r} is not a directory")
    manifest = _read_manifest(ckpt)
    named = _STEP_DIR.fullmatch(ckpt.name) or _REPLACED_DIR.fullmatch(ckpt.name)
    if named and int(named.group(1)) != manifest["step"]:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: the directory name says step {int(named.group(1))}, "
            f"its manifest says step {manifest['step']}"
        )

    contents = {}
    for name, entry in manifest["files"].items():
        try:
            data = (ckpt / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {str(ckpt)!r}: {name} is missing") from None
        except OSError as exc:
            raise CheckpointError(f"checkpoint {str(ckpt)!r}: cannot read {name}: {exc}") from None
        if len(data) != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r}: {name} has {len(data)} bytes, the manifest says "
                f"{entry['bytes']} (truncated or overwritten)"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r}: {name} is corrupted: sha256 {digest} does not "
                f"match the manifest's {entry['sha256']}"
            )
        contents[name] = data

    try:
        state = json.loads(contents[STATE_FILE].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: {STATE_FILE} is not valid JSON ({exc})"
        ) from None
    if not isinstance(state, dict) or state.get("step") != manifest["step"]:
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: {STATE_FILE} must be an object with step "
            f"{manifest['step']}, got {str(state)[:200]!r}"
        )
    return _parse_safetensors(ckpt, contents[MODEL_FILE]), state


def _parse_safetensors(ckpt: Path, data: bytes) -> dict[str, np.ndarray]:
    from safetensors import deserialize

    try:
        entries = deserialize(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others)
        raise CheckpointError(
            f"checkpoint {str(ckpt)!r}: {MODEL_FILE} is not valid safetensors ({exc})"
        ) from None
    tensors = {}
    for name, view in sorted(entries, key=lambda e: e[0]):
        dtype = _DTYPES.get(view.get("dtype"))
        if dtype is None:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r}: tensor {name!r} in {MODEL_FILE} has dtype "
                f"{view.get('dtype')!r}, not one pyswitch reads ({', '.join(_DTYPES)})"
            )
        shape = tuple(view["shape"])
        raw = view["data"]
        if len(raw) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(
                f"checkpoint {str(ckpt)!r}: tensor {name!r} holds {len(raw)} bytes, expected "
                f"{shape} x {dtype.itemsize}"
            )
        tensors[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
    return tensors
