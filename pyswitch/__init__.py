"""pyswitch: a Switch Transformer Mixture-of-Experts engine with a C++ core and a NumPy API.

Arrays go in and out as NumPy arrays of float32 or :data:`pyswitch.bfloat16` (the ml_dtypes
type). See ``build_info()`` for what this build contains.
"""

from ml_dtypes import bfloat16

from . import _core, comm, cuda
from ._core import CheckpointError, CommError, CommTimeout, DeviceError, Error
from .dispatch import (
    DispatchLayout,
    combine,
    combine_backward,
    dispatch,
    dispatch_backward,
    dispatch_layout,
)
from .layers import DenseFFN, SwitchFFN, matmul
from .numerics import to_bfloat16, to_float32
from .routing import ExpertChoicePlan, Router, RoutingPlan, route, route_expert_choice
from .runtime import (
    build_info,
    cpu_isa,
    get_log_level,
    get_num_threads,
    set_cpu_isa,
    set_log_level,
    set_num_threads,
    supported_isas,
)

__version__ = _core.build_info()["version"]

__all__ = [
    "comm",
    "cuda",
    "bfloat16",
    "Error",
    "CommError",
    "CommTimeout",
    "CheckpointError",
    "DeviceError",
    "build_info",
    "cpu_isa",
    "set_cpu_isa",
    "supported_isas",
    "get_num_threads",
    "set_num_threads",
    "set_log_level",
    "get_log_level",
    "to_bfloat16",
    "to_float32",
    "route",
    "route_expert_choice",
    "RoutingPlan",
    "ExpertChoicePlan",
    "Router",
    "DispatchLayout",
    "dispatch_layout",
    "dispatch",
    "combine",
    "combine_backward",
    "dispatch_backward",
    "SwitchFFN",
    "DenseFFN",
    "matmul",
]
