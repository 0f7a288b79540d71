# pyswitch.to_bfloat16 / to_float32 against ml_dtypes, bit for bit, on every CPU ISA.
# Conversion only; bfloat16 inside layers is tested with the layers.
"""float32 <-> bfloat16 conversion (SPEC section 2, precision policy).

float32 -> bfloat16 is round-to-nearest-even, overflow to +-inf, subnormals rounded (not
flushed), every NaN -> the canonical quiet NaN 0x7fc0 / 0xffc0 with its sign: exactly what
``ml_dtypes`` does.  bfloat16 -> float32 is exact (the bits shifted left by 16).
"""

import re

import ml_dtypes
import numpy as np
import pytest
from isa_utils import SUPPORTED_ISAS, THREAD_COUNTS, cpu_config

import pyswitch

BF16 = ml_dtypes.bfloat16


def bits_to_f32(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def expected_bf16_bits(a):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(a).astype(BF16).view(np.uint16)


def assert_bf16_bits_equal(got, x):
    """got: pyswitch's bfloat16 result for the float32 array x."""
    assert got.dtype == np.dtype(BF16), got.dtype
    assert got.shape == x.shape, (got.shape, x.shape)
    g = np.ascontiguousarray(got).view(np.uint16)
    e = expected_bf16_bits(x)
    bad = np.nonzero((g != e).ravel())[0]
    if bad.size:
        xb = np.ascontiguousarray(x).view(np.uint32).ravel()
        rows = [
            f"f32 0x{xb[i]:08x} -> got 0x{g.ravel()[i]:04x}, ml_dtypes 0x{e.ravel()[i]:04x}"
            for i in bad[:8]
        ]
        raise AssertionError(f"{bad.size} mismatches, e.g.\n" + "\n".join(rows))


SPECIALS = np.array(
    [
        0x00000000,
        0x80000000,  # +-0
        0x7F800000,
        0xFF800000,  # +-inf
        0x7FC00000,
        0xFFC00000,
        0x7F800001,
        0xFF800001,  # quiet / signalling NaNs
        0x7FBFFFFF,
        0x7FFFFFFF,
        0xFFFFFFFF,
        0x7FC12345,
        0xFFA00000,
        0x7F80FFFF,
        0x7F810000,
        0x00000001,
        0x80000001,  # smallest subnormals
        0x007FFFFF,
        0x807FFFFF,  # largest subnormals
        0x00008000,
        0x00018000,
        0x00007FFF,
        0x00008001,  # subnormal ties / near ties
        0x007F8000,
        0x007F7FFF,
        0x00408000,
        0x00418000,
        0x00800000,
        0x80800000,  # smallest normals
        0x7F7FFFFF,
        0xFF7FFFFF,  # FLT_MAX
        0x7F7F7FFF,
        0x7F7F8000,
        0x7F7F8001,  # just below / at / above the overflow tie
        0x7F7E8000,
        0x7F7EFFFF,
        0xFF7F8000,
        0xFF7F7FFF,
        0x3F800000,
        0x3F808000,
        0x3F818000,
        0x3F807FFF,
        0x3F808001,  # round-to-even ties
        0xBF808000,
        0xBF818000,
        0x3FFF8000,
        0x3FFFFFFF,
        0x4B7F8000,
    ],
    dtype=np.uint32,
)

# Hand-checked expectations (independent of ml_dtypes) for a few of the above.
HAND = {
    0x00000000: 0x0000,
    0x80000000: 0x8000,
    0x7F800000: 0x7F80,
    0xFF800000: 0xFF80,
    0x7F800001: 0x7FC0,
    0xFF800001: 0xFFC0,
    0x7FFFFFFF: 0x7FC0,
    0xFFFFFFFF: 0xFFC0,
    0x00000001: 0x0000,
    0x80000001: 0x8000,
    0x00008000: 0x0000,
    0x00018000: 0x0002,
    0x00008001: 0x0001,
    0x007FFFFF: 0x0080,
    0x7F7FFFFF: 0x7F80,
    0x7F7F7FFF: 0x7F7F,
    0x7F7F8000: 0x7F80,
    0x7F7E8000: 0x7F7E,
    0xFF7F8000: 0xFF80,
    0x3F808000: 0x3F80,
    0x3F818000: 0x3F82,
    0x3F807FFF: 0x3F80,
    0x3F808001: 0x3F81,
}

isa_param = pytest.mark.parametrize("isa", SUPPORTED_ISAS)


def test_bfloat16_is_the_ml_dtypes_type():
    assert np.dtype(pyswitch.bfloat16) == np.dtype(BF16)


def test_ml_dtypes_agrees_with_hand_checked_values():
    for f, b in HAND.items():
        assert int(expected_bf16_bits(bits_to_f32([f]))[0]) == b, hex(f)


@isa_param
def test_special_values(isa):
    x = bits_to_f32(SPECIALS)
    with cpu_config(isa=isa):
        for n in (1, 15, SPECIALS.size):  # scalar tails and vector bodies alike
            got = pyswitch.to_bfloat16(x[:n])
            assert_bf16_bits_equal(got, x[:n])
        for offset in range(17):  # each special at every lane position
            padded = np.concatenate([np.ones(offset, np.float32), x, np.ones(offset, np.float32)])
            assert_bf16_bits_equal(pyswitch.to_bfloat16(padded), padded)
        got = pyswitch.to_bfloat16(x).view(np.uint16)
    for f, b in HAND.items():
        assert int(got[np.nonzero(SPECIALS == f)[0][0]]) == b, hex(f)


@isa_param
def test_random_bit_patterns(isa):
    rng = np.random.default_rng(2024)
    bits = rng.integers(0, 2**32, size=2**24, dtype=np.uint32)
    x = bits.view(np.float32)
    before = bits.copy()
    with cpu_config(isa=isa):
        got = pyswitch.to_bfloat16(x)
    np.testing.assert_array_equal(bits, before)  # input untouched
    assert_bf16_bits_equal(got, x)
    # Every NaN is the canonical quiet NaN with the input's sign.
    nan = np.isnan(x)
    assert nan.sum() > 10000
    sign = (bits[nan] >> 31).astype(np.uint16)
    np.testing.assert_array_equal(got.view(np.uint16)[nan], 0x7FC0 | (sign << 15))


@isa_param
def test_every_rounding_neighbourhood(isa):
    """For every bfloat16 bit pattern h: h<<16 | low for the low halves around the tie."""
    high = np.arange(65536, dtype=np.uint32) << 16
    lows = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], dtype=np.uint32)
    x = (high[:, None] | lows[None, :]).ravel().view(np.float32)
    with cpu_config(isa=isa):
        assert_bf16_bits_equal(pyswitch.to_bfloat16(x), x)


@isa_param
def test_to_float32_is_exact_for_every_bfloat16(isa):
    b = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    a = b.view(BF16)
    with cpu_config(isa=isa):
        got = pyswitch.to_float32(a)
    assert got.dtype == np.float32 and got.shape == a.shape
    np.testing.assert_array_equal(got.view(np.uint32), b.astype(np.uint32) << 16)
    np.testing.assert_array_equal(got.view(np.uint32), a.astype(np.float32).view(np.uint32))


@isa_param
def test_round_trip_is_identity_except_nan(isa):
    b = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    a = b.view(BF16)
    with cpu_config(isa=isa):
        back = pyswitch.to_bfloat16(pyswitch.to_float32(a)).view(np.uint16)
    nan = np.isnan(a.astype(np.float32))
    assert nan.sum() == 2 * 127  # 0x7f81..0x7fff and 0xff81..0xffff
    np.testing.assert_array_equal(back[~nan], b[~nan])
    np.testing.assert_array_equal(back[nan], np.where(b[nan] & 0x8000, 0xFFC0, 0x7FC0))


@isa_param
@pytest.mark.parametrize("n", [0, 1, 15, 17, 31, 33, 1000003])
def test_odd_lengths(isa, n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 2**32, size=n, dtype=np.uint32).view(np.float32)
    with cpu_config(isa=isa):
        got = pyswitch.to_bfloat16(x)
        assert_bf16_bits_equal(got, x)
        back = pyswitch.to_float32(got)
    assert back.shape == (n,) and back.dtype == np.float32
    np.testing.assert_array_equal(back, got.astype(np.float32))


def strided_inputs(rng):
    base = rng.standard_normal((37, 29)).astype(np.float32) * 1e3
    base.ravel()[::11] = np.nan
    base.ravel()[5::13] = np.float32(1e-40)  # subnormal
    misaligned = np.ndarray((101,), np.float32, np.zeros(101 * 4 + 2, np.uint8), offset=2)
    misaligned[...] = base.ravel()[:101]
    return {
        "every other": base.ravel()[::2],
        "reversed": base.ravel()[::-1],
        "step -3": base.ravel()[::-3],
        "transposed": base.T,
        "fortran": np.asfortranarray(base),
        "column slice": base[:, 3:17:2],
        "row slice reversed": base[::-2, ::3],
        "offset by one": base.ravel()[1:],
        "misaligned": misaligned,
        "broadcast (zero stride)": np.broadcast_to(base[0], (5, 29)),
    }


@isa_param
def test_non_contiguous_inputs(isa):
    rng = np.random.default_rng(3)
    with cpu_config(isa=isa):
        for name, x in strided_inputs(rng).items():
            snapshot = x.copy()
            got = pyswitch.to_bfloat16(x)
            assert got.shape == x.shape, name
            np.testing.assert_array_equal(
                np.ascontiguousarray(got).view(np.uint16), expected_bf16_bits(x), err_msg=name
            )
            np.testing.assert_array_equal(x, snapshot, err_msg=name)
            b = expected_bf16_bits(x).view(BF16)
            for bname, bview in {"same": b, "reversed": b[::-1], "T": b.T}.items():
                back = pyswitch.to_float32(bview)
                assert back.shape == bview.shape
                np.testing.assert_array_equal(
                    np.ascontiguousarray(back).view(np.uint32),
                    bview.astype(np.float32).view(np.uint32),
                    err_msg=f"{name}/{bname}",
                )


@isa_param
@pytest.mark.parametrize(
    "shape", [(), (1,), (0,), (0, 5), (3, 0, 2), (2, 3, 4), (1, 1, 1, 1), (5, 7, 3, 2)]
)
def test_shapes_are_preserved(isa, shape):
    rng = np.random.default_rng(11)
    x = np.array(rng.standard_normal(shape) * 100, dtype=np.float32)
    with cpu_config(isa=isa):
        b = pyswitch.to_bfloat16(x)
        f = pyswitch.to_float32(b)
    assert b.shape == shape and f.shape == shape
    assert b.dtype == np.dtype(BF16) and f.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(b).view(np.uint16), expected_bf16_bits(x))
    np.testing.assert_array_equal(f, np.asarray(b).astype(np.float32))


def test_bit_identical_across_isas_and_threads():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 2**32, size=3_000_017, dtype=np.uint32).view(np.float32)
    b = x[:65536].view(np.uint16)[::2].copy().view(BF16)
    results = {}
    for isa in SUPPORTED_ISAS:
        for threads in THREAD_COUNTS:
            with cpu_config(isa=isa, threads=threads):
                results[(isa, threads)] = (
                    pyswitch.to_bfloat16(x).view(np.uint16).tobytes(),
                    pyswitch.to_float32(b).view(np.uint32).tobytes(),
                )
    for cfg, got in results.items():
        assert got == results[("scalar", 1)], cfg


@pytest.mark.parametrize(
    "fn,arr",
    [
        ("to_bfloat16", np.zeros(4, np.float64)),
        ("to_bfloat16", np.zeros(4, np.float16)),
        ("to_bfloat16", np.zeros(4, np.int32)),
        ("to_bfloat16", np.zeros(4, np.uint16)),
        ("to_bfloat16", np.zeros(4, BF16)),
        ("to_bfloat16", np.zeros((2, 2), np.complex64)),
        ("to_float32", np.zeros(4, np.float32)),
        ("to_float32", np.zeros(4, np.float64)),
        ("to_float32", np.zeros(4, np.uint16)),
        ("to_float32", np.zeros(4, np.float16)),
    ],
    ids=lambda v: v if isinstance(v, str) else str(v.dtype),
)
def test_wrong_dtype_is_a_type_error(fn, arr):
    with pytest.raises(TypeError):
        getattr(pyswitch, fn)(arr)


def test_out_parameter_writes_in_place_and_matches_ml_dtypes():
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2**32, size=(257, 33), dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    out16 = np.full(x.shape, 3.0, BF16)
    assert pyswitch.to_bfloat16(x, out=out16) is out16
    with np.errstate(invalid="ignore"):  # NaN patterns are part of the input
        expect = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(out16.view(np.uint16), expect)
    out32 = np.full(x.shape, 3.0, np.float32)
    assert pyswitch.to_float32(out16, out=out32) is out32
    assert np.array_equal(out32.view(np.uint32), out16.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize(
    "fn,src,out,exc,fragment",
    [
        (
            "to_bfloat16",
            np.zeros(4, np.float32),
            np.zeros(4, np.float32),
            TypeError,
            "out must be bfloat16",
        ),
        ("to_float32", np.zeros(4, BF16), np.zeros(4, BF16), TypeError, "out must be float32"),
        (
            "to_bfloat16",
            np.zeros(4, np.float32),
            np.zeros(5, BF16),
            ValueError,
            "of shape (4,), got (5,)",
        ),
        (
            "to_bfloat16",
            np.zeros((4, 4), np.float32),
            np.zeros((4, 8), BF16)[:, ::2],
            ValueError,
            "C-contiguous",
        ),
        (
            "to_bfloat16",
            np.zeros(4, np.float32),
            [0, 0, 0, 0],
            TypeError,
            "out must be a numpy array",
        ),
    ],
)
def test_out_parameter_errors(fn, src, out, exc, fragment):
    with pytest.raises(exc, match=re.escape(fragment)):
        getattr(pyswitch, fn)(src, out=out)


def test_out_parameter_rejects_overlap_and_read_only():
    buf = np.zeros(8, np.float32)
    overlapping = buf.view(BF16)[:8]  # same memory as buf[:4]
    with pytest.raises(ValueError, match="overlap"):
        pyswitch.to_bfloat16(buf, out=overlapping)
    frozen = np.zeros(8, BF16)
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        pyswitch.to_bfloat16(buf, out=frozen)
