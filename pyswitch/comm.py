"""Collective communication for expert and data parallelism (SPEC section 3).

``LocalGroup(world_size)`` runs ``world_size`` thread ranks in this process, exchanging
through shared memory; ``run(fn)`` calls ``fn(comm)`` on each. The collectives follow MPI/NCCL
names. Arrays are NumPy arrays of float32, bfloat16, int32 or int64; counts are in rows of the
leading axis, and the trailing shape must agree across ranks.

Rules: every rank calls every collective in the same order (ranks with nothing to send too);
a mismatch in op, dtype or size raises :class:`pyswitch.CommError` on every rank; every wait
has a timeout (:class:`pyswitch.CommTimeout`); a rank that raises poisons the group, so the
others raise ``CommError`` instead of waiting. Reductions run in rank order, so every rank gets
bit-identical results.

Gradient scale under expert x data parallelism
----------------------------------------------
An expert-parallel :class:`pyswitch.SwitchFFN` is *one* layer over the global batch (the
tokens of all ranks). Write the objective as the global one: each rank back-propagates
``dy = d(global loss)/dy`` for its own tokens, e.g. a cross-entropy averaged over the *global*
batch (divide by the global token count, not the rank's). Then:

* expert weights (sharded, one owner each): their gradients are complete on the owner. Do not
  all-reduce, average or rescale them.
* replicated parameters (the router, attention, embeddings, dense FFNs): each rank holds its
  tokens' share; :func:`sum_gradients` (all_reduce sum) gives the gradient of the global loss.
* the layer's ``aux_loss`` / ``z_loss`` are already the global losses (the same on every rank);
  add them once, not once per rank and then average.

The usual pure data-parallel convention (each rank's loss is the mean over its own tokens, and
gradients are averaged with :func:`average_gradients`) scales every rank's ``dy`` by ``W``
relative to this; mixed with expert parallelism it makes expert gradients ``W`` times too large
and under-weights the auxiliary losses by ``W``. That is the bug class this convention avoids;
the tests check it against one rank holding everything.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from ml_dtypes import bfloat16

from . import _core
from ._core import CommError
from .runtime import _as_int

_OPS = ("sum", "max", "min", "mean")

# Arrays of MPI calls that failed while MPI may still write into them; never freed.
_FAILED_CALL_BUFFERS: list = []


def _rows(x: np.ndarray) -> tuple[int, int]:
    """(rows, elements per row) of an array, treating a 0-d array as one row of one element."""
    if x.ndim == 0:
        return 1, 1
    per_row = int(np.prod(x.shape[1:], dtype=np.int64))
    return x.shape[0], per_row


def _fingerprint(shape) -> int:
    """A value every rank computes alike from a shape (Python's hash of a tuple of ints does not
    depend on the process), checked by the core with the rest of the call."""
    return hash(tuple(int(d) for d in shape)) & 0x7FFFFFFFFFFFFFFF


def _dtype_code(x: np.ndarray) -> int:
    for code, dtype in enumerate((np.float32, bfloat16, np.int32, np.int64), start=1):
        if x.dtype == dtype:
            return code
    return 0


def _check_array(where: str, x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{where}: x must be a numpy array, got {type(x).__name__}")
    if not _dtype_code(x):
        raise TypeError(f"{where}: x must be float32, bfloat16, int32 or int64, got {x.dtype}")
    # np.ascontiguousarray would turn a 0-d array into shape (1,).
    return x if x.flags.c_contiguous else np.array(x, order="C")


def _check_op(where: str, op) -> str:
    if op not in _OPS:
        raise ValueError(f"{where}: op must be one of {_OPS}, got {op!r}")
    return op


class Communicator:
    """One rank's view of a group. Use it only from that rank's thread.

    Attributes
    ----------
    rank, size : int
    timeout : float
        Seconds any collective may wait before raising ``CommTimeout``.
    """

    def __init__(self, impl, poison=None):
        self._impl = impl
        self._poison = poison
        self.rank = impl.rank
        self.size = impl.size
        self.timeout = impl.timeout

    @staticmethod
    def _internal(op: str, call):
        """Run a helper exchange of `op`, reporting its failures under `op`'s name."""
        try:
            call()
        except CommError as exc:
            raise type(exc)(f"{op}: {exc}") from None

    def _run(self, call, *arrays):
        """Runs a core call on `arrays`; if it fails, they are kept alive for good when the
        backend may still write into them (MPI cannot cancel a started collective)."""
        try:
            return call()
        except CommError:
            if self._keeps_failed_buffers:
                _FAILED_CALL_BUFFERS.extend(arrays)
            raise

    _keeps_failed_buffers = False

    def _check_shape(self, x: np.ndarray, *, rows_may_differ=False) -> None:
        """Makes the next collective check that every rank passes an array of this shape (the
        trailing shape when row counts may differ): the core compares it with op, dtype and
        counts, so on a mismatch every rank raises CommError, and the group is poisoned."""
        self._impl.set_next_call_check(_fingerprint(x.shape[1:] if rows_may_differ else x.shape))

    def _equal_blocks(self, where: str, x: np.ndarray) -> tuple[int, int]:
        """(rows, elements per row) of an x that splits into `size` equal blocks of rows."""
        rows, per_row = _rows(x)
        if x.ndim == 0 or rows % self.size:
            raise ValueError(
                f"{where}: x must have a leading dimension divisible by size={self.size}, "
                f"got shape {x.shape}"
            )
        return rows, per_row

    def all_to_all(self, x: np.ndarray) -> np.ndarray:
        """Exchange equal blocks: x (size * n, ...) -> y (size * n, ...).

        Block r of x (rows r*n:(r+1)*n) goes to rank r; block r of y came from rank r.
        """
        x = _check_array("all_to_all", x)
        rows, per_row = self._equal_blocks("all_to_all", x)
        out = np.empty_like(x)
        self._check_shape(x)
        self._run(lambda: self._impl.all_to_all(x, out, (rows // self.size) * per_row), x, out)
        return out

    def all_to_all_v(
        self, x: np.ndarray, send_counts, *, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exchange blocks of varying size.

        Parameters
        ----------
        x : ndarray (sum(send_counts), ...)
            Rows for rank 0, then rank 1, ...
        send_counts : sequence of int, length size
            Rows sent to each rank (>= 0).
        out : ndarray, optional
            A C-contiguous array of x's dtype and trailing shape to receive into; used when it
            has at least sum(recv_counts) rows (then y is a view of its first rows), else a new
            array is returned. Reusing one buffer saves the page faults of a fresh output.

        Returns
        -------
        y : ndarray (sum(recv_counts), ...)
            Rows from rank 0, then rank 1, ...
        recv_counts : ndarray of int64 (size,)
        """
        x = _check_array("all_to_all_v", x)
        if x.ndim == 0:
            raise ValueError(
                "all_to_all_v: x must have a leading (rows) dimension, got a 0-d array"
            )
        counts = np.asarray(send_counts)
        if counts.dtype.kind not in "iu" or counts.ndim != 1:  # slow path, for the messages
            counts = np.asarray([_as_int("all_to_all_v", "send_counts", c) for c in send_counts])
        counts = np.ascontiguousarray(counts, dtype=np.int64).reshape(-1)
        if (counts < 0).any() or counts.sum() != x.shape[0]:
            raise ValueError(
                "all_to_all_v: send_counts must be >= 0 and sum to x.shape[0]="
                f"{x.shape[0]}, got {counts.tolist()}"
            )
        # The counts travel first, so that every rank can size its output; that exchange also
        # checks the dtype and the trailing shape.
        check = _fingerprint((_dtype_code(x),) + x.shape[1:])
        _, per_row = _rows(x)
        if out is not None and not (
            isinstance(out, np.ndarray)
            and out.dtype == x.dtype
            and out.ndim == x.ndim
            and out.shape[1:] == x.shape[1:]
            and out.flags.c_contiguous
            and out.flags.writeable
        ):
            raise ValueError(
                "all_to_all_v: out must be a writeable C-contiguous array of dtype "
                f"{x.dtype} and shape (rows, *{x.shape[1:]}), got "
                + (f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else repr(out))
            )
        return self._run(
            lambda: self._impl.all_to_all_v_rows(x, counts, per_row, check, out), x, counts, out
        )

    def all_reduce(self, x: np.ndarray, op: str = "sum", *, out: np.ndarray | None = None):
        """Elementwise reduction over ranks (rank order; bf16 accumulates in float32).

        ``out``: an array of x's shape and dtype to write into (``out=x`` reduces in place);
        default a new array.
        """
        x = _check_array("all_reduce", x)
        op = _check_op("all_reduce", op)
        if out is None:
            out = np.empty_like(x)
        elif not (
            isinstance(out, np.ndarray)
            and out.shape == x.shape
            and out.dtype == x.dtype
            and out.flags.c_contiguous
            and out.flags.writeable
        ):
            raise ValueError(
                "all_reduce: out must be a writeable C-contiguous array of the shape and dtype of "
                f"x {x.shape} {x.dtype}, got "
                + (f"{out.shape} {out.dtype}" if isinstance(out, np.ndarray) else repr(out))
            )
        self._check_shape(x)
        self._run(lambda: self._impl.all_reduce(x, out, x.size, op), x, out)
        return out

    def all_gather(self, x: np.ndarray) -> np.ndarray:
        """Stack every rank's x: y (size, *x.shape), y[r] = rank r's x."""
        x = _check_array("all_gather", x)
        out = np.empty((self.size,) + x.shape, dtype=x.dtype)
        self._check_shape(x)
        self._run(lambda: self._impl.all_gather(x, out, x.size), x, out)
        return out

    def reduce_scatter(self, x: np.ndarray, op: str = "sum") -> np.ndarray:
        """x (size * n, ...) -> this rank's block (n, ...) of the all_reduce of x."""
        x = _check_array("reduce_scatter", x)
        op = _check_op("reduce_scatter", op)
        rows, per_row = self._equal_blocks("reduce_scatter", x)
        out = np.empty((rows // self.size,) + x.shape[1:], dtype=x.dtype)
        self._check_shape(x)
        self._run(lambda: self._impl.reduce_scatter(x, out, out.size, op), x, out)
        return out

    def broadcast(self, x: np.ndarray, root: int = 0) -> np.ndarray:
        """Root's x on every rank (other ranks pass an array of the same shape and dtype)."""
        x = _check_array("broadcast", x)
        root = _as_int("broadcast", "root", root)
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast: root must be in [0, {self.size}), got {root}")
        out = np.array(x, copy=True, order="C")
        self._check_shape(x)
        self._run(lambda: self._impl.broadcast(out, out.size, root), out)
        return out

    def barrier(self) -> None:
        """Wait until every rank has called barrier."""
        self._impl.barrier()


def _check_timeout(where: str, timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"{where}: timeout must be a number, got {timeout!r}")
    if not (timeout > 0 and np.isfinite(timeout)):
        raise ValueError(f"{where}: timeout must be finite and > 0 seconds, got {timeout}")
    return float(timeout)


class MPIComm(Communicator):
    """The MPI backend: this process's rank of an MPI communicator (``mpiexec -n N python ...``).

    Needs mpi4py and an MPICH-compatible MPI library (``pip install 'pyswitch[mpi]'`` installs
    the ``mpich`` and ``mpi4py`` wheels). ``import pyswitch`` never needs them; only this class
    does. Results are bit-identical to :class:`LocalGroup`'s (reductions in rank order).

    Parameters
    ----------
    mpi4py_comm : mpi4py.MPI.Comm, optional
        The group (default ``MPI.COMM_WORLD``). It is duplicated, so pyswitch's messages never
        mix with the application's. Collective: every rank of it must construct ``MPIComm``.
    timeout : float
        Seconds any collective may wait (default 30).

    Notes
    -----
    A rank that raises outside a collective must tell the others, or they wait for the
    timeout: run the rank's work through :meth:`run`, or call ``comm.poison(reason)``. After a
    ``CommError`` the MPI job cannot continue reliably (MPI cannot cancel a started collective):
    end it, e.g. with ``MPI.COMM_WORLD.Abort(1)``. pyswitch never aborts the job itself.
    """

    def __init__(self, mpi4py_comm=None, *, timeout: float = 30.0):
        where = "MPIComm"
        timeout = _check_timeout(where, timeout)
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(
                f"{where} needs mpi4py and an MPI library; install them with "
                "pip install 'pyswitch[mpi]' (the mpich and mpi4py wheels)"
            ) from exc
        try:
            from . import _mpi
        except ImportError as exc:
            raise ImportError(
                f"{where}: the MPI backend pyswitch._mpi could not be loaded ({exc}); this build "
                "has no MPI backend, or its MPI library (libmpi.so.12, MPICH ABI) is missing: "
                "pip install 'pyswitch[mpi]'"
            ) from exc
        comm = MPI.COMM_WORLD if mpi4py_comm is None else mpi4py_comm
        if not isinstance(comm, MPI.Comm):
            raise TypeError(
                f"{where}: mpi4py_comm must be an mpi4py.MPI.Comm, got {type(comm).__name__}"
            )
        if comm == MPI.COMM_NULL:
            raise ValueError(f"{where}: mpi4py_comm must be a valid communicator, got COMM_NULL")
        ours = _mpi.library_version().strip()
        theirs = MPI.Get_library_version().strip().splitlines()[0].strip()
        if ours.split()[:3] != theirs.split()[:3]:
            raise _core.Error(
                f"{where}: mpi4py runs on '{theirs}' but pyswitch's MPI backend loaded "
                f"'{ours}'; both must use the same MPI library"
            )
        impl = _mpi.MPIComm(comm.py2f(), timeout)
        super().__init__(impl, impl.poison)
        self._keeps_failed_buffers = True
        self.mpi4py_comm = comm

    def poison(self, reason: str) -> None:
        """Tell every other rank that this one failed: their collectives raise ``CommError``."""
        self._impl.poison(str(reason))

    def run(self, fn):
        """Call ``fn(self)`` and return its result; if it raises, poison the group (so the other
        ranks raise ``CommError`` at once instead of waiting for the timeout) and re-raise."""
        try:
            return fn(self)
        except BaseException as exc:
            if not isinstance(exc, CommError):
                self.poison(f"rank {self.rank} raised {type(exc).__name__}: {exc}")
            raise


def thread_shares(threads: int, world_size: int) -> list[int]:
    """How :class:`LocalGroup` splits ``threads`` (the pool size) between ``world_size`` thread
    ranks: ``threads // world_size`` each, one more for the first ``threads % world_size``
    ranks, and at least 1."""
    base, extra = divmod(threads, world_size)
    return [max(1, base + (rank < extra)) for rank in range(world_size)]


class LocalGroup:
    """``world_size`` ranks as threads of this process (the embedded default backend).

    The ranks split the core's thread pool (:func:`thread_shares`) rather than each running a
    full team, so ``W`` ranks do not oversubscribe the cores ``W`` times over.

    Parameters
    ----------
    world_size : int
        Number of ranks, >= 1.
    timeout : float
        Seconds a collective may wait for the other ranks (default 30).
    """

    def __init__(self, world_size: int, *, timeout: float = 30.0):
        self.world_size = _as_int("LocalGroup", "world_size", world_size)
        if self.world_size < 1:
            raise ValueError(f"LocalGroup: world_size must be >= 1, got {self.world_size}")
        self.timeout = _check_timeout("LocalGroup", timeout)

    def run(self, fn) -> list:
        """Call ``fn(comm)`` on every rank, each in its own thread; return the results by rank.

        If a rank raises, the others are released (their collectives raise ``CommError``) and
        the first original exception is re-raised here with its type; a failure that is only a
        communication error (mismatch, timeout) re-raises the first ``CommError``.
        """
        group = _core.LocalGroup(self.world_size, self.timeout)
        results = [None] * self.world_size
        errors = []  # (time, rank, exception)
        lock = threading.Lock()

        shares = thread_shares(_core.get_num_threads(), self.world_size)

        def body(rank):
            # Each rank runs its ops on its share of the pool, not on a full team of its own.
            _core.set_thread_share(shares[rank])
            try:
                results[rank] = fn(Communicator(group.comm(rank), group.poison))
            except BaseException as exc:  # noqa: BLE001 - re-raised by run()
                with lock:
                    errors.append((time.monotonic(), rank, exc))
                group.poison(f"rank {rank} raised {type(exc).__name__}: {exc}")
            finally:
                _core.set_thread_share(0)

        threads = [
            threading.Thread(target=body, args=(r,), name=f"pyswitch-rank-{r}", daemon=True)
            for r in range(self.world_size)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            errors.sort(key=lambda e: e[0])
            original = [e for e in errors if not isinstance(e[2], CommError)]
            raise (original or errors)[0][2]
        return results


def sum_gradients(comm: Communicator, grads: dict, keys=None) -> dict:
    """Expert x data parallelism: replace each gradient by its sum over the ranks, in place.

    Use it for replicated parameters (the router, dense layers) when each rank back-propagates
    its share of the *global* loss (see "Gradient scale" in this module's docs): the sum is then
    the gradient of the global loss. Never for sharded expert weights.

    Parameters
    ----------
    comm : Communicator
    grads : dict of str -> float32 or bfloat16 ndarray
        Typically ``{"router": layer.grads["router"]}`` (live arrays are updated in place).
    keys : iterable of str, optional
        The entries to reduce (default: all, in sorted order so every rank agrees).

    Returns
    -------
    dict
        ``grads`` itself.
    """
    return _reduce_gradients(comm, grads, keys, "sum")


def _reduce_gradients(comm: Communicator, grads: dict, keys, op: str) -> dict:
    names = sorted(grads) if keys is None else list(keys)
    for name in names:
        g = grads[name]
        if g.flags.c_contiguous and g.flags.writeable:
            comm.all_reduce(g, op=op, out=g)  # in place: no copy of large gradients
        else:
            g[...] = comm.all_reduce(np.ascontiguousarray(g), op=op)
    return grads


def average_gradients(comm: Communicator, grads: dict, keys=None) -> dict:
    """Data parallelism: replace each gradient by its mean over the ranks, in place.

    Pure data parallelism (no expert-parallel layer), where each rank's loss is the mean over
    its own tokens and the ranks hold equal shares: the mean over ranks is then the gradient of
    the mean over the global batch. With expert-parallel layers use the global-loss convention
    and :func:`sum_gradients` instead (see "Gradient scale" in this module's docs).

    Parameters
    ----------
    comm : Communicator
    grads : dict of str -> float32 or bfloat16 ndarray
        Typically ``layer.grads`` (live arrays: the layer sees the averaged values).
    keys : iterable of str, optional
        The entries to average (default: all, in sorted order so every rank agrees).

    Returns
    -------
    dict
        ``grads`` itself.
    """
    return _reduce_gradients(comm, grads, keys, "mean")
