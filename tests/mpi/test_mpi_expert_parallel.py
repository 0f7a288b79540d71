# Expert parallelism under MPI (SPEC section 3): SwitchFFN(comm=MPIComm) on W processes against
# one rank holding every expert, and against LocalGroup(W) thread ranks, bit for bit.
"""Every rank regenerates the global parameters and every rank's tokens from a shared seed, then

* runs its rank of the expert-parallel layer (``SwitchFFN(..., comm=MPIComm)``),
* builds the reference inside its own process: a one-rank ``SwitchFFN(group_size=T_per)``
  holding all ``E`` experts over the concatenation of the ranks' tokens in rank order, and
* runs the same expert-parallel layer on ``LocalGroup(W)`` thread ranks in-process.

It compares its own slice: rows ``[r*T_per, (r+1)*T_per)`` of the one-rank y / dx, experts
``[r*E/W, (r+1)*E/W)`` of its gradients, aux / z losses, all bit-identical (float32 and
bfloat16, eval k=1 and training k=2 with jitter and dropout); the router gradient after
``sum_gradients`` within ``1e-6 * max|g|`` of the one-rank one, the same bits on every rank, and
the float32 rank-order sum of the ranks' shares. The MPI rank's results equal the LocalGroup
rank's bit for bit. Failures are raised on every rank at the end (mpi_utils.Failures).
"""

import numpy as np
import pytest
from array_utils import assert_bits_equal
from mpi_utils import Failures, digest, gather_ints
from test_comm_local import ref_reduce
from test_ep import (
    CONFIGS,
    ROUTER_ATOL,
    ROUTER_RTOL,
    D,
    F,
    assert_close_scaled,
    ep_steps,
    global_params,
    load_params,
    sgd,
    step_record,
)

import pyswitch
from pyswitch.comm import LocalGroup

BF16 = np.dtype(pyswitch.bfloat16)
F32 = np.dtype(np.float32)
T_PER = 32


def num_experts(world):
    return 8 if 8 % world == 0 else 2 * world


def make_data(seed, world, counts, cfg, num_exp, steps=1):
    """Global parameters and, per step, every rank's x and dy (the same on every rank)."""
    rng = np.random.default_rng(seed)
    params = global_params(rng, cfg, num_experts=num_exp)
    dtype = BF16 if cfg.get("dtype") == "bfloat16" else F32
    xs, dys = [], []
    for _ in range(steps):
        xs.append([rng.standard_normal((n, D)).astype(np.float32).astype(dtype) for n in counts])
        dys.append([rng.standard_normal((n, D)).astype(np.float32).astype(dtype) for n in counts])
    return params, xs, dys


def one_rank(cfg, num_exp, params, xs, dys, training, group_size, lr=None):
    """The reference: one rank, all experts, the ranks' tokens concatenated in rank order."""
    layer = pyswitch.SwitchFFN(D, F, num_exp, group_size=group_size, **cfg)
    load_params(layer, params)
    out = []
    for x_step, dy_step in zip(xs, dys):
        y = layer.forward(np.concatenate(x_step), training=training)
        dx = layer.backward(np.concatenate(dy_step))
        out.append(step_record(layer, y, dx))
        if lr is not None:
            sgd(layer, lr)
    return out


def ep_rank(comm, cfg, num_exp, params, xs, dys, training, lr=None):
    """One rank of the expert-parallel layer on ``comm`` (MPIComm or a LocalGroup rank)."""
    layer = pyswitch.SwitchFFN(D, F, num_exp, comm=comm, **cfg)
    n = num_exp // comm.size
    assert (layer.first_expert, layer.local_experts) == (comm.rank * n, n)
    load_params(layer, params)
    return ep_steps(comm, layer, xs, dys, training, lr)


def check_against_one_rank(comm, failures, ref, mine, counts, num_exp, what):
    """This rank's slice of the one-rank results; the router across ranks (collectives)."""
    rank, world = comm.rank, comm.size
    lo = sum(counts[:rank])
    hi = lo + counts[rank]
    n = num_exp // world
    with failures.check(f"{what}: y, dx, losses"):
        assert_bits_equal(mine["y"], ref["y"][lo:hi], f"{what}: y")
        assert_bits_equal(mine["dx"], ref["dx"][lo:hi], f"{what}: dx")
        assert_bits_equal(np.float64(mine["aux"]), np.float64(ref["aux"]), f"{what}: aux_loss")
        assert_bits_equal(np.float64(mine["z"]), np.float64(ref["z"]), f"{what}: z_loss")
    with failures.check(f"{what}: expert gradients"):
        assert set(mine["grads"]) == set(ref["grads"]) - {"router"}
        for key, g in mine["grads"].items():
            expected = ref["grads"][key][rank * n : (rank + 1) * n]
            assert_bits_equal(g, expected, f"{what}: grad {key} (experts {rank * n}..)")
    with failures.check(f"{what}: router gradient after sum_gradients"):
        scale = float(np.max(np.abs(ref["grads"]["router"].astype(np.float64)), initial=0.0))
        assert scale > 0, "an all-zero router gradient compares nothing"
        assert_close_scaled(
            mine["router_summed"], ref["grads"]["router"], ROUTER_RTOL, what, atol=ROUTER_ATOL
        )
    shares = comm.all_gather(mine["router_share"])
    with failures.check(f"{what}: summed router gradient is the rank-order sum of the shares"):
        assert_bits_equal(mine["router_summed"], ref_reduce(list(shares), "sum"), what)
        total = shares.astype(np.float64).sum(axis=0)
        assert_close_scaled(total, ref["grads"]["router"], ROUTER_RTOL, what, atol=ROUTER_ATOL)
    every = gather_ints(comm, [digest(mine["router_summed"]), mine["dropped"]])
    with failures.check(f"{what}: router gradient and drops across ranks"):
        assert (every[:, 0] == every[0, 0]).all(), f"summed router grads differ: {every[:, 0]}"
        assert int(every[:, 1].sum()) == ref["dropped"], (every[:, 1].tolist(), ref["dropped"])


def check_against_local_group(failures, mine, theirs, what):
    with failures.check(f"{what}: MPI vs LocalGroup"):
        for key in ("y", "dx", "router_share", "router_summed"):
            assert_bits_equal(mine[key], theirs[key], f"{what}: {key}")
        for key in ("aux", "z"):
            assert_bits_equal(np.float64(mine[key]), np.float64(theirs[key]), f"{what}: {key}")
        assert mine["dropped"] == theirs["dropped"], (mine["dropped"], theirs["dropped"])
        assert set(mine["grads"]) == set(theirs["grads"])
        for key in mine["grads"]:
            assert_bits_equal(mine["grads"][key], theirs["grads"][key], f"{what}: grad {key}")


def run_case(comm, cfg, training, counts, seed, what, steps=1, lr=None, min_dropped=0):
    world = comm.size
    num_exp = num_experts(world)
    failures = Failures(comm.rank)
    params, xs, dys = make_data(seed, world, counts, cfg, num_exp, steps)
    group_size = max(counts)
    ref = one_rank(cfg, num_exp, params, xs, dys, training, group_size, lr)
    mine = ep_rank(comm, cfg, num_exp, params, xs, dys, training, lr)
    local = LocalGroup(world, timeout=60).run(
        lambda c: ep_rank(c, cfg, num_exp, params, xs, dys, training, lr)
    )[comm.rank]
    for step in range(steps):
        label = f"{what} step {step}" if steps > 1 else what
        check_against_one_rank(comm, failures, ref[step], mine[step], counts, num_exp, label)
        check_against_local_group(failures, mine[step], local[step], label)
        with failures.check(f"{label}: the case drops assignments"):
            assert ref[step]["dropped"] >= min_dropped, ref[step]["dropped"]
    failures.raise_on_all(comm)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_expert_parallel_equals_one_rank(comm, dtype, config):
    base, training = CONFIGS[config]
    cfg = dict(base, dtype=dtype, seed=7)
    run_case(
        comm,
        cfg,
        training,
        [T_PER] * comm.size,
        seed=[comm.size, len(config), dtype == "bfloat16"],
        what=f"W={comm.size} {dtype} {config}",
        min_dropped=1 if config == "train_geglu_bias_drops" else 0,
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_several_training_steps(comm, dtype):
    cfg = dict(k=2, activation="gelu", jitter_eps=0.05, expert_dropout=0.2, dtype=dtype, seed=3)
    run_case(
        comm,
        cfg,
        True,
        [T_PER] * comm.size,
        seed=[30, comm.size],
        what=f"W={comm.size} {dtype} SGD steps",
        steps=3,
        lr=0.05,
    )


@pytest.mark.parametrize("t_per", [1, 33])
@pytest.mark.parametrize("config", ["eval_k1_relu", "train_k2_gelu_jitter_dropout"])
def test_odd_token_counts(comm, config, t_per):
    base, training = CONFIGS[config]
    run_case(
        comm,
        dict(base, seed=21),
        training,
        [t_per] * comm.size,
        seed=[95, comm.size, t_per, len(config)],
        what=f"W={comm.size} T_per={t_per} {config}",
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_zero_token_rank(comm, dtype):
    """Rank 1 has no tokens (it still runs every collective; its experts still get tokens); the
    one-rank reference simply does not have its group."""
    cfg = dict(k=2, activation="geglu", use_bias=True, jitter_eps=0.05, dtype=dtype, seed=9)
    counts = [T_PER] * comm.size
    counts[1] = 0
    run_case(
        comm,
        cfg,
        True,
        counts,
        seed=[50, comm.size],
        what=f"W={comm.size} {dtype} rank 1 empty",
    )


def test_experts_not_divisible_by_world_size(comm):
    with pytest.raises(ValueError, match="divisible"):
        pyswitch.SwitchFFN(D, F, comm.size + 1, comm=comm)
