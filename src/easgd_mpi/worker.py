"""The worker loop: local steps, exchanges every τ steps, status, checkpoints, stopping.

:class:`WorkerClock` is a worker's bookkeeping around its steps (status reports, the master's
requests for its state, the stop, the finish), shared by the package's loop (:func:`run_worker`)
and a user's own loop (easgd_mpi.torch, docs/ARCHITECTURE.md §8).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .algorithms import make_algorithm
from .collective import agree_epoch_and_stop
from .data.sampling import worker_rng
from .workerstate import WorkerState

__all__ = ["run_worker", "WorkerClock", "STATUS_PERIOD"]

#: Seconds between a worker's status reports and its looks at the master's control word:
#: often enough for progress lines, checkpoints and stops, rare enough to cost nothing (every
#: exchange, as first written, cost 10 % of the demo's throughput).
STATUS_PERIOD = 0.05
#: Collective rules decide together every this many local steps (rounded to whole rounds).
_AGREE_STEPS = 16
#: Seconds a finished worker sleeps between looks at the master's requests.
_IDLE_POLL = 0.002


class WorkerClock:
    """What a worker does between its steps besides training (docs/ARCHITECTURE.md §5.8).

    ``algo``: the worker's rule; ``rng``: its generator (stored with its state); ``steps``: the
    local steps already done (a resumed worker's count); ``stop_flag()``: true once this
    process got a stop signal; ``on_saved(epoch)``: called right after this worker saved its
    state for a new checkpoint epoch (a user loop sends its own state then).
    """

    def __init__(
        self,
        cfg,
        roles,
        status,
        channel,
        algo,
        rng,
        steps: int = 0,
        stop_flag: Callable[[], bool] | None = None,
        on_saved: Callable[[int], None] | None = None,
    ):
        self.roles, self.status, self.channel, self.algo, self.rng = (
            roles,
            status,
            channel,
            algo,
            rng,
        )
        self.slot = roles.worker_index
        self.steps = steps
        self.loss = float("nan")
        #: Whether the worker left before its budget: a stop signal, or the master's stop.
        self.stopped = False
        self._stop_flag = stop_flag or (lambda: False)
        self._on_saved = on_saved
        # Workers of a collective rule must leave the loop, and copy their states, at the same
        # step, or the others would wait in the next all-reduce forever: they decide together
        # at round boundaries (which fall on the same step everywhere).
        self._agree_every = max(1, -(-_AGREE_STEPS // cfg.tau))  # rounds between decisions
        self._last_status = time.monotonic()

    def after_step(self, steps: int, loss, exchanged: bool) -> bool:
        """Book the local steps done so far (``steps``) and the step's loss (kept where it was
        computed: converting a device scalar every step would make the host wait for the GPU);
        ``exchanged``: whether this step exchanged. Returns whether the worker must stop."""
        self.steps, self.loss = steps, loss
        now = time.monotonic()
        due = now - self._last_status >= STATUS_PERIOD
        if due:
            self.publish(done=False)
            self._last_status = now
        if self.algo.collective:  # on the same round everywhere (all count the same rounds)
            due = exchanged and self.algo.exchanges % self._agree_every == 0
        if due:
            wants_stop = self._stop_flag()
            epoch, stop, _ = self.channel.peek()
            if self.algo.collective:
                epoch, stop = agree_epoch_and_stop(self.roles.workers, epoch, stop or wants_stop)
            self._answer(epoch, wants_stop=wants_stop)
            if stop or wants_stop:
                self.stopped = True
        return self.stopped

    def finish(self) -> dict:
        """Publish ``done``, then keep answering the master (its final checkpoint needs this
        worker's state) until it has asked for the final epoch and got it. Returns this
        worker's final counters."""
        self.algo.finish()  # a center that computes has applied every push of this worker
        self.algo.backend.synchronize()
        self.publish(done=True)
        while True:
            epoch, _, release = self.channel.peek()
            self._answer(epoch, finished=True, wants_stop=self.stopped and self._stop_flag())
            if release:
                break
            time.sleep(_IDLE_POLL)
        algo = self.algo
        return {
            "steps": self.steps,
            "exchanges": algo.exchanges,
            "resets": algo.resets,
            "stopped": self.stopped,
        }

    def publish(self, done: bool) -> None:
        algo = self.algo
        self.status.publish(
            self.slot,
            steps=self.steps,
            exchanges=algo.exchanges,
            loss=float(self.loss),
            distance=algo.distance,
            resets=algo.resets,
            bytes=algo.bytes,
            push_bytes=algo.push_bytes,
            done=1.0 if done else 0.0,
            # A center that computes (zeros for the others): docs/ARCHITECTURE.md §3.11.
            pushes=getattr(algo, "pushes", 0),
            staleness=getattr(algo, "staleness_sum", 0),
            staleness_max=getattr(algo, "staleness_max", 0),
            wait=getattr(algo, "wait_s", 0.0),
        )

    def _answer(self, epoch: int, finished: bool = False, wants_stop: bool = False) -> None:
        saved = self.channel.answer(
            self.slot,
            self.algo,
            self.rng,
            self.steps,
            epoch,
            finished=finished,
            wants_stop=wants_stop,
        )
        if saved and self._on_saved is not None:
            self._on_saved(epoch)


def run_worker(
    cfg,
    roles,
    problem,
    backend,
    center,
    status,
    channel,
    alpha: float,
    direct_mpi: bool = False,
    resume: WorkerState | None = None,
    stop_flag=None,
    inbox=None,
) -> dict:
    """Train this worker's copy up to ``cfg.steps`` local steps (or until told to stop).

    It exchanges with ``center`` (a :class:`~easgd_mpi.center.CenterWindow`), publishes its
    counters on ``status`` (the :class:`~easgd_mpi.status_board.StatusBoard`) and answers the
    master's requests for its state on ``channel`` (its :class:`~easgd_mpi.snapshots.WorkerSide`).
    ``resume``: the worker's saved state (a checkpoint's, workerstate.py) or None for a fresh
    start. ``stop_flag()`` is true once this process got a stop signal. ``inbox``: the servers'
    inboxes of a center that computes (center_inbox.py). Returns this worker's final counters.
    """
    rng = worker_rng(cfg.seed, roles.worker_index) if resume is None else resume.generator()
    algo = make_algorithm(
        cfg,
        problem,
        backend,
        center,
        alpha,
        rng,
        direct_mpi=direct_mpi,
        workers_comm=roles.workers,
        inbox=inbox,
    )
    algo.pull_center()
    first = 0
    if resume is not None:
        first = resume.steps
        algo.restore(resume)
    clock = WorkerClock(cfg, roles, status, channel, algo, rng, steps=first, stop_flag=stop_flag)
    for t in range(first, cfg.steps):
        before = algo.exchanges
        loss = algo.step(t)
        if clock.after_step(t + 1, loss, exchanged=algo.exchanges != before):
            break
    return clock.finish()
