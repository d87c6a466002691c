"""Sync EASGD, all-reduce SGD and DOWNPOUR through ``easgd_mpi.train`` at any world size.

p = world size − 1 workers (`make test`: p = 1, 2, 4). On the noiseless quadratic the
synchronous rules are deterministic, so every point where a worker took a gradient and the
final center must follow the float64 recurrence of docs/ARCHITECTURE.md §2, computed here
independently.
"""

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import QUADRATIC, config, train_quietly

import easgd_mpi as ea
from recurrences import WorkerQuadratic

H = [0.5, 1.0, 1.5, 2.0]
M = [1.0, -1.0, 0.5, 0.25]
START = 0.0
TOL = 1e-6


def quadratic(**extra):
    return {
        "model.name": '"quadratic"',
        "quadratic.dim": len(H),
        "quadratic.noise": 0.0,
        "quadratic.curvature": str(H),
        "quadratic.optimum": str(M),
        "quadratic.start": START,
        "eval_interval": 0.2,
        **extra,
    }


def train_recording(cfg):
    made = []

    def factory(cfg, xp):
        made.append(WorkerQuadratic(cfg.quadratic, -1, xp))  # every rank: the config's optimum
        return made[-1]

    summary = ea.train(cfg, problem=factory, comm=MPI.COMM_WORLD)
    return summary, made[0]


def expected_sync_easgd(p, steps, tau, lr, alpha, momentum=0.0):
    """docs/ARCHITECTURE.md §2.5 for p workers in float64: gradient points (steps × p × dim) and
    the center."""
    h, m = np.array(H), np.array(M)
    beta = p * alpha
    x = np.full((p, len(H)), START)
    v = np.zeros_like(x)
    c = np.full(len(H), START)
    points = []
    for t in range(steps):
        y = x + momentum * v  # Nesterov look-ahead (x itself without momentum)
        points.append(y.copy())
        g = h * (y - m)
        v = momentum * v - lr * g
        if t % tau == 0:
            x, c = x - alpha * (x - c) + v, (1 - beta) * c + beta * x.mean(axis=0)
        else:
            x = x + v
    return np.array(points), c


def expected_allreduce_sgd(p, steps, lr, momentum=0.0):
    h, m = np.array(H), np.array(M)
    x = np.full((p, len(H)), START)
    v = np.zeros_like(x)
    points = []
    for _ in range(steps):
        y = x + momentum * v
        points.append(y.copy())
        g = (h * (y - m)).mean(axis=0)  # the all-reduced gradient
        v = momentum * v - lr * g
        x = x + v
    return np.array(points), x[0]


def check(summary, problem, points, center):
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if rank == 0:
        assert problem.points == []  # the master never takes a gradient
        np.testing.assert_allclose(problem.evaluated, center, rtol=0, atol=TOL)
        assert summary["center_error"] == pytest.approx(np.max(np.abs(center - M)), abs=TOL)
    else:
        got = np.array(problem.points)
        assert got.shape == (points.shape[0], len(H))
        np.testing.assert_allclose(got, points[:, rank - 1], rtol=0, atol=TOL)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "tau, steps, momentum", [(3, 14, 0.0), (1, 9, 0.0), (4, 17, 0.5), (5, 5, 0.0)]
)
def test_sync_easgd_follows_the_recurrence_exactly(tmp_path, tau, steps, momentum):
    p = MPI.COMM_WORLD.Get_size() - 1
    lr = 0.1
    cfg = config(
        tmp_path,
        **quadratic(algorithm='"sync-easgd"', lr=lr, tau=tau, steps=steps, momentum=momentum),
    )
    summary, problem = train_recording(cfg)
    points, center = expected_sync_easgd(p, steps, tau, lr, 0.9 / p, momentum)
    check(summary, problem, points, center)
    assert summary["exchanges"] == -(-steps // tau) * p  # rounds at t = 0, τ, 2τ, ...


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tau, steps, momentum", [(3, 14, 0.0), (4, 16, 0.5)])
def test_allreduce_sgd_follows_the_recurrence_exactly(tmp_path, tau, steps, momentum):
    p = MPI.COMM_WORLD.Get_size() - 1
    lr = 0.1
    cfg = config(
        tmp_path,
        **quadratic(algorithm='"allreduce-sgd"', lr=lr, tau=tau, steps=steps, momentum=momentum),
    )
    summary, problem = train_recording(cfg)
    points, center = expected_allreduce_sgd(p, steps, lr, momentum)
    check(summary, problem, points, center)  # the window holds x after the last step


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("sync-easgd", {}),
        ("sync-easgd", {"momentum": 0.5, "lr": 0.05, "tau": 8}),
        ("downpour", {"lr": 0.02}),
        ("allreduce-sgd", {}),
        ("allreduce-sgd", {"momentum": 0.5, "lr": 0.05}),
    ],
)
def test_noiseless_quadratic_converges_to_the_optimum(tmp_path, algorithm, extra):
    params = {**QUADRATIC, "algorithm": f'"{algorithm}"', "steps": 1500, "tau": 4, **extra}
    summary = train_quietly(config(tmp_path, **params))
    assert summary["workers"] == MPI.COMM_WORLD.Get_size() - 1
    assert summary["center_error"] <= 1e-4, summary
    assert summary["steps"] == 1500 * summary["workers"]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("sync-easgd", {}),
        ("downpour", {"lr": 0.05}),
        ("allreduce-sgd", {"momentum": 0.9, "lr": 0.02}),
    ],
)
def test_digits_mlp_learns(tmp_path, algorithm, extra):
    params = {
        "algorithm": f'"{algorithm}"',
        "steps": 1000,
        "lr": 0.1,
        "eval_interval": 0.5,
        **extra,
    }
    summary = train_quietly(config(tmp_path, **params))
    assert summary["center_error"] <= 0.08, summary
    assert summary["bytes"] > 0 or summary["workers"] == 1
