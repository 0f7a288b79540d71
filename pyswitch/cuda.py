"""CUDA availability: whether this installation can run pyswitch on an NVIDIA GPU.

The CUDA backend is its own extension module, ``pyswitch._cuda``, imported only here and only
when asked, so ``import pyswitch`` never needs CUDA libraries. This version has no CUDA backend
yet: :func:`is_available` is False and :func:`device_count` is 0 everywhere, and asking a layer
or model for ``device="cuda"`` raises :class:`pyswitch.DeviceError`.
"""

from __future__ import annotations

import importlib

from . import _core

__all__ = ["is_available", "device_count"]


def _backend():
    """The CUDA extension module, or None where it is not built or cannot load."""
    try:
        return importlib.import_module("pyswitch._cuda")
    except ImportError:
        return None


def device_count() -> int:
    """Number of CUDA devices pyswitch can use (0 without the CUDA backend or a GPU)."""
    backend = _backend()
    return int(backend.device_count()) if backend is not None else 0


def is_available() -> bool:
    """True when the CUDA backend is built and at least one device is visible. Never raises."""
    try:
        return device_count() > 0
    except _core.Error:
        return False
