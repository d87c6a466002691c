"""The math of a center that computes (center_rules.py) against float64, push by push.

Each rule is applied, as a server applies it, to a slice whose end is past the model's
trainable prefix (the buffers there are only added), with some pushes merged into one apply
(pushes that reach a server together are one step of their sum). async-diloco's delayed
momentum and the worker's staleness weight are checked here too.
"""

import numpy as np
import pytest

from easgd_mpi.algorithms import AsyncDiLoCo
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.center_rules import (
    ADownpourRule,
    AsyncDiLoCoRule,
    MDownpourRule,
    MVADownpourRule,
    outer_nesterov,
    staleness_weight,
)
from easgd_mpi.config import Config
from easgd_mpi.data.sampling import worker_rng
from local_center import LocalCenter, LocalInbox
from recurrences import SETTINGS, WorkerQuadratic

N, TRAINABLE = 12, 9
RNG = np.random.default_rng(5)
START = RNG.normal(size=N)
#: (first, last) push numbers of each apply: pushes 3-4 and 6-8 reach the server together.
APPLIES = [(1, 1), (2, 2), (3, 4), (5, 5), (6, 8), (9, 9)]
PUSHES = RNG.normal(scale=0.1, size=(9, N))


def run_rule(rule):
    x = START.astype(np.float32)
    rows = rule.initial_rows(x)
    for first, last in APPLIES:
        u = PUSHES[first - 1 : last].sum(axis=0).astype(np.float32)
        rule.apply(x, rows, u, TRAINABLE, first, last)
    return x.astype(np.float64), {k: v.astype(np.float64) for k, v in rows.items()}


def merged():
    for first, last in APPLIES:
        yield first, last, PUSHES[first - 1 : last].sum(axis=0)


def check(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_mdownpour_is_nesterov_at_the_master_in_look_ahead_form():
    delta = 0.9
    # The paper's variables: x̃ ← x̃ + v, v ← δv + u; the stored center is x̃ + δv.
    center, v = START[:TRAINABLE].copy(), np.zeros(TRAINABLE)
    buffers = START[TRAINABLE:].copy()
    for _, _, u in merged():
        v = delta * v + u[:TRAINABLE]
        center = center + v
        buffers = buffers + u[TRAINABLE:]
    x, rows = run_rule(MDownpourRule(delta))
    check(x[:TRAINABLE], center + delta * v)
    check(x[TRAINABLE:], buffers)
    check(rows["velocity"][:TRAINABLE], v)


def test_adownpour_is_adagrad_at_the_master():
    lr, eps = 0.05, 1e-3
    x_want, big = START.copy(), np.zeros(N)
    for _, _, u in merged():
        k = slice(0, TRAINABLE)
        big[k] += u[k] ** 2
        x_want[k] += lr * u[k] / (np.sqrt(big[k]) + eps)
        x_want[TRAINABLE:] += u[TRAINABLE:]
    x, rows = run_rule(ADownpourRule(lr, eps))
    check(x, x_want)
    check(rows["adagrad_sum"], big)


def test_mvadownpour_averages_the_center_after_every_apply():
    rate = 0.2
    x_want, z = START.copy(), START.copy()
    for _, _, u in merged():
        x_want = x_want + u
        z = (1 - rate) * z + rate * x_want  # the buffers too: z is the evaluated model
    x, rows = run_rule(MVADownpourRule(rate))
    check(x, x_want)
    check(rows["average"], z)


@pytest.mark.parametrize("period", [1, 3])
def test_async_diloco_delays_its_momentum_to_every_period_pushes(period):
    lr, mu = 0.7, 0.9
    theta, m, b = START[:TRAINABLE].copy(), np.zeros(TRAINABLE), np.zeros(TRAINABLE)
    buffers = START[TRAINABLE:].copy()
    for first, last, u in merged():
        g = -u[:TRAINABLE]
        buffers = buffers + u[TRAINABLE:]
        if last // period > (first - 1) // period:  # pushes first..last cross a period
            m = mu * m + b + g
            b = np.zeros(TRAINABLE)
            theta = theta - lr * (g + mu * m)
        else:
            b = b + g
            theta = theta - lr * g
    x, rows = run_rule(AsyncDiLoCoRule(lr, mu, period))
    check(x[:TRAINABLE], theta)
    check(x[TRAINABLE:], buffers)
    check(rows["outer_momentum"][:TRAINABLE], m)
    check(rows["outer_buffer"][:TRAINABLE], b)
    if period == 3:  # the buffer holds the pushes since the last momentum update (push 9)
        assert np.abs(b).max() == 0 and np.abs(m).max() > 0


def test_the_outer_step_at_lr_1_without_momentum_is_the_average_bit_for_bit():
    theta = RNG.normal(size=1000).astype(np.float32)
    x = (theta + RNG.normal(scale=1e-3, size=1000)).astype(np.float32)
    d = theta - x
    m, scratch = np.zeros_like(theta), np.empty_like(theta)
    averaged = theta - d
    outer_nesterov(theta, m, d, 1.0, 0.0, scratch)
    assert np.array_equal(theta.view(np.uint32), averaged.view(np.uint32))


def test_the_staleness_weight():
    assert staleness_weight(0, 1, "inverse") == 1.0  # one worker: never stale
    assert staleness_weight(0, 4, "inverse") == 0.25  # no staler than round-robin: 1/p
    assert staleness_weight(3, 4, "inverse") == 0.25
    assert staleness_weight(7, 4, "inverse") == 0.125  # twice as stale: half the weight
    assert staleness_weight(7, 4, "none") == 0.25


class StaleInbox(LocalInbox):
    """One worker whose center has taken ``others`` pushes of other workers since each pull."""

    def __init__(self, *args, others, **kwargs):
        super().__init__(*args, **kwargs)
        self.others, self.payloads = others, []

    def counters(self):
        c = super().counters()
        c[0, 0] += self.others  # arrived: the others' pushes, not yet in this worker's base
        return c

    def push(self, update):
        self.payloads.append(np.array(update, dtype=np.float64))
        return super().push(update)


@pytest.mark.parametrize("others, scale, weight", [(0, "inverse", 1 / 4), (9, "inverse", 1 / 10)])
def test_async_diloco_weighs_a_push_by_its_staleness(others, scale, weight):
    cfg = Config()
    for key, value in {**SETTINGS, "algorithm": "async-diloco", "tau": 3, "steps": 3}.items():
        cfg.set(key, value)
    prob = WorkerQuadratic(cfg.quadratic, 0)
    x0 = prob.layout.zeros()
    center = LocalCenter(x0, chunk=3)
    inbox = StaleInbox(
        center, AsyncDiLoCoRule(0.7, 0.9, 4), prob.layout.size, workers=4, others=others
    )
    algo = AsyncDiLoCo(cfg, prob, NumpyBackend(), center, 0.0, worker_rng(0, 0), inbox=inbox)
    algo.pull_center()
    base = algo.x.astype(np.float64).copy()
    for t in range(3):
        algo.step(t)
    moved = np.array(prob.points[-1]) - 0.1 * prob._h64 * (prob.points[-1] - prob._m64)
    (payload,) = inbox.payloads
    np.testing.assert_allclose(payload[: prob.dim], weight * (moved - base[: prob.dim]), atol=1e-6)
    assert algo.staleness_max == others
