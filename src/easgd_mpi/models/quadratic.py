"""The separable quadratic f(x) = ½ Σ_j h_j (x_j − m_j)², the paper's analysis problem.

With noise σ = 0 the gradient is exact, so the algorithms' fixed points can be checked exactly.
"""

from __future__ import annotations

import numpy as np

from ..flat import Layout

__all__ = ["QuadraticProblem"]


def _vector(value, dim) -> np.ndarray:
    return np.asarray(value if isinstance(value, list) else [value] * dim, dtype=np.float64)


class QuadraticProblem:
    #: The "error" is the largest coordinate error max |x_j − m_j|, not a rate.
    error_is_rate = False

    def __init__(self, qcfg, xp=np):
        self.xp = xp
        self.dim = int(qcfg.dim)
        self.layout = Layout([("x", (self.dim,))])
        self.noise = float(qcfg.noise)
        self._h64 = _vector(qcfg.curvature, self.dim)
        self._m64 = _vector(qcfg.optimum, self.dim)
        self._start = _vector(qcfg.start, self.dim)
        pad = self.layout.size - self.dim
        # Padding elements get h = 0, m = 0: zero gradient, they never move. Kept as float32
        # on the worker's device, with one scratch vector: a step allocates and casts nothing.
        self._h = xp.asarray(np.concatenate([self._h64, np.zeros(pad)]), dtype=np.float32)
        self._m = xp.asarray(np.concatenate([self._m64, np.zeros(pad)]), dtype=np.float32)
        self._d = xp.empty(self.layout.size, dtype=np.float32)

    @property
    def optimum(self) -> np.ndarray:
        return self._m64.copy()

    def init_params(self, x_host: np.ndarray, seed: int) -> None:
        x_host[:] = 0.0
        x_host[: self.dim] = self._start

    def sample_batch(self, rng: np.random.Generator):
        if self.noise == 0.0:
            return None
        return rng.standard_normal(self.layout.size) * self.noise

    def loss_and_grad(self, x, batch, g):
        """½ Σ h d² at x (a 0-d array, not synchronised) and g = h d (+ noise), d = x − m."""
        xp, h, m, d = self.xp, self._h, self._m, self._d
        if x.dtype != d.dtype:  # e.g. a float64 finite-difference check: compute in its dtype
            h, m, d = h.astype(x.dtype), m.astype(x.dtype), xp.empty_like(x)
        xp.subtract(x, m, out=d)
        xp.multiply(h, d, out=g)
        loss = 0.5 * xp.dot(g, d)
        if batch is not None:
            noise = xp.asarray(batch, dtype=x.dtype)
            noise[self.dim :] = 0
            g += noise
        return loss

    def evaluate(self, x_host: np.ndarray) -> dict:
        d = x_host[: self.dim].astype(np.float64) - self._m64
        return {
            "loss": float(0.5 * np.sum(self._h64 * d * d)),
            # The largest coordinate error: what "converged to the optimum within ε" means.
            "error": float(np.max(np.abs(d))) if self.dim else 0.0,
        }
