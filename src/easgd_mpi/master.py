"""The master loop: serve the center, evaluate snapshots, report progress, end the run.

The master never blocks the workers: between evaluations it only tests the end-of-run barrier
(which also drives MPI progress) and sleeps briefly, so on an oversubscribed node it leaves the
cores to the workers.
"""

from __future__ import annotations

import time

import numpy as np

from .metrics import format_progress

__all__ = ["run_master"]

#: Seconds the idle master sleeps between polls.
_POLL = 0.002


class _Evaluator:
    def __init__(self, problem, center, start_time):
        self.problem = problem
        self.center = center
        self.start_time = start_time
        self.snapshot = np.empty(center.n, dtype=np.float32)

    def record(self) -> dict:
        self.center.read(self.snapshot)  # atomic snapshot; workers keep going meanwhile
        status = self.center.read_status()
        result = self.problem.evaluate(self.snapshot)
        return {
            "time": round(time.monotonic() - self.start_time, 4),
            "steps": int(status["steps"].sum()),
            "exchanges": int(status["exchanges"].sum()),
            "center_loss": float(result["loss"]),
            "center_error": float(result["error"]),
            "distance": float(status["distance"].mean()) if status["distance"].size else 0.0,
            "worker_loss": float(np.nanmean(status["loss"])) if status["loss"].size else 0.0,
            "bytes": int(status["bytes"].sum()),
        }


def run_master(cfg, roles, problem, center, metrics, out=print) -> dict:
    """Serve until every worker has finished; returns the last metrics record."""
    start = time.monotonic()
    evaluator = _Evaluator(problem, center, start)
    done = roles.world.Ibarrier()  # completes once every worker has joined it
    next_eval = start
    record = None
    while not done.Test():
        now = time.monotonic()
        if now >= next_eval:
            record = evaluator.record()
            metrics.write(record)
            out(format_progress(record))
            next_eval = now + cfg.eval_interval
        time.sleep(_POLL)
    record = evaluator.record()  # the final center, after every worker's last exchange
    metrics.write(record)
    out(format_progress(record))
    return record
