"""float32 <-> bfloat16 conversion, bit-identical to ml_dtypes and several times faster."""

from __future__ import annotations

import numpy as np

from . import _core


def to_bfloat16(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Convert a float32 array to :data:`pyswitch.bfloat16`, rounding to nearest even.

    Bit-identical to ``a.astype(ml_dtypes.bfloat16)``: overflow rounds to +-inf, subnormals are
    rounded (not flushed), every NaN becomes the canonical quiet NaN with its sign.

    Parameters
    ----------
    a : ndarray of float32, any shape (non-contiguous views are copied first)
    out : ndarray of bfloat16, optional
        A writeable C-contiguous array of ``a``'s shape, not overlapping ``a``, to write into
        (saves the allocation and its page faults when converting repeatedly).

    Returns
    -------
    ndarray of bfloat16, same shape (``out`` when given)

    Raises
    ------
    TypeError
        If ``a`` is not a NumPy array of dtype float32, or ``out`` is not bfloat16.
    ValueError
        If ``out`` has the wrong shape, is not C-contiguous and writeable, or overlaps ``a``.
    """
    return _core.to_bfloat16(a, out)


def to_float32(a: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Convert a :data:`pyswitch.bfloat16` array to float32 (exact).

    Parameters
    ----------
    a : ndarray of bfloat16, any shape
    out : ndarray of float32, optional
        As in :func:`to_bfloat16`.

    Returns
    -------
    ndarray of float32, same shape (``out`` when given)

    Raises
    ------
    TypeError
        If ``a`` is not a NumPy array of dtype bfloat16, or ``out`` is not float32.
    ValueError
        If ``out`` has the wrong shape, is not C-contiguous and writeable, or overlaps ``a``.
    """
    return _core.to_float32(a, out)
