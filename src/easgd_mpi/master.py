"""The master loop: serve the center, evaluate snapshots, report, checkpoint, end the run.

The master never blocks the workers: between its own jobs it only reads the workers' rows in
the RMA windows and sleeps briefly, so on an oversubscribed node it leaves the cores to them.
"""

from __future__ import annotations

import logging
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
from .config import SYNC_ALGORITHMS
from .errors import CheckpointError, os_reason
from .metrics import format_progress

__all__ = ["run_master", "MasterResult"]

_log = logging.getLogger(__name__)

#: Seconds the idle master sleeps between polls.
_POLL = 0.002


class MasterResult(dict):
    """The last metrics record plus ``stopped`` (ended by a signal before the budget),
    ``failure`` (the :class:`CheckpointError` of a final checkpoint that could not be written,
    else None) and ``abandoned`` (world ranks of workers that never answered the stop: the
    final checkpoint holds their last saved state and the job must be aborted, since they
    will not reach the end)."""


class _Run:
    def __init__(self, cfg, roles, problem, center, status, channel, metrics, run_dir, resume):
        self.cfg, self.problem, self.center, self.channel = cfg, problem, center, channel
        self.status = status
        self.metrics, self.run_dir = metrics, Path(run_dir)
        self.p = roles.n_workers
        self.first_worker_rank = roles.size - roles.n_workers
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
            _log.info(
                f"easgd: note: {run_dir} already holds checkpoints of an earlier run; this "
                f"run's are numbered from {self.sequence + 1}"
            )
        self.snapshot = np.empty(center.n, dtype=np.float32)
        # When the master first saw each (worker, epoch) state: its age goes into checkpoints.
        # Epoch 0 is the state a worker starts from (this segment's start, or the resumed one).
        # (A resume with more workers than the checkpoint's: the new ones start now.)
        start_age = resume.states.age if resume is not None else None
        self.seen = {
            (i, 0): self.elapsed()
            - (0.0 if start_age is None or i >= len(start_age) else float(start_age[i]))
            for i in range(self.p)
        }
        self.warned: set[int] = set()

    def elapsed(self) -> float:
        return self.time_offset + time.monotonic() - self.start

    def rank_of(self, slot: int) -> int:
        return self.first_worker_rank + slot

    def note_answers(self, table) -> None:
        now = self.elapsed()
        for i, ack in enumerate(table["ack"]):
            self.seen.setdefault((i, int(ack)), now)

    def warn_laggards(self, late: np.ndarray, waited: float) -> None:
        """One warning per worker that has not answered within the wait."""
        for i in np.flatnonzero(late):
            if int(i) in self.warned:
                continue
            self.warned.add(int(i))
            _warn(
                f"easgd: warning: worker rank {self.rank_of(int(i))} has not answered the "
                f"master for {waited:.1f}s (stopped, hung GPU or frozen node?): checkpoints "
                f"keep its last saved state and record its age"
                + (
                    " (the workers of a synchronous rule wait for each other: one stalled "
                    "worker holds them all)"
                    if self.cfg.algorithm in SYNC_ALGORITHMS
                    else ""
                )
            )

    def evaluate(self) -> dict:
        self.center.read(self.snapshot)  # atomic snapshot; workers keep going meanwhile
        status = self.status.read()
        result = self.problem.evaluate(self.snapshot)
        error = result.get("error")
        record = {
            "time": round(self.elapsed(), 4),
            "steps": int(status["steps"].sum()),
            "exchanges": int(status["exchanges"].sum()),
            "center_loss": float(result["loss"]),
            "center_error": None if error is None else float(error),
            "distance": float(np.nanmean(status["distance"])) if self.p else 0.0,
            "worker_loss": float(np.nanmean(status["loss"])) if self.p else 0.0,
            "bytes": int(status["bytes"].sum()),
            "resets": int(status["resets"].sum()),
        }
        # A user loop's own numbers (docs/ARCHITECTURE.md §8.3): its evaluation's other keys
        # (center_<key>) and its workers' (worker_<key>), after the standard ones.
        record.update({k: float(v) for k, v in result.items() if k not in ("loss", "error")})
        self.records.append(record)
        self.metrics.write(record)
        _log.info(format_progress(record, getattr(self.problem, "error_is_rate", True)))
        return record

    def checkpoint(self, table, epoch: int, read_center: bool = True) -> Path:
        """Write the next checkpoint from the states at hand for ``epoch``.

        The synchronous rules take one common round (each worker's half that answered the
        oldest epoch still held by all); the asynchronous ones each worker's latest state.
        Where the first worker saved the center of its cut, that is the center stored, so
        center, states, counters and generators are one consistent cut. Otherwise the window
        is read now (``read_center`` False reuses the snapshot just evaluated: at the end, when
        no worker moves the center any more).
        """
        common = int(table["ack"].min()) if self.cfg.algorithm in SYNC_ALGORITHMS else None
        cut = self.channel.cut(table, common)
        now = self.elapsed()
        age = np.array([now - self.seen.get((i, int(a)), now) for i, a in enumerate(cut["ack"])])
        states, cut_center = self.channel.states(cut, age=np.maximum(age, 0.0))
        if cut_center is not None:
            self.snapshot[:] = cut_center
        elif read_center:
            self.center.read(self.snapshot)
        self.sequence += 1
        data = CheckpointData(
            config_toml=self.cfg.to_toml(),
            algorithm=self.cfg.algorithm,
            layout=self.problem.layout,
            center=self.snapshot.copy(),
            states=states,
            wall_time=now,
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
            prune_checkpoints(self.run_dir, self.cfg.checkpoint.keep, report=_log.info)
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
    status,
    channel,
    metrics,
    run_dir,
    resume: CheckpointData | None = None,
    stop_flag=None,
) -> MasterResult:
    """Serve until every worker has finished (or a stop); returns the last metrics record.

    Evaluates snapshots of ``center``, reads the workers' counters on ``status`` (the
    :class:`~easgd_mpi.status_board.StatusBoard`) and their states through ``channel``.
    Waits for the workers' states are bounded by ``checkpoint.state_wait``: past it a periodic
    checkpoint is written with the states at hand, and a stop writes its final checkpoint
    without the workers that did not answer (they are returned as ``abandoned``).
    """
    run = _Run(cfg, roles, problem, center, status, channel, metrics, run_dir, resume)
    stop_flag = stop_flag or (lambda: False)
    interval, wait = cfg.checkpoint.interval, cfg.checkpoint.state_wait
    next_eval = time.monotonic()
    next_checkpoint = time.monotonic() + interval if interval > 0 else float("inf")
    epoch, pending, final, stopping = 0, None, False, False
    requested_at = stop_deadline = float("inf")
    abandoned: list[int] = []
    while True:
        now = time.monotonic()
        table = channel.table()
        run.note_answers(table)
        if not stopping and (stop_flag() or table["wants_stop"].any()):
            stopping = True
            stop_deadline = now + wait
            channel.stop()
            _log.info("easgd: stop requested (signal): writing a final checkpoint")
            if not final:  # the final checkpoint replaces a periodic one still waiting
                pending = None
        if pending is not None:
            answered = table["ack"] == pending
            late = now - requested_at > wait
            # The final checkpoint of a stop goes ahead once the wait is over with the workers
            # that finished; a stalled one (not finished) keeps its last saved state.
            ready = answered.all() or (late and (not final or answered[table["finished"]].all()))
            if ready and not answered.all():
                run.warn_laggards(~answered, now - requested_at)
            if ready and final:
                record = run.evaluate()  # the final center, after every worker's last exchange
                try:
                    path, failure = run.checkpoint(table, pending, read_center=False), None
                except CheckpointError as exc:  # the job fails, after every rank has left
                    path, failure = None, exc
                abandoned = [run.rank_of(int(i)) for i in np.flatnonzero(~table["finished"])]
                channel.release()
                if path is not None:
                    _log.info(f"easgd: checkpoint {path}")
                break
            if ready:
                try:
                    run.checkpoint(table, pending)
                except CheckpointError as exc:  # training goes on; the next interval tries again
                    _warn(
                        f"easgd: warning: {exc}; training goes on, the next try is in {interval:g}s"
                    )
                pending = None
        if pending is None:
            if table["finished"].all() or (stopping and now >= stop_deadline):
                if stopping and not table["finished"].all():
                    run.warn_laggards(~table["finished"], now - stop_deadline + wait)
                epoch, pending, final = epoch + 1, epoch + 1, True
                channel.request(epoch)
                # Workers that finished answer within a poll; the stop's wait is already spent.
                requested_at = now - (wait if stopping and now >= stop_deadline else 0.0)
            elif now >= next_checkpoint:
                epoch, pending = epoch + 1, epoch + 1
                channel.request(epoch)
                requested_at = now
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
        abandoned=abandoned,
    )


def _warn(line: str) -> None:
    _log.warning(line)
