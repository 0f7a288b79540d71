# Build information, CPU-ISA selection, thread count and error classes of the Python package.
# What the ISAs compute is tested in test_route.py / test_bf16.py.
import numpy as np
import pytest
from isa_utils import SUPPORTED_ISAS, cpu_config

import pyswitch

KNOWN_ISAS = {"scalar", "avx2", "avx512_bf16"}


def test_build_info_keys():
    info = pyswitch.build_info()
    for key in ("version", "compiled_isas", "active_isa", "blas", "mpi", "cuda", "num_threads"):
        assert key in info, key
    assert isinstance(info["version"], str) and info["version"].count(".") >= 2
    compiled = list(info["compiled_isas"])
    assert "scalar" in compiled and set(compiled) <= KNOWN_ISAS
    assert info["active_isa"] in compiled
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1


def test_supported_isas_are_compiled_and_selectable():
    compiled = set(pyswitch.build_info()["compiled_isas"])
    assert set(SUPPORTED_ISAS) <= compiled
    for isa in SUPPORTED_ISAS:
        with cpu_config(isa=isa):
            assert pyswitch.cpu_isa() == isa
            assert pyswitch.build_info()["active_isa"] == isa


def test_set_cpu_isa_returns_previous():
    start = pyswitch.cpu_isa()
    try:
        prev = pyswitch.set_cpu_isa("scalar")
        assert prev == start
        assert pyswitch.set_cpu_isa(SUPPORTED_ISAS[-1]) == "scalar"
    finally:
        pyswitch.set_cpu_isa(start)


@pytest.mark.parametrize("name", ["sse9000", "", "AVX2 ", "neon"])
def test_set_cpu_isa_rejects_unknown(name):
    before = pyswitch.cpu_isa()
    with pytest.raises(ValueError):
        pyswitch.set_cpu_isa(name)
    assert pyswitch.cpu_isa() == before


def test_set_cpu_isa_rejects_unsupported():
    before = pyswitch.cpu_isa()
    for isa in set(pyswitch.build_info()["compiled_isas"]) - set(SUPPORTED_ISAS):
        with pytest.raises(ValueError):
            pyswitch.set_cpu_isa(isa)
        assert pyswitch.cpu_isa() == before


def test_num_threads_roundtrip():
    before = pyswitch.get_num_threads()
    try:
        pyswitch.set_num_threads(1)
        assert pyswitch.get_num_threads() == 1
        pyswitch.set_num_threads(2)
        assert pyswitch.get_num_threads() == 2
        plan = pyswitch.route(np.zeros((8, 2), np.float32))
        assert plan.expert_index.shape == (8, 1)
    finally:
        pyswitch.set_num_threads(before)


def test_error_classes():
    assert issubclass(pyswitch.Error, RuntimeError)
    for cls in (pyswitch.CommError, pyswitch.CommTimeout, pyswitch.CheckpointError):
        assert issubclass(cls, pyswitch.Error), cls
    # SPEC section 3: a timeout is a CommError-derived exception.
    assert issubclass(pyswitch.CommTimeout, pyswitch.CommError)
