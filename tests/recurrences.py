"""The float64 recurrences of docs/ARCHITECTURE.md §2, written independently of the package, and the
quadratic problem with one optimum per worker they are checked on (the unit, MPI and checkpoint
cut tests share them).

Worker i's loss is ½ Σ H (x − m_i)² with m_i = M + SHIFT·(i + 1): the workers differ, so a rule
that skipped the averaging could not pass.
"""

import numpy as np

from easgd_mpi.backend import NumpyBackend
from easgd_mpi.compress import BLOCK
from easgd_mpi.models import QuadraticProblem

H = np.array([0.5, 1.0, 1.5, 2.0])
M = np.array([1.0, -1.0, 0.5, 0.25])
SHIFT = np.array([0.7, -1.4, 2.1, 0.35])
START = 0.0
LR = 0.1
TOL = 1e-5


#: The config keys of this problem (``Config.set`` values; ``--set`` text via :func:`as_toml`).
SETTINGS = {
    "model.name": "quadratic",
    "quadratic.dim": len(H),
    "quadratic.noise": 0.0,
    "quadratic.curvature": H.tolist(),
    "quadratic.optimum": M.tolist(),
    "quadratic.start": START,
    "lr": LR,
}


def as_toml(values: dict) -> dict:
    """Config values as ``--set`` text (strings quoted, numbers and lists as TOML)."""
    return {k: f'"{v}"' if isinstance(v, str) else str(v) for k, v in values.items()}


def optimum(worker: int) -> np.ndarray:
    return M + SHIFT * (worker + 1)


class WorkerQuadratic(QuadraticProblem):
    """The quadratic with worker ``worker``'s own optimum (−1: the master, which keeps the
    config's: it only evaluates), remembering where gradients were taken and what was last
    evaluated."""

    def __init__(self, qcfg, worker: int, xp=np):
        super().__init__(qcfg, xp=xp)
        if worker >= 0:
            self._m64 = optimum(worker)
            self._m[: self.dim] = xp.asarray(self._m64, dtype=np.float32)
        self.points = []
        self.evaluated = None

    def loss_and_grad(self, x, batch, g):
        self.points.append(np.array(x[: self.dim], dtype=np.float64))
        return super().loss_and_grad(x, batch, g)

    def evaluate(self, x_host):
        self.evaluated = np.array(x_host[: self.dim], dtype=np.float64)
        return super().evaluate(x_host)


def sync_easgd(p, steps, tau, alpha, delta, lr=LR):
    """Sync EASGD (Nesterov momentum δ): gradient points (steps × p × dim), final x (p × dim)
    and final center. Worker and center move together, both from the old x and x̃."""
    m = np.array([optimum(i) for i in range(p)])
    beta = p * alpha
    x = np.full((p, len(H)), START)
    v = np.zeros_like(x)
    c = np.full(len(H), START)
    points = []
    for t in range(steps):
        y = x + delta * v
        points.append(y.copy())
        v = delta * v - lr * H * (y - m)
        if t % tau == 0:
            x, c = x - alpha * (x - c) + v, (1 - beta) * c + beta * x.mean(axis=0)
        else:
            x = x + v
    return np.array(points), x, c


def allreduce_sgd(p, steps, delta, lr=LR):
    """All-reduce SGD: gradient points (steps × p × dim) and the workers' common final x."""
    m = np.array([optimum(i) for i in range(p)])
    x = np.full(len(H), START)  # the workers stay identical
    v = np.zeros_like(x)
    points = []
    for _ in range(steps):
        y = x + delta * v
        points.append(np.tile(y, (p, 1)))
        g = (H * (y - m)).mean(axis=0)  # the all-reduced gradient of p different problems
        v = delta * v - lr * g
        x = x + v
    return np.array(points), x


def async_rule(algorithm, steps, tau, alpha, delta=0.0, lr=LR):
    """EASGD (δ = 0), EAMSGD or DOWNPOUR with one worker: gradient points (steps × dim),
    final x and final center."""
    m, x, c = optimum(0), np.full(len(H), START), np.full(len(H), START)
    v = np.zeros_like(x)
    acc = np.zeros_like(x)
    points = []
    for t in range(steps):
        if algorithm == "downpour":
            points.append(x.copy())
            d = -lr * H * (x - m)
            x, acc = x + d, acc + d
            if (t + 1) % tau == 0 or t + 1 == steps:
                c = c + acc  # push, then copy
                x, acc = c.copy(), np.zeros_like(acc)
            continue
        y = x + delta * v  # Nesterov: the gradient at the look-ahead point (EASGD: at x)
        points.append(y.copy())
        v = delta * v - lr * H * (y - m)
        if t % tau == 0:
            e = alpha * (x - c)  # from the old x
            x, c = x - e + v, c + e
        else:
            x = x + v
    return np.array(points), x, c


# ---- the rules of issue 19: a center that computes, local SGD, DiLoCo -------------------------


def _local_phase(x, v, m, delta, lr, tau, points):
    """τ local steps (Nesterov δ; SGD at δ = 0) of every row of x toward its optimum row m,
    recording the gradient points."""
    for _ in range(tau):
        y = x + delta * v
        points.append(y.copy())
        v = delta * v - lr * H * (y - m)
        x = x + v
    return x, v


def local_sgd(p, steps, tau, delta=0.0, lr=LR, outer_lr=None, outer_momentum=0.0):
    """Local SGD (outer_lr None: θ ← mean x_i) or DiLoCo (outer Nesterov on D = mean(θ − x_i):
    m ← μm + D, θ ← θ − η_o(D + μm)), p workers: gradient points (steps × p × dim), the final
    center and the outer momentum. A round ends after every τ-th step and after the last."""
    m_opt = np.array([optimum(i) for i in range(p)])
    theta = np.full(len(H), START)
    x = np.tile(theta, (p, 1))
    v = np.zeros_like(x)
    mom = np.zeros(len(H))
    points = []
    done = 0
    while done < steps:
        h = min(tau, steps - done)
        x, v = _local_phase(x, v, m_opt, delta, lr, h, points)
        done += h
        d = (theta - x).mean(axis=0)
        if outer_lr is None:
            theta = theta - d
        else:
            mom = outer_momentum * mom + d
            theta = theta - outer_lr * (d + outer_momentum * mom)
        x = np.tile(theta, (p, 1))
    return np.array(points), theta, mom


def coded_sender(codec: str):
    """A worker's coded pushes with error feedback, written with the NumPy backend's compress
    and decompress: u (float64) ↦ what the center receives (u + r coded in float32 blocks,
    then decoded), the residual r carried to the next push."""
    backend, residual = NumpyBackend(), []

    def send(u):
        e = np.asarray(u, np.float32).copy()
        if not residual:
            residual.append(np.zeros_like(e))
        codes, scales = np.empty(e.size, np.uint8), np.empty(-(-e.size // BLOCK), np.float32)
        backend.compress(e, residual[0], codes, scales, codec, BLOCK)
        received = np.empty_like(e)
        backend.decompress(codes, scales, received, codec, BLOCK)
        return received.astype(np.float64)

    return send


def master_rule(algorithm, steps, tau, lr=LR, send=None, **knobs):
    """A rule whose center computes, one worker (no staleness): gradient points (steps × dim),
    the vector the master evaluates, and the center-side rows.

    mdownpour (knob ``momentum`` δ): the paper's master x̃ ← x̃ + v with v ← δv + u, the
    worker pulling x̃ + δv; adownpour (``outer_lr``, ``outer_eps``): G ← G + u²,
    x̃ ← x̃ + η_o u/(√G + ε); mvadownpour (``moving_rate`` ν): x̃ ← x̃ + u,
    z ← (1 − ν)z + νx̃, z evaluated; async-diloco (``outer_lr``, ``outer_momentum``, worker
    ``momentum``): g = θ − x after τ local steps, m ← μm + g, θ ← θ − η_o(g + μm). u is the
    worker's summed update x − (what it pulled) after τ local steps (the last round shorter);
    ``send`` (e.g. :func:`coded_sender`) maps it to what the center receives.
    """
    m_opt = optimum(0)[None, :]
    start = np.full(len(H), START)
    center, vel, big, avg, mom = start.copy(), 0 * start, 0 * start, start.copy(), 0 * start
    delta = knobs.get("momentum", 0.0) if algorithm == "async-diloco" else 0.0
    v = np.zeros((1, len(H)))

    def pulled():
        if algorithm == "mdownpour":
            return center + knobs["momentum"] * vel
        return center

    points, done = [], 0
    while done < steps:
        h = min(tau, steps - done)
        base = pulled()
        x, v = _local_phase(base[None, :].copy(), v, m_opt, delta, lr, h, points)
        done += h
        u = x[0] - base if send is None else send(x[0] - base)
        if algorithm == "mdownpour":
            vel = knobs["momentum"] * vel + u
            center = center + vel
        elif algorithm == "adownpour":
            big = big + u * u
            center = center + knobs["outer_lr"] * u / (np.sqrt(big) + knobs["outer_eps"])
        elif algorithm == "mvadownpour":
            center = center + u
            avg = (1 - knobs["moving_rate"]) * avg + knobs["moving_rate"] * center
        else:
            g = -u
            mom = knobs["outer_momentum"] * mom + g
            center = center - knobs["outer_lr"] * (g + knobs["outer_momentum"] * mom)
    evaluated = {"mvadownpour": avg, "mdownpour": pulled()}.get(algorithm, center)
    rows = {"velocity": vel, "adagrad_sum": big, "average": avg, "outer_momentum": mom}
    return np.array(points)[:, 0, :], evaluated, rows
