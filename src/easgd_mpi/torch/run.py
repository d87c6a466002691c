"""``et.init()`` and :class:`Run`: a user's own PyTorch training loop as a run of easgd-mpi
(docs/ARCHITECTURE.md §8).

Every rank of the job runs the user's script. :func:`init` starts the run's
:class:`~easgd_mpi.session.Session` (the world, the roles, the config and a resumed
checkpoint's, the device, the stop signals). The model does not exist yet: the rest of the
set-up (the run folder, the windows, each worker's start state) comes when the workers bind
their model (``et.ElasticAveraging(model, optimizer, run)``) while the serving ranks enter
:meth:`Run.serve`: one collective *binding*, whose every step is agreed, so a mistake on any
rank (a model that differs between workers, the worker API on a serving rank, a resume whose
optimizer differs) is one line on every rank and exit 2. :meth:`Run.finish` tears the run
down on every rank.

A script needs no wrapper: :func:`init` installs an exception hook that ends the rank as
``easgd train`` would (an error every rank has: its line and exit 2; an error on one rank
only: its line and ``MPI_Abort``, so no rank waits forever; anything else: the traceback and
``MPI_Abort(1)``).
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from ..comm import (
    agree_or_fail,
    broadcast,
    exit_for,
    gather_to_master,
    receive_floats,
    send_floats,
    wait_for_all,
    world_comm,
)
from ..config import Config
from ..errors import ConfigError, EasgdError, ExportError, UsageError
from ..export import export_checkpoint
from ..flat import Layout
from ..log import console_if_unconfigured
from ..models.torch_binding import ModuleBinding, use_rank_threads
from ..rundir import CENTER_NAME, center_path
from ..session import Session
from ..side_channel import open_side
from .sampler import ElasticSampler
from .serving import CenterProblem, ChannelWithUserStates

__all__ = ["init", "Run", "RESUME_VAR", "CENTER_FILE"]

#: Where ``init`` finds ``resume`` when the script does not say (the Slurm templates set it).
RESUME_VAR = "EASGD_RESUME"
#: The center as a ``state_dict``, written in the run folder at the end of the run.
CENTER_FILE = CENTER_NAME
#: Message tag of the first worker's initial values, sent to the master at binding.
_INITIAL_TAG = 41


def init(config=None, *, resume=None, warm_start=None, comm=None) -> Run:
    """Every rank: start a run of your own training loop; returns this rank's :class:`Run`.

    ``config``: a TOML file, a :class:`~easgd_mpi.Config`, a mapping of dotted keys to values
    (``{"algorithm": "sync-easgd", "tau": 8}``) or None (the defaults and ``EASGD_*``
    variables). ``resume``: a checkpoint file, a run folder or ``"auto"`` (the newest valid
    checkpoint of ``run_dir``, a fresh start when it has none), as ``easgd train --resume``;
    None reads ``$EASGD_RESUME``. ``warm_start``: a checkpoint file or run folder whose center
    a fresh run starts from (any number of workers, any rule; a resume wins over it). ``comm``:
    the MPI communicator of the run (default: the whole job).
    """
    console_if_unconfigured()
    _install_exit_hook()
    if resume is None:
        resume = os.environ.get(RESUME_VAR) or None
    _bind_gpu_before_mpi(config)
    world = world_comm(comm)
    cfg = agree_or_fail(world, lambda: _config_of(config))
    session = Session(cfg, comm=world, resume=resume, warm_start=warm_start, own_loop=True)
    session.open_world()
    use_rank_threads(torch)
    run = Run(session)
    atexit.register(run._unfinished_at_exit)
    return run


class Run:
    """One rank's handle on the run: who it is, the workers' API, the servers' API."""

    def __init__(self, session: Session):
        self._session = session
        self._phase = "open"  # → "bound" → "finished"
        self._elastic = None  # this worker's ElasticAveraging, once bound
        self._sampler: ElasticSampler | None = None
        self._channel: ChannelWithUserStates | None = None
        #: This worker's own saved state (a decoded tree) of a resumed run, else None.
        self._saved: dict | None = None
        self._epoch = 0
        #: The run's summary (the same dict on every rank), after :meth:`finish`.
        self.summary: dict | None = None

    # ---- who this rank is -------------------------------------------------------------------
    @property
    def serves(self) -> bool:
        """Whether this rank serves (the master, rank 0, and any other server): it calls
        :meth:`serve`, not the workers' API."""
        return self._session.roles.is_server

    @property
    def rank(self) -> int:
        return self._session.roles.rank

    @property
    def worker(self) -> int | None:
        """This worker's index 0..p−1 (None on a serving rank)."""
        index = self._session.roles.worker_index
        return None if index < 0 else index

    @property
    def workers(self) -> int:
        """p, the number of workers."""
        return self._session.roles.n_workers

    @property
    def cfg(self) -> Config:
        """The run's config (a resumed checkpoint's, with what this launch states over it)."""
        return self._session.cfg

    @property
    def steps(self) -> int:
        """Local steps per worker (``steps``): the budget, e.g. for a schedule's length."""
        return self.cfg.steps

    @property
    def device(self):
        """Where this rank computes: its GPU on a worker that has one, else the CPU."""
        backend = self._session.backend
        if backend.is_gpu:
            return torch.device("cuda", int(getattr(backend, "device_id", 0) or 0))
        return torch.device("cpu")

    @property
    def run_dir(self) -> Path | None:
        """The run folder, once the run has started (the binding)."""
        path = getattr(self._session, "run_dir", None)
        return None if path is None else Path(path)

    @property
    def should_stop(self) -> bool:
        """Leave the loop now: a stop signal (SIGTERM, SIGUSR1: the run ends ``PREEMPTED``
        with a final checkpoint and exit 0), the master's stop, or the step budget spent.
        With a synchronous rule every worker sees it at the same step."""
        if self._elastic is None:
            return self._session.stop_requested()
        return self._elastic.must_stop()

    # ---- the serving ranks ----------------------------------------------------------------
    def serve(self, evaluate=None) -> None:
        """The serving ranks: hold the center, evaluate it (the master), checkpoint; returns
        when the workers are done. ``evaluate(state_dict) -> float | dict`` is yours: the
        center as a ``state_dict`` of CPU tensors (valid during the call; load it into a
        model of yours); a number is the loss, a dict may hold ``loss``, ``error`` (a rate)
        and more numbers. At the end the center is written to ``center.pt`` in the run
        folder (:meth:`finish` returns it)."""
        if not self.serves:
            self._refuse(
                f"run.serve() on rank {self.rank}, a worker: the serving ranks (run.serves) "
                f"call it; a worker binds its model with et.ElasticAveraging(model, "
                f"optimizer, run)"
            )
        if self._phase != "open":
            raise UsageError("run.serve() is called once, before run.finish()")
        self._bind(evaluate=evaluate)
        session = self._session
        if not session.roles.is_master:
            session.serve_slice()
            return
        session.serve_center(self._channel)
        self._channel.finish()
        self._write_center()

    # ---- the workers ----------------------------------------------------------------------
    def sampler(self, dataset, *, shuffle=True, drop_last=False, batch_size=None):
        """This worker's sampler of ``dataset`` for a ``DataLoader(sampler=...)``: its share
        of every epoch, reshuffled per epoch from the run's seed; where it is in the epoch is
        saved with the worker (see easgd_mpi/torch/sampler.py for the batch size)."""
        self._worker_only("run.sampler(dataset)")
        if self._sampler is not None:
            raise UsageError("run.sampler() gives this worker's one training sampler: call it once")
        sampler = ElasticSampler(
            dataset,
            workers=self.workers,
            worker=self.worker,
            seed=self.cfg.seed,
            shuffle=shuffle,
            drop_last=drop_last,
            batch_size=batch_size,
        )
        self._sampler = sampler
        if self._saved and self._saved.get("sampler") is not None:
            sampler.load_state_dict(self._saved["sampler"])
        return sampler

    def epochs(self) -> Iterator[int]:
        """The epoch numbers, from where this worker's saved state was, until
        :attr:`should_stop`; each one starts the sampler's epoch."""
        self._worker_only("run.epochs()")
        if self._phase == "open":
            self._refuse(
                f"run.epochs() on worker rank {self.rank} before et.ElasticAveraging(model, "
                f"optimizer, run): bind the model first (the epochs continue where its saved "
                f"state was)"
            )
        return self._epochs(self._first_epoch())

    def _epochs(self, epoch: int) -> Iterator[int]:
        while not self.should_stop:
            self._epoch = epoch
            if self._sampler is not None:
                self._sampler.set_epoch(epoch)
            yield epoch
            epoch += 1

    def _first_epoch(self) -> int:
        saved = self._saved.get("run", {}).get("epoch", 0) if self._saved else self._epoch
        sampler = self._sampler
        if sampler is not None and sampler.epoch == saved and sampler.spent:
            return saved + 1  # it stopped after the last batch of its epoch
        return saved

    # ---- every rank -----------------------------------------------------------------------
    def finish(self):
        """Every rank, at the end: the worker's final state to the master, the final
        checkpoint, the outcome marker (``COMPLETED``, or ``PREEMPTED`` after a stop), the
        folder's lock released, the summary (:attr:`summary`). Returns the center as a
        ``state_dict`` on the master (also in ``center.pt`` in the run folder), else None."""
        if self._phase == "finished":
            raise UsageError("run.finish() is called once")
        if self._phase == "open":
            what = "run.serve()" if self.serves else "et.ElasticAveraging(model, optimizer, run)"
            self._refuse(f"run.finish() on rank {self.rank} before {what}: the run never started")
        if self._elastic is not None:
            self._elastic.finish()
        self._phase = "finished"
        self.summary = self._session.close()
        if not self._session.roles.is_master or not self.summary.get("checkpoint"):
            return None
        return torch.load(center_path(self.run_dir), weights_only=True)

    # ---- binding ----------------------------------------------------------------------------
    def _bind(self, module=None, evaluate=None, error: str | None = None, on_bound=None):
        """Collective over the world, every step agreed: the workers' modules and the serving
        ranks meet (docs/ARCHITECTURE.md §8.1). ``error``: this rank joins only to fail, so
        every rank reports it. ``on_bound(side)``: a worker's restore of its own state, once
        the windows exist. Returns the worker's :class:`ModuleBinding` (None when serving)."""
        session = self._session
        roles = session.roles
        world = roles.world
        self._phase = "binding"
        # The serving ranks come first, the workers after building their model and data: wait
        # without spinning a core (a blocking collective polls), then meet.
        wait_for_all(world)
        try:

            def offer():
                if error is not None:
                    raise UsageError(error)
                return None if roles.is_server else ModuleBinding(torch, module)

            binding = agree_or_fail(world, offer)
            shapes = gather_to_master(world, None if binding is None else _shape_of(binding))
            agree_or_fail(world, lambda: _check_same_models(shapes, roles.servers))
            shape = broadcast(world, shapes[roles.servers] if roles.is_master else None)
            layout = Layout(shape[0])
            initial = self._first_worker_values(binding, layout)
            problem = (
                CenterProblem(layout, shape[1], initial, evaluate, transient=shape[3])
                if binding is None
                else _WorkerModule(binding)
            )
            session.open_run(problem)
            role = "master" if roles.is_master else "none" if roles.is_server else "worker"
            side = open_side(world, role, roles.n_workers)
            if roles.is_master:
                start = session.start_states.user or [None] * roles.n_workers
                self._channel = ChannelWithUserStates(session.channel, side, start)
                problem.channel = self._channel
            agree_or_fail(world, lambda: None if on_bound is None else on_bound(side))
        except EasgdError:
            # Every rank has this error (each step is agreed): they leave together.
            if getattr(session, "_open_windows", False):
                session.close_together()
            else:
                session.abandon()
            raise
        self._phase = "bound"
        return binding

    def _first_worker_values(self, binding, layout) -> np.ndarray | None:
        """The first worker's module as it built it, on the master: the initial center of a
        fresh run (every worker starts from the center)."""
        roles = self._session.roles
        if roles.worker_index == 0:
            values = np.zeros(layout.size, np.float32)
            binding.copy_into(values)
            send_floats(roles.world, values, dest=0, tag=_INITIAL_TAG)
            return None
        if roles.is_master:
            values = np.zeros(layout.size, np.float32)
            receive_floats(roles.world, values, source=roles.servers, tag=_INITIAL_TAG)
            return values
        return None

    def _worker_only(self, what: str) -> None:
        if self.serves:
            self._refuse(
                f"{what} on rank {self.rank}, which serves (run.serves): the workers' API is "
                f"for the other ranks; a serving rank calls run.serve()"
            )

    def _refuse(self, message: str) -> None:
        """A mistake in the use of the API: before the binding, this rank joins the binding
        with it, so every rank reports it (one line each, exit 2); after, it is this rank's."""
        if self._phase == "open":
            self._bind(error=message)
        raise UsageError(message)

    def _unfinished_at_exit(self) -> None:
        """A script that ends without :meth:`finish` would leave the other ranks waiting for
        this one forever: its line, and the job ends (exit 2)."""
        if self._phase != "finished":
            exit_for(
                UsageError(
                    f"the script ended on rank {self.rank} without run.finish(): every rank "
                    f"calls it at the end (the others wait for this one)"
                )
            )

    def _write_center(self) -> None:
        """The master, after the final checkpoint: the center as ``center.pt`` (a failure is
        the run's, as a failed final checkpoint: every rank exits 2)."""
        session = self._session
        final = session.master_result
        if final.get("failure") is not None or not final.get("checkpoint"):
            return
        try:
            session.folder.write_center(
                lambda target: export_checkpoint(final["checkpoint"], target)
            )
        except (ExportError, ConfigError) as exc:
            final["failure"] = exc


class _WorkerModule:
    """The problem protocol on a worker of a user's loop: the bound module's layout; the user's
    optimizer takes the steps (models/__init__.py)."""

    def __init__(self, binding: ModuleBinding):
        self.binding = binding
        self.layout = binding.layout
        self.n_trainable = binding.n_trainable

    def bind_state(self, x, g) -> None:
        self.binding.bind(x)

    def init_params(self, x_host, seed) -> None:
        self.binding.copy_into(x_host)

    def local_state(self) -> dict[str, np.ndarray]:
        return self.binding.local_state()


def _shape_of(binding: ModuleBinding) -> tuple:
    """What must be the same on every worker: each float tensor's name and shape in layout
    order, where the trainable part ends, the integer buffers' names, and the buffers the
    module's ``state_dict`` leaves out (``persistent=False``)."""
    specs = tuple((s.name, tuple(s.shape)) for s in binding.layout.specs)
    kept = binding.module.state_dict().keys()
    transient = tuple(n for n, _ in binding.module.named_buffers() if n not in kept)
    return specs, binding.n_trainable, tuple(sorted(binding.local)), transient


def _check_same_models(shapes: list | None, servers: int) -> None:
    """The master: every worker's model must be the first worker's (checked once, here)."""
    if shapes is None:
        return
    first, *others = shapes[servers:]
    for k, other in enumerate(others, start=1):
        if other != first:
            rank = servers + k
            raise ConfigError(
                f"worker rank {rank}'s model differs from worker rank {servers}'s: "
                f"{_difference(other, first)} (every worker must build the same model)"
            )


def _difference(mine, theirs) -> str:
    a, b = dict(mine[0]), dict(theirs[0])
    for name in [*a, *(n for n in b if n not in a)]:  # in layout order: the first difference
        if name not in b:
            return f"it has tensor '{name}', the first worker's has not"
        if name not in a:
            return f"it lacks tensor '{name}'"
        if a[name] != b[name]:
            return f"tensor '{name}' is {list(a[name])} there, {list(b[name])} on the first"
    if mine[0] != theirs[0]:
        return "its tensors come in another order"
    if mine[1] != theirs[1]:
        return "another set of its parameters is trainable (requires_grad)"
    return f"its integer buffers differ ({', '.join(mine[2]) or 'none'})"


def _config_of(config) -> Config:
    if config is None:
        return Config.from_toml(None)
    if isinstance(config, Config):
        return config.validate()
    if isinstance(config, Mapping):
        return Config.from_toml(None, overrides=dict(config))
    if isinstance(config, (str, os.PathLike)):
        return Config.from_toml(config)
    raise ConfigError(
        f"et.init(config): a TOML file, a Config or a mapping of keys, not a "
        f"{type(config).__name__}"
    )


def _bind_gpu_before_mpi(config) -> None:
    """Each rank's GPU, before mpi4py starts MPI (a CUDA-aware MPI opens a context on every
    visible GPU at MPI_Init), as ``easgd train`` does (gpu_binding.py); too late once the
    script has started MPI itself."""
    if "mpi4py.MPI" in sys.modules:
        return
    from ..gpu_binding import bind_gpu  # noqa: PLC0415

    try:
        servers = _config_of(config).servers
    except EasgdError:
        servers = None  # reported once MPI is up, on every rank
    bind_gpu(servers=servers)


def _install_exit_hook() -> None:
    """Uncaught exceptions end the rank as run_or_abort would (comm.exit_for)."""
    previous = sys.excepthook
    if getattr(previous, "easgd_exit", False):
        return

    def hook(kind, exc, tb):
        exit_for(exc, show_traceback=lambda: previous(kind, exc, tb))

    hook.easgd_exit = True
    sys.excepthook = hook
