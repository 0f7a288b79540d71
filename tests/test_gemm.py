"""pyswitch.matmul, the core's GEMM kernel: float64 reference, exact bf16 products, and the
row-independence the bitwise promises rest on (any row split, thread count and CPU tier gives
the same bits). The per-element FMA chain itself is checked in C++ (cpp/tests/test_gemm.cpp).
"""

import ml_dtypes
import numpy as np
import pytest
from array_utils import assert_bits_equal
from hypothesis import given
from hypothesis import strategies as st
from isa_utils import SUPPORTED_ISAS, all_configs, cpu_config

import pyswitch


def _operands(seed, M, N, K, dtype):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((M, K)).astype(np.float32)
    b = rng.standard_normal((K, N)).astype(np.float32)
    if dtype == "bfloat16":
        a, b = a.astype(ml_dtypes.bfloat16), b.astype(ml_dtypes.bfloat16)
    return a, b


def _check_against_float64(a, b, c):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    exact = a64 @ b64
    # Each FMA rounds once in float32: the error is bounded by K * eps * sum |a_k b_k|.
    bound = a.shape[1] * np.finfo(np.float32).eps * (np.abs(a64) @ np.abs(b64)) + 1e-30
    assert c.dtype == np.float32 and c.shape == exact.shape
    assert np.all(np.abs(c - exact) <= bound), np.max(np.abs(c - exact) / bound)


shapes = st.tuples(
    st.integers(1, 260), st.integers(1, 70), st.integers(1, 600), st.sampled_from(["f32", "bf16"])
)


@given(shape=shapes, split=st.integers(0, 10**6), seed=st.integers(0, 2**31 - 1))
def test_rows_do_not_depend_on_the_rows_beside_them(shape, split, seed):
    M, N, K, kind = shape
    a, b = _operands(seed, M, N, K, "bfloat16" if kind == "bf16" else "float32")
    whole = pyswitch.matmul(a, b)
    _check_against_float64(a, b, whole)
    cut = split % (M + 1)
    top = pyswitch.matmul(a[:cut], b)
    bottom = pyswitch.matmul(a[cut:], b)
    assert_bits_equal(np.concatenate([top, bottom]), whole, "row split")
    row = split % M
    assert_bits_equal(pyswitch.matmul(a[row : row + 1], b)[0], whole[row], "single row")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_isa_and_thread_count_gives_the_same_bits(dtype):
    a, b = _operands(3, 197, 301, 517, dtype)
    results = {}
    for isa, threads in all_configs():
        with cpu_config(isa=isa, threads=threads):
            results[(isa, threads)] = pyswitch.matmul(a, b)
    reference = results[("scalar", 1)]
    _check_against_float64(a, b, reference)
    for config, c in results.items():
        assert_bits_equal(c, reference, f"{dtype} {config}")


def test_bf16_products_are_exact_float32_products():
    # bf16 x bf16 fits float32 exactly, so one-term products must equal NumPy's float32 product.
    a, b = _operands(5, 33, 47, 1, "bfloat16")
    for isa in SUPPORTED_ISAS:
        with cpu_config(isa=isa):
            got = pyswitch.matmul(a, b)
        assert_bits_equal(got, a.astype(np.float32) * b.astype(np.float32), isa)


def test_build_info_names_the_gemm_path_per_dtype():
    for isa in SUPPORTED_ISAS:
        with cpu_config(isa=isa):
            gemm = pyswitch.build_info()["gemm"]
        assert set(gemm) == {"float32", "bfloat16"}
        assert isa in gemm["float32"] and isa in gemm["bfloat16"]
        assert "widened exactly" in gemm["bfloat16"]


def test_onednn_comparison_agrees_within_rounding():
    a, b = _operands(9, 64, 96, 300, "float32")
    _check_against_float64(a, b, pyswitch.matmul(a, b, library="onednn"))


def test_matmul_rejects_bad_arguments():
    a, b = _operands(1, 4, 5, 6, "float32")
    with pytest.raises(ValueError, match="library must be 'pyswitch' or 'onednn', got 'mkl'"):
        pyswitch.matmul(a, b, library="mkl")
    with pytest.raises(ValueError, match="matching K"):
        pyswitch.matmul(a, b.T)
    with pytest.raises(TypeError):
        pyswitch.matmul(a, b.astype(ml_dtypes.bfloat16))
