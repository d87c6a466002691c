"""Exact recurrences of every rule, in one process (under MPI: tests/mpi/test_recurrences.py).

The real classes of ``algorithms.py`` and the NumPy kernels, with an in-memory center and, for
the synchronous rules, p workers in threads joined by an in-memory all-reduce. Each worker has
its own optimum, so the averaging of the synchronous rules shows; the asynchronous rules run at
p = 1, where they are deterministic. Gradient points and the final center must follow the
float64 recurrence of docs/ARCHITECTURE.md §2, written here independently.
"""

import threading

import numpy as np
import pytest

from easgd_mpi.algorithms import _RULES, make_algorithm
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.center_rules import make_center_rule
from easgd_mpi.config import SYNC_ALGORITHMS, Config
from easgd_mpi.data.sampling import worker_rng
from local_center import LocalCenter, LocalInbox
from recurrences import (
    SETTINGS,
    TOL,
    H,
    WorkerQuadratic,
    allreduce_sgd,
    async_rule,
    local_sgd,
    master_rule,
    sync_easgd,
)


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


def make_config(algorithm, tau, steps, momentum=0.0, alpha=None, **knobs) -> Config:
    cfg = Config()
    values = {**SETTINGS, "algorithm": algorithm, "tau": tau, "steps": steps, "momentum": momentum}
    if alpha is not None:
        values["alpha"] = alpha
    values.update(knobs)
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
    inbox = None
    if cfg.is_active:  # a center that computes: every push applied at once by the real rule
        inbox = LocalInbox(center, make_center_rule(cfg, p), probs[0].layout.size, workers=p)
    for i, prob in enumerate(probs):
        rng = worker_rng(cfg.seed, i)
        if cfg.algorithm in SYNC_ALGORITHMS:
            rule = _RULES[cfg.algorithm]
            allreduce = ThreadAllreduce(shared, i)
            algos.append(rule(cfg, prob, NumpyBackend(), center, alpha, rng, allreduce=allreduce))
        else:
            assert p == 1
            algos.append(make_algorithm(cfg, prob, NumpyBackend(), center, alpha, rng, inbox=inbox))
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


# ---- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("tau", [1, 4])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_sync_easgd(p, tau, momentum):
    steps = 13
    points, center, _ = run(make_config("sync-easgd", tau, steps, momentum), p)
    want_points, _, want_center = sync_easgd(p, steps, tau, 0.9 / p, momentum)
    np.testing.assert_allclose(points, want_points, rtol=0, atol=TOL)
    np.testing.assert_allclose(center, want_center, rtol=0, atol=TOL)
    assert np.abs(points[-1, 0] - points[-1, -1]).max() > 0.05  # the workers differ


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("tau", [1, 4])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_allreduce_sgd(p, tau, momentum):
    steps = 13
    points, center, _ = run(make_config("allreduce-sgd", tau, steps, momentum), p)
    want_points, want_x = allreduce_sgd(p, steps, momentum)
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
    want_points, _, want_center = async_rule(algorithm, steps, tau, alpha, momentum)
    np.testing.assert_allclose(points, want_points[:, None, :], rtol=0, atol=TOL)
    np.testing.assert_allclose(center, want_center, rtol=0, atol=TOL)
    assert algo.exchanges == -(-steps // tau)


# ---- issue 19: local SGD, DiLoCo and the rules whose center computes ----------------------------


@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("tau", [1, 4])
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_localsgd(p, tau, momentum):
    steps = 14  # the last round is shorter (14 = 3·4 + 2)
    points, center, _ = run(make_config("localsgd", tau, steps, momentum), p)
    want_points, want_center, _ = local_sgd(p, steps, tau, momentum)
    np.testing.assert_allclose(points, want_points, rtol=0, atol=TOL)
    np.testing.assert_allclose(center, want_center, rtol=0, atol=TOL)
    # The workers differ: with one worker's optimum alone the center would end elsewhere.
    assert np.abs(want_center - local_sgd(1, steps, tau, momentum)[1]).max() > 0.05


@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("tau", [1, 4])
@pytest.mark.parametrize("momentum, outer_lr, outer_momentum", [(0.0, 0.7, 0.9), (0.5, 1.1, 0.5)])
def test_diloco(p, tau, momentum, outer_lr, outer_momentum):
    steps = 14
    cfg = make_config(
        "diloco", tau, steps, momentum, outer_lr=outer_lr, outer_momentum=outer_momentum
    )
    points, center, algos = run(cfg, p)
    want_points, want_center, want_m = local_sgd(
        p, steps, tau, momentum, outer_lr=outer_lr, outer_momentum=outer_momentum
    )
    np.testing.assert_allclose(points, want_points, rtol=0, atol=TOL)
    np.testing.assert_allclose(center, want_center, rtol=0, atol=TOL)
    for algo in algos:  # every worker holds the same outer momentum, the recurrence's
        np.testing.assert_allclose(algo.outer_m[: len(H)], want_m, rtol=0, atol=TOL)
    # The outer step is not the plain average: local SGD ends elsewhere.
    assert np.abs(want_center - local_sgd(p, steps, tau, momentum)[1]).max() > 0.05


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("tau, momentum", [(1, 0.0), (4, 0.0), (3, 0.5)])
def test_diloco_with_outer_sgd_at_lr_1_is_local_sgd_bit_for_bit(p, tau, momentum):
    steps = 13
    diloco = make_config("diloco", tau, steps, momentum, outer_lr=1.0, outer_momentum=0.0)
    averaging = make_config("localsgd", tau, steps, momentum)
    points_d, center_d, algos_d = run(diloco, p)
    points_l, center_l, algos_l = run(averaging, p)
    np.testing.assert_array_equal(points_d, points_l)
    np.testing.assert_array_equal(center_d, center_l)
    for a, b in zip(algos_d, algos_l, strict=True):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.theta, b.theta)


MASTER_CASES = [
    ("mdownpour", 1, {"momentum": 0.5}),
    ("mdownpour", 3, {"momentum": 0.9}),
    ("adownpour", 1, {"outer_lr": 0.05, "outer_eps": 1e-8}),
    ("adownpour", 3, {"outer_lr": 0.1, "outer_eps": 1e-3}),
    ("mvadownpour", 1, {"moving_rate": 0.3}),
    ("mvadownpour", 3, {"moving_rate": 0.1}),
    ("async-diloco", 1, {"outer_lr": 0.7, "outer_momentum": 0.9}),
    ("async-diloco", 4, {"outer_lr": 0.7, "outer_momentum": 0.9, "momentum": 0.5}),
]


@pytest.mark.parametrize("algorithm, tau, knobs", MASTER_CASES)
def test_a_center_that_computes_at_one_worker(algorithm, tau, knobs):
    steps = 14
    momentum = knobs.get("momentum", 0.0)
    extra = {k: v for k, v in knobs.items() if k != "momentum"}
    cfg = make_config(algorithm, tau, steps, momentum, **extra)
    points, center, (algo,) = run(cfg, 1)
    want_points, want_evaluated, want_rows = master_rule(algorithm, steps, tau, **knobs)
    np.testing.assert_allclose(points, want_points[:, None, :], rtol=0, atol=TOL)
    got = center if algorithm != "mvadownpour" else algo.inbox.rows["average"][: len(H)]
    np.testing.assert_allclose(got, want_evaluated, rtol=0, atol=TOL)
    for name, row in algo.inbox.rows.items():
        if name in want_rows:
            np.testing.assert_allclose(row[: len(H)], want_rows[name], rtol=0, atol=TOL)
    assert algo.exchanges == algo.pushes == -(-steps // tau)
    assert algo.staleness_max == 0  # one worker never pulls a center without its own push
