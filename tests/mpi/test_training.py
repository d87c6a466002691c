"""End-to-end training through ``easgd_mpi.train`` at whatever world size the run has.

p = world size − 1 workers; `make test` runs this file at 2, 3 and 5 ranks (p = 1, 2, 4).
"""

import json
from pathlib import Path

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import QUADRATIC, config, train_quietly

import easgd_mpi as ea


def run(tmp_path, **overrides):
    return train_quietly(config(tmp_path, **overrides))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("easgd", {}),
        ("eamsgd", {"momentum": 0.5, "lr": 0.05}),
    ],
)
def test_noiseless_quadratic_converges_to_the_optimum(tmp_path, algorithm, extra):
    summary = run(
        tmp_path, **{**QUADRATIC, "algorithm": f'"{algorithm}"', "steps": 1500, "tau": 4, **extra}
    )
    assert summary["workers"] == MPI.COMM_WORLD.Get_size() - 1
    assert summary["center_error"] <= 1e-4, summary
    assert summary["steps"] == 1500 * summary["workers"]
    assert summary["exchanges"] == 1500 // 4 * summary["workers"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("lock_mode", ["shared", "exclusive"])
def test_digits_mlp_learns_and_writes_its_run_folder(tmp_path, lock_mode):
    summary = run(tmp_path, steps=1500, lr=0.1, lock_mode=f'"{lock_mode}"', eval_interval=0.5)
    assert summary["center_error"] <= 0.06, summary
    if MPI.COMM_WORLD.Get_rank() == 0:
        run_dir = Path(summary["run_dir"])
        cfg = ea.Config.from_toml(run_dir / "config.toml", environ={})
        assert cfg.lock_mode == lock_mode and cfg.steps == 1500
        records = [
            json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().split("\n") if line
        ]
        assert len(records) >= 2
        assert records[0]["center_error"] > 0.5  # the random start
        assert records[-1]["center_error"] == summary["center_error"]
        assert records[-1]["steps"] == 1500 * summary["workers"]
        keys = {"time", "steps", "exchanges", "center_loss", "center_error", "distance"}
        assert keys <= set(records[-1])
        assert all(np.isfinite(r["distance"]) for r in records)
