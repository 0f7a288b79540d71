"""`mpiexec -n N pyswitch train`: the MPI backend trains exactly as N thread ranks do."""

from __future__ import annotations

import json

import numpy as np

from pyswitch.models import SwitchLMConfig
from pyswitch.train import TrainOptions, train


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mpi_training_equals_thread_ranks(tmp_path, make_comm):
    comm = make_comm(60)
    config = SwitchLMConfig(d_model=32, num_layers=2, num_heads=2, d_ff=64, num_experts=4)
    options = dict(
        steps=8,
        minutes=None,
        batch_size=4,
        seq_len=32,
        eval_every=4,
        ckpt_every=8,
        progress=False,
        plots=False,
    )
    # Every process calls train(); rank 0's directory is the run's (broadcast inside).
    mpi_dir = tmp_path / "mpi"
    train(config, TrainOptions(out=str(mpi_dir), **options), log=lambda *_: None)
    comm.barrier()
    failed = 0
    if comm.rank == 0:
        thread_dir = tmp_path / "threads"
        train(
            config,
            TrainOptions(out=str(thread_dir), ranks=comm.size, **options),
            log=lambda *_: None,
        )
        ours, theirs = _metrics(mpi_dir), _metrics(thread_dir)
        keys = ("step", "loss", "val_loss", "grad_norm")
        failed = int(
            [[m.get(k) for k in keys] for m in ours] != [[m.get(k) for k in keys] for m in theirs]
        )
    flags = comm.all_gather(np.array([failed], np.int64))
    assert flags.sum() == 0, "MPI training and thread-rank training differ (see rank 0)"
