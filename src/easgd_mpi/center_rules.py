"""What a center that computes does with the workers' pushes (docs/ARCHITECTURE.md §2.10-2.15).

A rule of :data:`~easgd_mpi.config.ACTIVE_ALGORITHMS` has each worker push u, the change it
wants to make to the center (DOWNPOUR's summed local updates; async-diloco's x − θ_pulled, the
negative pseudo-gradient, scaled for its staleness); a server applies :meth:`CenterRule.apply`
to its slice with the sum of the pushes that reached it since its last apply. This module is the
math only, on float32 arrays in place, with no MPI: center_server.py moves the pushes, the
servers run it, the tests run it in one process. The same outer Nesterov step
(:func:`outer_nesterov`) is sync diloco's on the workers, where the arrays may be on a GPU: the
functions use only in-place array operators, which NumPy and CuPy share.

Past the trainable prefix (a model's buffers, §2.2) every rule only adds u: statistics are
averaged, never given momentum or an adaptive step.
"""

from __future__ import annotations

import abc

import numpy as np

__all__ = [
    "CenterRule",
    "MDownpourRule",
    "ADownpourRule",
    "MVADownpourRule",
    "AsyncDiLoCoRule",
    "make_center_rule",
    "outer_nesterov",
    "staleness_weight",
]

_f32 = np.float32


def outer_nesterov(theta, m, d, lr: float, mu: float, scratch) -> None:
    """The outer Nesterov step on a pseudo-gradient d: m ← μm + d; θ ← θ − η_o(d + μm).

    PyTorch's ``SGD(nesterov=True)`` form, which DiLoCo uses for its outer optimizer. At
    η_o = 1, μ = 0 it is θ − d exactly (m = d, d + 0·m = d, 1·(d) = d): model averaging when d
    is the mean of θ − x_i, bit for bit. ``scratch``: an array like θ.
    """
    m *= _f32(mu)
    m += d
    scratch[...] = m
    scratch *= _f32(mu)
    scratch += d
    scratch *= _f32(lr)
    theta -= scratch


def staleness_weight(staleness: int, workers: int, scale: str) -> float:
    """async-diloco's weight of a pseudo-gradient pushed ``staleness`` pushes late.

    ``"inverse"``: 1/max(p, 1 + s): a push no staler than the round-robin schedule of p equal
    workers (s ≤ p − 1) weighs 1/p, sync DiLoCo's weight of one worker in the mean; a staler
    one weighs 1/(1 + s), less the longer its worker was away. ``"none"``: 1/p for every push.
    One worker: 1 (its pushes are never stale).
    """
    p = max(1, int(workers))
    if scale == "none":
        return 1.0 / p
    return 1.0 / max(p, 1 + max(0, int(staleness)))


class CenterRule(abc.ABC):
    """One rule on one server's slice [lo, hi) of the center; ``trainable``: how many of the
    slice's elements lie in the trainable prefix (the rest are buffers: u is only added)."""

    name = ""
    #: The center-side vectors this rule keeps (``Config.center_rows``), each the slice's size.
    rows: tuple[str, ...] = ()
    #: What the master evaluates: "center" (the window) or one of :attr:`rows`.
    evaluated = "center"

    def initial_rows(self, center: np.ndarray) -> dict[str, np.ndarray]:
        """The rows of a fresh run, given the slice's initial center: zeros."""
        return {name: np.zeros_like(center) for name in self.rows}

    @abc.abstractmethod
    def apply(self, x, rows: dict, u, trainable: int, first: int, last: int) -> None:
        """x (the slice) and ``rows`` ← the rule applied to u, the sum of the pushes numbered
        ``first``..``last`` (this server's arrival order, from 1); u may be overwritten."""


class _TrainablePrefixRule(CenterRule):
    """A rule of the trainable part only: the buffers past it take the pushed sum as it is."""

    def apply(self, x, rows: dict, u, trainable: int, first: int, last: int) -> None:
        k = trainable
        self._apply(x[:k], {n: r[:k] for n, r in rows.items()}, u[:k], first, last)
        if k < x.shape[0]:
            x[k:] += u[k:]

    @abc.abstractmethod
    def _apply(self, x, rows, u, first, last) -> None:
        """The rule on the trainable part of the slice."""


class MDownpourRule(_TrainablePrefixRule):
    """MDOWNPOUR: Nesterov momentum δ at the master, in the look-ahead form.

    The paper's master keeps x̃ and v, workers take their gradients at x̃ + δv and push
    u = −ηg: v ← δv + u, x̃ ← x̃ + v. Stored as y = x̃ + δv (the point every worker pulls, as
    PyTorch's Nesterov SGD stores its parameters): v ← δv + u; y ← y + δv + u.
    """

    name = "mdownpour"
    rows = ("velocity",)

    def __init__(self, momentum: float):
        self.delta = _f32(momentum)

    def _apply(self, x, rows, u, first, last) -> None:
        v = rows["velocity"]
        v *= self.delta
        v += u
        u += self.delta * v  # δv + u, the step of the look-ahead point
        x += u


class ADownpourRule(_TrainablePrefixRule):
    """ADOWNPOUR: Adagrad at the master on the pushed updates (u = −η Σ g).

    G ← G + u²; x̃ ← x̃ + η_o·u/(√G + ε): the authors' server in Adagrad's "global" mode
    (github.com/sixin-zh/mpiT, ``BiCNN/pserver.lua``: ``paramVariance:addcmul(g, g)``,
    ``p:addcdiv(-lr, g, sqrt(paramVariance) + eps)``) with g = −u.
    """

    name = "adownpour"
    rows = ("adagrad_sum",)

    def __init__(self, lr: float, eps: float):
        self.lr, self.eps = _f32(lr), _f32(eps)

    def _apply(self, x, rows, u, first, last) -> None:
        big = rows["adagrad_sum"]
        big += u * u
        denom = np.sqrt(big)
        denom += self.eps
        u *= self.lr
        u /= denom
        x += u


class MVADownpourRule(CenterRule):
    """MVADOWNPOUR: DOWNPOUR's center x̃ ← x̃ + u, and its moving average
    z ← (1 − ν)z + νx̃ after every apply; the master evaluates z (the average starts at the
    initial center)."""

    name = "mvadownpour"
    rows = ("average",)
    evaluated = "average"

    def __init__(self, rate: float):
        self.rate = _f32(rate)

    def initial_rows(self, center):
        return {"average": center.copy()}

    def apply(self, x, rows, u, trainable, first, last) -> None:
        # The buffers are averaged too: z is the model the master evaluates.
        x += u
        z = rows["average"]
        z *= _f32(1) - self.rate
        z += self.rate * x


class AsyncDiLoCoRule(_TrainablePrefixRule):
    """async-diloco: the outer optimizer on each pseudo-gradient g = −u as it arrives, with
    the momentum delayed (Liu et al. 2024, "delayed Nesterov"): every push moves the center by
    −η_o·g at once; the momentum is updated from the pushes buffered since its last update
    every ``period`` pushes (p, the number of workers), on that push: m ← μm + b + g,
    x ← x − η_o(g + μm), b ← 0. With one worker this is diloco's outer Nesterov step.
    """

    name = "async-diloco"
    rows = ("outer_momentum", "outer_buffer")

    def __init__(self, lr: float, momentum: float, period: int):
        self.lr, self.mu, self.period = _f32(lr), _f32(momentum), max(1, int(period))

    def _apply(self, x, rows, u, first, last) -> None:
        m, b = rows["outer_momentum"], rows["outer_buffer"]
        g = u
        g *= _f32(-1)  # the pseudo-gradient θ_pulled − x (already weighted by the worker)
        if last // self.period > (first - 1) // self.period:  # a momentum update falls here
            m *= self.mu
            m += b
            m += g
            b[...] = 0
            g += self.mu * m
        else:
            b += g
        g *= self.lr
        x -= g


def make_center_rule(cfg, workers: int) -> CenterRule:
    """The center rule of ``cfg.algorithm`` (one of the active ones)."""
    name = cfg.algorithm
    if name == "mdownpour":
        return MDownpourRule(cfg.momentum)
    if name == "adownpour":
        return ADownpourRule(cfg.resolve_center("outer_lr"), cfg.resolve_center("outer_eps"))
    if name == "mvadownpour":
        return MVADownpourRule(cfg.resolve_center("moving_rate"))
    if name == "async-diloco":
        return AsyncDiLoCoRule(
            cfg.resolve_center("outer_lr"), cfg.resolve_center("outer_momentum"), workers
        )
    raise ValueError(f"algorithm {name!r} has no center rule")
