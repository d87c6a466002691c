"""The stability region of the center's own optimizer (docs/STABILITY.md §7), both sides.

Each bound is checked against an independent float64 iteration of the rule on the quadratic
with exact gradients: 3 % inside, validation accepts and the iteration converges; 3 % outside,
validation refuses with one line and the iteration diverges. DiLoCo and one worker of a center
that computes run the recurrences of tests/recurrences.py; the round-robin schedule of p
asynchronous workers is simulated here push by push, written from the rule's definition, not
from stability.py's matrices.
"""

import re

import numpy as np
import pytest

from easgd_mpi.config import Config
from easgd_mpi.errors import ConfigError
from easgd_mpi.stability import delayed_center_map, spectral_radius
from recurrences import LR, SETTINGS, H, local_sgd, master_rule, optimum


def config(algorithm, **values) -> Config:
    cfg = Config()
    for key, value in {**SETTINGS, "algorithm": algorithm, **values}.items():
        cfg.set(key, value)
    return cfg


def limit_of(cfg, workers, knob) -> float:
    """The refusal's "stable for <knob> <= L" bound."""
    with pytest.raises(ConfigError) as info:
        cfg.validate(workers=workers)
    message = str(info.value)
    assert "\n" not in message and "docs/STABILITY.md" in message
    return float(re.search(rf"stable for {knob} <= ([0-9.e+-]+)", message).group(1))


def final_error(center) -> float:
    return float(np.abs(center - optimum(0)).max())


# ---- every model: the outer step on a direction the local steps resolve ----------------------


@pytest.mark.parametrize("algorithm", ["diloco", "async-diloco"])
def test_the_outer_nesterov_bound_applies_to_every_model(algorithm):
    # 2(1 + μ)/(1 + 2μ) = 1.357 at μ = 0.9; DiLoCo's own 0.7 is well inside.
    Config.from_toml(None, environ={}, overrides={"algorithm": algorithm}).validate(workers=4)
    ok = {"algorithm": algorithm, "outer_lr": "1.35", "outer_momentum": "0.9"}
    Config.from_toml(None, environ={}, overrides=ok).validate(workers=4)
    bad = {**ok, "outer_lr": "1.36"}
    with pytest.raises(ConfigError) as info:
        Config.from_toml(None, environ={}, overrides=bad).validate(workers=4)
    message = str(info.value)
    assert "outer_lr = 1.36 is outside the stability region of the outer Nesterov step" in message
    assert "= 1.357 for outer_momentum = 0.9" in message and "\n" not in message


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"algorithm": "easgd", "outer_lr": "0.7"}, "outer_lr is not used by algorithm 'easgd'"),
        ({"algorithm": "diloco", "outer_eps": "1e-8"}, "outer_eps is not used by algorithm"),
        ({"algorithm": "localsgd", "push_lag": "1"}, "push_lag = 1 is not used by algorithm"),
        ({"algorithm": "diloco", "outer_momentum": "1.0"}, "outer_momentum = 1.0 must be in"),
        ({"algorithm": "mvadownpour", "moving_rate": "1.5"}, "moving_rate = 1.5 must be in (0, 1]"),
        ({"algorithm": "adownpour", "outer_lr": "0"}, "outer_lr = 0.0 must be > 0"),
        ({"algorithm": "async-diloco", "staleness_scale": "sqrt"}, "staleness_scale = 'sqrt'"),
        ({"algorithm": "mdownpour", "lock_mode": "exclusive"}, "lock_mode = 'exclusive' cannot"),
        ({"algorithm": "adownpour", "momentum": "0.9"}, "momentum = 0.9 is not used by"),
        ({"algorithm": "downpour", "momentum": "0.9"}, "algorithm = 'mdownpour'"),
    ],
)
def test_center_keys_outside_their_rule_or_range_are_refused(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        Config.from_toml(None, environ={}, overrides=overrides)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ---- the quadratic: one round of DiLoCo, one worker of a center that computes -----------------


@pytest.mark.parametrize(
    "tau, momentum, outer_momentum", [(1, 0.0, 0.9), (4, 0.0, 0.9), (4, 0.5, 0.5), (2, 0.9, 0.0)]
)
def test_diloco_outer_lr_bound_is_where_the_round_diverges(tau, momentum, outer_momentum):
    values = {"tau": tau, "momentum": momentum, "outer_momentum": outer_momentum}
    limit = limit_of(config("diloco", outer_lr=50.0, **values), 2, "outer_lr")
    inside, outside = 0.97 * limit, 1.03 * limit
    config("diloco", outer_lr=inside, **values).validate(workers=2)
    with pytest.raises(ConfigError):
        config("diloco", outer_lr=outside, **values).validate(workers=2)
    steps = 4000 * tau

    def run(lr):
        return local_sgd(1, steps, tau, momentum, outer_lr=lr, outer_momentum=outer_momentum)[1]

    assert final_error(run(inside)) < 1e-3
    assert not final_error(run(outside)) < 1.0  # grows without bound (or overflows)


def test_mdownpour_at_one_worker_is_stable_for_every_momentum():
    # p = 1: Nesterov at the master on c = 1 − (1 − ηh)^τ ≤ 1 < 2(1 + δ)/(1 + 2δ).
    for momentum in (0.0, 0.9, 0.99):
        config("mdownpour", momentum=momentum, tau=4).validate(workers=1)
        _, center, _ = master_rule("mdownpour", 6000, 4, momentum=momentum)
        assert final_error(center) < 1e-3


# ---- the round-robin schedule of p asynchronous workers --------------------------------------


def round_robin(c, p, lr, mu, delayed, rounds=3000):
    """|θ| after ``rounds`` × p pushes of p equal workers in turn on one curvature (optimum 0),
    each pushing w·c·θ_b for the center θ_b it pulled after its previous push: async-diloco's
    delayed Nesterov (w = 1/p; the momentum from the buffered pushes every p pushes) or a
    Nesterov step per push (w = 1; mdownpour: lr = 1, mu = δ)."""
    theta, m, b = 1.0, 0.0, 0.0
    pulled = [theta] * p  # each worker's base: everyone starts from the initial center
    w = 1.0 / p if delayed else 1.0
    for push in range(rounds * p):
        k = push % p
        g = w * c * pulled[k]
        if delayed and (push + 1) % p:
            b += g
            theta -= lr * g
        else:
            m = mu * m + b + g
            b = 0.0
            theta -= lr * (g + mu * m)
        pulled[k] = theta
        if not abs(theta) < 1e12:
            return float("inf")
    return abs(theta)


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("c, lr, mu", [(0.59, 0.7, 0.9), (0.1, 1.0, 0.99), (0.94, 1.2, 0.5)])
@pytest.mark.parametrize("delayed", [True, False])
def test_the_round_robin_map_is_the_simulated_schedule(p, c, lr, mu, delayed):
    radius = spectral_radius(delayed_center_map(c, p, lr, mu, delayed)) ** (1.0 / p)
    if abs(radius - 1.0) < 0.0005:
        pytest.skip("on the boundary: neither side is decisive in a finite run")
    grows = round_robin(c, p, lr, mu, delayed) > 1.0
    assert grows == (radius > 1.0), radius


def test_async_diloco_round_robin_bound_on_the_quadratic():
    # Four workers, τ = 4 at ηh = 0.2 (h = 2): the delayed momentum is stable at DiLoCo's
    # outer_lr = 0.7; the bound is where the simulated schedule starts to grow.
    cfg = config("async-diloco", tau=4, outer_momentum=0.9, outer_lr=0.7)
    cfg.validate(workers=4)
    limit = limit_of(
        config("async-diloco", tau=4, outer_momentum=0.9, outer_lr=20.0), 4, "outer_lr"
    )
    c = 1.0 - (1.0 - LR * H.max()) ** 4
    assert round_robin(c, 4, 0.97 * limit, 0.9, True) < 1.0
    assert round_robin(c, 4, 1.03 * limit, 0.9, True) > 1.0


def test_mdownpour_with_the_papers_momentum_needs_few_workers():
    # δ = 0.99 with four workers in turn: each push is a whole Nesterov step on a center
    # three pushes old, which the momentum amplifies; refused, and the schedule diverges.
    message_limit = limit_of(config("mdownpour", tau=1, momentum=0.99), 4, "momentum")
    assert message_limit < 0.99
    c = LR * H.max()
    assert round_robin(c, 4, 1.0, 0.99, False) > 1.0
    assert round_robin(c, 4, 1.0, 0.97 * message_limit, False) < 1.0
    config("mdownpour", tau=1, momentum=0.99).validate(workers=1)


def one_flat_direction(a, tau, delta, lr, mu, rounds=4000) -> float:
    """|θ| after ``rounds`` DiLoCo rounds on one coordinate (optimum 0, ηh = a), the workers'
    Nesterov velocity carried over rounds."""
    theta, m, v = 1.0, 0.0, 0.0
    for _ in range(rounds):
        x = theta
        for _ in range(tau):
            y = x + delta * v
            v = delta * v - a * y
            x = x + v
        d = theta - x
        m = mu * m + d
        theta -= lr * (d + mu * m)
        if not abs(theta) < 1e12:
            return float("inf")
    return abs(theta)


@pytest.mark.parametrize("algorithm", ["diloco", "async-diloco"])
def test_two_momenta_compound_on_the_flat_directions_of_every_model(algorithm):
    # DiLoCo's outer 0.7/0.9 with an inner Nesterov 0.9 that carries over rounds of τ = 4:
    # a band of small ηh, which every network's flat directions fill, grows. Refused for
    # every model, and the round on such a direction diverges; inside the bound it converges.
    values = {"algorithm": algorithm, "momentum": "0.9", "tau": "4"}
    with pytest.raises(ConfigError) as info:
        Config.from_toml(None, environ={}, overrides=values).validate(workers=2)
    message = str(info.value)
    assert "the workers' velocity carries over rounds" in message and "\n" not in message
    a = float(
        re.search(
            r"on the flat directions every network has \(lr\*h = ([0-9.e-]+)\)", message
        ).group(1)
    )
    limit = float(re.search(r"stable for outer_lr <= ([0-9.e+-]+)", message).group(1))
    assert one_flat_direction(a, 4, 0.9, 0.7, 0.9) == float("inf")
    assert one_flat_direction(a, 4, 0.9, 0.97 * limit, 0.9) < 0.01  # (flat: slowly)
    ok = {**values, "outer_lr": str(0.97 * limit)}
    Config.from_toml(None, environ={}, overrides=ok).validate(workers=2)
    # Plain local steps never compound: DiLoCo's defaults stand at any τ.
    for tau in ("1", "4", "64"):
        plain = {"algorithm": algorithm, "tau": tau}
        Config.from_toml(None, environ={}, overrides=plain).validate(workers=2)
