"""The worker loop: local steps, exchanges every τ steps, status for the master, termination."""

from __future__ import annotations

import time

from .algorithms import make_algorithm
from .data.sampling import worker_rng

__all__ = ["run_worker"]

#: Seconds between status updates when exchanges are rare (large τ).
_STATUS_PERIOD = 0.5


def run_worker(cfg, roles, problem, backend, center, alpha: float, direct_mpi: bool = False):
    """Train this worker's copy for ``cfg.steps`` local steps. Returns the algorithm object."""
    slot = roles.worker_index
    rng = worker_rng(cfg.seed, slot)
    algo = make_algorithm(cfg, problem, backend, center, alpha, rng, direct_mpi=direct_mpi)
    algo.pull_center()

    loss = float("nan")
    last_status = time.monotonic()
    for t in range(cfg.steps):
        before = algo.exchanges
        loss = algo.step(t)
        now = time.monotonic()
        if algo.exchanges != before or now - last_status >= _STATUS_PERIOD:
            _publish(center, slot, algo, t + 1, loss, done=False)
            last_status = now
    _publish(center, slot, algo, cfg.steps, loss, done=True)
    backend.synchronize()
    return algo


def _publish(center, slot, algo, steps, loss, done):
    center.publish_status(
        slot, steps=steps, exchanges=algo.exchanges, loss=loss, distance=algo.distance,
        bytes=algo.bytes, done=1.0 if done else 0.0,
    )


def wait_for_all(comm, poll: float = 0.002) -> None:
    """Join the end-of-run barrier without busy-spinning a core (MPICH polls in Wait)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(poll)
