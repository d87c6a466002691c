"""The issue-19 rules on a GPU worker against the same run on the CPU (deterministic set-ups:
local SGD and DiLoCo with two workers, a center that computes with one). Skipped without a
usable GPU (tests/gpu/conftest.py), unless EASGD_TEST_GPU=1 makes that a failure."""

from __future__ import annotations

import os

import numpy as np
import pytest

from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.rundir import list_checkpoints
from launching import run, train_command

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("usable_gpu")]

CASES = [
    ("localsgd", 3, ("momentum=0.5",)),
    ("diloco", 3, ("momentum=0.5", "outer_lr=0.5")),
    ("mdownpour", 2, ("momentum=0.9",)),
    ("adownpour", 2, ()),
    ("mvadownpour", 2, ()),
    ("async-diloco", 2, ("momentum=0.5",)),
]


@pytest.mark.parametrize(("algorithm", "n", "extra"), CASES, ids=[c[0] for c in CASES])
def test_gpu_worker_gives_the_cpu_center(mpiexec, tmp_path, algorithm, n, extra):
    sets = [
        f"algorithm={algorithm}",
        "model.name=quadratic",
        "quadratic.dim=100003",
        "lr=0.05",
        "steps=200",
        "tau=4",
        "checkpoint.interval=0",
        "chunk=16384",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASGD_")}
    finals = []
    for device in ("auto", "off"):
        run_dir = tmp_path / device
        proc = run(train_command(mpiexec, n, run_dir, *sets, f"device={device}"), env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        if device == "auto":
            assert "on GPU" in proc.stdout.splitlines()[0], proc.stdout
        finals.append(load_checkpoint(list_checkpoints(run_dir)[-1]))
    gpu, cpu = finals
    np.testing.assert_allclose(gpu.center, cpu.center, rtol=1e-5, atol=1e-6)
    for name, row in cpu.center_state.items():
        np.testing.assert_allclose(gpu.center_state[name], row, rtol=1e-5, atol=1e-6)
