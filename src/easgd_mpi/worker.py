"""The worker loop: local steps, exchanges every τ steps, status, checkpoints, stopping."""

from __future__ import annotations

import time

from .algorithms import make_algorithm
from .collective import agree_epoch_and_stop
from .data.sampling import worker_rng
from .workerstate import WorkerState

__all__ = ["run_worker"]

#: Seconds between a worker's status reports and its looks at the master's control word:
#: often enough for progress lines, checkpoints and stops, rare enough to cost nothing (every
#: exchange, as first written, cost 10 % of the demo's throughput).
_STATUS_PERIOD = 0.05
#: Collective rules decide together every this many local steps (rounded to whole rounds).
_AGREE_STEPS = 16
#: Seconds a finished worker sleeps between looks at the master's requests.
_IDLE_POLL = 0.002


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
    slot = roles.worker_index
    rng = worker_rng(cfg.seed, slot) if resume is None else resume.generator()
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

    stop_flag = stop_flag or (lambda: False)
    # Workers of a collective rule must leave the loop, and copy their states, at the same
    # step, or the others would wait in the next all-reduce forever: they decide together at
    # round boundaries (which fall on the same step everywhere).
    collective = algo.collective
    agree_every = max(1, -(-_AGREE_STEPS // cfg.tau))  # rounds between decisions
    loss = float("nan")
    last_status = time.monotonic()
    steps = first
    stopped = False
    for t in range(first, cfg.steps):
        before = algo.exchanges
        loss = algo.step(t)
        steps = t + 1
        now = time.monotonic()
        due = now - last_status >= _STATUS_PERIOD
        if due:
            _publish(status, slot, algo, steps, loss, done=False)
            last_status = now
        if collective:  # on the same round everywhere (all workers count the same rounds)
            due = algo.exchanges != before and algo.exchanges % agree_every == 0
        if due:
            wants_stop = stop_flag()
            epoch, stop, _ = channel.peek()
            if collective:
                epoch, stop = agree_epoch_and_stop(roles.workers, epoch, stop or wants_stop)
            channel.answer(slot, algo, rng, steps, epoch, wants_stop=wants_stop)
            if stop or wants_stop:
                stopped = True
                break
    algo.finish()  # a center that computes has applied every push of this worker
    backend.synchronize()
    _publish(status, slot, algo, steps, loss, done=True)
    # Finished: keep answering the master (its final checkpoint needs this worker's state)
    # until it has asked for the final epoch and got it.
    while not channel.answer_if_asked(
        slot, algo, rng, steps, finished=True, wants_stop=stopped and stop_flag()
    )[1]:
        time.sleep(_IDLE_POLL)
    return {"steps": steps, "exchanges": algo.exchanges, "resets": algo.resets, "stopped": stopped}


def _publish(status, slot, algo, steps, loss, done):
    # The loss stays where the model computed it (a 0-d device array on a GPU) until here:
    # converting it every step would make the host wait for the GPU on every step.
    status.publish(
        slot,
        steps=steps,
        exchanges=algo.exchanges,
        loss=float(loss),
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
