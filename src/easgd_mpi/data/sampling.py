"""Per-worker random streams: each worker samples the whole training set with its own seed,
with replacement, as in the paper (no sharding: every worker sees the full distribution). The
problems draw their minibatches from the generator a worker hands them."""

from __future__ import annotations

import numpy as np

__all__ = ["worker_rng"]


def worker_rng(seed: int, worker: int) -> np.random.Generator:
    """The independent random stream of one worker (also used for gradient noise)."""
    return np.random.default_rng([int(seed), int(worker), 0x5EED])
