"""Exact recurrences that fail when a rule is wrong, through ``easgd_mpi.train`` under MPI.

Sync EASGD and all-reduce SGD: every worker has its *own* optimum (the problem reads its rank), so
the workers differ and the averaging shows: a worker's gradient points and the final center must
follow the float64 recurrence of docs/ARCHITECTURE.md §2 with the mean over the workers in it, at
p = world size − 1 (`make test`: p = 1, 2, 4; the averaging is seen at p ≥ 2).

Async EASGD, EAMSGD and DOWNPOUR are deterministic at p = 1: each pair of ranks (a communicator
split off the world; a leftover rank sits out) runs one master and one worker through the real
CenterWindow, and the worker's gradient points and the final center must follow the recurrence.
So are the rules whose center computes (issue 19): the master applies the rule through the real
inbox windows, in its server thread; local SGD and DiLoCo run with p workers like the
synchronous rules above.
"""

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import pair

import easgd_mpi as ea
from easgd_mpi.flat import Layout
from recurrences import (
    SETTINGS,
    START,
    TOL,
    WorkerQuadratic,
    allreduce_sgd,
    as_toml,
    async_rule,
    local_sgd,
    master_rule,
    optimum,
    sync_easgd,
)


def make_config(out, **values) -> ea.Config:
    overrides = {
        **as_toml(SETTINGS),
        "eval_interval": "0.2",
        "checkpoint.interval": "0",
        "output": f'"{out}"',
        **{k: str(v) for k, v in values.items()},
    }
    return ea.Config.from_toml(None, environ={}, overrides=overrides)


def train_recording(cfg, comm, worker):
    made = []

    def factory(cfg, xp):
        made.append(WorkerQuadratic(cfg.quadratic, worker, xp))
        return made[-1]

    summary = ea.train(cfg, problem=factory, comm=comm)
    return summary, made[0]


def check(comm, summary, problem, points, center):
    """Rank 0 of ``comm``: the final center; a worker: its gradient points (steps × dim)."""
    if comm.Get_rank() == 0:
        assert problem.points == []  # the master never takes a gradient
        np.testing.assert_allclose(problem.evaluated, center, rtol=0, atol=TOL)
    else:
        got = np.array(problem.points)
        assert got.shape == points.shape
        np.testing.assert_allclose(got, points, rtol=0, atol=TOL)


# ---- the synchronous rules: p workers, each its own optimum -----------------------------------


def world_and_worker():
    comm = MPI.COMM_WORLD
    return comm, comm.Get_size() - 1, comm.Get_rank() - 1


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tau", [1, 4])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sync_easgd_with_different_workers(tmp_path, tau, momentum):
    comm, p, worker = world_and_worker()
    steps = 13
    out = comm.bcast(str(tmp_path), root=0)
    cfg = make_config(out, algorithm='"sync-easgd"', tau=tau, steps=steps, momentum=momentum)
    summary, problem = train_recording(cfg, comm, worker)
    points, _, center = sync_easgd(p, steps, tau, 0.9 / p, momentum)
    check(comm, summary, problem, points[:, max(worker, 0)], center)
    assert summary["exchanges"] == -(-steps // tau) * p
    if p >= 2 and worker >= 0:  # the test can see the averaging: the workers differ
        others = comm.allgather(np.array(problem.points)[-1])
        assert np.abs(others[1] - others[-1]).max() > 0.05
    else:
        comm.allgather(None)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tau", [1, 4])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_allreduce_sgd_with_different_workers(tmp_path, tau, momentum):
    comm, p, worker = world_and_worker()
    steps = 13
    out = comm.bcast(str(tmp_path), root=0)
    cfg = make_config(out, algorithm='"allreduce-sgd"', tau=tau, steps=steps, momentum=momentum)
    summary, problem = train_recording(cfg, comm, worker)
    points, final_x = allreduce_sgd(p, steps, momentum)
    check(comm, summary, problem, points[:, max(worker, 0)], final_x)
    if p >= 2:  # each worker alone would head for its own optimum, not the mean of them
        assert np.abs(optimum(0) - optimum(1)).max() > 0.5


# ---- the asynchronous rules at p = 1: pairs of ranks, the real CenterWindow -------------------


ASYNC_CASES = [
    ("easgd", 1, 0.0, 0.6),
    ("easgd", 3, 0.0, 0.5),
    ("eamsgd", 1, 0.5, 0.5),
    ("eamsgd", 3, 0.9, 0.4),
    ("downpour", 1, 0.0, None),
    ("downpour", 3, 0.0, None),
]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm, tau, momentum, alpha", ASYNC_CASES)
def test_async_rule_at_one_worker(tmp_path, algorithm, tau, momentum, alpha):
    comm = pair()
    if comm is None:
        return
    try:
        steps = 14
        out = comm.bcast(str(tmp_path), root=0)
        extra = {"momentum": momentum} if momentum else {}
        if alpha is not None:
            extra["alpha"] = alpha
        cfg = make_config(out, algorithm=f'"{algorithm}"', tau=tau, steps=steps, **extra)
        worker = comm.Get_rank() - 1
        summary, problem = train_recording(cfg, comm, worker)
        points, _, center = async_rule(algorithm, steps, tau, alpha, momentum)
        check(comm, summary, problem, points, center)
        exchanges = -(-steps // tau)  # at t = 0, τ, 2τ, ... (DOWNPOUR: after each τ-th step
        assert summary["exchanges"] == exchanges  # and after the last one: as many)
        assert np.abs(center - START).max() > 0.1  # the center moved: the exchange was seen
    finally:
        comm.Free()


# ---- issue 19 ----------------------------------------------------------------------------------


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tau", [1, 3])
@pytest.mark.parametrize(
    "algorithm, knobs",
    [
        ("localsgd", {"momentum": 0.5}),
        ("diloco", {"outer_lr": 0.7, "outer_momentum": 0.9}),
        ("diloco", {"momentum": 0.5, "outer_lr": 1.1, "outer_momentum": 0.5}),
    ],
)
def test_local_sgd_and_diloco_with_different_workers(tmp_path, algorithm, knobs, tau):
    comm, p, worker = world_and_worker()
    steps = 14
    out = comm.bcast(str(tmp_path), root=0)
    cfg = make_config(out, algorithm=f'"{algorithm}"', tau=tau, steps=steps, **knobs)
    summary, problem = train_recording(cfg, comm, worker)
    outer = {} if algorithm == "localsgd" else {"outer_lr": knobs["outer_lr"]}
    points, center, _ = local_sgd(
        p,
        steps,
        tau,
        knobs.get("momentum", 0.0),
        outer_momentum=knobs.get("outer_momentum", 0.0),
        **outer,
    )
    check(comm, summary, problem, points[:, max(worker, 0)], center)
    assert summary["exchanges"] == -(-steps // tau) * p


MASTER_CASES = [
    ("mdownpour", 1, {"momentum": 0.5}),
    ("mdownpour", 3, {"momentum": 0.9}),
    ("adownpour", 2, {"outer_lr": 0.1, "outer_eps": 1e-3}),
    ("mvadownpour", 1, {"moving_rate": 0.3}),
    ("async-diloco", 1, {"outer_lr": 0.7, "outer_momentum": 0.9}),
    ("async-diloco", 4, {"outer_lr": 0.7, "outer_momentum": 0.9, "momentum": 0.5}),
]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm, tau, knobs", MASTER_CASES)
def test_a_center_that_computes_at_one_worker(tmp_path, algorithm, tau, knobs):
    comm = pair()
    if comm is None:
        return
    try:
        steps = 14
        out = comm.bcast(str(tmp_path), root=0)
        cfg = make_config(out, algorithm=f'"{algorithm}"', tau=tau, steps=steps, **knobs)
        worker = comm.Get_rank() - 1
        summary, problem = train_recording(cfg, comm, worker)
        points, evaluated, _ = master_rule(algorithm, steps, tau, **knobs)
        check(comm, summary, problem, points, evaluated)  # the master evaluates z for mva
        assert summary["exchanges"] == -(-steps // tau)
        assert summary["staleness_max"] == 0 and summary["center_lag"] == 0
        assert summary["center_pushes"] == summary["exchanges"]
        assert np.abs(evaluated - START).max() > 0.1  # the center moved: the pushes were seen
    finally:
        comm.Free()


# ---- DOWNPOUR's buffers: each worker adds its 1/p share of their change -------------------------


class MeasuringProblem:
    """A zero-gradient model with one buffer that each worker's forward pass moves by its own
    measurement (worker index + 1), as BatchNorm moves its running statistics. A change, not a
    value: workers start when they start, and a late one copies a center that already holds an
    earlier worker's push."""

    error_is_rate = False

    def __init__(self, worker, xp):
        self.xp = xp
        self.layout = Layout([("w", (2,)), ("statistic", (1,))])
        self.n_trainable = self.layout["statistic"].offset
        self.measured = float(worker + 1)
        self.evaluated = None

    def init_params(self, x_host, seed):
        x_host[:] = 0.0

    def sample_batch(self, rng):
        return None

    def loss_and_grad(self, x, batch, g):
        g[...] = 0
        x[self.n_trainable] += self.measured
        return 0.0

    def evaluate(self, x_host):
        self.evaluated = np.array(x_host, dtype=np.float64)
        return {"loss": 0.0, "error": 0.0}


@pytest.mark.mpi(min_size=3)
def test_downpour_adds_each_workers_share_of_its_buffers_change(tmp_path):
    """One push per worker, whatever the order: the center's statistic moves by the workers'
    mean change (p + 1)/2, not their sum (p whole changes move an average p times too far)."""
    comm, p, worker = world_and_worker()
    made = []

    def factory(cfg, xp):
        made.append(MeasuringProblem(worker, xp))
        return made[-1]

    cfg = make_config(tmp_path, algorithm='"downpour"', steps=1, tau=1)
    ea.train(cfg, problem=factory, comm=comm)
    if comm.Get_rank() == 0:
        statistic = made[0].evaluated[made[0].n_trainable]
        assert statistic == pytest.approx((p + 1) / 2, abs=1e-6), (statistic, p)
