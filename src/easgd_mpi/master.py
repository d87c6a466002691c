"""The master loop: evaluate snapshots of the center, report, checkpoint, end the run (the center's
window itself is a passive RMA target: nothing runs to serve it).

The master never blocks the workers: between its own jobs it only reads the workers' rows in
the RMA windows and sleeps briefly, so on an oversubscribed node it leaves the cores to them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointData
from .comm import MpiTurn
from .config import SYNC_ALGORITHMS
from .errors import CheckpointError
from .metrics import format_progress, progress_fields

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
    def __init__(
        self, cfg, roles, problem, center, status, channel, metrics, folder, resume, active=None
    ):
        self.cfg, self.problem, self.center, self.channel = cfg, problem, center, channel
        #: A center that computes (center_server.ActiveCenter), or None: a passive window.
        self.active = active
        #: The MPI turn shared with the master's center thread (none: nobody to share with).
        server = active.server if active is not None else None
        self.turn = server.turn if server is not None else MpiTurn(threaded=False)
        self.status = status
        self.metrics, self.folder = metrics, folder
        self.p = roles.n_workers
        self.first_worker_rank = roles.size - roles.n_workers
        self.start = time.monotonic()
        self.time_offset = resume.wall_time if resume else 0.0
        self.records = list(resume.metrics) if resume else []
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
        # An atomic snapshot, element by element; workers keep going meanwhile.
        if self.active is None:
            self.center.read(self.snapshot)
        else:  # mvadownpour evaluates its moving average, the others the center
            self.active.read_evaluated(self.snapshot)
        status = self.status.read()
        with self.turn.paused():  # no MPI in the evaluation: the center's thread goes on
            result = self.problem.evaluate(self.snapshot)
        error = result.get("error")
        now = round(self.elapsed(), 4)
        # The rate is measured from the previous record of this start (a resumed run's last
        # record is older than this start: time_offset is its checkpoint's wall time).
        last = self.records[-1] if self.records else None
        previous = (
            (last["time"], last["steps"]) if last and last["time"] > self.time_offset else None
        )
        record = {
            "time": now,
            "steps": int(status["steps"].sum()),
            "exchanges": int(status["exchanges"].sum()),
            "center_loss": float(result["loss"]),
            "center_error": None if error is None else float(error),
            "distance": float(np.nanmean(status["distance"])) if self.p else 0.0,
            "worker_loss": float(np.nanmean(status["loss"])) if self.p else 0.0,
            "bytes": int(status["bytes"].sum()),
            "resets": int(status["resets"].sum()),
            **progress_fields(
                status["steps"], self.cfg.steps, self.first_worker_rank, now, previous
            ),
            # After every older field: older readers and files keep their order.
            "push_bytes": int(status["push_bytes"].sum()),
        }
        if self.active is not None:
            record.update(self._center_metrics(status))
        # A user loop's own numbers (docs/ARCHITECTURE.md §8.3): its evaluation's other keys
        # (center_<key>) and its workers' (worker_<key>), after the standard ones.
        record.update({k: float(v) for k, v in result.items() if k not in ("loss", "error")})
        self.records.append(record)
        self.metrics.write(record)
        _log.info(format_progress(record, getattr(self.problem, "error_is_rate", True)))
        return record

    def _center_metrics(self, status) -> dict:
        """A center that computes: the workers' pushes, their mean and largest staleness
        (pushes the center took between a worker's pull and its push), the seconds workers
        waited for the servers (summed), and the servers' side (ActiveCenter.metrics)."""
        pushes = float(status["pushes"].sum())
        return {
            "staleness": round(float(status["staleness"].sum()) / pushes, 3) if pushes else 0.0,
            "staleness_max": int(status["staleness_max"].max(initial=0)),
            "push_wait_s": round(float(status["wait"].sum()), 4),
            **self.active.metrics(),
        }

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
        states, cut_rows = self.channel.states(cut, age=np.maximum(age, 0.0))
        center_state = {}
        if cut_rows is not None:
            self.snapshot[:] = cut_rows.pop("center")
            center_state = cut_rows
        else:
            if read_center or (self.active is not None and self.active.rule.evaluated != "center"):
                self.center.read(self.snapshot)
            if self.active is not None:
                center_state = self.active.read_rows()
        data = CheckpointData(
            config_toml=self.cfg.to_toml(),
            algorithm=self.cfg.algorithm,
            layout=self.problem.layout,
            center=self.snapshot.copy(),
            states=states,
            wall_time=now,
            metrics=self.records,
            trainable_size=getattr(self.problem, "n_trainable", None),
            local_tensors=self.problem.local_state()
            if hasattr(self.problem, "local_state")
            else {},
            center_state=center_state,
        )
        # The folder numbers it above every file already there and prunes once it is safe.
        with self.turn.paused():
            return self.folder.save_checkpoint(data)


def run_master(
    cfg,
    roles,
    problem,
    center,
    status,
    channel,
    metrics,
    folder,
    resume: CheckpointData | None = None,
    stop_flag=None,
    active=None,
) -> MasterResult:
    """Serve until every worker has finished (or a stop); returns the last metrics record.

    Evaluates snapshots of ``center``, reads the workers' counters on ``status`` (the
    :class:`~easgd_mpi.status_board.StatusBoard`) and their states through ``channel``.
    Waits for the workers' states are bounded by ``checkpoint.state_wait``: past it a periodic
    checkpoint is written with the states at hand, and a stop writes its final checkpoint
    without the workers that did not answer (they are returned as ``abandoned``).
    """
    run = _Run(cfg, roles, problem, center, status, channel, metrics, folder, resume, active)
    stop_flag = stop_flag or (lambda: False)
    interval, wait = cfg.checkpoint.interval, cfg.checkpoint.state_wait
    next_eval = time.monotonic()
    next_checkpoint = time.monotonic() + interval if interval > 0 else float("inf")
    epoch, pending, final, stopping = 0, None, False, False
    requested_at = stop_deadline = float("inf")
    abandoned: list[int] = []
    while True:
        # One MPI caller at a time with the master's center thread (center_server.MpiTurn).
        with run.turn:
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
                ready = answered.all() or (
                    late and (not final or answered[table["finished"]].all())
                )
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
                    except CheckpointError as exc:  # training goes on; the next interval tries
                        _warn(
                            f"easgd: warning: {exc}; training goes on, the next try is in "
                            f"{interval:g}s"
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
