"""Per-worker minibatch sampling: each worker samples the whole training set with its own seed,
with replacement, as in the paper (no sharding: every worker sees the full distribution)."""

from __future__ import annotations

import numpy as np

__all__ = ["WorkerSampler", "worker_rng"]


def worker_rng(seed: int, worker: int) -> np.random.Generator:
    """The independent random stream of one worker (also used for gradient noise)."""
    return np.random.default_rng([int(seed), int(worker), 0x5EED])


class WorkerSampler:
    """Draws index minibatches of a fixed size from ``n`` training samples."""

    def __init__(self, n: int, batch_size: int, rng: np.random.Generator):
        self.n = int(n)
        self.batch_size = min(int(batch_size), self.n)
        self.rng = rng

    def next_indices(self) -> np.ndarray:
        return self.rng.integers(0, self.n, self.batch_size)
