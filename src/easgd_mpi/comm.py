"""MPI start-up: roles, node-local rank, agreement on errors, abort on failure.

Ranks 0..S−1 serve the center (``servers = S``, default 1; DESIGN.md §4d), rank 0 is also the
master, ranks S..S+p−1 are the p workers. Everything here is about the MPI world; nothing about
models or updates.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import ConfigError, EasgdError, LaunchError

__all__ = [
    "MASTER",
    "Roles",
    "AgreedError",
    "make_roles",
    "check_layout",
    "world_comm",
    "agree_or_fail",
    "local_rank",
    "node_position",
    "node_sum",
    "gpu_transfer_plan",
    "cuda_aware_mpi",
    "cuda_mpi_requested",
    "limit_blas_threads",
    "run_or_abort",
    "report_error",
]

MASTER = 0
T = TypeVar("T")


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
            "easgd needs at least 2 MPI ranks (rank 0 = master, ranks 1..p = workers), "
            "got world size 1: launch with e.g. `mpiexec -n 5 easgd train`"
        )
    if isinstance(servers, bool) or not isinstance(servers, int) or servers < 1:
        raise ConfigError(f"config: servers = {servers!r} must be an integer >= 1")
    if servers >= size:
        raise ConfigError(
            f"config: servers = {servers} leaves no worker in a world of {size} ranks (ranks "
            f"0..{servers - 1} would serve the center): use servers <= {size - 1} or launch "
            f"more than {servers} ranks"
        )


def world_comm(comm=None):
    """``comm``, or MPI's COMM_WORLD when it is None."""
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


class AgreedError(EasgdError):
    """An input error that every rank raises at the same point: exit cleanly, no abort."""


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


def cuda_mpi_requested() -> bool:
    """``EASGD_CUDA_MPI=1`` asks for device buffers to go to MPI directly (default off)."""
    return os.environ.get("EASGD_CUDA_MPI", "0").strip() == "1"


def gpu_transfer_plan(is_gpu: bool, requested: bool, supported: bool | None) -> dict[str, str]:
    """How each kind of transfer of a worker reaches MPI: the one place that decides.

    One-sided operations (the center's exchange, reads, DOWNPOUR's push) and the checkpoint
    state copies always go through pinned host buffers on a GPU: Open MPI documents one-sided
    operations and non-blocking reductions as unsupported on device memory even when it is
    CUDA-aware. Only the synchronous rules' blocking ``Allreduce`` takes device buffers, and
    only when CUDA-aware MPI is requested (``EASGD_CUDA_MPI=1``) and not denied by the library.
    """
    if not is_gpu:
        return {"center": "host", "allreduce": "host", "states": "host"}
    device_ok = requested and supported is not False
    return {
        "center": "staged (pinned host)",
        "allreduce": "device (CUDA-aware)" if device_ok else "staged (pinned host)",
        "states": "staged (pinned host)",
    }


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
    # One write per message: the launcher forwards several ranks' stderr through one stream,
    # and separate writes of text and newline interleave between ranks.
    sys.stderr.write(text)
    sys.stderr.flush()


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
            MPI.COMM_WORLD.Abort(code)
    except Exception:  # noqa: BLE001
        pass
    os._exit(code)
