"""A worker's saved rows restore its exact state, in one process (no MPI, no timing).

The asynchronous rules at p = 1 are deterministic: a run cut after k steps, its saved rows
(x, then EAMSGD's v or DOWNPOUR's pending sum), its counters, its generator and the center
copied, then continued by a fresh worker the way ``run_worker`` resumes (pull the center, set
the generator, ``restore``), must end bit-identical to the run that never stopped. The CLI test
(tests/cli/test_exact_resume.py) checks the same through real launches, but its cut falls where
the timing puts it: a DOWNPOUR cut right after a push has nothing pending, and a restore that
dropped the pending sum would pass there. Here every cut of DOWNPOUR falls between pushes.
"""

import numpy as np
import pytest

from easgd_mpi.algorithms import make_algorithm
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.config import Config
from easgd_mpi.data.sampling import worker_rng
from easgd_mpi.models import QuadraticProblem
from easgd_mpi.workerstate import WorkerState, encode_rng
from local_center import LocalCenter

STEPS = 14


def make_config(algorithm, tau, momentum=0.0, alpha=None) -> Config:
    cfg = Config()
    values = {
        "algorithm": algorithm,
        "lr": 0.1,
        "tau": tau,
        "steps": STEPS,
        "momentum": momentum,
        "model.name": "quadratic",
        "quadratic.dim": 4,
        "quadratic.curvature": [0.5, 1.0, 1.5, 2.0],
        "quadratic.optimum": [1.0, -1.0, 0.5, 0.25],
        "quadratic.start": 0.0,
        "quadratic.noise": 0.1,  # the generator matters too
    }
    if alpha is not None:
        values["alpha"] = alpha
    for key, value in values.items():
        cfg.set(key, value)
    cfg.validate(workers=1)
    return cfg


def start(cfg, center_value):
    problem = QuadraticProblem(cfg.quadratic)
    center = LocalCenter(center_value, chunk=3)
    rng = worker_rng(cfg.seed, 0)
    algo = make_algorithm(cfg, problem, NumpyBackend(), center, cfg.resolve_alpha(1), rng)
    algo.pull_center()
    return algo, center, rng


def initial_center(cfg):
    problem = QuadraticProblem(cfg.quadratic)
    x0 = problem.layout.zeros()
    problem.init_params(x0, cfg.seed)
    return x0


@pytest.mark.parametrize(
    "algorithm, tau, momentum, alpha, cut",
    [
        ("easgd", 3, 0.0, 0.5, 7),
        ("eamsgd", 3, 0.9, 0.4, 7),
        ("downpour", 4, 0.0, None, 5),
        ("downpour", 4, 0.0, None, 6),
        ("downpour", 4, 0.0, None, 11),
    ],
)
def test_restoring_the_saved_rows_continues_bit_identical(algorithm, tau, momentum, alpha, cut):
    cfg = make_config(algorithm, tau, momentum, alpha)

    ref, ref_center, _ = start(cfg, initial_center(cfg))
    for t in range(STEPS):
        ref.step(t)

    first, first_center, first_rng = start(cfg, initial_center(cfg))
    for t in range(cut):
        first.step(t)
    rows = [np.array(r, copy=True) for r in first.saved_rows()]
    if algorithm == "downpour":  # the cut falls between pushes: something is pending
        assert np.abs(rows[1]).max() > 0
    saved = (first_center.value.copy(), first_rng.bit_generator.state, first.exchanges)

    second, second_center, second_rng = start(cfg, saved[0])
    second_rng.bit_generator.state = saved[1]
    second.restore(
        WorkerState(
            steps=cut,
            exchanges=saved[2],
            resets=first.resets,
            rng_words=encode_rng(first_rng),
            rows=dict(zip(cfg.state_rows, rows, strict=True)),
        )
    )
    for t in range(cut, STEPS):
        second.step(t)

    assert np.array_equal(second_center.value.view(np.uint32), ref_center.value.view(np.uint32))
    for got, want in zip(second.saved_rows(), ref.saved_rows(), strict=True):
        assert np.array_equal(np.asarray(got).view(np.uint32), np.asarray(want).view(np.uint32))
    assert second.exchanges == ref.exchanges
