"""Your own loop (easgd_mpi.torch) on GPU workers: the module's tensors view the CuPy buffers
(DLPack), the exchange takes the staged path (pinned host chunks), and the run learns and
writes its checkpoints and center as on the CPU.

Skipped without a usable GPU and a CUDA build of PyTorch (tests/gpu/conftest.py names what is
missing), unless EASGD_TEST_GPU=1 turns that into a failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from launching import run

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("torch_on_gpu")]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "own_loop_train.py"


def launch(mpiexec, run_dir, *args):
    return [mpiexec, "-n", "3", sys.executable, str(SCRIPT), str(run_dir), *args]


def test_your_own_loop_trains_on_gpu_workers(mpiexec, clean_env, tmp_path):
    from easgd_mpi.checkpoint import load_checkpoint
    from easgd_mpi.metrics import read_metrics
    from easgd_mpi.rundir import list_checkpoints

    rule = ("algorithm=sync-easgd", "steps=120", "tau=2")
    done = run(launch(mpiexec, tmp_path / "gpu", *rule), clean_env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "on GPU" in done.stdout  # the start-up line names each worker's device
    records = read_metrics(tmp_path / "gpu" / "metrics.jsonl")
    assert records[-1]["center_error"] < records[0]["center_error"]
    final = load_checkpoint(list_checkpoints(tmp_path / "gpu")[-1])
    assert final.states.counters["steps"].tolist() == [120, 120]
    assert all(np.isfinite(final.center))
    assert (tmp_path / "gpu" / "center.pt").is_file()
