"""The stability region of the update rules: which step sizes a config may use.

:meth:`Config.validate` calls :func:`check_elastic_stability` (rules with an elastic force) or
:func:`check_local_stability` (the others) once the number of workers is known. Each raises a
one-line :class:`ConfigError` naming the bound, the value and the curvature behind it.

Without a curvature (every model but the quadratic) only the ηh-free parts of the region apply;
on the quadratic every curvature h_j, with weight decay λ added (g = h(x − m) + λx), must lie in
the region of the rule's linear recurrence. The derivation, the region each rule enforces and the
table of limits: docs/STABILITY.md. The numerical pieces (the step matrices, Jury's test, the
period map, the α limit) are public so that the tests and that page can call them.

This module reads a config's fields and never imports config.py (config.py imports this one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "check_elastic_stability",
    "check_local_stability",
    "check_center_stability",
    "outer_round_map",
    "delayed_center_map",
    "spectral_radius",
    "nesterov_limit",
    "step_matrices",
    "schur_stable",
    "elastic_stable",
    "alpha_limit",
]

#: Boundary points count as inside (the paper's region is closed: α ≤ (4 − 2ηh)/(4 − ηh)).
_SLACK = 1e-12


# ---------------------------------------------------------------------------------------------
# The checks Config.validate runs (``cfg`` is a Config)


def check_elastic_stability(cfg, workers: int) -> None:
    """The region of an elastic rule (easgd, eamsgd, sync-easgd) with ``workers`` workers."""
    alpha = cfg.resolve_alpha(workers)
    beta = cfg.resolve_beta(workers)
    how = _alpha_origin(cfg, workers)
    if cfg.elastic_key == "beta":
        if not (0.0 < beta < 2.0):
            raise ConfigError(f"config: beta = {beta:g} is outside the stable range 0 < beta < 2")
    elif cfg.algorithm == "sync-easgd":
        # The sync center update x̃ ← (1 − β)x̃ + β·mean(x^i) needs |1 − β| < 1.
        if not (0.0 < beta < 2.0):
            raise ConfigError(
                f"config: beta = p*alpha = {workers}*{alpha:g} = {beta:g} (from {how}) is "
                f"outside the stable range 0 < beta < 2 of sync-easgd's center update"
            )
    # Without knowing the curvature, ηh → 0 gives the loosest bound: 0 < α ≤ 1.
    if not (0.0 < alpha <= 1.0):
        raise ConfigError(
            f"config: {how} = {alpha:g} is outside the stability region 0 < alpha <= 1"
        )
    if cfg.algorithm == "sync-easgd" and alpha + beta > 2.0 + _SLACK:
        # As ηh → 0 a round multiplies x^i − x̃ (all workers alike) by 1 − α − β.
        raise ConfigError(
            f"config: alpha + beta = {alpha:g} + {workers}*{alpha:g} = {alpha + beta:g} "
            f"(from {how}) is outside the stability region alpha + beta <= 2 of "
            f"sync-easgd (each round multiplies x - center by 1 - alpha - beta)"
        )
    steps = _local_steps(cfg)
    if steps is None:
        return
    a, sym, h_of = steps
    delta = cfg.momentum if cfg.keeps_velocity else 0.0
    if cfg.algorithm != "sync-easgd" and delta == 0.0:
        # The paper's region (round-robin, τ = 1); bound decreasing in ηh: the largest counts.
        eta_h = float(a.max())
        bound = (4.0 - 2.0 * eta_h) / (4.0 - eta_h)
        if alpha > bound + _SLACK:
            raise ConfigError(
                f"config: {how} = {alpha:g} is outside the stability region "
                f"alpha <= (4 - 2*lr*h)/(4 - lr*h) = {bound:.4g} for {sym} = {eta_h:g}"
            )
        return
    if cfg.algorithm == "sync-easgd":
        # Exact: a mean mode (β = pα) and, with p ≥ 2, p − 1 deviation modes.
        ratio, taus, deviation = float(workers), (cfg.tau,), workers >= 2
        cap = min(1.0, 2.0 / (workers + 1), (2.0 - _SLACK) / workers)
        setting = f"sync-easgd with p = {workers}, momentum = {delta:g}, tau = {cfg.tau}"
    else:
        # One worker and the center, at the configured τ and at τ = 1 (docs/STABILITY.md).
        ratio, taus, deviation, cap = 1.0, tuple(sorted({1, cfg.tau})), False, 1.0
        at = " and ".join(f"tau = {t}" for t in taus)
        setting = f"{cfg.algorithm} with momentum = {delta:g} (one worker and the center, at {at})"
    ok = np.ones(a.shape, dtype=bool)
    for tau in taus:
        ok &= elastic_stable(a, alpha, ratio * alpha, delta, tau, deviation)
    if ok.all():
        return
    bad = a[~ok]
    if bad.size > 32:  # the message needs the binding one; a sample of them is enough
        bad = bad[np.linspace(0, bad.size - 1, 32).round().astype(int)]
    limits = [alpha_limit(x, ratio, delta, taus, deviation, cap) for x in bad]
    k = int(np.argmin(limits))
    limit, eta_h = limits[k], float(bad[k])
    beta_part = f", beta <= {workers * limit:.4g}" if cfg.algorithm == "sync-easgd" else ""
    raise ConfigError(
        f"config: {how} = {alpha:g} is outside the stability region of {setting} for "
        f"{sym} = {eta_h:.4g} ({h_of(eta_h)}): stable for alpha <= {limit:.4g}{beta_part} "
        f"(docs/STABILITY.md)"
    )


def check_local_stability(cfg) -> None:
    """The local step alone (the region of a rule without an elastic force): plain SGD needs
    ηh ≤ 2, Nesterov momentum δ needs ηh < 2(1 + δ)/(1 + 2δ). Only the quadratic has an h."""
    _local_steps(cfg)


def check_center_stability(cfg, workers: int) -> None:
    """The center's own optimizer: diloco, async-diloco (outer Nesterov) and mdownpour
    (Nesterov at the master, the paper's δ = ``momentum``), with ``workers`` workers.

    Every model but the quadratic: the outer step on a direction that the τ local steps
    resolve (c = 1: the round reaches the local optimum) is Nesterov with step ``outer_lr``,
    stable iff outer_lr < 2(1 + μ)/(1 + 2μ). On the quadratic, every curvature: the exact
    round map of the center and the workers' mean mode (and their deviation mode), and for
    the asynchronous rules with p ≥ 2 the round-robin schedule of p equal workers, each
    pushing a pseudo-gradient p − 1 pushes old (docs/STABILITY.md §7).
    """
    lr, mu, what = _outer_step(cfg)
    quadratic = cfg.model.name == "quadratic"
    outer = cfg.algorithm in ("diloco", "async-diloco")
    if outer and not quadratic and not lr < nesterov_limit(mu):
        raise ConfigError(
            f"config: outer_lr = {lr:g} is outside the stability region of the outer Nesterov "
            f"step outer_lr < 2*(1 + outer_momentum)/(1 + 2*outer_momentum) = "
            f"{nesterov_limit(mu):.4g} for outer_momentum = {mu:g} (a direction that the tau "
            f"local steps resolve, c = 1; docs/STABILITY.md)"
        )
    if not quadratic:  # (on the quadratic c is known: the exact round maps below decide)
        if outer and cfg.keeps_velocity:
            _check_flat_directions(cfg, lr, mu)
        return
    curvatures = np.unique(np.atleast_1d(np.asarray(cfg.quadratic.curvature, dtype=np.float64)))
    a_all = cfg.lr * (curvatures + cfg.weight_decay)
    delta = cfg.momentum if cfg.keeps_velocity else 0.0
    # Round-robin staleness only where it is modelled: asynchronous, plain local SGD steps.
    delayed = cfg.algorithm != "diloco" and workers >= 2 and delta == 0.0

    def stable(a, lr_, mu_) -> bool:
        if delayed:
            c = 1.0 - (1.0 - a) ** cfg.tau
            period = delayed_center_map(c, workers, lr_, mu_, cfg.algorithm == "async-diloco")
            return spectral_radius(period) <= 1 + 1e-9
        # (The workers' deviation mode, |E| ≤ 1, holds wherever the local step does: §7.)
        return spectral_radius(outer_round_map(a, cfg.tau, delta, lr_, mu_)[0]) <= 1 + 1e-9

    refusals = []
    for a in a_all:
        if stable(a, lr, mu):
            continue
        h = float(curvatures[np.argmin(np.abs(a_all - a))])
        if cfg.algorithm in ("mdownpour", "mvadownpour") and not stable(a, 1.0, 0.0):
            # DOWNPOUR's own center is unstable here: only a smaller lr helps.
            hw = h + cfg.weight_decay
            limit = _interval_end(lambda x, hw=hw: stable(x * hw, 1.0, mu), cfg.lr)
            knob, name = f"lr = {cfg.lr:g}", "lr"
        elif cfg.algorithm == "mdownpour":
            limit = _interval_end(lambda m, a=a: stable(a, 1.0, m), mu)
            knob, name = f"momentum = {mu:g}", "momentum"
        else:
            limit = _interval_end(lambda x, a=a: stable(a, x, mu), lr)
            knob, name = f"outer_lr = {lr:g} ({what})", "outer_lr"
        refusals.append((limit, a, h, knob, name))
    if not refusals:
        return
    # The binding curvature: the smallest limit (the stable set is an interval in each knob).
    limit, a, h, knob, name = min(refusals)
    setting = (
        f"{cfg.algorithm} with p = {workers} (round-robin, each push {workers - 1} pushes "
        f"old), tau = {cfg.tau}"
        if delayed
        else f"{cfg.algorithm} (one round of the center and the workers' mean), tau = "
        f"{cfg.tau}, momentum = {delta:g}"
    )
    raise ConfigError(
        f"config: {knob} is outside the stability region of {setting} for lr*h = {a:.4g} "
        f"(quadratic.curvature h = {h:g}): stable for {name} <= {limit:.4g} (docs/STABILITY.md)"
    )


#: ηh of the flat directions every network has (docs/STABILITY.md §7): checked for DiLoCo with
#: a velocity that carries over rounds, where the two momenta compound on them.
FLAT_ETA_H = np.geomspace(1e-4, 0.1, 61)


def _check_flat_directions(cfg, lr: float, mu: float) -> None:
    """diloco / async-diloco whose workers keep a Nesterov velocity across rounds: the inner
    and the outer momentum compound, and on a band of small ηh, which every network's flat
    directions fill, one round of the center and the workers' mean can grow."""
    delta, tau = cfg.momentum, cfg.tau

    def stable(a, x) -> bool:
        return spectral_radius(outer_round_map(a, tau, delta, x, mu)[0]) <= 1 + 1e-9

    bad = [a for a in FLAT_ETA_H if not stable(a, lr)]
    if not bad:
        return
    limit, a = min((_interval_end(lambda x, a=a: stable(a, x), lr), a) for a in bad)
    raise ConfigError(
        f"config: outer_lr = {lr:g} is outside the stability region of {cfg.algorithm} with "
        f"momentum = {delta:g} (the workers' velocity carries over rounds), tau = {tau}, "
        f"outer_momentum = {mu:g} on the flat directions every network has (lr*h = {a:.2g}): "
        f"stable for outer_lr <= {limit:.4g}, or lower momentum (docs/STABILITY.md)"
    )


def _outer_step(cfg) -> tuple[float, float, str]:
    """(the center's step size, its momentum, how they were set) of a center rule."""
    if cfg.algorithm == "mdownpour":
        return 1.0, cfg.momentum, "the master's step is the pushed update itself"
    if cfg.algorithm == "mvadownpour":  # DOWNPOUR's center; the average is a stable filter
        return 1.0, 0.0, "DOWNPOUR's center"
    lr, mu = cfg.resolve_center("outer_lr"), cfg.resolve_center("outer_momentum")
    return lr, mu, f"outer_momentum = {mu:g}"


def _interval_end(stable: Callable[[float], bool], cap: float) -> float:
    """The largest x ≤ cap such that every x' in (0, x] is stable: a scan, then bisection."""
    grid = np.linspace(cap / 200, cap, 200)
    ok = [stable(float(x)) for x in grid]
    if all(ok):
        return cap
    k = ok.index(False)
    lo, hi = (float(grid[k - 1]), float(grid[k])) if k else (0.0, float(grid[0]))
    while hi - lo > 1e-6 * max(1.0, cap):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if stable(mid) else (lo, mid)
    return lo


def _alpha_origin(cfg, workers: int) -> str:
    """How α came about, as the messages show it (``alpha = beta/p = 0.9/4``)."""
    return {
        "rho": f"alpha = lr*rho = {cfg.lr}*{cfg.rho}",
        "alpha": "alpha",
        "beta": f"alpha = beta/p = {cfg.resolve_beta(workers):g}/{workers}",
    }[cfg.elastic_key]


def _local_steps(cfg) -> tuple[np.ndarray, str, Callable[[float], str]] | None:
    """Check the local step on the quadratic, with h + λ for every curvature h (weight decay λ).

    Returns None without a curvature, else (ηh of every distinct curvature, how ηh is
    written, a function naming the curvature behind one of them) for the elastic checks.
    """
    if cfg.model.name != "quadratic":
        return None
    # A single number is every curvature; validation has checked a list's length against dim.
    curvatures = np.unique(np.atleast_1d(np.asarray(cfg.quadratic.curvature, dtype=np.float64)))
    wd = cfg.weight_decay
    a = cfg.lr * (curvatures + wd)
    eta_h = float(a.max())
    h_max = float(curvatures.max())
    if wd:
        what = f"lr*(h + weight_decay) = {cfg.lr}*({h_max:g} + {wd:g}) = {eta_h:g}"
        sym = "lr*(h + weight_decay)"
    else:
        what = f"lr*h = {cfg.lr}*{h_max:g} = {eta_h:g}"
        sym = "lr*h"
    if cfg.keeps_velocity:
        delta = cfg.momentum
        bound = nesterov_limit(delta)
        if not eta_h < bound:
            raise ConfigError(
                f"config: {what} is outside the stability region of the Nesterov "
                f"momentum step {sym} < 2*(1 + momentum)/(1 + 2*momentum) = {bound:.4g} "
                f"for momentum = {delta:g} (h = largest quadratic.curvature; "
                f"docs/STABILITY.md)"
            )
    elif eta_h > 2.0:
        raise ConfigError(
            f"config: {what} is outside the stability region "
            f"{sym} <= 2 (h = largest quadratic.curvature)"
        )

    def h_of(x: float) -> str:
        h = float(curvatures[np.argmin(np.abs(a - x))])
        return f"quadratic.curvature h = {h:g}" + (f", weight_decay = {wd:g}" if wd else "")

    return a, sym, h_of


# ---------------------------------------------------------------------------------------------
# The numerics (the derivation: docs/STABILITY.md §2)


def nesterov_limit(delta: float) -> float:
    """The bound on ηh of Nesterov's step with momentum δ on a quadratic of curvature h:
    stable iff 0 < ηh < 2(1 + δ)/(1 + 2δ) (2 at δ = 0, ≈ 1.357 at δ = 0.9)."""
    return 2.0 * (1.0 + delta) / (1.0 + 2.0 * delta)


def step_matrices(a, alpha, beta, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """The linear maps of one step on the state (x, v, x̃) of one curvature, ηh = a.

    ``E``: the exchange step (gradient at x + δv, e = α(x − x̃), v ← δv − ηg, x ← x − e + v,
    x̃ ← x̃ + β(x − x̃)); ``L``: a local step (x̃ unchanged). Arrays broadcast; shape (n, 3, 3).
    """
    a, alpha, beta = (np.ravel(t).astype(np.float64) for t in np.broadcast_arrays(a, alpha, beta))
    n = a.shape[0]
    keep = delta * (1.0 - a)
    E = np.zeros((n, 3, 3))
    E[:, 0, 0], E[:, 0, 1], E[:, 0, 2] = 1.0 - alpha - a, keep, alpha
    E[:, 1, 0], E[:, 1, 1] = -a, keep
    E[:, 2, 0], E[:, 2, 2] = beta, 1.0 - beta
    L = np.zeros((n, 3, 3))
    L[:, 0, 0], L[:, 0, 1] = 1.0 - a, keep
    L[:, 1, 0], L[:, 1, 1] = -a, keep
    L[:, 2, 2] = 1.0
    return E, L


def schur_stable(P: np.ndarray) -> np.ndarray:
    """Whether every eigenvalue of each 2×2 or 3×3 matrix in P lies in the closed unit disk,
    by Jury's test on the characteristic polynomial (no eigenvalue solver: exact on the
    boundary up to rounding, where a double root would cost an eigen-solver √ε)."""
    with np.errstate(all="ignore"):
        tr = np.trace(P, axis1=-2, axis2=-1)
        det = np.linalg.det(P)
        if P.shape[-1] == 2:  # z² + c1 z + c0
            c1, c0 = -tr, det
            ok = (1 + c1 + c0 >= -_SLACK) & (1 - c1 + c0 >= -_SLACK)
            return ok & (np.abs(c0) <= 1 + _SLACK)
        minors = (
            P[..., 0, 0] * P[..., 1, 1]
            - P[..., 0, 1] * P[..., 1, 0]
            + P[..., 0, 0] * P[..., 2, 2]
            - P[..., 0, 2] * P[..., 2, 0]
            + P[..., 1, 1] * P[..., 2, 2]
            - P[..., 1, 2] * P[..., 2, 1]
        )
        c2, c1, c0 = -tr, minors, -det  # z³ + c2 z² + c1 z + c0
        ok = (1 + c2 + c1 + c0 >= -_SLACK) & (1 - c2 + c1 - c0 >= -_SLACK)
        ok &= np.abs(c0) <= 1 + _SLACK
        ok &= (1 - c0 * c0) - np.abs(c1 - c0 * c2) >= -_SLACK
        return ok & np.isfinite(c0) & np.isfinite(c1) & np.isfinite(c2)


def elastic_stable(a, alpha, beta, delta: float, tau: int, deviation: bool) -> np.ndarray:
    """Whether the period map (one exchange step, then τ − 1 local steps) is stable.

    The mean mode is (x, v, x̃) with the center moved by β(x − x̃): β = α for one worker and
    the center, β = pα for sync EASGD's average. ``deviation``: also the modes in which the
    workers differ from one another (sync EASGD at p ≥ 2): (x, v) pulled by α, no center.
    """
    E, L = step_matrices(a, alpha, beta, delta)
    with np.errstate(all="ignore"):
        Lk = np.linalg.matrix_power(L, int(tau) - 1)
        ok = schur_stable(E @ Lk)
        if deviation:
            ok &= schur_stable(E[:, :2, :2] @ Lk[:, :2, :2])
    return ok


def alpha_limit(
    a: float, ratio: float, delta: float, taus: Sequence[int], deviation: bool, cap: float
) -> float:
    """The largest α ≤ cap such that every α' in (0, α] is stable at ηh = a (β = ratio·α) for
    every τ in taus: a scan of 400 points, then bisection to 1e-6."""

    def stable(alphas):
        ok = np.ones(np.shape(alphas), dtype=bool)
        for tau in taus:
            ok &= elastic_stable(a, alphas, ratio * np.asarray(alphas), delta, tau, deviation)
        return ok

    grid = np.linspace(cap / 400, cap, 400)
    ok = stable(grid)
    if ok.all():
        return cap
    k = int(np.argmin(ok))
    lo, hi = (grid[k - 1], grid[k]) if k else (0.0, grid[0])
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if stable(np.array([mid]))[0] else (lo, mid)
    return lo


def spectral_radius(P: np.ndarray) -> float:
    """The largest |eigenvalue| of one square matrix (inf if it is not finite)."""
    if not np.all(np.isfinite(P)):
        return float("inf")
    return float(np.max(np.abs(np.linalg.eigvals(P))))


def outer_round_map(a: float, tau: int, delta: float, lr: float, mu: float):
    """One round of diloco on one curvature (ηh = a), workers alike: the map of the mean mode
    on (θ, m, v) and the factor of the workers' deviation mode (their v − v̄).

    A round: x ← θ; τ local Nesterov steps (δ; plain SGD at δ = 0) on (x, v), v kept across
    rounds; D = θ − x; m ← μm + D; θ ← θ − η_o(D + μm). With L^τ = [[A, B], [C, E]] on (x, v),
    D = (1 − A)θ − Bv; a deviation starts each round at x − x̄ = 0, so only v − v̄ carries over,
    multiplied by E.
    """
    _, L = step_matrices(a, 0.0, 0.0, delta)
    Lt = np.linalg.matrix_power(L[0, :2, :2], int(tau))
    A, B, C, E = Lt[0, 0], Lt[0, 1], Lt[1, 0], Lt[1, 1]
    P = np.array(
        [
            [1.0 - lr * (1.0 + mu) * (1.0 - A), -lr * mu * mu, lr * (1.0 + mu) * B],
            [1.0 - A, mu, -B],
            [C, 0.0, E],
        ]
    )
    return P, float(E)


def delayed_center_map(c: float, p: int, lr: float, mu: float, delayed: bool) -> np.ndarray:
    """p pushes of the round-robin schedule of p equal asynchronous workers on one curvature.

    Each worker takes τ plain SGD steps from the center it pulled right after its previous
    push, p − 1 pushes of the others ago, so its pseudo-gradient is c·θ_old with
    c = 1 − (1 − ηh)^τ. ``delayed`` (async-diloco): weight 1/p, the center steps by the
    pseudo-gradient at once and updates its momentum from the buffered ones every p pushes
    (m ← μm + b, θ ← θ − η_o(g + μm) on that push); otherwise (mdownpour: η_o = 1, μ = δ) each
    push is a whole Nesterov step m ← μm + g, θ ← θ − η_o(g + μm). State
    (θ_j, θ_{j−1}, …, θ_{j−p+1}, m, b); returns the map of p pushes.
    """
    p = int(p)
    d = p + 2
    m_, b_ = p, p + 1
    w = 1.0 / p if delayed else 1.0
    period = np.eye(d)
    for r in range(1, p + 1):
        push = np.zeros((d, d))
        for k in range(1, p):  # the history shifts by one push
            push[k, k - 1] = 1.0
        g = w * c  # the pushed pseudo-gradient per unit of the oldest center θ_{j−p+1}
        momentum_now = r == p or not delayed
        push[b_, b_] = 0.0 if momentum_now else 1.0
        if not momentum_now:
            push[b_, p - 1] = g
            push[m_, m_] = 1.0
            push[0, 0] = 1.0
            push[0, p - 1] -= lr * g  # (the same entry as θ_j's at p = 1)
        else:  # m' = μm + b + g;  θ' = θ − η_o(g + μm')
            push[m_, m_], push[m_, b_], push[m_, p - 1] = mu, 1.0, g
            push[0, 0] = 1.0
            push[0, p - 1] -= lr * (g + mu * g)
            push[0, m_], push[0, b_] = -lr * mu * mu, -lr * mu
        period = push @ period
    return period
