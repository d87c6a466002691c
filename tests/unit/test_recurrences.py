"""Exact recurrences of every rule, in one process (under MPI: tests/mpi/test_recurrences.py).

The real classes of ``algorithms.py`` and the NumPy kernels, with an in-memory center and, for
the synchronous rules, p workers in threads joined by an in-memory all-reduce. Each worker has
its own optimum, so the averaging of the synchronous rules shows; the asynchronous rules run at
p = 1, where they are deterministic. Gradient points and the final center must follow the
float64 recurrence of DESIGN.md §2, written here independently.
"""

import threading

import numpy as np
import pytest

from easgd_mpi.algorithms import AllreduceSGD, SyncEASGD, make_algorithm
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.config import Config
from easgd_mpi.data.sampling import worker_rng
from easgd_mpi.models import QuadraticProblem
from local_center import LocalCenter

H = np.array([0.5, 1.0, 1.5, 2.0])
M = np.array([1.0, -1.0, 0.5, 0.25])
SHIFT = np.array([0.7, -1.4, 2.1, 0.35])
START = 0.0
LR = 0.1
TOL = 1e-5


def optimum(worker: int) -> np.ndarray:
    return M + SHIFT * (worker + 1)


class ThreadAllreduce:
    """WorkerAllreduce's interface for workers in threads: the mean in rank order, float32."""

    def __init__(self, shared, rank):
        self.shared, self.rank, self.size = shared, rank, len(shared["slots"])

    def mean(self, src, out):
        slots, barrier = self.shared["slots"], self.shared["barrier"]
        slots[self.rank] = np.array(src, dtype=np.float32)
        barrier.wait()
        total = slots[0].copy()
        for s in slots[1:]:
            total += s
        barrier.wait()  # all have read the slots before any worker writes the next round's
        out[...] = total * np.float32(1.0 / self.size)
        return 0


class WorkerQuadratic(QuadraticProblem):
    def __init__(self, qcfg, worker):
        super().__init__(qcfg)
        self._m64 = optimum(worker)
        self._m[: self.dim] = self._m64.astype(np.float32)
        self.points = []

    def loss_and_grad(self, x, batch, g):
        self.points.append(np.array(x[: self.dim], dtype=np.float64))
        return super().loss_and_grad(x, batch, g)


def make_config(algorithm, tau, steps, momentum=0.0, alpha=None) -> Config:
    cfg = Config()
    values = {
        "algorithm": algorithm,
        "lr": LR,
        "tau": tau,
        "steps": steps,
        "momentum": momentum,
        "model.name": "quadratic",
        "quadratic.dim": len(H),
        "quadratic.curvature": H.tolist(),
        "quadratic.optimum": M.tolist(),
        "quadratic.start": START,
    }
    if alpha is not None:
        values["alpha"] = alpha
    for key, value in values.items():
        cfg.set(key, value)
    return cfg


def run(cfg, p):
    """Every worker's gradient points (steps × p × dim) and the final center."""
    cfg.validate(workers=p)
    alpha = cfg.resolve_alpha(p)
    probs = [WorkerQuadratic(cfg.quadratic, i) for i in range(p)]
    x0 = probs[0].layout.zeros()
    probs[0].init_params(x0, 0)
    center = LocalCenter(x0, chunk=3)
    shared = {"slots": [None] * p, "barrier": threading.Barrier(p, timeout=30)}
    algos = []
    for i, prob in enumerate(probs):
        rng = worker_rng(cfg.seed, i)
        if cfg.algorithm in ("sync-easgd", "allreduce-sgd"):
            rule = SyncEASGD if cfg.algorithm == "sync-easgd" else AllreduceSGD
            allreduce = ThreadAllreduce(shared, i)
            algos.append(rule(cfg, prob, NumpyBackend(), center, alpha, rng, allreduce=allreduce))
        else:
            assert p == 1
            algos.append(make_algorithm(cfg, prob, NumpyBackend(), center, alpha, rng))
        algos[-1].pull_center()
    failures = []

    def work(algo):
        try:
            for t in range(cfg.steps):
                algo.step(t)
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            failures.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=work, args=(a,)) for a in algos]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if failures:
        raise failures[0]
    points = np.stack([np.array(prob.points) for prob in probs], axis=1)
    return points, center.value[: len(H)].astype(np.float64), algos


# ---- the recurrences, float64 -----------------------------------------------------------------


def expected_sync_easgd(p, steps, tau, alpha, delta):
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
        if t % tau == 0:
            x, c = x - alpha * (x - c) + v, (1 - beta) * c + beta * x.mean(axis=0)
        else:
            x = x + v
    return np.array(points), c


def expected_allreduce_sgd(p, steps, delta):
    m = np.array([optimum(i) for i in range(p)])
    x = np.full(len(H), START)
    v = np.zeros_like(x)
    points = []
    for _ in range(steps):
        y = x + delta * v
        points.append(np.tile(y, (p, 1)))
        v = delta * v - LR * (H * (y - m)).mean(axis=0)
        x = x + v
    return np.array(points), x


def expected_async(algorithm, steps, tau, alpha, delta):
    m, x, c = optimum(0), np.full(len(H), START), np.full(len(H), START)
    v = np.zeros_like(x)
    acc = np.zeros_like(x)
    points = []
    for t in range(steps):
        if algorithm == "downpour":
            points.append(x.copy())
            d = -LR * H * (x - m)
            x, acc = x + d, acc + d
            if (t + 1) % tau == 0 or t + 1 == steps:
                c = c + acc  # push, then copy
                x, acc = c.copy(), np.zeros_like(acc)
            continue
        y = x + delta * v  # EASGD: δ = 0, the gradient at x itself
        points.append(y.copy())
        v = delta * v - LR * H * (y - m)
        if t % tau == 0:
            e = alpha * (x - c)  # the old x
            x, c = x - e + v, c + e
        else:
            x = x + v
    return np.array(points)[:, None, :], c


# ---- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("tau", [1, 4])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sync_easgd(p, tau, momentum):
    steps = 13
    points, center, _ = run(make_config("sync-easgd", tau, steps, momentum), p)
    want_points, want_center = expected_sync_easgd(p, steps, tau, 0.9 / p, momentum)
    np.testing.assert_allclose(points, want_points, rtol=0, atol=TOL)
    np.testing.assert_allclose(center, want_center, rtol=0, atol=TOL)
    assert np.abs(points[-1, 0] - points[-1, -1]).max() > 0.05  # the workers differ


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("tau", [1, 4])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_allreduce_sgd(p, tau, momentum):
    steps = 13
    points, center, _ = run(make_config("allreduce-sgd", tau, steps, momentum), p)
    want_points, want_x = expected_allreduce_sgd(p, steps, momentum)
    np.testing.assert_allclose(points, want_points, rtol=0, atol=TOL)
    np.testing.assert_allclose(center, want_x, rtol=0, atol=TOL)  # mirrored after the last step


@pytest.mark.parametrize(
    "algorithm, tau, momentum, alpha",
    [
        ("easgd", 1, 0.0, 0.6),
        ("easgd", 3, 0.0, 0.5),
        ("eamsgd", 1, 0.5, 0.5),
        ("eamsgd", 3, 0.9, 0.4),
        ("downpour", 1, 0.0, None),
        ("downpour", 3, 0.0, None),
    ],
)
def test_async_rule_at_one_worker(algorithm, tau, momentum, alpha):
    steps = 14
    points, center, (algo,) = run(make_config(algorithm, tau, steps, momentum, alpha), 1)
    want_points, want_center = expected_async(algorithm, steps, tau, alpha, momentum)
    np.testing.assert_allclose(points, want_points, rtol=0, atol=TOL)
    np.testing.assert_allclose(center, want_center, rtol=0, atol=TOL)
    assert algo.exchanges == -(-steps // tau)
