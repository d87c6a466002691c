"""Both sides of every enforced stability bound (docs/STABILITY.md), with the real rules.

The config's region comes from the linear recurrence of one period of each rule on the
quadratic. Here the real algorithm classes (NumPy backend, float32) iterate the quadratic with
exact gradients: a single worker against an in-memory center for the asynchronous rules, p
workers stepped in lockstep with an in-memory all-reduce for the synchronous ones. Just inside a
bound the iteration converges and validation accepts; just outside validation refuses and,
where the bound is a true stability boundary, the iteration diverges.
"""

import numpy as np
import pytest

from easgd_mpi.algorithms import AllreduceSGD, SyncEASGD, make_algorithm
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.config import Config
from easgd_mpi.data.sampling import worker_rng
from easgd_mpi.errors import ConfigError
from easgd_mpi.models import QuadraticProblem
from easgd_mpi.stability import (
    alpha_limit,
    elastic_stable,
    nesterov_limit,
    schur_stable,
    step_matrices,
)
from local_center import LocalCenter

OPTIMUM = 1.0  # start 0: the initial error is 1


class LockstepAllreduce:
    """WorkerAllreduce's interface for p workers stepped one after another in one process.

    Sync EASGD averages the workers' x as they were at the start of the round, so the driver
    computes that mean before stepping the workers of a round (``shared["mean"]``). All-reduce
    SGD averages gradients: it is driven at p = 1 only, where the mean is the value itself
    (its workers stay identical at any p, so p = 1 is its whole recurrence).
    """

    def __init__(self, shared, rank):
        self.shared, self.rank, self.size = shared, rank, shared["p"]

    def mean(self, src, out):
        if self.size == 1:
            out[...] = src
        else:
            out[...] = self.shared["mean"]
        return 0


def quadratic(algorithm, lr, tau=1, momentum=0.0, h=1.0, **extra) -> Config:
    """One coordinate, curvature h, optimum 1, start 0, exact gradients (not validated)."""
    cfg = Config()
    values = {
        "algorithm": algorithm,
        "lr": lr,
        "tau": tau,
        "momentum": momentum,
        "model.name": "quadratic",
        "quadratic.dim": 1,
        "quadratic.curvature": h,
        "quadratic.optimum": OPTIMUM,
        "quadratic.start": 0.0,
        **extra,
    }
    for key, value in values.items():
        cfg.set(key, value)
    return cfg


def accepted(cfg, workers) -> bool:
    try:
        cfg.validate(workers=workers)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return False
    return True


def refusal(cfg, workers) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.validate(workers=workers)
    message = str(info.value)
    assert "\n" not in message
    return message


def iterate(cfg, workers, steps, spread=0.1):
    """Run the real rule; returns (final error, largest error seen, resets).

    Errors are |x − m| over every worker and |x̃ − m|. Sync EASGD's worker i starts at
    x̃ + spread·(i − (p − 1)/2), so the modes in which workers differ are excited too.
    """
    cfg.steps = steps
    alpha = cfg.resolve_alpha(workers)
    prob0 = QuadraticProblem(cfg.quadratic)
    x0 = prob0.layout.zeros()
    prob0.init_params(x0, 0)
    center = LocalCenter(x0, chunk=64)
    n = prob0.dim
    collective = cfg.algorithm in ("sync-easgd", "allreduce-sgd")
    assert collective or workers == 1, "asynchronous rules: p = 1 (deterministic)"
    assert cfg.algorithm != "allreduce-sgd" or workers == 1
    shared = {"p": workers, "mean": None}
    algos = []
    for i in range(workers):
        prob = QuadraticProblem(cfg.quadratic)
        rng = worker_rng(cfg.seed, i)
        if collective:
            rule = SyncEASGD if cfg.algorithm == "sync-easgd" else AllreduceSGD
            algo = rule(
                cfg,
                prob,
                NumpyBackend(),
                center,
                alpha,
                rng,
                allreduce=LockstepAllreduce(shared, i),
            )
        else:
            algo = make_algorithm(cfg, prob, NumpyBackend(), center, alpha, rng)
        algo.pull_center()
        if cfg.algorithm == "sync-easgd":
            algo.x[:n] += np.float32(spread * (i - (workers - 1) / 2))
        algos.append(algo)
    largest = 0.0
    with np.errstate(all="ignore"):
        for t in range(steps):
            if workers > 1 and t % cfg.tau == 0:
                total = algos[0].x.copy()
                for algo in algos[1:]:
                    total += algo.x
                shared["mean"] = total * np.float32(1.0 / workers)
            for algo in algos:
                algo.step(t)
            err = max(float(np.max(np.abs(algo.x[:n] - OPTIMUM))) for algo in algos)
            if not err <= largest:
                largest = err if np.isfinite(err) else float("inf")
            if largest > 1e6 or any(algo.resets for algo in algos):
                break  # diverged
            rest = [float(np.max(np.abs(algo.v[:n]))) for algo in algos if algo.v is not None]
            rest.append(float(np.max(np.abs(center.value[:n] - OPTIMUM))))
            if max(err, *rest) < 1e-5:
                break  # at the fixed point (x = x̃ = m, v = 0) to float32 rounding: it stays
        final = max(float(np.max(np.abs(algo.x[:n] - OPTIMUM))) for algo in algos)
        final = max(final, float(np.max(np.abs(center.value[:n] - OPTIMUM))))
    return (
        final if np.isfinite(final) else float("inf"),
        largest,
        sum(algo.resets for algo in algos),
    )


def converges(cfg, workers, steps=3000) -> bool:
    final, largest, resets = iterate(cfg, workers, steps)
    return resets == 0 and final < 1e-4 and largest < 10


def diverges(cfg, workers, steps=3000) -> bool:
    final, largest, resets = iterate(cfg, workers, steps)
    # A worker that went non-finite restarts from the center (resets): divergence too.
    return resets > 0 or largest > 1e6


# ---- the analysis itself ---------------------------------------------------------------------


def test_jury_test_agrees_with_the_eigenvalues():
    rng = np.random.default_rng(7)
    n = 20000
    a = rng.uniform(0.0, 2.2, n)
    alpha = rng.uniform(0.0, 1.1, n)
    beta = alpha * rng.choice([1.0, 2.0, 4.0], n)
    for delta in (0.0, 0.9):
        E, L = step_matrices(a, alpha, beta, delta)
        for tau in (1, 3):
            P = E @ np.linalg.matrix_power(L, tau - 1)
            for M in (P, P[:, :2, :2] if tau == 1 else None):
                if M is None:
                    continue
                radius = np.abs(np.linalg.eigvals(M)).max(axis=1)
                clear = np.abs(radius - 1.0) > 1e-6
                assert np.array_equal((radius <= 1.0)[clear], schur_stable(M)[clear])


def test_paper_region_and_nesterov_bound_are_what_the_analysis_gives():
    # δ = 0, τ = 1, one worker and the center: the paper's α ≤ (4 − 2ηh)/(4 − ηh).
    for a in (0.1, 0.5, 1.0, 1.5, 1.9):
        assert alpha_limit(a, 1.0, 0.0, (1,), False, 1.0) == pytest.approx(
            (4 - 2 * a) / (4 - a), abs=2e-6
        )
    assert nesterov_limit(0.9) == pytest.approx(1.3571, abs=1e-4)
    assert nesterov_limit(0.99) == pytest.approx(1.3356, abs=1e-4)
    assert nesterov_limit(0.0) == 2.0
    # The local Nesterov step alone (α = 0 leaves the center still): stable iff ηh < bound.
    for delta in (0.5, 0.9, 0.99):
        nb = nesterov_limit(delta)
        assert elastic_stable(0.999 * nb, 1e-9, 1e-9, delta, 1, False)[0]
        assert not elastic_stable(1.001 * nb, 1e-9, 1e-9, delta, 1, False)[0]


# ---- the Nesterov bound: EAMSGD and the synchronous rules with momentum ------------------------


def test_the_issues_example_is_refused_and_diverges():
    """EAMSGD with ηh = 1.9 and δ = 0.9 (issue 10) is refused, whatever α, and diverges."""
    cfg = quadratic("eamsgd", lr=1.9, momentum=0.9, alpha=0.05)
    message = refusal(cfg, 1)
    assert "lr*h = 1.9*1 = 1.9" in message
    assert "2*(1 + momentum)/(1 + 2*momentum) = 1.357" in message and "momentum = 0.9" in message
    assert diverges(cfg, 1)


@pytest.mark.parametrize("delta", [0.9, 0.99])
def test_nesterov_bound_eamsgd(delta):
    nb = nesterov_limit(delta)
    inside_a = 0.98 * nb
    alpha = 0.5 * alpha_limit(inside_a, 1.0, delta, (1,), False, 1.0)
    inside = quadratic("eamsgd", lr=inside_a, momentum=delta, alpha=alpha)
    assert accepted(inside, 1) and converges(inside, 1)
    outside = quadratic("eamsgd", lr=1.02 * nb, momentum=delta, alpha=alpha)
    assert "2*(1 + momentum)/(1 + 2*momentum)" in refusal(outside, 1)
    assert diverges(outside, 1)


def test_nesterov_bound_allreduce_sgd():
    """All-reduce SGD keeps its workers identical: the bound is exactly Nesterov's, at any p
    (validated at p = 3; the identical workers are iterated as one)."""
    workers = 3
    nb = nesterov_limit(0.9)
    inside = quadratic("allreduce-sgd", lr=0.98 * nb, momentum=0.9)
    assert accepted(inside, workers) and converges(inside, 1)
    outside = quadratic("allreduce-sgd", lr=1.02 * nb, momentum=0.9)
    assert "Nesterov" in refusal(outside, workers)
    assert diverges(outside, 1)


def test_weight_decay_counts_in_the_curvature():
    nb = nesterov_limit(0.9)
    cfg = quadratic("allreduce-sgd", lr=0.9 * nb, momentum=0.9, weight_decay=0.2)  # ηh·1.2
    assert "lr*(h + weight_decay)" in refusal(cfg, 2)
    assert diverges(cfg, 1)


# ---- the elastic term with momentum: one worker and the center --------------------------------

ELASTIC_CASES = [
    # (algorithm, ηh, δ, τ): the bound binds at the configured τ (a true stability boundary)
    ("easgd", 1.0, 0.0, 1),  # the paper's region
    ("easgd", 0.3, 0.0, 1),
    ("eamsgd", 0.5, 0.9, 1),
    ("eamsgd", 1.2, 0.9, 1),
    ("eamsgd", 0.3, 0.99, 1),
    ("eamsgd", 0.1, 0.99, 4),  # with momentum τ = 4 is tighter than τ = 1 at small ηh
    ("eamsgd", 0.3, 0.9, 2),
]


@pytest.mark.parametrize("algorithm, eta_h, delta, tau", ELASTIC_CASES)
def test_elastic_bound_one_worker(algorithm, eta_h, delta, tau):
    limit = alpha_limit(eta_h, 1.0, delta, tuple(sorted({1, tau})), False, 1.0)
    assert 1.03 * limit < 1  # below the ηh-free α ≤ 1, so that it is this bound being tested
    common = {"lr": eta_h, "tau": tau, "momentum": delta}
    inside = quadratic(algorithm, alpha=0.97 * limit, **common)
    assert accepted(inside, 1) and converges(inside, 1)
    outside = quadratic(algorithm, alpha=1.03 * limit, **common)
    message = refusal(outside, 1)
    assert "alpha = " in message and f"{1.03 * limit:g}" in message
    if delta:
        assert f"stable for alpha <= {limit:.4g}" in message and f"momentum = {delta:g}" in message
    else:
        assert "(4 - 2*lr*h)/(4 - lr*h)" in message
    assert diverges(outside, 1)


def test_tau_one_region_is_also_enforced_for_longer_periods():
    """At τ = 4, ηh = 1.2, δ = 0.9 the τ = 1 region binds: refused, although one worker at
    τ = 4 still converges there (the conservative part of the enforced region)."""
    limit = alpha_limit(1.2, 1.0, 0.9, (1,), False, 1.0)
    assert alpha_limit(1.2, 1.0, 0.9, (4,), False, 1.0) == 1.0
    outside = quadratic("eamsgd", lr=1.2, tau=4, momentum=0.9, alpha=1.03 * limit)
    assert "tau = 1 and tau = 4" in refusal(outside, 1)
    assert converges(outside, 1)
    inside = quadratic("eamsgd", lr=1.2, tau=4, momentum=0.9, alpha=0.97 * limit)
    assert accepted(inside, 1) and converges(inside, 1)


def test_every_curvature_is_checked_not_only_the_largest():
    """With momentum the enforced bound is not monotone in ηh (at δ = 0.99, τ = 4: ≈ 0.962
    at ηh = 0.1, ≈ 0.971 at ηh = 0.2), so the largest curvature alone would not do."""
    delta, tau = 0.99, 4
    low = alpha_limit(0.1, 1.0, delta, (1, tau), False, 1.0)
    high = alpha_limit(0.2, 1.0, delta, (1, tau), False, 1.0)
    assert low < high
    alpha = 0.5 * (low + high)
    assert accepted(quadratic("eamsgd", lr=1.0, tau=tau, momentum=delta, h=0.2, alpha=alpha), 1)
    one_bad = quadratic("eamsgd", lr=1.0, tau=tau, momentum=delta, h=0.1, alpha=alpha)
    assert diverges(one_bad, 1, steps=10000)
    both = quadratic("eamsgd", lr=1.0, tau=tau, momentum=delta, alpha=alpha)
    both.set("quadratic.dim", 2)
    both.set("quadratic.curvature", [0.1, 0.2])
    message = refusal(both, 1)
    assert "h = 0.1" in message and f"stable for alpha <= {low:.4g}" in message


# ---- sync EASGD: the mean mode (β = pα) and the modes in which workers differ ------------------


@pytest.mark.parametrize(
    "workers, eta_h, delta, tau",
    [(4, 1.0, 0.0, 1), (2, 1.2, 0.9, 1), (3, 0.8, 0.5, 1), (2, 0.5, 0.99, 2)],
)
def test_sync_easgd_bound(workers, eta_h, delta, tau):
    cap = min(1.0, 2.0 / (workers + 1))
    limit = alpha_limit(eta_h, workers, delta, (tau,), workers >= 2, cap)
    assert 1.03 * limit < cap  # the curvature-dependent bound binds, not α + β ≤ 2
    common = {"lr": eta_h, "tau": tau, "momentum": delta}
    inside = quadratic("sync-easgd", beta=0.97 * workers * limit, **common)
    assert accepted(inside, workers) and converges(inside, workers)
    outside = quadratic("sync-easgd", beta=1.03 * workers * limit, **common)
    message = refusal(outside, workers)
    assert f"sync-easgd with p = {workers}" in message and "beta <= " in message
    assert diverges(outside, workers)


def test_sync_easgd_alpha_plus_beta_bound():
    """As ηh → 0 a round multiplies x − x̃ by 1 − α − β: α + β ≤ 2 for every model."""
    inside = quadratic("sync-easgd", lr=0.1, alpha=0.39)  # p = 4: α + β = 1.95
    assert accepted(inside, 4) and converges(inside, 4, steps=4000)
    outside = quadratic("sync-easgd", lr=0.1, alpha=0.41)  # α + β = 2.05
    assert "alpha + beta = 0.41 + 4*0.41 = 2.05" in refusal(outside, 4)
    assert diverges(outside, 4)
    # Without a curvature (the digits MLP) the same ηh-free bound applies.
    cfg = Config()
    cfg.set("algorithm", "sync-easgd")
    cfg.set("alpha", 0.41)
    assert "alpha + beta <= 2" in refusal(cfg, 4)
    cfg.set("alpha", 0.39)
    assert accepted(cfg, 4)


def test_defaults_and_shipped_momentum_settings_stay_valid():
    # The paper's β = 0.9 with δ = 0.99 on the analysis quadratic, p = 1..16, τ = 1..64.
    for p in (1, 2, 4, 16):
        for tau in (1, 4, 16, 64):
            for algorithm in ("eamsgd", "sync-easgd"):
                cfg = quadratic(algorithm, lr=0.05, tau=tau, momentum=0.99, h=2.0)
                assert accepted(cfg, p), (algorithm, p, tau)
