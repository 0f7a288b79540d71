"""Expert dispatch and combine driven by a routing plan, and their backward passes.

No one-hot ``(T, E, C)`` tensor is built: a :class:`DispatchLayout` holds ``O(T*k + E)`` row
indices, and the data moves by row copies (dispatch) and gate-weighted row sums (combine).
"""

from __future__ import annotations

import numpy as np

from . import _core

DispatchLayout = _core.DispatchLayout


def dispatch_layout(plan, *, packed: bool = False) -> DispatchLayout:
    """The buffer layout of a routing plan.

    Parameters
    ----------
    plan : RoutingPlan
    packed : bool
        ``False``: expert buffers of shape ``(E, G*C, d_model)``; token ``t``'s j-th choice goes
        to row ``plan.slot[t, j]`` of expert ``plan.expert_index[t, j]``; unused rows are zero.
        ``True``: the same rows in the same order without the unused ones, as one
        ``(rows, d_model)`` buffer where expert ``e`` owns rows
        ``expert_offset[e]:expert_offset[e + 1]`` (the dropless layout).

    Returns
    -------
    DispatchLayout
        ``expert_offset`` int64 (E + 1,), ``assignment_row`` int64 (T, k) (-1 = dropped),
        ``row_token`` int32 (rows,) (-1 = unused row), ``total_rows``, ``packed``.
    """
    return _core.DispatchLayout(plan, bool(packed))


def dispatch(x: np.ndarray, layout: DispatchLayout) -> np.ndarray:
    """Gather tokens into expert buffers.

    Parameters
    ----------
    x : ndarray of float32 or bfloat16, shape (T, d_model)
    layout : DispatchLayout

    Returns
    -------
    ndarray, dtype of ``x``: shape (E, G*C, d_model) (padded) or (rows, d_model) (packed)
    """
    return _core.dispatch(x, layout)


def combine(expert_out: np.ndarray, gate: np.ndarray, layout: DispatchLayout) -> np.ndarray:
    """Scatter expert outputs back to their tokens, weighted by their gates.

    ``y[t] = sum over kept j of gate[t, j] * expert_out[row(t, j)]``, accumulated in float32 in
    order of j. Dropped assignments contribute exactly 0.

    Parameters
    ----------
    expert_out : ndarray of float32 or bfloat16, the buffer shape of ``layout``
    gate : ndarray of float32, shape (T, k), usually ``plan.gate``
    layout : DispatchLayout

    Returns
    -------
    y : ndarray, shape (T, d_model), dtype of ``expert_out``
    """
    return _core.combine(expert_out, gate, layout)


def combine_backward(dy, expert_out, gate, layout):
    """Backward of :func:`combine`.

    Returns
    -------
    d_expert_out : ndarray, buffer shape, dtype of ``expert_out`` (``gate * dy[token]``)
    d_gate : ndarray of float32, shape (T, k) (``<dy[t], expert_out[row]>``, 0 where dropped)
    """
    return _core.combine_backward(dy, expert_out, gate, layout)


def dispatch_backward(d_buffer: np.ndarray, layout: DispatchLayout) -> np.ndarray:
    """Backward of :func:`dispatch`: ``dx[t] = sum over kept j of d_buffer[row(t, j)]``.

    Returns
    -------
    dx : ndarray, shape (T, d_model), dtype of ``d_buffer``
    """
    return _core.dispatch_backward(d_buffer, layout)
