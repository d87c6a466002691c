"""The master loop: serve the center, evaluate snapshots, report, checkpoint, end the run.

The master never blocks the workers: between its own jobs it only reads the workers' rows in
the RMA windows and sleeps briefly, so on an oversubscribed node it leaves the cores to them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .checkpoint import (
    CheckpointData,
    checkpoint_path,
    checkpoint_sequence,
    list_checkpoints,
    prune_checkpoints,
    save_checkpoint,
)
from .errors import CheckpointError, os_reason
from .metrics import format_progress

__all__ = ["run_master", "MasterResult"]

#: Seconds the idle master sleeps between polls.
_POLL = 0.002


class MasterResult(dict):
    """The last metrics record plus ``stopped`` (ended by a signal before the budget) and
    ``failure`` (the :class:`CheckpointError` of a final checkpoint that could not be written,
    else None)."""


class _Run:
    def __init__(self, cfg, roles, problem, center, channel, metrics, run_dir, out, resume):
        self.cfg, self.problem, self.center, self.channel = cfg, problem, center, channel
        self.metrics, self.run_dir, self.out = metrics, Path(run_dir), out
        self.p = roles.n_workers
        self.start = time.monotonic()
        self.time_offset = resume.wall_time if resume else 0.0
        self.records = list(resume.metrics) if resume else []
        # New checkpoints are numbered above every file already in the folder (a damaged one
        # that resume skipped, or an earlier run's), so pruning never removes the newest.
        for stale in self.run_dir.glob(".checkpoint-*.h5.tmp-*"):  # a crash mid-write left it
            stale.unlink(missing_ok=True)
        existing = [checkpoint_sequence(p) for p in list_checkpoints(run_dir)]
        self.sequence = max([resume.sequence if resume else 0, *existing])
        if existing and resume is None:
            out(
                f"easgd: note: {run_dir} already holds checkpoints of an earlier run; this "
                f"run's are numbered from {self.sequence + 1}"
            )
        self.snapshot = np.empty(center.n, dtype=np.float32)

    def elapsed(self) -> float:
        return self.time_offset + time.monotonic() - self.start

    def evaluate(self) -> dict:
        self.center.read(self.snapshot)  # atomic snapshot; workers keep going meanwhile
        status = self.center.read_status()
        result = self.problem.evaluate(self.snapshot)
        record = {
            "time": round(self.elapsed(), 4),
            "steps": int(status["steps"].sum()),
            "exchanges": int(status["exchanges"].sum()),
            "center_loss": float(result["loss"]),
            "center_error": float(result["error"]),
            "distance": float(np.nanmean(status["distance"])) if self.p else 0.0,
            "worker_loss": float(np.nanmean(status["loss"])) if self.p else 0.0,
            "bytes": int(status["bytes"].sum()),
            "resets": int(status["resets"].sum()),
        }
        self.records.append(record)
        self.metrics.write(record)
        self.out(format_progress(record, getattr(self.problem, "error_is_rate", True)))
        return record

    def checkpoint(self, table, read_center: bool = True) -> Path:
        """Write the next checkpoint; ``read_center`` False reuses the snapshot just evaluated
        (at the end, when no worker moves the center any more)."""
        if read_center:
            self.center.read(self.snapshot)
        x, v = self.channel.states()
        self.sequence += 1
        data = CheckpointData(
            config_toml=self.cfg.to_toml(),
            algorithm=self.cfg.algorithm,
            layout=self.problem.layout,
            center=self.snapshot.copy(),
            worker_counters={
                k: np.asarray(table[k], np.int64) for k in ("steps", "exchanges", "resets")
            },
            worker_x=x,
            worker_v=v,
            worker_rng=self.channel.rng_states(table),
            wall_time=self.elapsed(),
            sequence=self.sequence,
            metrics=self.records,
            trainable_size=getattr(self.problem, "n_trainable", None),
            local_tensors=self.problem.local_state()
            if hasattr(self.problem, "local_state")
            else {},
        )
        path = checkpoint_path(self.run_dir, self.sequence)
        try:
            save_checkpoint(path, data)
        except CheckpointError:
            self.sequence -= 1  # nothing was written: the next try takes the same number
            raise
        try:  # pruning only after a checkpoint is safe: a failed one never costs a good one
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep, report=self.out)
        except OSError as exc:
            _warn(
                f"easgd: warning: an older checkpoint ({exc.filename or self.run_dir}) cannot "
                f"be removed: {os_reason(exc)}"
            )
        return path


def run_master(
    cfg,
    roles,
    problem,
    center,
    channel,
    metrics,
    run_dir,
    out=print,
    resume: CheckpointData | None = None,
    stop_flag=None,
) -> MasterResult:
    """Serve until every worker has finished (or a stop); returns the last metrics record."""
    run = _Run(cfg, roles, problem, center, channel, metrics, run_dir, out, resume)
    stop_flag = stop_flag or (lambda: False)
    interval = cfg.checkpoint.interval
    next_eval = time.monotonic()
    next_checkpoint = time.monotonic() + interval if interval > 0 else float("inf")
    epoch, pending, final, stopping = 0, None, False, False
    while True:
        now = time.monotonic()
        table = channel.table()
        if not stopping and (stop_flag() or table["wants_stop"].any()):
            stopping = True
            channel.stop()
            out("easgd: stop requested (signal): writing a final checkpoint")
        if pending is not None and np.all(table["ack"] == pending):
            if final:
                record = run.evaluate()  # the final center, after every worker's last exchange
                try:
                    path, failure = run.checkpoint(table, read_center=False), None
                except CheckpointError as exc:  # the job fails, after every rank has left
                    path, failure = None, exc
                channel.release()
                if path is not None:
                    out(f"easgd: checkpoint {path}")
                break
            try:
                run.checkpoint(table)
            except CheckpointError as exc:  # training goes on; the next interval tries again
                _warn(f"easgd: warning: {exc}; training goes on, the next try is in {interval:g}s")
            pending = None
        if pending is None:
            if table["finished"].all():
                epoch, pending, final = epoch + 1, epoch + 1, True
                channel.request(epoch)
            elif now >= next_checkpoint:
                epoch, pending = epoch + 1, epoch + 1
                channel.request(epoch)
                next_checkpoint = now + interval
        if now >= next_eval:
            run.evaluate()
            next_eval = now + cfg.eval_interval
        time.sleep(_POLL)
    reached = bool(np.all(table["steps"] >= cfg.steps))
    return MasterResult(
        record,
        stopped=stopping and not reached,
        checkpoint=None if path is None else str(path),
        failure=failure,
    )


def _warn(line: str) -> None:
    sys.stderr.write(line + "\n")  # one write: ranks share the launcher's stderr
    sys.stderr.flush()
