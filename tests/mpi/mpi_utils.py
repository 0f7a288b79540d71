# Helpers for the MPI suite: failures raised on every rank together, digests compared across
# ranks, and timing of fault scenarios.
import contextlib
import hashlib
import re
import time
import traceback

import numpy as np


def digest(*arrays) -> int:
    """A 63-bit digest of the dtypes, shapes and raw bits of ``arrays`` (same on every rank)."""
    h = hashlib.blake2b(digest_size=8)
    for a in arrays:
        a = np.asarray(a)
        h.update(f"{a.dtype.str}{a.shape}|".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little") & 0x7FFFFFFFFFFFFFFF


def gather_ints(comm, values) -> np.ndarray:
    """Every rank's ``values`` (a list of ints, the same length on every rank): (size, n)."""
    return comm.all_gather(np.asarray(values, dtype=np.int64).reshape(-1))


class Failures:
    """Check failures of one rank, raised on every rank together by :meth:`raise_on_all`.

    A rank that raised as soon as a check failed would skip the collectives that follow, and
    its peers would wait for the timeout; instead each check runs in ``with failures.check(...)``
    (which records an AssertionError or any other exception and carries on), and the test ends
    with ``failures.raise_on_all(comm)``.
    """

    def __init__(self, rank):
        self.rank = rank
        self.messages = []

    def __bool__(self):
        return bool(self.messages)

    def add(self, what, exc):
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
        self.messages.append(f"rank {self.rank}: {what}: {type(exc).__name__}: {exc}{where}")

    @contextlib.contextmanager
    def check(self, what):
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - recorded, raised by raise_on_all
            self.add(what, exc)

    def raise_on_all(self, comm):
        """Raise AssertionError on every rank if any rank recorded a failure.

        ``comm`` is a usable communicator (make a fresh one after fault scenarios)."""
        counts = gather_ints(comm, [len(self.messages)])[:, 0]
        failed = [r for r in range(comm.size) if counts[r]]
        if not failed:
            return
        shown = "\n".join(self.messages[:8])
        more = f"\n... and {len(self.messages) - 8} more" if len(self.messages) > 8 else ""
        raise AssertionError(
            f"ranks {failed} recorded failures (counts {counts.tolist()}); this rank's:\n"
            f"{shown or '(none)'}{more}"
        )


def names_rank(message, rank):
    """``message`` names ``rank`` (the number not part of a longer number)."""
    return re.search(rf"(?<!\d){rank}(?!\d)", message) is not None


def timed(f, *args, **kwargs):
    """(result, exception or None, elapsed seconds) of ``f(*args, **kwargs)``; an Exception
    it raises is returned, not raised."""
    t0 = time.monotonic()
    try:
        result = f(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - inspected by the caller
        return None, exc, time.monotonic() - t0
    return result, None, time.monotonic() - t0
