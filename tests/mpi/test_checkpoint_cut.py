"""A periodic checkpoint is one consistent cut: its center is the center at its workers' step.

Where the center of a cut is known exactly (the synchronous rules' replica; the window of a
single asynchronous worker) the first worker saves it with its state. Were the master to read
the window when it writes the checkpoint instead, the workers would have moved it on by then:
here the master is held up between collecting the states and writing the file (a sleep wrapped
around ``MasterSide.states``, the math untouched), so such a center is many steps later, every
time, and not the float64 recurrence of docs/ARCHITECTURE.md §2 at the checkpoint's step count.

Async EASGD at p = 1 runs on each pair of ranks (a leftover rank sits out); sync EASGD on the
whole world, p = world size − 1, every worker with its own optimum.
"""

import time

import numpy as np
import pytest
from mpi4py import MPI

import easgd_mpi as ea
from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.rundir import list_checkpoints
from easgd_mpi.snapshots import MasterSide
from recurrences import SETTINGS, TOL, H, WorkerQuadratic, as_toml, async_rule, sync_easgd

#: Slow enough that 20 steps move the center by far more than TOL.
LR = 0.02
STEPS = 240
#: Seconds per gradient (the run lasts long enough for several periodic checkpoints) and the
#: master's hold-up between the states and the file (many steps of the workers).
STEP_DELAY = 0.002
MASTER_DELAY = 0.05


class SlowWorkerQuadratic(WorkerQuadratic):
    def loss_and_grad(self, x, batch, g):
        time.sleep(STEP_DELAY)
        return super().loss_and_grad(x, batch, g)


def expected_state(algorithm, p, steps, tau, alpha):
    """(x of every worker, center) after ``steps`` steps, float64."""
    if algorithm == "easgd":
        _, x, c = async_rule("easgd", steps, tau, alpha, lr=LR)
        return x[None, :], c
    _, x, c = sync_easgd(p, steps, tau, alpha, 0.0, lr=LR)
    return x, c


def run_and_check(monkeypatch, tmp_path, comm, algorithm, p, worker):
    original = MasterSide.states

    def held_up(self, cut, **kwargs):
        result = original(self, cut, **kwargs)
        time.sleep(MASTER_DELAY)  # the workers go on meanwhile
        return result

    monkeypatch.setattr(MasterSide, "states", held_up)
    out = comm.bcast(str(tmp_path), root=0)
    values = {
        **SETTINGS,
        "algorithm": algorithm,
        "lr": LR,
        "tau": 1,
        "steps": STEPS,
        "eval_interval": 0.5,
        "checkpoint.interval": 0.05,
        "checkpoint.keep": 1000,
        "output": out,
    }
    cfg = ea.Config.from_toml(None, environ={}, overrides=as_toml(values))
    summary = ea.train(
        cfg,
        problem=lambda cfg, xp: SlowWorkerQuadratic(cfg.quadratic, worker, xp),
        comm=comm,
    )
    if comm.Get_rank() != 0:
        return
    alpha = summary["alpha"]
    middle = []
    for path in list_checkpoints(summary["run_dir"]):
        data = load_checkpoint(path)
        steps = data.states.counters["steps"]
        if 0 < steps.max() < STEPS:
            middle.append(data)
    assert middle, "no checkpoint was written mid-run"
    for data in middle:
        steps = data.states.counters["steps"]
        assert len(set(steps.tolist())) == 1  # p = 1, or one common round
        x, c = expected_state(algorithm, p, int(steps[0]), 1, alpha)
        np.testing.assert_allclose(data.center[: len(H)], c, rtol=0, atol=TOL)
        np.testing.assert_allclose(data.states.row("x")[:, : len(H)], x, rtol=0, atol=TOL)


@pytest.mark.mpi(min_size=2)
def test_async_easgd_checkpoint_center_is_the_cut(monkeypatch, tmp_path):
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    alone = rank == size - 1 and size % 2 == 1
    comm = world.Split(MPI.UNDEFINED if alone else rank // 2, rank)
    if alone:
        return
    try:
        run_and_check(monkeypatch, tmp_path, comm, "easgd", 1, comm.Get_rank() - 1)
    finally:
        comm.Free()


@pytest.mark.mpi(min_size=3)
def test_sync_easgd_checkpoint_center_is_the_cut(monkeypatch, tmp_path):
    world = MPI.COMM_WORLD
    run_and_check(
        monkeypatch, tmp_path, world, "sync-easgd", world.Get_size() - 1, world.Get_rank() - 1
    )
