"""How a user loop's run may start from another run's checkpoint (easgd_mpi.torch).

A warm start takes only a checkpoint's center, as a fresh run in a fresh folder, with any
number of workers and any rule: every worker starts from that center. A resume of async EASGD
may change the number of workers (its resume is not exact anyway): the workers the checkpoint
has continue from their saved states, new ones start at the center, and with fewer workers the
last ones' states are left out. (The exact rules refuse another p: test_own_loop_misuse.py.)
"""

import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from easgd_mpi.checkpoint import load_checkpoint  # noqa: E402
from easgd_mpi.metrics import read_metrics  # noqa: E402
from easgd_mpi.rundir import list_checkpoints  # noqa: E402
from launching import run  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "own_loop_train.py"


def train(mpiexec, ranks, run_dir, *args):
    return [mpiexec, "-n", str(ranks), sys.executable, str(SCRIPT), str(run_dir), *args]


def parameters(checkpoint, flat):
    """The module's parameters (in its order) out of a flat vector of ``checkpoint``'s layout."""
    views = checkpoint.layout.views(flat)
    trainable = checkpoint.trainable_size
    names = [s.name for s in checkpoint.layout.specs if s.offset < trainable]
    return np.concatenate([views[n].reshape(-1) for n in names])


@pytest.fixture(scope="module")
def first(mpiexec, clean_env, tmp_path_factory):
    """Async EASGD, 2 workers, 24 steps each."""
    folder = tmp_path_factory.mktemp("first")
    done = run(train(mpiexec, 3, folder, "algorithm=easgd", "steps=24"), clean_env)
    assert done.returncode == 0, done.stderr
    path = list_checkpoints(folder)[-1]
    return path, load_checkpoint(path)


def test_a_warm_start_takes_the_center_with_another_rule_and_p(first, mpiexec, clean_env, tmp_path):
    source, first = first
    args = ("algorithm=sync-easgd", "steps=12", "--warm-start", str(source))
    done = run(train(mpiexec, 4, tmp_path, *args), clean_env)
    assert done.returncode == 0, done.stderr
    assert "starting from the center of checkpoint" in done.stdout
    center = parameters(first, first.center)
    for worker in range(3):  # every worker starts from the checkpoint's center
        assert np.array_equal(np.load(tmp_path / f"start-{worker}.npy"), center)
    final = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert final.algorithm == "sync-easgd" and final.workers == 3
    assert final.states.counters["steps"].tolist() == [12, 12, 12]  # a fresh run's budget
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["steps"] == 0


@pytest.mark.parametrize("ranks", [4, 2], ids=["more workers", "fewer workers"])
def test_async_easgd_resumes_with_another_number_of_workers(
    ranks, first, mpiexec, clean_env, tmp_path
):
    source, first = first
    args = ("algorithm=easgd", "steps=36", "--resume", str(source))
    done = run(train(mpiexec, ranks, tmp_path, *args), clean_env)
    assert done.returncode == 0, done.stderr
    p = ranks - 1
    assert f"2 workers then, {p} now" in done.stdout
    for worker in range(p):
        start = np.load(tmp_path / f"start-{worker}.npy")
        if worker < 2:  # its own saved state
            expected = parameters(first, first.states.row("x")[worker])
        else:  # a new worker: the center
            expected = parameters(first, first.center)
        assert np.array_equal(start, expected), worker
    final = load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert final.states.counters["steps"].tolist() == [36] * p
    assert final.states.user[p - 1] is not None
