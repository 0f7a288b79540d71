# Bit-level array comparison shared by the tests that promise bit-identical results.
import numpy as np


def bits(a):
    """The raw bits of an array, as unsigned integers of its item size."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def assert_bits_equal(got, expected, what):
    """Same dtype, same shape, same bits (so NaN payloads and signed zeros count)."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.dtype == expected.dtype, (what, got.dtype, expected.dtype)
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    bad = np.argwhere(bits(got) != bits(expected))
    assert bad.size == 0, (
        f"{what}: {len(bad)} elements differ, first at {tuple(bad[0])}: "
        f"got {got[tuple(bad[0])]!r}, expected {expected[tuple(bad[0])]!r}"
    )
