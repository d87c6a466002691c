"""A run's set-up and tear-down on every rank: the one :class:`Session` behind every face.

``train()`` (and so ``easgd train``) is a Session around the package's own loops; a user's own
training loop (easgd_mpi.torch, docs/ARCHITECTURE.md §8) is a Session around theirs. Set-up
(docs/ARCHITECTURE.md §5) comes in two parts, because a user's loop builds its model after the
run has started: :meth:`Session.open_world` (the layout of the world and the roles, the resumed
checkpoint and its config precedence, the agreed checks of config and device, the stop
signals) and :meth:`Session.open_run` once the problem exists (memory, the checkpoint against
the model, the run folder and its lock, the windows: center, status, worker states, each
worker's start state). Tear-down, whatever ended the run (its budget, a signal, a stalled
worker, an error): the end-of-run barrier, the windows freed, the outcome marker, the folder's
lock released, the summary.

Start-up steps that depend on input run on every rank and agree collectively
(:func:`~easgd_mpi.comm.agree_or_fail`), so bad input is the same one-line error everywhere.
"""

from __future__ import annotations

import logging
import signal
import sys
import time

import numpy as np

from .backend import NumpyBackend, select_backend
from .center import CenterWindow, describe_slice, shard_slices
from .center_server import SERVER_POLL, ActiveCenter
from .checkpoint import CheckpointData, check_matches
from .comm import (
    EXIT_STALLED,
    agree_or_fail,
    allreduce_on_device,
    broadcast,
    check_layout,
    end_job,
    gather_to_master,
    keep_progress,
    limit_blas_threads,
    make_roles,
    node_position,
    node_sum,
    rank_and_size,
    receive_object,
    send_object,
    wait_for_all,
    world_comm,
)
from .compress import coded_bytes
from .config import (
    BUILTIN_ALGORITHMS,
    DOWNPOUR_ALGORITHMS,
    LOOP_ALGORITHMS,
    RESIZABLE_ALGORITHMS,
    SYNC_ALGORITHMS,
    Config,
)
from .data.sampling import worker_rng
from .errors import CheckpointError, ConfigError, EasgdError
from .gpu_binding import bind_before_mpi
from .log import console_if_unconfigured
from .metrics import format_error
from .models import make_problem
from .rundir import COMPLETED, PREEMPTED, RunFolder, Start, find_checkpoint
from .snapshots import open_state_channel
from .status_board import StatusBoard
from .workerstate import WorkerState, WorkerStates

__all__ = ["Session", "STOP_SIGNALS"]

_log = logging.getLogger(__name__)

#: Signals that end a run early with a final checkpoint (Slurm sends them before a time limit).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
#: Message tag of the start states the master sends each worker on resume.
_STATE_TAG = 7


class Session:
    """One run on every rank of ``comm`` (default COMM_WORLD); a context manager.

    ``cfg``: the launch's :class:`Config`. ``problem``: a problem object, a factory
    ``f(cfg, xp)`` or None for the built-in problem of ``cfg.model.name``. ``resume``: a
    checkpoint file, a run folder (its newest valid checkpoint), ``"auto"`` (the same for
    ``cfg.run_dir``; a fresh start when it holds none) or a loaded :class:`CheckpointData`
    (read on rank 0). On resume the checkpoint's config is the base and the keys this launch
    states win (:meth:`Config.over_checkpoint`). ``warm_start``: a checkpoint file or run folder
    whose center a fresh run starts from (any number of workers, any rule; a resume found by
    ``resume`` wins). ``own_loop``: the run is a user's own loop (its rules, its states).

    Inside the ``with`` block: :attr:`roles`, :attr:`cfg`, :attr:`problem`, :attr:`backend`,
    :attr:`alpha`, :attr:`center`, :attr:`channel` (this rank's side of the worker-state
    channel), :attr:`run_dir`, :attr:`checkpoint` (the master), :attr:`start_state` (a worker's
    resumed state, or None), :meth:`stop_requested`. :meth:`run` runs the package's own loops;
    after the block, :attr:`summary` is the same dict on every rank.
    """

    def __init__(
        self,
        cfg: Config,
        problem=None,
        comm=None,
        resume=None,
        warm_start=None,
        own_loop: bool = False,
    ):
        self.cfg = cfg
        self._problem_spec = problem
        self._comm = comm
        self._resume = resume
        self._warm_spec = warm_start
        self.own_loop = own_loop
        #: The checkpoint whose center a fresh run starts from (rank 0; None: none).
        self.warm: CheckpointData | None = None
        #: Every worker's state at the start of this segment (rank 0, from open_run on).
        self.start_states: WorkerStates | None = None
        self.summary: dict | None = None
        self.master_result: dict | None = None
        self.served: dict | None = None  # an idle server's CPU use (its loop's measurement)
        self.folder: RunFolder | None = None
        self.checkpoint: CheckpointData | None = None
        self.start_state: WorkerState | None = None
        self._stop = False
        self._previous_handlers: dict = {}
        self._open_windows = False
        self._barrier_done = False
        #: A center that computes (center_server.ActiveCenter) when the rule's does, else None.
        self.active = None

    # ---- set-up -----------------------------------------------------------------------------
    def __enter__(self) -> Session:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None:
            self.close()
        else:
            self.abandon()
        return False

    def abandon(self) -> None:
        """After an error: no collective call (the other ranks may never arrive; run_or_abort
        ends the job). What is this rank's own goes back: the signal handlers, the folder lock."""
        self._restore_signals()
        if self.folder is not None:
            self.folder.release()

    def open(self) -> None:
        """Every rank: the whole set-up (:meth:`open_world`, then :meth:`open_run`)."""
        self.open_world()
        self.open_run()

    def open_world(self) -> None:
        """Every rank: the world, the roles, the config (with a resumed checkpoint's), its
        agreed checks and the backend, the stop signals; nothing that needs the model."""
        console_if_unconfigured()
        # A script's run: bound to its GPU as `easgd train` binds, while MPI has not started.
        bind_before_mpi(self.cfg.servers)
        base = world_comm(self._comm)
        self._resolve_config(base)
        cfg = self.cfg
        # A bad servers value is every rank's same mistake: one line each, agreed before roles.
        agree_or_fail(base, lambda: check_layout(rank_and_size(base)[1], cfg.servers))
        self.roles = roles = make_roles(base, servers=cfg.servers)
        p = roles.n_workers
        limit_blas_threads(roles.world, cfg.threads)

        def setup():
            cfg.validate(workers=p)
            self._check_rule()
            backend, why_cpu, device_id = _choose_backend(cfg, roles)
            return backend, why_cpu, device_id, allreduce_on_device(backend.is_gpu)

        self.backend, self._why_cpu, self.device_id, self.direct_mpi = agree_or_fail(
            roles.world, setup
        )
        self.alpha = cfg.resolve_alpha(p)
        self._install_signals()

    def open_run(self, problem=None) -> None:
        """Every rank, once its problem exists (``problem``: this rank's, else the one given
        to the Session): memory, the checkpoint against the model, the run folder, the
        windows, each worker's start state."""
        cfg, roles, backend = self.cfg, self.roles, self.backend
        p = roles.n_workers
        spec = self._problem_spec if problem is None else problem
        self.problem = agree_or_fail(roles.world, lambda: _build_problem(cfg, spec, backend.xp))
        _check_memory(cfg, roles, self.problem, backend)
        agree_or_fail(roles.world, self._check_resumable)
        self.resuming = self.checkpoint is not None
        self._open_folder()
        devices = gather_to_master(roles.world, (backend.name, self._why_cpu, self.device_id))
        initial = self._initial_center()
        if roles.is_master:
            _announce(
                cfg, p, self.alpha, devices[roles.servers :], self.run_dir, self.problem, self
            )
            if self.checkpoint is not None:
                _announce_resume(cfg, self.checkpoint, p)
            elif self.warm is not None:
                _announce_warm_start(self.warm)
            self.start_states = self._initial_states(initial)
        self._open_windows_(initial)
        self.start_state = self._scatter_start_states()
        self._start = time.monotonic()

    def _check_rule(self) -> None:
        """Each face runs its own rules (docs/ARCHITECTURE.md §8)."""
        cfg = self.cfg
        if self.own_loop and cfg.algorithm in DOWNPOUR_ALGORITHMS:
            raise ConfigError(
                f"config: algorithm = '{cfg.algorithm}' does not run in your own loop: its push "
                f"is the sum of the package's own SGD steps (-lr * sum of gradients), which "
                f"your optimizer does not make; use 'async-diloco' (each worker pushes x minus "
                f"the center it pulled, whatever optimizer took the steps, and the center "
                f"takes an outer step) or 'diloco'"
            )
        if self.own_loop and cfg.algorithm not in LOOP_ALGORITHMS:
            raise ConfigError(
                f"config: algorithm = '{cfg.algorithm}' does not run in your own loop: use "
                f"{', '.join(LOOP_ALGORITHMS)} (EAMSGD: 'easgd' around torch.optim.SGD with "
                f"momentum and nesterov=True)"
            )
        if self.own_loop and cfg.momentum != 0:
            raise ConfigError(
                f"config: momentum = {cfg.momentum} is your optimizer's in your own loop: set "
                f"it there (torch.optim.SGD(momentum=...)) and momentum = 0 here"
            )
        if not self.own_loop and cfg.algorithm not in BUILTIN_ALGORITHMS:
            raise ConfigError(
                f"config: algorithm = '{cfg.algorithm}' runs in your own PyTorch loop only "
                f"(easgd_mpi.torch, examples/own_loop.py); easgd train runs "
                f"{', '.join(BUILTIN_ALGORITHMS)}"
            )

    def _resolve_config(self, base) -> None:
        """Find the checkpoint to resume (rank 0 reads it) and apply the config precedence;
        without one, the checkpoint a fresh run starts from (``warm_start``)."""
        rank, size = rank_and_size(base)
        resume, warm = self._resume, self._warm_spec

        def find():
            # A world of one rank is refused next (check_layout): no checkpoint is read for it.
            if rank != 0 or size < 2:
                return None, None
            found = None
            if isinstance(resume, CheckpointData):
                found = resume
            elif resume is not None:
                hit = find_checkpoint(resume, self.cfg.run_dir)
                found = None if hit is None else hit[1]
            if found is not None or warm is None:
                return found, None
            if isinstance(warm, CheckpointData):
                return None, warm
            hit = find_checkpoint(warm, "")
            return None, None if hit is None else hit[1]

        self.checkpoint, self.warm = agree_or_fail(base, find)
        base_toml = broadcast(base, self.checkpoint.config_toml if self.checkpoint else None)
        if base_toml is not None:
            self.cfg = agree_or_fail(base, lambda: self.cfg.over_checkpoint(base_toml))

    def _check_resumable(self) -> None:
        if not self.roles.is_master:
            return
        if self.warm is not None:  # any p, any rule: only the model must match
            check_matches(self.warm, self.problem.layout, "(warm start)")
        data = self.checkpoint
        if data is None:
            return
        cfg, p = self.cfg, self.roles.n_workers
        check_matches(data, self.problem.layout, f"#{data.sequence}")
        if data.workers != p and cfg.algorithm not in RESIZABLE_ALGORITHMS:
            # The servers are free to change (the file holds the whole center): only p must match.
            raise CheckpointError(
                f"checkpoint #{data.sequence} was written by {data.workers} workers, this launch "
                f"has {p}: launch with {data.workers + cfg.servers} ranks to resume it with "
                f"servers = {cfg.servers} (ranks = {data.workers} workers + servers); "
                f"algorithm '{cfg.algorithm}' resumes exactly, so the number of workers stays"
            )
        if data.algorithm != cfg.algorithm:
            raise CheckpointError(
                f"checkpoint #{data.sequence} is from algorithm "
                f"'{data.algorithm}', the config says '{cfg.algorithm}'"
            )

    def _open_folder(self) -> None:
        roles = self.roles

        def open_folder():
            if not roles.is_master:
                return None
            start = Start.of(self._resume, self.checkpoint)
            folder = RunFolder.open(self.cfg, start, self.checkpoint)
            try:
                folder.write_config(self.cfg.to_toml())
            except BaseException:
                folder.release()
                raise
            self.folder = folder
            return str(folder.path)

        self.run_dir = broadcast(roles.world, agree_or_fail(roles.world, open_folder))

    def _initial_center(self) -> np.ndarray | None:
        if not self.roles.is_master:
            return None
        initial = np.zeros(self.problem.layout.size, dtype=np.float32)
        if self.checkpoint is not None:
            initial[:] = self.checkpoint.center
        elif self.warm is not None:
            initial[:] = self.warm.center
        else:
            self.problem.init_params(initial, self.cfg.seed)
        return initial

    def _open_windows_(self, initial) -> None:
        cfg, roles, prob, data = self.cfg, self.roles, self.problem, self.checkpoint
        p = roles.n_workers
        # Collective, in this order on every rank: center, status board, worker-state channel.
        self.center = CenterWindow(
            roles.world,
            prob.layout.size,
            initial=initial,
            lock_mode=cfg.lock_mode,
            chunk=cfg.resolve_chunk(self.backend.is_gpu),
            # Pinned host chunks on a GPU: the one-sided operations never see device memory.
            alloc_chunk=self.backend.host_empty,
            servers=roles.servers,
            n_workers=p,
        )
        if cfg.is_active:  # the servers apply the rule: inboxes, counters, center-side rows
            self.active = ActiveCenter(
                cfg,
                self.center,
                p,
                int(getattr(prob, "n_trainable", prob.layout.size)),
                initial_rows=data.center_state if data is not None else None,
            )
        self.status = StatusBoard(
            roles.world, p, initial=None if data is None else dict(self.start_states.counters)
        )
        if roles.is_master and roles.servers > 1:
            _log.info(
                f"easgd: the center on {roles.servers} servers: "
                + "; ".join(
                    f"rank {s} {describe_slice(*sl)}" for s, sl in enumerate(self.center.slices)
                )
            )
        side = "master" if roles.is_master else "none" if roles.is_server else "worker"
        # Where the center of a cut is known exactly: the synchronous rules' common replica,
        # or the window of a single worker (nobody else moves it), with the center-side rows.
        cut = cfg.algorithm in SYNC_ALGORITHMS or p == 1
        self.channel = open_state_channel(
            roles.world,
            side,
            prob.layout.size,
            p,
            row_names=cfg.state_rows if cfg.checkpoint.worker_states else (),
            cut_center=cut,
            initial=self.start_states,
            initial_center=initial,
            center_rows=cfg.center_rows if cut else (),
            initial_center_rows=self._initial_center_rows(initial) if roles.is_master else None,
        )
        self._open_windows = True

    def _initial_states(self, center: np.ndarray) -> WorkerStates:
        """The state every worker starts this segment from, as the master stores it before any
        worker answers (snapshots.py): a worker that never answers is saved as it started.
        A resume with more workers than the checkpoint's (a rule of RESIZABLE_ALGORITHMS)
        starts the new ones fresh at the center; one with fewer drops the last ones."""
        p, data = self.roles.n_workers, self.checkpoint
        n = self.problem.layout.size
        fresh = self._fresh_states(center)
        if data is None:
            return fresh
        states = data.states if data.workers == p else data.states.resized(fresh)
        rows = dict(states.rows)
        rows.setdefault("x", np.broadcast_to(center, (p, n)))
        if self.cfg.keeps_residual:  # compression newly on: nothing is pending yet
            rows.setdefault("residual", np.zeros((p, n), np.float32))
        return WorkerStates(
            counters=states.counters,
            rng_words=states.rng_words,
            rows=rows,
            age=states.age,
            user=states.user,
        )

    def _fresh_states(self, center: np.ndarray) -> WorkerStates:
        """p workers at step 0, at the center, each with its own generator."""
        cfg, p = self.cfg, self.roles.n_workers
        n = self.problem.layout.size
        rows = {"x": center}
        m = int(getattr(self.problem, "n_trainable", n))
        for name in cfg.state_rows[1:]:
            row = np.zeros(n, np.float32)
            if name == "pending" and cfg.algorithm == "async-diloco":
                row[:] = center  # the center its first round starts from
            elif name == "pending":  # nothing pending; the buffers' base is the center's
                row[m:] = center[m:]
            rows[name] = row
        return WorkerStates.starting(p, [worker_rng(cfg.seed, i) for i in range(p)], rows)

    def _initial_center_rows(self, center: np.ndarray) -> dict[str, np.ndarray]:
        """The center-side rows this segment starts from (rank 0): the checkpoint's, else the
        rule's fresh ones (zeros; a moving average starts at the center)."""
        if self.checkpoint is not None:
            return dict(self.checkpoint.center_state)
        rows = {name: np.zeros_like(center) for name in self.cfg.center_rows}
        if "average" in rows:
            rows["average"][:] = center
        return rows

    def _scatter_start_states(self) -> WorkerState | None:
        """On resume, rank 0 sends each worker (world rank servers + i) its saved state."""
        roles = self.roles
        if not broadcast(roles.world, self.resuming):
            return None
        if roles.is_master:
            # A synchronous rule keeps its center-side rows on every worker (diloco's outer
            # momentum): each worker gets them with its state. Servers keep the active ones.
            replicated = {} if self.cfg.is_active else dict(self.checkpoint.center_state)
            for i in range(roles.n_workers):
                state = self.start_states.of(i)
                state.center = replicated
                send_object(roles.world, state, dest=roles.servers + i, tag=_STATE_TAG)
            return None
        if roles.is_server:
            return None
        return receive_object(roles.world, source=0, tag=_STATE_TAG)

    # ---- signals ----------------------------------------------------------------------------
    def _install_signals(self) -> None:
        """SIGTERM / SIGUSR1 set a flag the loops look at; the previous handlers come back at
        the end."""

        def handler(signum, frame):
            self._stop = True

        try:
            for sig in STOP_SIGNALS:
                self._previous_handlers[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: signals stay with whoever owns them
            self._restore_signals()

    def _restore_signals(self) -> None:
        for sig, old in self._previous_handlers.items():
            signal.signal(sig, old)
        self._previous_handlers.clear()

    def stop_requested(self) -> bool:
        """Whether this process got a stop signal (SIGTERM or SIGUSR1)."""
        return self._stop

    # ---- the package's own loops -----------------------------------------------------------
    def run(self) -> None:
        """Serve, master or train, by this rank's role, until the run ends."""
        from .worker import run_worker  # noqa: PLC0415

        roles = self.roles
        if roles.is_server and not roles.is_master:
            self.serve_slice()
        elif roles.is_master:
            self.serve_center()
        else:
            run_worker(
                self.cfg,
                roles,
                self.problem,
                self.backend,
                self.center,
                self.status,
                self.channel,
                self.alpha,
                direct_mpi=self.direct_mpi,
                resume=self.start_state,
                stop_flag=self.stop_requested,
                inbox=self.active.inbox if self.active is not None else None,
            )

    def serve_slice(self) -> None:
        """A server other than the master. A passive center: nothing to compute here, keep MPI
        progress going for this slice until every rank has joined the end-of-run barrier (the
        loop is that barrier). A center that computes: apply the pushes between the tests."""
        server = self.active.server if self.active is not None else None
        if server is None:
            self.served = keep_progress(self.roles.world)
        else:  # polled at the center's pace, not the barrier's
            self.served = keep_progress(self.roles.world, poll=SERVER_POLL, work=server.poll)
        self._barrier_done = True

    def serve_center(self, channel=None) -> None:
        """The master: the master loop (master.py) until the run ends; ``channel``: the
        worker-state channel's master side to use (default :attr:`channel`)."""
        from .master import run_master  # noqa: PLC0415

        server = self.active.server if self.active is not None else None
        metrics = self.folder.open_metrics()
        if server is not None:  # the master's slice, in a thread: evaluations take long
            server.start_thread()
        try:
            self.master_result = run_master(
                self.cfg,
                self.roles,
                self.problem,
                self.center,
                self.status,
                self.channel if channel is None else channel,
                metrics,
                self.folder,
                resume=self.checkpoint,
                stop_flag=self.stop_requested,
                active=self.active,
            )
        finally:
            metrics.close()
            if server is not None:
                server.stop_thread()
        if self.master_result["abandoned"]:
            self._end_stalled()

    def _end_stalled(self) -> None:
        """The master after a stop that some worker never answered: the final checkpoint holds
        that worker's last saved state; mark the folder, let it go, and end every rank (the
        stalled one would never reach the end of the run)."""
        final = self.master_result
        ranks = ", ".join(str(r) for r in final["abandoned"])
        if final.get("failure") is None:
            try:
                self.folder.mark(PREEMPTED)
            except EasgdError as exc:
                _log.warning(f"easgd: warning: {exc}")
        self.folder.release()
        outcome = (
            f"the final checkpoint {final['checkpoint']} holds their last saved states"
            if final.get("checkpoint")
            else f"the final checkpoint failed: {final['failure']}"
        )
        _log.info(
            f"easgd: worker rank(s) {ranks} did not answer the stop within "
            f"{self.cfg.checkpoint.state_wait:g}s (checkpoint.state_wait): {outcome}; ending "
            f"the job (exit {EXIT_STALLED})"
        )
        end_job(EXIT_STALLED)

    # ---- tear-down --------------------------------------------------------------------------
    def close(self) -> dict:
        """Collective: end the run on every rank; returns the summary (also :attr:`summary`)."""
        roles = self.roles
        if not self._barrier_done:
            wait_for_all(roles.world)
            self._barrier_done = True
        self._close_windows()
        self._restore_signals()

        def finish():
            # The outcome on disk (rank 0). A final checkpoint or marker that cannot be written
            # fails the job on every rank, with no marker; the folder's lock goes either way.
            if not roles.is_master:
                return None
            final = self.master_result or {}
            try:
                failure = final.pop("failure", None)
                if failure is not None:
                    raise failure
                stopped = bool(final.pop("stopped", self._stop))
                self.folder.mark(PREEMPTED if stopped else COMPLETED)
                return stopped
            finally:
                self.folder.release()

        try:
            stopped = agree_or_fail(roles.world, finish)
        except EasgdError:
            roles.free()
            raise
        # How much of a core each idle server used (a sleeping poll loop should use next to none).
        served = gather_to_master(roles.world, self.served)
        summary = None
        if roles.is_master:
            summary = self._summary(stopped, [x for x in served if x is not None])
        self.summary = broadcast(roles.world, summary)
        roles.free()
        return self.summary

    def close_together(self) -> None:
        """Collective, after an error that every rank has once the windows are open (a user
        loop's agreed restore, easgd_mpi.torch): the windows freed, the folder's lock released,
        no marker (the run did not start)."""
        self._close_windows()
        self.abandon()
        self.roles.free()

    def _close_windows(self) -> None:
        """Collective: the worker-state channel, the status board, a center that computes's
        inboxes and the center freed."""
        if self._open_windows:
            self.channel.close()
            self.status.close()
            if self.active is not None:
                self.active.close()
            self.center.close()
            self._open_windows = False

    def _summary(self, stopped: bool, server_cpu: list[dict]) -> dict:
        cfg, p = self.cfg, self.roles.n_workers
        final = self.master_result or {}
        summary = {
            "run_dir": str(self.run_dir),
            "algorithm": cfg.algorithm,
            "workers": p,
            "servers": self.roles.servers,
            "server_cpu": server_cpu,
            "alpha": self.alpha,
            "wall_time": round(time.monotonic() - self._start, 3),
            "stopped": stopped,
            "resumed": self.resuming,
            **final,
        }
        if "steps" in summary:
            verb = "stopped early" if stopped else "done"
            is_rate = getattr(self.problem, "error_is_rate", True)
            loss = summary["center_loss"]
            if loss == loss:
                result = (
                    f"center test error {format_error(summary['center_error'], is_rate)}, "
                    f"loss {loss:.4f}"
                )
            else:  # a user loop that does not evaluate the center
                result = f"workers' loss {summary['worker_loss']:.4f}"
            _log.info(
                f"{verb}: {cfg.algorithm} with {p} workers, {summary['steps']:,d} worker steps, "
                f"{summary['exchanges']:,d} exchanges in {summary['wall_time']:.1f}s; "
                f"{result}{_servers_text(server_cpu)}; run folder {self.run_dir}"
            )
        return summary


# ---- start-up helpers --------------------------------------------------------------------------


def _check_memory(cfg, roles, prob, backend) -> None:
    """Refuse, before the model-sized buffers exist, a run whose state would not fit.

    Host memory is shared by the ranks of a node: their needs are summed there. A GPU worker's
    vectors live on its device, so only its staging buffers count against the host.
    """
    from .data.images import available_memory_bytes, human_bytes  # noqa: PLC0415

    n_bytes = 4 * prob.layout.size
    p = roles.n_workers
    if roles.is_server:
        # A server's window holds its slice only (cut as CenterWindow cuts it, near enough).
        lo, hi = shard_slices(prob.layout.size, roles.servers, cfg.resolve_chunk(False))[roles.rank]
        need = 4 * (hi - lo)
        if cfg.is_active:  # inbox, its take buffers, the private slice, the rows twice
            need += 4 * (hi - lo) * (4 + 2 * len(cfg.center_rows))
            if cfg.compress != "none":  # a coded slot per worker: 1 byte an element + scales
                need += p * coded_bytes(hi - lo, cfg.compress)
        if roles.is_master:
            # The state window holds two halves of every worker's rows (snapshots.py) and two
            # of the cut's center; a checkpoint copies one half of each.
            rows = len(cfg.state_rows) * p if cfg.checkpoint.worker_states else 0
            cut = 2 * (1 + len(cfg.center_rows))
            need += n_bytes * (2 + 3 * rows + cut)  # snapshot, copy, states, cut center
    else:
        # x, g, v, y + scratch (+ the residual of compressed pushes) on the host; a GPU
        # worker's host side is its pinned chunks.
        rows = 6 + int(cfg.keeps_residual)
        need = 4 * 4 * cfg.resolve_chunk(True) if backend.is_gpu else n_bytes * rows
    node_need, ranks = node_sum(roles.world, need)

    def check():
        have = available_memory_bytes()
        if node_need > have:
            raise ConfigError(
                f"the model has {prob.layout.size:,d} parameters: the {ranks} ranks on this node "
                f"need about {human_bytes(node_need)} for it (rank 0 keeps "
                f"{'every worker state' if cfg.checkpoint.worker_states else 'the center'}), "
                f"but only {human_bytes(have)} is available; use a smaller model, fewer ranks "
                f"per node, or checkpoint.worker_states = false"
            )

    agree_or_fail(roles.world, check)


def _choose_backend(cfg, roles):
    """Workers use a GPU when one is usable; the servers (the master evaluates) use the host."""
    if roles.is_server:
        return NumpyBackend(), "", None
    if cfg.device == "off":
        return NumpyBackend(), "device = off", None
    from .gpu_binding import bound_gpu  # noqa: PLC0415

    # The index among the workers on this node picks the GPU: the servers, which hold none,
    # do not shift the numbering, whatever the launcher's local rank says. (Collective over
    # the workers: every worker takes part, bound or not.)
    local_worker = node_position(roles.workers)[0]
    bound = bound_gpu()
    if bound is not None:
        # Bound before MPI started (gpu_binding: the same numbering): CUDA_VISIBLE_DEVICES holds
        # this worker's GPU alone, device 0 in here. The start-up line names the node's GPU.
        backend, why = select_backend(prefer_gpu=True, device_id=0, mode=cfg.device)
        label = int(bound) if bound.isdigit() else bound
        return backend, why, label if getattr(backend, "is_gpu", False) else None
    backend, why = select_backend(prefer_gpu=True, device_id=local_worker, mode=cfg.device)
    return backend, why, getattr(backend, "device_id", None)


def _build_problem(cfg, problem, xp):
    if problem is None:
        return make_problem(cfg, xp=xp)
    # A class or a factory function builds one per rank with that rank's array module.
    if isinstance(problem, type) or (callable(problem) and not hasattr(problem, "loss_and_grad")):
        return problem(cfg, xp)
    return problem


def _servers_text(served: list[dict]) -> str:
    """What the servers other than the master cost: the most CPU any of them used."""
    if not served:
        return ""
    busiest = max(x["cpu_s"] / max(x["wall_s"], 1e-9) for x in served)
    return f"; {len(served) + 1} servers, the idle ones at most {busiest:.1%} of a core"


def _announce(cfg, p, alpha, devices, run_dir, prob, session) -> None:
    kinds: dict[str, int] = {}
    for name, why, dev in devices:
        if name == "numpy":
            label = f"NumPy, no GPU: {why}" if why else "NumPy"
        else:
            label = f"GPU {dev}" if dev is not None else "GPU"
        kinds[label] = kinds.get(label, 0) + 1
    where = "; ".join(f"{n} on {k}" for k, n in kinds.items())
    coded = ""
    if cfg.compress != "none":  # docs/ARCHITECTURE.md §2.16: what the codes save, and where
        feedback = "with" if cfg.error_feedback else "WITHOUT"
        coded = f", pushes coded in {cfg.compress} {feedback} error feedback"
    # In a user's own loop the optimizer (and its learning rate) is the user's.
    lr = "your optimizer" if session.own_loop else f"lr = {cfg.lr:g}"
    _log.info(
        f"easgd: {cfg.algorithm}, {p} workers ({where}), tau = {cfg.tau}, "
        f"alpha = {alpha:.4g} (beta = {alpha * p:.3g}), {lr}, "
        f"{prob.layout.size:,d} parameters, {cfg.steps:,d} steps per worker{coded}; "
        f"run folder {run_dir}"
    )


def _announce_resume(cfg, checkpoint, p) -> None:
    changes = cfg.changes_from(checkpoint.config_toml)
    resized = ""
    if checkpoint.workers != p:
        resized = (
            f"{checkpoint.workers} workers then, {p} now ("
            + (
                f"workers {checkpoint.workers}..{p - 1} start at the center"
                if p > checkpoint.workers
                else f"the states of workers {p}..{checkpoint.workers - 1} are dropped"
            )
            + "); "
        )
    _log.info(
        f"easgd: resuming from checkpoint #{checkpoint.sequence}: "
        f"{checkpoint.total_steps:,d} worker steps, {checkpoint.wall_time:.1f}s done; {resized}"
        + ("config changes: " + ", ".join(changes) if changes else "config as the checkpoint's")
    )
    sys.stdout.flush()


def _announce_warm_start(checkpoint) -> None:
    _log.info(
        f"easgd: starting from the center of checkpoint #{checkpoint.sequence} (warm start: "
        f"{checkpoint.algorithm}, {checkpoint.workers} workers, "
        f"{checkpoint.total_steps:,d} worker steps); a fresh run otherwise"
    )
