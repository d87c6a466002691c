"""MPI start-up: roles, node-local rank, agreement on errors, abort on failure.

Ranks 0..S−1 serve the center (``servers = S``, default 1; docs/SCALING.md says when more than
one pays), rank 0 is also the master, ranks S..S+p−1 are the p workers. Everything here is about
the MPI world; nothing about models or updates. With center.py, status_board.py, snapshots.py
and collective.py this is one of the five modules that call MPI (tests/unit/test_structure.py
enforces it): the command line, ``train()`` and ``easgd check`` reach the world through the
small functions below (world, broadcast, gather, the end-of-run barrier and the idle servers'
loop in it).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import AgreedError, BackendError, ConfigError, EasgdError, LaunchError

__all__ = [
    "EXIT_STALLED",
    "end_job",
    "MASTER",
    "Roles",
    "AgreedError",
    "make_roles",
    "world_comm",
    "rank_and_size",
    "broadcast",
    "gather_to_master",
    "send_object",
    "receive_object",
    "send_floats",
    "receive_floats",
    "wait_for_all",
    "keep_progress",
    "BARRIER_POLL",
    "library_versions",
    "check_layout",
    "agree_or_fail",
    "local_rank",
    "node_position",
    "node_sum",
    "CUDA_MPI_VAR",
    "CudaMpi",
    "cuda_mpi_mode",
    "gpu_transfer_plan",
    "allreduce_on_device",
    "cuda_aware_mpi",
    "limit_blas_threads",
    "run_or_abort",
    "exit_for",
    "report_error",
    "MpiTurn",
]

MASTER = 0
T = TypeVar("T")

#: Seconds a rank waiting in the end-of-run barrier sleeps between two tests of it.
BARRIER_POLL = 0.002


def _mpi():
    from mpi4py import MPI  # noqa: PLC0415  (importing initialises MPI; only when needed)

    return MPI


@dataclass
class Roles:
    """Who this rank is and the communicators it uses."""

    world: object  # MPI.Comm: a private duplicate of COMM_WORLD
    workers: object  # MPI.Comm among the worker ranks only (MPI.COMM_NULL on the servers)
    rank: int
    size: int
    #: Ranks 0..servers−1 hold a slice of the center each (rank 0 is also the master).
    servers: int = 1

    @property
    def is_master(self) -> bool:
        return self.rank == MASTER

    @property
    def is_server(self) -> bool:
        """Whether this rank holds a slice of the center (the master always does)."""
        return self.rank < self.servers

    @property
    def n_workers(self) -> int:
        return self.size - self.servers

    @property
    def worker_index(self) -> int:
        """0-based worker number: world rank − servers (−1 on a server)."""
        return self.rank - self.servers if self.rank >= self.servers else -1

    def free(self) -> None:
        """Release the communicators (collective over the world)."""
        if self.workers != _mpi().COMM_NULL:
            self.workers.Free()
        self.world.Free()


def check_layout(size: int, servers: int = 1) -> None:
    """Refuse a world that leaves no worker: size 1, or ``servers`` outside 1..size−1."""
    if size < 2:
        raise LaunchError(
            "easgd needs at least 2 MPI ranks (the master, rank 0, and at least one worker), "
            f"got world size 1: launch with e.g. `{launch_hint()}`"
        )
    if isinstance(servers, bool) or not isinstance(servers, int) or servers < 1:
        raise ConfigError(f"config: servers = {servers!r} must be an integer >= 1")
    if servers >= size:
        raise ConfigError(
            f"config: servers = {servers} leaves no worker in a world of {size} ranks (ranks "
            f"0..{servers - 1} would serve the center): use servers <= {size - 1} or launch "
            f"more than {servers} ranks"
        )


def launch_hint(ranks: int = 5) -> str:
    """How to launch what this process runs: the ``easgd`` command, or a user's script."""
    argv = list(sys.argv) or ["easgd"]
    program = os.path.basename(argv[0])
    if program in ("easgd", "__main__.py", "cli.py") or program.startswith("easgd_mpi"):
        return f"mpiexec -n {ranks} easgd train"
    return f"mpiexec -n {ranks} python {' '.join(argv)}"


def world_comm(comm=None):
    """``comm``, or MPI's COMM_WORLD when it is None (importing mpi4py initialises MPI, so the
    command line calls this only after the GPU binding, which must precede it)."""
    return _mpi().COMM_WORLD if comm is None else comm


def make_roles(comm=None, servers: int = 1) -> Roles:
    """Split the world into the servers (rank 0: also the master) and the workers.

    A world that leaves no worker is a launch error (:func:`check_layout`; ``train`` checks it
    on every rank first, so it is one line per rank).
    """
    MPI = _mpi()
    base = world_comm(comm)
    check_layout(base.Get_size(), servers)
    world = base.Dup()
    rank = world.Get_rank()
    color = MPI.UNDEFINED if rank < servers else 1
    workers = world.Split(color, rank)
    return Roles(world=world, workers=workers, rank=rank, size=world.Get_size(), servers=servers)


def rank_and_size(comm) -> tuple[int, int]:
    """(this rank, number of ranks) of ``comm``."""
    return comm.Get_rank(), comm.Get_size()


def broadcast(comm, value: Any, root: int = MASTER) -> Any:
    """``root``'s ``value`` on every rank of ``comm`` (pickled: start-up decisions, a config's
    text, the run's summary; never model-sized buffers). Collective."""
    return comm.bcast(value, root=root)


def gather_to_master(comm, value: Any) -> list | None:
    """Every rank's ``value``, in rank order, on the master (None elsewhere). Collective."""
    return comm.gather(value, root=MASTER)


def send_object(comm, value: Any, dest: int, tag: int) -> None:
    """Send one pickled object to rank ``dest`` (the master's per-worker start-up data)."""
    comm.send(value, dest=dest, tag=tag)


def receive_object(comm, source: int, tag: int) -> Any:
    """The object that :func:`send_object` sent from ``source`` with ``tag``."""
    return comm.recv(source=source, tag=tag)


#: Floats per message of :func:`send_floats` (each under 2^31 bytes).
_FLOAT_PIECE = 1 << 26


def send_floats(comm, values, dest: int, tag: int) -> None:
    """Send a float32 vector (model-sized: in pieces, no pickling) to rank ``dest``."""
    for lo in range(0, values.shape[0], _FLOAT_PIECE):
        comm.Send(values[lo : lo + _FLOAT_PIECE], dest=dest, tag=tag)


def receive_floats(comm, out, source: int, tag: int) -> None:
    """Fill the float32 vector ``out`` with what :func:`send_floats` sent from ``source``."""
    for lo in range(0, out.shape[0], _FLOAT_PIECE):
        comm.Recv(out[lo : lo + _FLOAT_PIECE], source=source, tag=tag)


def wait_for_all(comm, poll: float = BARRIER_POLL) -> None:
    """The end-of-run barrier of every rank of ``comm``, without busy-spinning a core.

    A blocking ``Barrier`` polls in MPICH's progress loop: a rank that finished early would take
    a core from the ranks still working on a node with fewer cores than ranks. A non-blocking
    barrier tested every ``poll`` seconds costs nothing while it waits.
    """
    _test_until_complete(comm.Ibarrier(), poll)


def keep_progress(comm, poll: float = BARRIER_POLL, work: Callable[[], bool] | None = None) -> dict:
    """The idle servers' loop: a server that is not the master joins the end-of-run barrier of
    ``comm`` at once and keeps MPI's progress going until every other rank has joined it.

    Its slice of the center needs nothing from it on one node (MPICH moves intra-node RMA
    through shared memory), but some MPI libraries complete accumulates from other nodes only
    while the target is inside an MPI call. Each test of the barrier is such a call, and the
    sleep between tests leaves the core to the workers. Returns what the loop cost this rank:
    ``rank``, ``wall_s``, ``cpu_s`` (this process's user + system seconds) and ``tests``, which
    the run's summary reports as ``server_cpu``. ``work``: the server's share of a center that
    computes (docs/ARCHITECTURE.md §3.11), run between the tests.
    """
    wall, cpu = time.monotonic(), time.process_time()
    tests = _test_until_complete(comm.Ibarrier(), poll, work)
    return {
        "rank": comm.Get_rank(),
        "wall_s": time.monotonic() - wall,
        "cpu_s": time.process_time() - cpu,
        "tests": tests,
    }


def _test_until_complete(request, poll: float, work: Callable[[], bool] | None = None) -> int:
    """Test ``request`` every ``poll`` seconds until it completes; returns the tests made.
    ``work()`` runs before each sleep; when it did something (returns True) there is no sleep:
    a server of a center that computes applies the pushes that arrived meanwhile."""
    tests = 1
    while not request.Test():
        if work is None or not work():
            time.sleep(poll)
        tests += 1
    return tests


def library_versions() -> dict[str, str]:
    """The MPI library (the first line of its version string), the MPI standard it implements,
    and mpi4py's version: what ``easgd check`` reports."""
    import mpi4py  # noqa: PLC0415

    MPI = _mpi()
    return {
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
        "mpi_standard": "{}.{}".format(*MPI.Get_version()),
        "mpi4py": mpi4py.__version__,
    }


def local_rank(comm=None) -> int:
    """This rank's index on its node: Slurm's, the launcher's, or a shared-memory split."""
    for var in (
        "SLURM_LOCALID",
        "MPI_LOCALRANKID",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "PMI_LOCAL_RANK",
        "MV2_COMM_WORLD_LOCAL_RANK",
    ):
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    return node_position(_mpi().COMM_WORLD if comm is None else comm)[0]


#: The environment variable that chooses whether a GPU worker's all-reduce hands device buffers
#: to MPI. Read by :func:`cuda_mpi_mode` only.
CUDA_MPI_VAR = "EASGD_CUDA_MPI"


class CudaMpi(enum.Enum):
    """The three settings of ``EASGD_CUDA_MPI``."""

    AUTO = "auto"  # unset (or empty): the library decides, MPIX_Query_cuda_support() = 1
    OFF = "off"  # 0: never; device data is staged through pinned host memory
    ON = "on"  # 1: always, unless the library itself says it cannot take device buffers


_CUDA_MPI_VALUES = {"": CudaMpi.AUTO, "0": CudaMpi.OFF, "1": CudaMpi.ON}

_STAGED = "staged (pinned host)"
_DEVICE = "device (CUDA-aware)"
#: What the plan says when EASGD_CUDA_MPI=1 asks for what the library denies.
_DENIED = (
    f"refused: {CUDA_MPI_VAR}=1 but this MPI library reports no CUDA support "
    f"(MPIX_Query_cuda_support() = 0)"
)


def cuda_mpi_mode(env: Mapping[str, str] | None = None) -> CudaMpi:
    """``EASGD_CUDA_MPI`` of ``env`` (default: this process's environment) as a :class:`CudaMpi`.

    Unset or empty: AUTO, ``0``: OFF, ``1``: ON. Any other value is a :class:`LaunchError`
    naming the variable: a typo must not silently choose the transfer path.
    """
    raw = (os.environ if env is None else env).get(CUDA_MPI_VAR)
    try:
        return _CUDA_MPI_VALUES["" if raw is None else raw.strip()]
    except KeyError:
        raise LaunchError(
            f"{CUDA_MPI_VAR}={raw!r} is not a setting: use 1 (device buffers to MPI), 0 (stage "
            f"through pinned host memory) or leave it unset (ask the MPI library)"
        ) from None


def cuda_aware_mpi() -> bool | None:
    """Whether the loaded MPI library can take GPU buffers: ``MPIX_Query_cuda_support()``
    (Open MPI, MPICH >= 4.1), or None when the library does not say."""
    import ctypes  # noqa: PLC0415

    _mpi()  # the library is loaded (and initialised) by mpi4py
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            paths = {line.split()[-1] for line in fh if "libmpi" in line and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            query = ctypes.CDLL(path).MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return bool(query())
    return None


def gpu_transfer_plan(is_gpu: bool, mode: CudaMpi, supported: bool | None) -> dict[str, str]:
    """How each kind of transfer of a worker reaches MPI: the one place that decides.

    One-sided operations (the center's exchange, reads, DOWNPOUR's push) and the checkpoint
    state copies always go through pinned host buffers on a GPU: Open MPI documents one-sided
    operations and non-blocking reductions as unsupported on device memory even when it is
    CUDA-aware. Only the synchronous rules' blocking ``Allreduce`` may take device buffers:
    with ``mode`` AUTO when the library says it can (``supported`` True), with ON unless it says
    it cannot (``supported`` False: then the plan's all-reduce entry says "refused" and why),
    never with OFF.
    """
    if not is_gpu:
        return {"center": "host", "allreduce": "host", "states": "host"}
    if mode is CudaMpi.ON:
        allreduce = _DENIED if supported is False else _DEVICE
    elif mode is CudaMpi.AUTO and supported is True:
        allreduce = _DEVICE
    else:
        allreduce = _STAGED
    return {"center": _STAGED, "allreduce": allreduce, "states": _STAGED}


def allreduce_on_device(is_gpu: bool) -> bool:
    """Whether this worker's all-reduce hands device buffers to MPI, as the plan decides.

    Reads ``EASGD_CUDA_MPI`` on every rank (a bad value fails everywhere alike) and asks the
    library only when its answer matters. A plan that refuses (``EASGD_CUDA_MPI=1`` with a
    library that reports no CUDA support) is a :class:`BackendError`: the user asked for device
    buffers, and staging them instead would hide that the request cannot be met.
    """
    mode = cuda_mpi_mode()
    supported = cuda_aware_mpi() if is_gpu and mode is not CudaMpi.OFF else None
    allreduce = gpu_transfer_plan(is_gpu, mode, supported)["allreduce"]
    if allreduce == _DENIED:
        raise BackendError(
            f"{_DENIED.removeprefix('refused: ')}: set {CUDA_MPI_VAR}=0, or leave it unset, to "
            f"stage through pinned host memory"
        )
    return allreduce == _DEVICE


def node_position(comm) -> tuple[int, int]:
    """(this rank's index, number of ranks) among the ranks of ``comm`` on this node.

    Collective over ``comm``: a shared-memory split, whatever the launcher says.
    """
    MPI = _mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def node_sum(comm, value: int) -> tuple[int, int]:
    """(sum of ``value`` over the ranks of ``comm`` on this node, their number). Collective."""
    MPI = _mpi()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.allreduce(int(value)), node.Get_size()
    finally:
        node.Free()


def limit_blas_threads(comm, threads: int = 0) -> int:
    """Cap BLAS/OpenMP threads of this rank (0: the node's cores shared among its ranks).

    Several ranks on a node that each start a full BLAS thread pool oversubscribe the cores
    many times over: measured here, a 64-64-10 MLP step took 14 ms instead of 0.3 ms.
    """
    if threads <= 0:
        cores = (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 1)
        )
        threads = max(1, cores // node_position(comm)[1])
    # PyTorch (imported later, by a torch model) sizes its pool from this at first use.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415
    except ImportError:
        return threads
    threadpool_limits(limits=threads)
    return threads


def agree_or_fail(comm, func: Callable[[], T]) -> T:
    """Run ``func`` on every rank; if it raises an :class:`EasgdError` anywhere, raise on all.

    Used for start-up steps (config, data, checkpoint) whose failure on one rank must become a
    clean error on every rank instead of a hang in the next collective. Other exceptions
    propagate (they are bugs and abort the job).
    """
    try:
        result, message = func(), None
    except EasgdError as exc:
        result, message = None, str(exc)
    messages = comm.allgather(message)
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        if message is not None:
            raise AgreedError(message)
        rank, first = failed[0]
        raise AgreedError(f"{first} (reported by rank {rank})")
    return result


def report_error(exc: BaseException, rank: int | None) -> None:
    """One line on stderr naming the rank; tracebacks only for bugs."""
    where = f"[rank {rank}] " if rank is not None else ""
    if isinstance(exc, EasgdError):
        text = f"easgd: error: {where}{exc}\n"
    else:
        tb = "".join(traceback.format_exception(exc))
        text = f"easgd: internal error {where}(this is a bug):\n{tb}"
    # One record, one write (log.py): the launcher forwards several ranks' stderr through one
    # stream, and separate writes of text and newline interleave between ranks.
    logging.getLogger(__name__).error(text.rstrip("\n"))


def run_or_abort(func: Callable[[], int]) -> int:
    """Run a rank's main function; any exception ends the whole MPI job.

    An :class:`AgreedError` (raised on every rank at once, e.g. a bad config that every rank
    read) or an error in a world of size 1 exits with its code and one line, no traceback.
    Anything raised on one rank alone calls ``MPI_Abort`` so the other ranks cannot hang.
    """
    rank = _world_rank_or_none()
    try:
        return func()
    except AgreedError as exc:
        report_error(exc, rank)
        return exc.exit_code
    except KeyboardInterrupt:
        _abort(130)
        return 130
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if code != 0:
            _abort(code)
        return code
    except BaseException as exc:  # noqa: BLE001 - the last line of defence of an MPI rank
        report_error(exc, rank)
        code = exc.exit_code if isinstance(exc, EasgdError) else 1
        _abort(code)
        return code


def exit_for(exc: BaseException, show_traceback: Callable[[], None] | None = None) -> None:
    """End this rank for an exception that nothing caught, as :func:`run_or_abort` would: a
    user's script that does not wrap its code (``sys.excepthook``, installed by
    ``easgd_mpi.torch.init``). An :class:`AgreedError` (every rank has it) is one line and a
    clean exit with its code; another :class:`EasgdError` is one line and ``MPI_Abort`` (the
    other ranks cannot know); anything else is ``show_traceback()`` (default: the package's
    internal-error line) and ``MPI_Abort(1)``. Never returns."""
    rank = _world_rank_or_none()
    if isinstance(exc, KeyboardInterrupt):
        _abort(130)
    if isinstance(exc, EasgdError) or show_traceback is None:
        report_error(exc, rank)
    else:
        show_traceback()
    if isinstance(exc, AgreedError):
        _finalize_and_exit(exc.exit_code)
    # Not after the lines are forwarded, an abort can cut them off (end_job waits for them).
    end_job(exc.exit_code if isinstance(exc, EasgdError) else 1)


def _finalize_and_exit(code: int) -> None:
    """Every rank leaves with ``code``: MPI is finalised (the launcher sees a clean end), and
    nothing else runs (an exception hook cannot choose the exit code otherwise)."""
    sys.stderr.flush()
    sys.stdout.flush()
    try:
        MPI = _mpi()
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()
    except Exception:  # noqa: BLE001
        pass
    os._exit(code)


def _world_rank_or_none() -> int | None:
    try:
        MPI = _mpi()
        if MPI.Is_initialized() and not MPI.Is_finalized():
            return MPI.COMM_WORLD.Get_rank()
    except Exception:  # noqa: BLE001
        return None
    return None


def _abort(code: int) -> None:
    try:
        MPI = _mpi()
        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            sys.stderr.flush()
            sys.stdout.flush()
            # The launcher forwards output through pipes that the abort may cut before they are
            # drained (seen on a loaded node: the error line lost): a moment for the line that
            # says why the job ends.
            time.sleep(0.3)
            MPI.COMM_WORLD.Abort(code)
    except Exception:  # noqa: BLE001
        pass
    os._exit(code)


#: Exit code of a job stopped with its final checkpoint written while a worker did not answer
#: (stopped, hung GPU, frozen node): the master ends every rank, since that one never reaches
#: the end. Distinct from 1 (a bug) and 2 (bad input or a failed final checkpoint).
EXIT_STALLED = 3


def end_job(code: int) -> None:
    """End every rank of the job now with exit ``code`` (``MPI_Abort``); never returns.

    For a master that has saved everything while some rank cannot be waited for."""
    sys.stdout.flush()
    sys.stderr.flush()
    # The launcher forwards output through pipes that an abort may cut before they are
    # drained: give it a moment, so the line that says why the job ended reaches the user.
    time.sleep(0.5)
    _abort(code)


class MpiTurn:
    """One MPI caller at a time in the master's process, whose slice of a center that computes
    is served by a thread (``center_server.CenterServer.start_thread``).

    MPI_THREAD_MULTIPLE allows both threads to call MPI at once, on the same windows; after a
    rare run in which the master's two threads stopped together inside MPI (once in about a
    hundred threaded runs, not reproduced since), they take turns instead: the master's loop
    holds the turn for its reads and gives it up around the work that needs no MPI (the
    evaluation of a snapshot, the checkpoint file), the thread takes it for each poll.
    ``threaded`` False: no lock (a passive center, or a server without a thread).
    """

    def __init__(self, threaded: bool = True):
        self._lock = threading.Lock() if threaded else None

    def __enter__(self) -> MpiTurn:
        if self._lock is not None:
            self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()

    @contextlib.contextmanager
    def paused(self):
        """Inside ``with turn:``, give the turn up for work that needs no MPI."""
        if self._lock is not None:
            self._lock.release()
        try:
            yield
        finally:
            if self._lock is not None:
                self._lock.acquire()
