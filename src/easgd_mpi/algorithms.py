"""The update rules of DESIGN.md §2, one small class each.

An algorithm owns a worker's state (x, gradient, momentum...) on its backend and performs one
local step at a time. It knows the equations, not MPI: the center is reached only through
:meth:`CenterWindow.exchange`, which hands it one chunk of the center at a time and takes back
the elastic difference for that chunk.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

__all__ = ["WorkerAlgorithm", "AsyncEASGD", "EAMSGD", "make_algorithm"]


class _ChunkStaging:
    """Runs a chunk kernel where the worker's state lives.

    On the host (or with CUDA-aware MPI) the center's chunk buffers are used directly. On a GPU
    without CUDA-aware MPI the chunk is staged: pinned host → device, kernel, device → pinned
    host, and the stream is synchronised before MPI touches the host buffer again.
    """

    def __init__(self, backend, chunk: int, direct: bool):
        self.backend = backend
        self.direct = direct or not backend.is_gpu
        if not self.direct:
            self._c_dev = backend.zeros(chunk)
            self._e_dev = backend.zeros(chunk)

    def run(self, c, e, kernel) -> float:
        """kernel(c_dev, e_dev) on one chunk; returns Σ e² (for the worker-to-center distance)."""
        b = self.backend
        if self.direct:
            kernel(c, e)
            return b.sum_squares(e)
        k = c.shape[0]
        c_dev, e_dev = self._c_dev[:k], self._e_dev[:k]
        b.from_host(c, c_dev)
        kernel(c_dev, e_dev)
        b.to_host(e_dev, e)
        sq = b.sum_squares(e_dev)
        b.synchronize()
        return sq


class WorkerAlgorithm(ABC):
    """Common state: the local copy x, the gradient buffer, the step clock."""

    name = ""
    uses_momentum = False

    def __init__(self, cfg, problem, backend, center, alpha: float, rng, direct_mpi=False):
        self.cfg = cfg
        self.problem = problem
        self.backend = backend
        self.center = center
        self.alpha = float(alpha)
        self.rng = rng
        n = problem.layout.size
        self.x = backend.zeros(n)
        self.g = backend.zeros(n)
        self.v = backend.zeros(n) if self.uses_momentum else None
        self.exchanges = 0
        self.bytes = 0
        #: ‖x − x̃‖ at the last exchange (before the elastic pull).
        self.distance = 0.0
        self._staging = _ChunkStaging(backend, center.chunk, direct_mpi)

    def pull_center(self) -> None:
        """x ← x̃ (start of a run: every worker starts from the center)."""
        host = np.empty(self.problem.layout.size, dtype=np.float32)
        self.center.read(host)
        self.backend.from_host(host, self.x)
        if self.v is not None:
            self.v[...] = 0
        self.backend.synchronize()

    @abstractmethod
    def step(self, t: int) -> float:
        """Local step number ``t`` (exchanging first when t mod τ = 0); returns the loss."""

    def _exchange(self, chunk_kernel) -> None:
        """One elastic exchange; chunk_kernel(lo, hi, c, e) updates x[lo:hi] and writes e."""
        total_sq = 0.0

        def compute(lo, hi, c, e):
            nonlocal total_sq
            total_sq += self._staging.run(c, e, lambda cd, ed: chunk_kernel(lo, hi, cd, ed))

        self.bytes += self.center.exchange(compute)
        self.exchanges += 1
        self.distance = math.sqrt(total_sq) / self.alpha if self.alpha > 0 else 0.0


class AsyncEASGD(WorkerAlgorithm):
    """Asynchronous EASGD: every τ steps an elastic exchange fused with the SGD step."""

    name = "easgd"

    def step(self, t: int) -> float:
        cfg, b = self.cfg, self.backend
        batch = self.problem.sample_batch(self.rng)
        loss = self.problem.loss_and_grad(self.x, batch, self.g)  # at x, before the exchange
        if t % cfg.tau == 0:
            x, g = self.x, self.g
            self._exchange(lambda lo, hi, c, e: b.exchange_sgd_step(
                x[lo:hi], c, g[lo:hi], e, self.alpha, cfg.lr, cfg.weight_decay))
        else:
            b.sgd_step(self.x, self.g, cfg.lr, cfg.weight_decay)
        return loss


class EAMSGD(WorkerAlgorithm):
    """Asynchronous EAMSGD: the same exchange, Nesterov momentum for the local steps."""

    name = "eamsgd"
    uses_momentum = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.y = self.backend.zeros(self.problem.layout.size)

    def step(self, t: int) -> float:
        cfg, b = self.cfg, self.backend
        delta = cfg.momentum
        b.nesterov_lookahead(self.x, self.v, delta, self.y)
        batch = self.problem.sample_batch(self.rng)
        loss = self.problem.loss_and_grad(self.y, batch, self.g)  # at x + δv
        if t % cfg.tau == 0:
            x, v, g = self.x, self.v, self.g
            self._exchange(lambda lo, hi, c, e: b.exchange_nesterov_step(
                x[lo:hi], v[lo:hi], c, g[lo:hi], e, self.alpha, cfg.lr, delta,
                cfg.weight_decay))
        else:
            b.nesterov_step(self.x, self.v, self.g, cfg.lr, delta, cfg.weight_decay)
        return loss


_RULES = {cls.name: cls for cls in (AsyncEASGD, EAMSGD)}


def make_algorithm(cfg, problem, backend, center, alpha, rng, direct_mpi=False):
    """The worker-side rule named by ``cfg.algorithm``."""
    return _RULES[cfg.algorithm](cfg, problem, backend, center, alpha, rng, direct_mpi)
