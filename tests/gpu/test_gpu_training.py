"""Training on GPUs under the venv's real mpiexec: same accuracy as on the CPU, and the staged
and CUDA-aware exchanges give the same center.

Skipped without a usable GPU (tests/gpu/conftest.py names what is missing), unless
EASGD_TEST_GPU=1 turns that into a failure. The CUDA-aware case also needs an MPI library that
reports CUDA support (MPIX_Query_cuda_support).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.metrics import read_metrics
from easgd_mpi.rundir import list_checkpoints
from launching import run, train_command

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("usable_gpu")]


def train(mpiexec, n, run_dir, *sets, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASGD_")}
    env.update(env_extra or {})
    proc = run(train_command(mpiexec, n, run_dir, *sets), env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_gpu_run_reaches_the_cpu_accuracy(mpiexec, tmp_path):
    common = ["steps=1500", "lr=0.1", "eval_interval=0.5"]
    gpu = train(mpiexec, 3, tmp_path / "gpu", *common)
    assert "on GPU" in gpu.stdout.splitlines()[0], gpu.stdout  # the workers really used it
    train(mpiexec, 3, tmp_path / "cpu", *common, "device=off")
    gpu_error = read_metrics(tmp_path / "gpu" / "metrics.jsonl")[-1]["center_error"]
    cpu_error = read_metrics(tmp_path / "cpu" / "metrics.jsonl")[-1]["center_error"]
    assert gpu_error <= 0.06 and abs(gpu_error - cpu_error) <= 0.02


@pytest.mark.parametrize("algorithm", ["easgd", "sync-easgd"])
def test_staged_and_cuda_aware_exchanges_give_the_same_center(mpiexec, tmp_path, algorithm):
    from mpi4py import MPI  # noqa: F401  (loads the library the query looks at)

    from easgd_mpi.comm import cuda_aware_mpi

    support = cuda_aware_mpi()
    if not support:
        pytest.skip(
            "this MPI library reports no CUDA support (MPIX_Query_cuda_support() = 0)"
            if support is False
            else "this MPI library does not say whether it takes GPU buffers "
            "(no MPIX_Query_cuda_support)"
        )
    # Deterministic set-ups: one async worker, or the synchronous rule, on exact gradients.
    n = 2 if algorithm == "easgd" else 3
    sets = [
        f"algorithm={algorithm}",
        "model.name=quadratic",
        "quadratic.dim=100003",
        "steps=200",
        "checkpoint.interval=0",
        "chunk=16384",
    ]
    centers = []
    for mode in ("0", "1"):
        run_dir = tmp_path / f"cuda-mpi-{mode}"
        train(mpiexec, n, run_dir, *sets, env_extra={"EASGD_CUDA_MPI": mode})
        centers.append(load_checkpoint(list_checkpoints(run_dir)[-1]).center)
    np.testing.assert_allclose(centers[0], centers[1], rtol=1e-6, atol=1e-6)
