"""Async DiLoCo in a user's own loop (easgd_mpi.torch), launched as a user launches it.

tests/scripts/own_loop_train.py (AdamW with a one-cycle schedule, a GradScaler, a DataLoader over
``run.sampler``) with ``algorithm = "async-diloco"`` and two workers: the servers run the active
center (its inboxes, its outer Nesterov step) for the user loop as for the package's, the run
ends with exit 0, ``COMPLETED`` and ``center.pt``, and its periodic and final checkpoints hold
the center-side outer momentum; ``EASGD_RESUME=auto`` continues it to a larger budget.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from easgd_mpi.checkpoint import load_checkpoint  # noqa: E402
from easgd_mpi.rundir import list_checkpoints  # noqa: E402
from launching import run  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "own_loop_train.py"
RULE = ("algorithm=async-diloco", "tau=4", "checkpoint.interval=0.05", "checkpoint.keep=100")
STEPS, MORE = 96, 144


def train(mpiexec, run_dir, steps):
    """Two workers, slowed a little (a sleep per step) so that checkpoints fall mid-run."""
    script = (sys.executable, str(SCRIPT), str(run_dir), "--delay", "0.005")
    return [mpiexec, "-n", "3", *script, *RULE, f"steps={steps}"]


@pytest.fixture(scope="module")
def finished(mpiexec, clean_env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("async-diloco")
    done = run(train(mpiexec, folder, STEPS), clean_env)
    assert done.returncode == 0, done.stderr
    return folder, list_checkpoints(folder)


def test_async_diloco_in_your_own_loop_completes_with_the_outer_momentum_checkpointed(finished):
    folder, checkpoints = finished
    assert (folder / "COMPLETED").exists() and (folder / "center.pt").exists()
    center = torch.load(folder / "center.pt")
    assert {"0.weight", "1.running_mean", "3.bias"} <= set(center)
    assert len(checkpoints) >= 3, "no periodic checkpoint was written mid-run"
    final = load_checkpoint(checkpoints[-1])
    assert final.algorithm == "async-diloco" and final.workers == 2
    assert final.states.counters["steps"].tolist() == [STEPS, STEPS]
    assert final.states.counters["exchanges"].tolist() == [STEPS // 4, STEPS // 4]
    momentum = final.center_state["outer_momentum"]
    trainable = final.trainable_size
    assert np.isfinite(momentum).all() and np.abs(momentum[:trainable]).max() > 0
    assert "outer_buffer" in final.center_state
    middle = [load_checkpoint(p) for p in checkpoints[:-1]]
    assert any(0 < c.states.counters["steps"].max() < STEPS for c in middle)
    assert any(np.abs(c.center_state["outer_momentum"]).max() > 0 for c in middle)


def test_resume_auto_of_async_diloco_in_your_own_loop_finishes(finished, mpiexec, clean_env):
    folder, _ = finished
    env = {**clean_env, "EASGD_RESUME": "auto"}
    done = run(train(mpiexec, folder, MORE), env)
    assert done.returncode == 0, done.stderr
    assert "resuming from checkpoint" in done.stdout
    assert (folder / "COMPLETED").exists()
    final = load_checkpoint(list_checkpoints(folder)[-1])
    assert final.states.counters["steps"].tolist() == [MORE, MORE]
    assert np.abs(final.center_state["outer_momentum"]).max() > 0
