# Data-parallel gradient averaging over thread ranks, against a float32 rank-order reference.
import numpy as np

import pyswitch
from pyswitch.comm import LocalGroup, average_gradients


def test_average_gradients_is_the_rank_order_float32_mean_in_place():
    world = 3
    rng = np.random.default_rng(0)
    per_rank = [
        {"router": rng.standard_normal((4, 2)).astype(np.float32), "b": rng.standard_normal(5)}
        for _ in range(world)
    ]
    for g in per_rank:
        g["b"] = g["b"].astype(np.float32)

    def fn(comm):
        mine = {k: v.copy() for k, v in per_rank[comm.rank].items()}
        alias = mine["router"]
        out = average_gradients(comm, mine)
        assert out is mine and mine["router"] is alias  # in place
        return mine

    results = LocalGroup(world).run(fn)
    for key in ("router", "b"):
        total = per_rank[0][key].copy()
        for r in range(1, world):
            total = total + per_rank[r][key]
        expect = total / np.float32(world)
        for r in range(world):
            assert results[r][key].dtype == np.float32
            np.testing.assert_array_equal(results[r][key], expect)


def test_average_gradients_of_switch_layers_makes_replicas_agree():
    # Two data-parallel replicas of the same layer on different tokens: after averaging, the
    # router gradient equals the mean of the two single-replica gradients.
    x = np.random.default_rng(1).standard_normal((2, 16, 8)).astype(np.float32)

    def fn(comm):
        layer = pyswitch.SwitchFFN(8, 16, 4, jitter_eps=0.0, seed=3)
        layer.forward(x[comm.rank], training=True)
        layer.backward(np.ones((16, 8), np.float32))
        before = layer.grads["router"].copy()
        average_gradients(comm, layer.grads, keys=["router"])
        return before, layer.grads["router"].copy()

    (b0, a0), (b1, a1) = LocalGroup(2).run(fn)
    np.testing.assert_array_equal(a0, a1)
    np.testing.assert_array_equal(a0, (b0 + b1) / np.float32(2))
