"""route(device="cuda") against route(device="cpu"): the same plan, bit for bit.

The CUDA row pass uses the CPU row kernels' arithmetic (route_math.hpp) and the host finishes
the plan with the CPU's own code, so expert_index, slot, gates, capacity, drops and both losses
are identical, not merely close (docs/cuda.md)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_route import plan_fingerprint, route_cases

import pyswitch


@given(case=route_cases())
def test_cuda_route_equals_the_cpu_route(case):
    logits, kwargs = case
    assert plan_fingerprint(pyswitch.route(logits, device="cuda", **kwargs)) == plan_fingerprint(
        pyswitch.route(logits, device="cpu", **kwargs)
    )


@given(data=st.data())
def test_cuda_route_equals_the_cpu_route_on_arbitrary_floats(data):
    T = data.draw(st.integers(1, 300))
    E = data.draw(st.integers(1, 70))
    k = data.draw(st.integers(1, min(E, 4)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    logits = (rng.standard_normal((T, E)) * data.draw(st.sampled_from([0.01, 1.0, 30.0]))).astype(
        np.float32
    )
    kwargs = dict(
        k=k,
        capacity_factor=data.draw(st.sampled_from([None, 0.5, 1.0, 1.25, 2.0])),
        priority=data.draw(st.sampled_from(["position", "batch_prioritized"])),
    )
    assert plan_fingerprint(pyswitch.route(logits, device="cuda", **kwargs)) == plan_fingerprint(
        pyswitch.route(logits, device="cpu", **kwargs)
    )


@pytest.mark.parametrize("priority", ["position", "batch_prioritized"])
def test_cuda_route_large_groups_cross_the_unit_size(priority):
    # 4 groups of 1000 tokens: units of 256 rows, a partial last unit in every group.
    logits = np.random.default_rng(3).standard_normal((4000, 64)).astype(np.float32)
    kwargs = dict(k=2, group_size=1000, priority=priority)
    assert plan_fingerprint(pyswitch.route(logits, device="cuda", **kwargs)) == plan_fingerprint(
        pyswitch.route(logits, device="cpu", **kwargs)
    )


def test_cuda_route_errors_match_the_cpu():
    bad = np.zeros((5, 4), np.float32)
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="logits row 3 is not finite"):
        pyswitch.route(bad, device="cuda")
    with pytest.raises(ValueError, match="k must be in"):
        pyswitch.route(np.zeros((5, 4), np.float32), k=5, device="cuda")
