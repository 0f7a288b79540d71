"""CUDA: whether this installation can run pyswitch on an NVIDIA GPU, and the CUDA backend.

The CUDA backend is its own extension module, ``pyswitch._cuda``, imported only here and only
when asked (``is_available()``, ``device_count()`` or anything with ``device="cuda"``), so
``import pyswitch`` never needs the CUDA runtime, cuBLAS or NCCL. It is built when the build finds
nvcc, cuBLAS and NCCL (``PYSWITCH_ENABLE_CUDA``; docs/cuda.md); ``pip install "pyswitch[cuda]"``
brings the runtime libraries it links.

What runs on cuda in this version: :func:`pyswitch.route` and the layers
:class:`pyswitch.SwitchFFN` / :class:`pyswitch.DenseFFN` on one device (their parameters,
gradients and activations live in device memory; NumPy arrays are copied in and out at the
edges; ``params`` / ``grads`` are read-only host copies). Expert parallelism over NCCL, the
language model and the Trainer run on the CPU only.
"""

from __future__ import annotations

import importlib
import threading

from . import _core
from .runtime import _as_int

__all__ = ["is_available", "device_count", "device_info", "versions", "require"]

_lock = threading.Lock()
_installed = False


def _module():
    """The CUDA extension module, or None where it is not built or its libraries cannot load."""
    try:
        return importlib.import_module("pyswitch._cuda")
    except ImportError:
        return None


def device_count() -> int:
    """Number of CUDA devices pyswitch can use (0 without the CUDA backend, a driver or a GPU)."""
    module = _module()
    return int(module.device_count()) if module is not None else 0


def is_available() -> bool:
    """True when the CUDA backend is built and at least one device is visible. Never raises."""
    try:
        return device_count() > 0
    except _core.Error:
        return False


def _missing_reason() -> str:
    if not _core.build_info()["cuda"]:
        return (
            "this pyswitch was built without the CUDA backend (build it with nvcc, cuBLAS and "
            "NCCL present; see docs/cuda.md)"
        )
    try:
        importlib.import_module("pyswitch._cuda")
    except ImportError as exc:
        return (
            f"the CUDA module could not load ({exc}); install the CUDA runtime libraries with "
            '`pip install "pyswitch[cuda]"`'
        )
    return "no CUDA device is visible (no driver, no GPU, or CUDA_VISIBLE_DEVICES hides them)"


def require(where: str = "pyswitch") -> None:
    """Make the CUDA backend available to pyswitch, or raise :class:`pyswitch.DeviceError`.

    Called by everything that takes ``device="cuda"``; idempotent and thread-safe.
    """
    global _installed
    with _lock:
        if _installed:
            return
        module = _module()
        if module is None or module.device_count() == 0:
            raise _core.DeviceError(
                f"{where}: device 'cuda' is not available: {_missing_reason()}; use device='cpu'"
            )
        _core._install_backend(module.backend_capsule())
        _installed = True


def device_info(device: int = 0) -> dict:
    """``{"name", "compute_capability", "memory_bytes"}`` of one device: DeviceError if there is
    none, ValueError for an index outside ``[0, device_count())``."""
    device = _as_int("pyswitch.cuda.device_info", "device", device)
    require("pyswitch.cuda.device_info")
    return dict(_module().device_info(device))


def versions() -> str:
    """The CUDA runtime, driver, cuBLAS and NCCL versions the backend uses (DeviceError if it
    cannot load)."""
    module = _module()
    if module is None:
        raise _core.DeviceError(f"pyswitch.cuda.versions: {_missing_reason()}")
    return str(module.versions())
