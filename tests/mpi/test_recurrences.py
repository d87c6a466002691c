"""Exact recurrences that fail when a rule is wrong, through ``easgd_mpi.train`` under MPI.

Sync EASGD and all-reduce SGD: every worker has its *own* optimum (the problem reads its rank), so
the workers differ and the averaging shows: a worker's gradient points and the final center must
follow the float64 recurrence of DESIGN.md §2 with the mean over the workers in it, at
p = world size − 1 (`make test`: p = 1, 2, 4; the averaging is seen at p ≥ 2).

Async EASGD, EAMSGD and DOWNPOUR are deterministic at p = 1: each pair of ranks (a communicator
split off the world; a leftover rank sits out) runs one master and one worker through the real
CenterWindow, and the worker's gradient points and the final center must follow the recurrence.
"""

import numpy as np
import pytest
from mpi4py import MPI

import easgd_mpi as ea
from easgd_mpi.models import QuadraticProblem

H = np.array([0.5, 1.0, 1.5, 2.0])
M = np.array([1.0, -1.0, 0.5, 0.25])
#: Worker i (world rank i + 1) has its optimum at M + SHIFT·(i + 1).
SHIFT = np.array([0.7, -1.4, 2.1, 0.35])
START = 0.0
LR = 0.1
TOL = 1e-5


def optimum(worker: int) -> np.ndarray:
    return M + SHIFT * (worker + 1)


class WorkerQuadratic(QuadraticProblem):
    """The quadratic with this worker's own optimum, remembering where gradients were taken and
    what the master evaluated last (the final center)."""

    def __init__(self, cfg, xp, worker):
        super().__init__(cfg.quadratic, xp=xp)
        if worker >= 0:  # the master (worker −1) keeps the config's optimum: it only evaluates
            m = optimum(worker)
            self._m64 = m.copy()
            self._m[: self.dim] = xp.asarray(m, dtype=np.float32)
        self.points = []
        self.evaluated = None

    def loss_and_grad(self, x, batch, g):
        self.points.append(np.array(x[: self.dim], dtype=np.float64))
        return super().loss_and_grad(x, batch, g)

    def evaluate(self, x_host):
        self.evaluated = np.array(x_host[: self.dim], dtype=np.float64)
        return super().evaluate(x_host)


def make_config(out, **values) -> ea.Config:
    overrides = {
        "model.name": '"quadratic"',
        "quadratic.dim": len(H),
        "quadratic.noise": 0.0,
        "quadratic.curvature": str(H.tolist()),
        "quadratic.optimum": str(M.tolist()),
        "quadratic.start": START,
        "lr": LR,
        "eval_interval": 0.2,
        "checkpoint.interval": 0,
        "output": f'"{out}"',
        **values,
    }
    return ea.Config.from_toml(
        None, environ={}, overrides={k: str(v) for k, v in overrides.items()}
    )


def train_recording(cfg, comm, worker):
    made = []

    def factory(cfg, xp):
        made.append(WorkerQuadratic(cfg, xp, worker))
        return made[-1]

    summary = ea.train(cfg, problem=factory, comm=comm, out=lambda line: None)
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


def expected_sync_easgd(p, steps, tau, alpha, delta):
    """Gradient points (steps × p × dim) and the final center, DESIGN.md §2 in float64."""
    m = np.array([optimum(i) for i in range(p)])
    beta = p * alpha
    x = np.full((p, len(H)), START)
    v = np.zeros_like(x)
    c = np.full(len(H), START)
    points = []
    for t in range(steps):
        y = x + delta * v
        points.append(y.copy())
        v = delta * v - LR * H * (y - m)
        if t % tau == 0:  # both from the old x and x̃
            x, c = x - alpha * (x - c) + v, (1 - beta) * c + beta * x.mean(axis=0)
        else:
            x = x + v
    return np.array(points), c


def expected_allreduce_sgd(p, steps, delta):
    m = np.array([optimum(i) for i in range(p)])
    x = np.full(len(H), START)  # the workers stay identical
    v = np.zeros_like(x)
    points = []
    for _ in range(steps):
        y = x + delta * v
        points.append(np.tile(y, (p, 1)))
        g = (H * (y - m)).mean(axis=0)  # the all-reduced gradient of p different problems
        v = delta * v - LR * g
        x = x + v
    return np.array(points), x


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
    points, center = expected_sync_easgd(p, steps, tau, 0.9 / p, momentum)
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
    points, final_x = expected_allreduce_sgd(p, steps, momentum)
    check(comm, summary, problem, points[:, max(worker, 0)], final_x)
    if p >= 2:  # each worker alone would head for its own optimum, not the mean of them
        assert np.abs(optimum(0) - optimum(1)).max() > 0.5


# ---- the asynchronous rules at p = 1: pairs of ranks, the real CenterWindow -------------------


def expected_easgd(steps, tau, alpha):
    m, x, c = optimum(0), np.full(len(H), START), np.full(len(H), START)
    points = []
    for t in range(steps):
        points.append(x.copy())
        g = H * (x - m)  # at x, before the exchange
        if t % tau == 0:
            e = alpha * (x - c)
            x, c = x - e - LR * g, c + e
        else:
            x = x - LR * g
    return np.array(points), c


def expected_eamsgd(steps, tau, alpha, delta):
    m, x, c = optimum(0), np.full(len(H), START), np.full(len(H), START)
    v = np.zeros_like(x)
    points = []
    for t in range(steps):
        y = x + delta * v  # Nesterov: the gradient at the look-ahead point
        points.append(y.copy())
        v = delta * v - LR * H * (y - m)
        if t % tau == 0:
            e = alpha * (x - c)  # from the old x
            x, c = x - e + v, c + e
        else:
            x = x + v
    return np.array(points), c


def expected_downpour(steps, tau):
    m, x, c = optimum(0), np.full(len(H), START), np.full(len(H), START)
    acc = np.zeros_like(x)
    points = []
    for t in range(steps):
        points.append(x.copy())
        d = -LR * H * (x - m)
        x, acc = x + d, acc + d
        if (t + 1) % tau == 0 or t + 1 == steps:
            c = c + acc  # push, then copy
            x, acc = c.copy(), np.zeros_like(acc)
    return np.array(points), c


def pair():
    """This rank's pair (ranks 2k, 2k + 1) as a communicator, or None for a leftover rank."""
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    alone = rank == size - 1 and size % 2 == 1
    sub = world.Split(MPI.UNDEFINED if alone else rank // 2, rank)
    return None if alone else sub


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
        if algorithm == "easgd":
            points, center = expected_easgd(steps, tau, alpha)
        elif algorithm == "eamsgd":
            points, center = expected_eamsgd(steps, tau, alpha, momentum)
        else:
            points, center = expected_downpour(steps, tau)
        check(comm, summary, problem, points, center)
        exchanges = -(-steps // tau)  # at t = 0, τ, 2τ, ... (DOWNPOUR: after each τ-th step
        assert summary["exchanges"] == exchanges  # and after the last one: as many)
        assert np.abs(center - START).max() > 0.1  # the center moved: the exchange was seen
    finally:
        comm.Free()
