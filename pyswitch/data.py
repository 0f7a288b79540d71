"""Byte-level training data for ``pyswitch train``: the corpus, its train/validation split, and
deterministic batches. Pure Python and NumPy; no tokenizer (one byte is one token), no download.

The default corpus is the running interpreter's own standard library (its ``.py`` files), so a
training run needs nothing but this machine. ``ByteCorpus(path)`` takes a text file or a
directory of text files instead.

Determinism: the file list is sorted, the split is a hash of each file's relative path, and
:func:`batch` draws its windows from ``np.random.default_rng([seed, step])`` alone, so batch
``step`` of a resumed run is bitwise the batch the uninterrupted run would have drawn (for a
given NumPy version: NumPy does not promise ``Generator.integers`` streams across releases).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .runtime import _as_int

#: Byte placed between two files of a split. Files containing a 0 byte are skipped as binary,
#: so it never occurs inside a file and marks "end of one document, start of the next".
SEPARATOR = b"\x00"

#: A file is validation when ``_split_key(relpath) % 1000 < VAL_PER_MILLE`` (about 5%).
VAL_PER_MILLE = 50

# Directories never taken from the standard library: installed third-party packages, the
# interpreter's own test suites (test/, tests/, idlelib/idle_test/, lib2to3/tests/ with its
# deliberately broken data files) and byte-code caches.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def stdlib_corpus_files() -> list[Path]:
    """The ``.py`` files of the running interpreter's standard library, in a fixed order.

    Taken from ``sysconfig.get_paths()["stdlib"]``, recursively, without following symbolic
    links. Left out: ``site-packages`` / ``dist-packages`` (third-party code), the directories
    named ``test``, ``tests`` and ``idle_test`` (CPython's test suites, including ``lib2to3``'s
    test data with deliberately invalid files), ``__pycache__``, the build-configuration
    directory ``config-X.Y-*`` and the generated ``_sysconfigdata_*.py`` (machine-specific
    build settings, not source). ``idlelib`` and ``lib2to3`` themselves are kept: they are
    ordinary library source.

    Returns
    -------
    list of pathlib.Path
        Absolute paths, sorted by their path relative to the stdlib directory, written with
        ``/`` separators (so the order does not depend on the platform or on ``os.walk``).

    Raises
    ------
    ValueError
        If the stdlib directory does not exist (an embedded interpreter without sources).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(
            f"stdlib_corpus_files: the standard library directory {str(root)!r} of "
            f"{sys.executable!r} does not exist; pass a data path instead"
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")
        ]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata_"):
                path = Path(dirpath, name)
                if path.is_file():
                    found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _text_files_under(root: Path) -> list[Path]:
    """Regular files under ``root``, recursively, skipping hidden (``.``-prefixed) files and
    directories and ``__pycache__``, sorted by relative POSIX path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _is_text(raw: bytes) -> bool:
    """Text means: no 0 byte, and valid UTF-8."""
    if SEPARATOR in raw:
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _split_key(relpath: str) -> int:
    """The split hash of a relative POSIX path (stable across processes and machines)."""
    return int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "little")


def is_validation_file(relpath: str) -> bool:
    """Whether the file at ``relpath`` (relative, ``/``-separated) goes to validation.

    About 5% of paths do: ``sha256(relpath)[:8]`` as a little-endian integer, modulo 1000,
    below :data:`VAL_PER_MILLE` (50).
    """
    return _split_key(relpath) % 1000 < VAL_PER_MILLE


def _join(chunks: list[bytes]) -> np.ndarray:
    """Files joined with :data:`SEPARATOR` as one read-only uint8 array."""
    return np.frombuffer(SEPARATOR.join(chunks), dtype=np.uint8)


class ByteCorpus:
    """A byte-level corpus split into training and validation data by file.

    Parameters
    ----------
    path : str or os.PathLike, optional
        ``None`` (default): the interpreter's standard library (:func:`stdlib_corpus_files`).
        A file: that text file. A directory: its text files, recursively, in sorted order of
        their relative paths; hidden files and directories (``.git`` ...) and ``__pycache__``
        are skipped, and so are files that are not text (a 0 byte, or not UTF-8), counted in
        ``num_skipped``.
    seq_len : int, optional
        If given, both splits must hold at least ``seq_len + 1`` bytes (one training window).

    Attributes
    ----------
    train, val : numpy.ndarray
        uint8, shape ``(bytes,)``, read-only: the files of each split joined with one 0 byte
        (:data:`SEPARATOR`) between consecutive files. File bytes are kept as they are.
    num_files : int
        Text files used (both splits).
    num_skipped : int
        Files of a directory skipped as not text.
    train_files, val_files : tuple of str
        Relative POSIX paths of the files in each split, in corpus order.
    description : str
        One line saying what the corpus is, for logs and ``config.json``.

    Notes
    -----
    The split: a file is validation when :func:`is_validation_file` says so for its path
    relative to the corpus root (for a single file, its name). If that leaves a split empty,
    the last file (in corpus order) of the other split moves to it, so both are non-empty
    whenever there are two or more files. One file (``path`` is a file, or a directory with a
    single text file) is split inside itself instead: validation is its last ~5% of bytes, cut
    after a newline when there is one in its second half.

    Raises
    ------
    ValueError
        If ``path`` does not exist, a directory has no text files, a file is not text or is
        empty, or a split is shorter than ``seq_len + 1`` bytes.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, seq_len: int | None = None):
        if seq_len is not None:
            seq_len = _as_int("ByteCorpus", "seq_len", seq_len)
            if seq_len < 1:
                raise ValueError(f"ByteCorpus: seq_len must be >= 1, got {seq_len}")

        skipped = 0
        single = False
        if path is None:
            files = stdlib_corpus_files()
            root = Path(sysconfig.get_paths()["stdlib"])
            what = f"Python {sys.version.split()[0]} standard library ({root})"
        else:
            root = Path(path)
            if not root.exists():
                raise ValueError(f"ByteCorpus: data path {str(path)!r} does not exist")
            if root.is_dir():
                files = _text_files_under(root)
                what = f"directory {str(root)!r}"
            elif root.is_file():
                files = [root]
                single = True
                what = f"file {str(root)!r}"
            else:
                raise ValueError(
                    f"ByteCorpus: data path {str(path)!r} is neither a file nor a directory"
                )

        names: list[str] = []
        contents: list[bytes] = []
        for file in files:
            try:
                raw = file.read_bytes()
            except OSError as exc:
                raise ValueError(f"ByteCorpus: cannot read {str(file)!r}: {exc}") from exc
            if not _is_text(raw):
                if single:
                    raise ValueError(
                        f"ByteCorpus: data file {str(root)!r} is not UTF-8 text "
                        "(it holds a 0 byte or an invalid UTF-8 sequence)"
                    )
                skipped += 1
                continue
            if not raw:
                continue
            names.append(file.name if single else file.relative_to(root).as_posix())
            contents.append(raw)

        if not contents:
            if single:
                raise ValueError(f"ByteCorpus: data file {str(root)!r} is empty")
            raise ValueError(
                f"ByteCorpus: no non-empty text files under {str(root)!r} "
                f"({len(files)} files, {skipped} skipped as binary or not UTF-8)"
            )

        if len(contents) == 1:
            raw = contents[0]
            cut = len(raw) - max(1, math.ceil(len(raw) * VAL_PER_MILLE / 1000))
            newline = raw.rfind(b"\n", len(raw) // 2, cut)
            if newline >= 0:
                cut = newline + 1
            if cut < 1:
                raise ValueError(
                    f"ByteCorpus: {what} has {len(raw)} byte(s); at least 2 are needed to "
                    "split it into training and validation data"
                )
            self.train = np.frombuffer(raw[:cut], dtype=np.uint8)
            self.val = np.frombuffer(raw[cut:], dtype=np.uint8)
            self.train_files = self.val_files = (names[0],)
        else:
            is_val = [is_validation_file(name) for name in names]
            if all(is_val) or not any(is_val):
                # Move the last file of the non-empty split to the empty one.
                is_val[-1] = not is_val[-1]
            self.train = _join([c for c, v in zip(contents, is_val) if not v])
            self.val = _join([c for c, v in zip(contents, is_val) if v])
            self.train_files = tuple(n for n, v in zip(names, is_val) if not v)
            self.val_files = tuple(n for n, v in zip(names, is_val) if v)

        self.num_files = len(contents)
        self.num_skipped = skipped
        self.description = (
            f"{what}: {self.num_files} files ({len(self.train_files)} train, "
            f"{len(self.val_files)} validation), {self.train.size:,} train bytes, "
            f"{self.val.size:,} validation bytes"
        )
        if seq_len is not None:
            for split, data in (("training", self.train), ("validation", self.val)):
                if data.size < seq_len + 1:
                    raise ValueError(
                        f"ByteCorpus: the {split} split of {what} has {data.size} bytes, "
                        f"fewer than seq_len + 1 = {seq_len + 1}; use a larger corpus or a "
                        "shorter seq_len"
                    )

    def __repr__(self) -> str:
        return f"ByteCorpus({self.description})"


def _check_args(where: str, data, batch_size, seq_len) -> tuple[np.ndarray, int, int]:
    if not isinstance(data, np.ndarray):
        raise TypeError(f"{where}: data must be a numpy array, got {type(data).__name__}")
    if data.ndim != 1 or not np.issubdtype(data.dtype, np.integer):
        raise ValueError(
            f"{where}: data must be a 1-D integer array (bytes,), got {data.dtype} array of "
            f"shape {data.shape}"
        )
    batch_size = _as_int(where, "batch_size", batch_size)
    seq_len = _as_int(where, "seq_len", seq_len)
    if batch_size < 1:
        raise ValueError(f"{where}: batch_size must be >= 1, got {batch_size}")
    if seq_len < 1:
        raise ValueError(f"{where}: seq_len must be >= 1, got {seq_len}")
    if data.size < seq_len + 1:
        raise ValueError(
            f"{where}: data has {data.size} bytes, fewer than seq_len + 1 = {seq_len + 1}"
        )
    return data, batch_size, seq_len


def batch(data: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int) -> np.ndarray:
    """The training batch of ``step``: random windows of ``seq_len + 1`` consecutive bytes.

    A pure function of its arguments: the start offsets come from
    ``np.random.default_rng([seed, step])`` and nothing else, so a run resumed at ``step``
    draws the same batches as one that never stopped.

    Parameters
    ----------
    data : numpy.ndarray
        ``(bytes,)`` integer array, e.g. ``ByteCorpus.train``; at least ``seq_len + 1`` long.
    batch_size, seq_len : int
        Both >= 1.
    seed, step : int
        Both >= 0.

    Returns
    -------
    numpy.ndarray
        int32, shape ``(batch_size, seq_len + 1)``; row ``i`` is ``data[s_i : s_i + seq_len +
        1]`` with ``s_i`` uniform in ``[0, bytes - seq_len - 1]``. Inputs are ``[:, :-1]``,
        targets ``[:, 1:]``.

    Raises
    ------
    ValueError
        On a size below its minimum, a negative seed or step, or data too short.
    """
    data, batch_size, seq_len = _check_args("batch", data, batch_size, seq_len)
    seed = _as_int("batch", "seed", seed)
    step = _as_int("batch", "step", step)
    if seed < 0:
        raise ValueError(f"batch: seed must be >= 0, got {seed}")
    if step < 0:
        raise ValueError(f"batch: step must be >= 0, got {step}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, data.size - seq_len, size=batch_size, dtype=np.int64)
    return data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def eval_batches(
    data: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[np.ndarray]:
    """Validation batches: consecutive windows from the start of ``data``, always the same.

    Window ``k`` is ``data[k * seq_len : k * seq_len + seq_len + 1]``: consecutive windows share
    one byte (the last target of one is the first input of the next), so the predicted bytes
    never overlap and every byte after the first is predicted exactly once.

    Parameters
    ----------
    data : numpy.ndarray
        ``(bytes,)`` integer array, e.g. ``ByteCorpus.val``; at least ``seq_len + 1`` long.
    batch_size, seq_len : int
        Both >= 1.
    max_batches : int, optional
        Stop after this many batches (>= 1); ``None`` for all of ``data``.

    Yields
    ------
    numpy.ndarray
        int32, shape ``(rows, seq_len + 1)`` with ``rows = batch_size``, except possibly for the
        last batch (the windows left over, ``1 <= rows < batch_size``). Bytes after the last
        full window are not used.

    Raises
    ------
    ValueError
        On a size below its minimum or data too short (raised at the call, not on first use).
    """
    data, batch_size, seq_len = _check_args("eval_batches", data, batch_size, seq_len)
    if max_batches is not None:
        max_batches = _as_int("eval_batches", "max_batches", max_batches)
        if max_batches < 1:
            raise ValueError(f"eval_batches: max_batches must be >= 1 or None, got {max_batches}")
    num_windows = (data.size - 1) // seq_len
    num_batches = -(-num_windows // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    return _eval_batches(data, batch_size, seq_len, num_windows, num_batches)


def _eval_batches(data, batch_size, seq_len, num_windows, num_batches):
    offsets = np.arange(seq_len + 1)
    for b in range(num_batches):
        first = b * batch_size
        starts = np.arange(first, min(first + batch_size, num_windows), dtype=np.int64) * seq_len
        yield data[starts[:, None] + offsets].astype(np.int32)


def bits_per_byte(loss_nats):
    """Bits per byte of a mean cross-entropy in nats per byte: ``loss_nats / ln 2``.

    With one byte per token the per-token loss is per byte, so this is comparable across
    tokenizer-free runs. Accepts a float or an array (returned as the same kind).
    """
    return loss_nats / math.log(2)
