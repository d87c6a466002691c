"""Config validation of the sync rules and the baselines: bad combinations are clear errors."""

import pytest

from easgd_mpi.algorithms import _LOOP_RULES, _RULES
from easgd_mpi.config import (
    ALGORITHMS,
    ASYNC_ALGORITHMS,
    BUILTIN_ALGORITHMS,
    ELASTIC_ALGORITHMS,
    LOOP_ALGORITHMS,
    MOMENTUM_ALGORITHMS,
    OPTIONAL_MOMENTUM_ALGORITHMS,
    SYNC_ALGORITHMS,
    Config,
)
from easgd_mpi.errors import ConfigError


def load(workers=None, **overrides):
    cfg = Config.from_toml(None, overrides=overrides, environ={})
    return cfg.validate(workers=workers) if workers is not None else cfg


def test_every_algorithm_has_exactly_one_rule():
    assert set(BUILTIN_ALGORITHMS) == set(ALGORITHMS) == set(_RULES)
    # A user's own loop (easgd_mpi.torch) runs some of them, under the same names.
    assert set(LOOP_ALGORITHMS) == set(_LOOP_RULES) < set(ALGORITHMS)
    assert set(ASYNC_ALGORITHMS) | set(SYNC_ALGORITHMS) == set(ALGORITHMS)
    assert not set(ASYNC_ALGORITHMS) & set(SYNC_ALGORITHMS)
    for rules in (_RULES, _LOOP_RULES):
        assert all(rule.collective == (name in SYNC_ALGORITHMS) for name, rule in rules.items())


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_defaults_are_valid_for_every_algorithm(algorithm):
    overrides = {"algorithm": algorithm}
    if algorithm not in ELASTIC_ALGORITHMS:
        overrides["lr"] = "0.05"
    for p in (1, 2, 4, 16):
        load(workers=p, **overrides)


@pytest.mark.parametrize("algorithm", ["sync-easgd", "allreduce-sgd"])
def test_momentum_is_optional_for_the_synchronous_rules(algorithm):
    assert load(workers=4, algorithm=algorithm, momentum="0.9").keeps_velocity
    assert not load(workers=4, algorithm=algorithm).keeps_velocity
    assert set(SYNC_ALGORITHMS) == set(OPTIONAL_MOMENTUM_ALGORITHMS)
    assert load(algorithm="eamsgd").keeps_velocity  # even with momentum = 0
    assert not set(MOMENTUM_ALGORITHMS) & set(OPTIONAL_MOMENTUM_ALGORITHMS)


@pytest.mark.parametrize(
    "overrides, workers, fragments",
    [
        (
            {"algorithm": "sync-easgd", "lock_mode": "exclusive"},
            None,
            ["lock_mode = 'exclusive'", "algorithm = 'sync-easgd'", "set lock_mode = 'shared'"],
        ),
        (
            {"algorithm": "allreduce-sgd", "lock_mode": "exclusive"},
            None,
            ["lock_mode = 'exclusive'", "algorithm = 'allreduce-sgd'"],
        ),
        (
            {"algorithm": "downpour", "momentum": "0.9"},
            None,
            ["momentum = 0.9 is not supported by algorithm 'downpour'", "set momentum = 0"],
        ),
        (
            {"algorithm": "downpour", "beta": "0.9"},
            None,
            ["beta is not used by algorithm 'downpour'", "no elastic force"],
        ),
        (
            {"algorithm": "allreduce-sgd", "rho": "1.0"},
            None,
            ["rho is not used by algorithm 'allreduce-sgd'"],
        ),
        (
            {"algorithm": "allreduce-sgd", "alpha": "0.1"},
            None,
            ["alpha is not used by algorithm 'allreduce-sgd'"],
        ),
        (
            {"algorithm": "easgd", "momentum": "0.5"},
            None,
            ["momentum = 0.5 is not used by algorithm 'easgd'", "sync-easgd"],
        ),
        (
            {"algorithm": "sync-easgd", "beta": "2.0"},
            4,
            ["beta = 2 is outside the stable range 0 < beta < 2"],
        ),
        # alpha given directly: beta = p*alpha is still bounded for the sync center update.
        (
            {"algorithm": "sync-easgd", "alpha": "0.5"},
            4,
            ["beta = p*alpha = 4*0.5 = 2", "0 < beta < 2", "sync-easgd"],
        ),
        (
            {"algorithm": "sync-easgd", "rho": "10", "lr": "0.06"},
            4,
            ["beta = p*alpha = 4*0.6 = 2.4", "alpha = lr*rho"],
        ),
        (
            {"algorithm": "allreduce-sgd", "model.name": "quadratic", "lr": "2.5"},
            1,
            ["lr*h = 2.5*1 = 2.5 is outside the stability region lr*h <= 2"],
        ),
        (
            {"algorithm": "downpour", "model.name": "quadratic", "lr": "3"},
            2,
            ["lr*h = 3.0*1 = 3 is outside the stability region lr*h <= 2"],
        ),
        ({"algorithm": "sync-sgd"}, None, ["algorithm = 'sync-sgd' is not one of", "did you mean"]),
    ],
)
def test_bad_combinations_are_clear_errors(overrides, workers, fragments):
    with pytest.raises(ConfigError) as info:
        load(workers=workers, **overrides)
    message = str(info.value)
    assert all(f in message for f in fragments), message


def test_async_easgd_with_alpha_is_not_bound_by_the_sync_beta():
    # Async EASGD's α is bounded per worker (0 < α <= 1), not through β = pα.
    assert load(workers=4, algorithm="easgd", alpha="0.5").resolve_beta(4) == 2.0
