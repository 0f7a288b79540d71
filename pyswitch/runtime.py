"""Build information, CPU kernel selection and the size of the core's thread pool."""

from __future__ import annotations

from . import _core


def build_info() -> dict:
    """What this build of pyswitch contains and is using now.

    Returns
    -------
    dict
        ``version``; ``compiled_isas`` and ``supported_isas`` (kernel sets compiled in / runnable
        on this CPU, among ``"scalar"``, ``"avx2"``, ``"avx512_bf16"``); ``active_isa``;
        ``blas`` (what runs the GEMMs); ``gemm`` (dict: the path float32 and bfloat16 GEMMs
        take on the active ISA; bfloat16 needs no native bf16 support); ``mpi`` (bool: the MPI
        backend is built and its MPI library loads) and ``mpi_library`` (that library's
        version, or why it is unavailable);
        ``cuda`` (bool); ``num_threads``; ``compiler``.
    """
    info = dict(_core.build_info())
    try:
        from . import _mpi
    except ImportError as exc:
        info["mpi"] = False
        info["mpi_library"] = f"unavailable ({exc})"
    else:
        info["mpi"] = True
        info["mpi_library"] = _mpi.library_version()
    return info


def cpu_isa() -> str:
    """The active CPU kernel set: ``"scalar"``, ``"avx2"`` or ``"avx512_bf16"``."""
    return _core.cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Select the CPU kernel set and return the previous one.

    Every kernel set gives bit-identical results; this exists for tests and debugging. The
    environment variable ``PYSWITCH_CPU_ISA`` caps the choice made at import.

    Raises
    ------
    ValueError
        If ``name`` is not a kernel set, or this CPU cannot run it.
    """
    if not isinstance(name, str):
        raise TypeError(f"set_cpu_isa: name must be a str, got {type(name).__name__}")
    return _core.set_cpu_isa(name)


def supported_isas() -> list[str]:
    """Kernel sets compiled in that this CPU can run, slowest first."""
    return list(_core.supported_isas())


def get_num_threads() -> int:
    """Threads each pyswitch op uses (the core's OpenMP pool, shared with oneDNN)."""
    return _core.get_num_threads()


_LOG_LEVELS = ("debug", "info", "warning", "error", "off")


def set_log_level(level: str) -> None:
    """Which messages of the C++ core reach stderr: ``"debug"``, ``"info"``, ``"warning"``
    (default), ``"error"`` or ``"off"``. The core never writes to stdout; its messages are few
    (an ignored ``PYSWITCH_CPU_ISA``, a poisoned communicator group, buffers kept after an
    abandoned MPI call). The level at import is ``PYSWITCH_LOG_LEVEL`` when set.

    Raises
    ------
    ValueError
        For an unknown level.
    """
    if not isinstance(level, str):
        raise TypeError(f"set_log_level: level must be a str, got {type(level).__name__}")
    if level not in _LOG_LEVELS:
        raise ValueError(f"set_log_level: level must be one of {_LOG_LEVELS}, got {level!r}")
    _core.set_log_level(level)


def get_log_level() -> str:
    """The current level of :func:`set_log_level`."""
    return _core.log_level()


def set_num_threads(n: int) -> None:
    """Set the threads each op uses. Results do not depend on it (fixed work blocks).

    Raises
    ------
    ValueError
        If ``n < 1``.
    """
    _core.set_num_threads(_as_int("set_num_threads", "n", n))


def _as_int(where: str, name: str, value) -> int:
    """An integer argument, refusing floats and bools instead of truncating them."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{where}: {name} must be an integer, got {type(value).__name__} {value!r}")
    return value.__index__()


def _as_seed(where: str, seed) -> int:
    """A seed: an integer in [0, 2**64)."""
    seed = _as_int(where, "seed", seed)
    if seed < 0 or seed >= 2**64:
        raise ValueError(f"{where}: seed must be in [0, 2**64), got {seed}")
    return seed
