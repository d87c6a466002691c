"""Bind each rank to its GPU before MPI starts (``CUDA_VISIBLE_DEVICES`` per rank).

A CUDA-enabled MPI library opens a context on every GPU the process can see when MPI starts
(about 0.5 GB per GPU per rank), and with 8 GPUs and 9 ranks on a node that is 36 GB lost. So
``easgd train`` and ``easgd check`` narrow ``CUDA_VISIBLE_DEVICES`` from the launcher's
environment *before* mpi4py is imported:

* the master (world rank 0) and the other servers of the center (ranks 1..S−1 with
  ``servers = S``) hold no GPU: ``CUDA_VISIBLE_DEVICES=""``;
* a worker keeps one GPU: the one numbered by its index among the workers on its node (what
  ``training._choose_backend`` picks without a binding, so the choice does not change),
  round-robin when a node has more workers than GPUs. Inside the process that GPU is device 0.

MPI has not started yet, so S comes from the caller (``easgd train`` and ``easgd check`` read
it from their ``--config``/``--set``/``EASGD_SERVERS``) or from ``EASGD_SERVERS``; it is 1
otherwise (a resumed checkpoint's own ``servers`` is not known this early: give it again).

The node-local rank comes from the launcher: MPICH's Hydra (``MPI_LOCALRANKID``, ``PMI_RANK``),
Open MPI (``OMPI_COMM_WORLD_LOCAL_RANK``), MVAPICH (``MV2_COMM_WORLD_LOCAL_RANK``) or Slurm's
srun (``SLURM_LOCALID``, ``SLURM_PROCID``; ``SLURM_GTIDS`` says whether rank 0 shares the node).
The launcher-specific variables go first: Hydra started by Slurm inherits the SLURM_* variables
of its proxies, which describe the proxies, not the ranks. Without ``SLURM_GTIDS`` the ranks
are taken to be placed in blocks by node (mpiexec's default, the jobs/ templates' host files):
this node holds the ranks numbered from rank − local rank, so the servers on it are those of
them below S; a cyclic placement would pair workers with GPUs differently (set
``EASGD_BIND_GPUS=0`` there).

Without ``CUDA_VISIBLE_DEVICES`` the node's GPUs are those the CUDA driver can use, counted in a
child process (so that CUDA is not initialised in this one): the driver honours the job's
cgroup, which hides the GPUs of other jobs that ``/proc/driver/nvidia/gpus`` still lists.

Nothing changes when ``EASGD_BIND_GPUS=0``, when the launcher is unknown (e.g. a plain
``python`` start), when no GPU is visible, or when a worker already sees exactly one GPU (a job
template or ``--gpus-per-task=1`` narrowed it: never remapped twice). What was done is recorded
in ``EASGD_GPU_BINDING`` (e.g. ``world rank 3, local rank 2 (MPICH Hydra): worker 1 on this node
-> GPU 1 of 0,1,2,3``) for ``easgd check`` and the start-up line. The jobs/ templates do the same
in bash (their RANK_WRAPPER) and write the same record.

A script that calls ``easgd_mpi.train()`` itself is bound the same way, by
:func:`bind_before_mpi` when ``train()`` starts: it knows the config's ``servers`` there, and
MPI starts there unless the script started it itself. Not at ``import easgd_mpi``: the servers
are not known yet, and importing a package (the plotting and export tools, the tests, a
notebook) should not change the process's environment. A script that imports ``mpi4py.MPI``
before ``train()`` has started MPI with every GPU visible: it is left alone (each worker still
picks its own GPU by its index), or it calls :func:`bind_gpu` before that import.

This module must not import mpi4py, CuPy or anything that initialises CUDA.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "RECORD_VAR",
    "OPT_OUT_VAR",
    "SERVERS_VAR",
    "Launch",
    "detect_launch",
    "plan",
    "bind_gpu",
    "bind_before_mpi",
    "bound_gpu",
]

#: Where the binding is recorded (read by ``easgd check`` and the start-up line).
RECORD_VAR = "EASGD_GPU_BINDING"
#: ``EASGD_BIND_GPUS=0`` switches the binding off.
OPT_OUT_VAR = "EASGD_BIND_GPUS"
#: The config's ``servers`` as an environment variable (config.py reads it too).
SERVERS_VAR = "EASGD_SERVERS"
_OFF = {"0", "no", "false", "off"}
_RECORD_GPU = re.compile(r"-> GPU (\S+) of ")


@dataclass(frozen=True)
class Launch:
    """What the launcher says about this rank."""

    launcher: str  # in words, for the record
    rank: int  # world rank
    local_rank: int  # index among all ranks on this node
    master_here: bool  # whether world rank 0 runs on this node
    #: The world ranks on this node when the launcher lists them (Slurm's SLURM_GTIDS).
    node_ranks: tuple[int, ...] = ()

    def worker_on_node(self, servers: int = 1) -> int:
        """Index among the *workers* on this node: the servers (ranks < ``servers``) placed
        before this rank on it do not shift it."""
        if self.node_ranks:
            before = sum(1 for r in self.node_ranks if r < min(servers, self.rank))
        elif servers == 1:
            before = 1 if self.master_here else 0
        else:  # ranks in blocks by node: this node's first rank is rank − local rank
            before = max(0, min(servers, self.rank) - (self.rank - self.local_rank))
        return max(0, self.local_rank - before)


def _int(environ, name: str) -> int | None:
    value = environ.get(name, "").strip()
    return int(value) if value.isdigit() else None


def detect_launch(environ=os.environ) -> Launch | None:
    """This rank's launcher, world rank and node-local rank; None when no launcher says."""
    # (launcher, world rank variable, local rank variable), most specific first.
    for launcher, rank_var, local_var in (
        ("MPICH Hydra", "PMI_RANK", "MPI_LOCALRANKID"),
        ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"),
        ("MVAPICH", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_LOCAL_RANK"),
    ):
        rank, local = _int(environ, rank_var), _int(environ, local_var)
        if rank is not None and local is not None:
            return Launch(launcher, rank, local, master_here=rank == local)
    # srun: SLURM_STEP_ID tells a task of a job step from the batch shell itself.
    rank, local = _int(environ, "SLURM_PROCID"), _int(environ, "SLURM_LOCALID")
    if rank is not None and local is not None and "SLURM_STEP_ID" in environ:
        gtids = environ.get("SLURM_GTIDS", "")
        ids = [t.strip() for t in gtids.split(",") if t.strip()]
        here = "0" in ids if ids else rank == local
        listed = tuple(int(t) for t in ids) if all(t.isdigit() for t in ids) else ()
        return Launch("Slurm srun", rank, local, master_here=here, node_ranks=listed)
    rank, local = _int(environ, "PMI_RANK"), _int(environ, "PMI_LOCAL_RANK")
    if rank is not None and local is not None:
        return Launch("PMI", rank, local, master_here=rank == local)
    return None


#: Run by ``python -I -c`` in a child process: the number of devices the CUDA driver can use.
_DRIVER_COUNT = """
import ctypes, sys
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError:
    print(0)
    sys.exit()
n = ctypes.c_int(0)
ok = cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(n)) == 0
print(n.value if ok else 0)
"""


def _count_node_gpus(timeout: float = 30.0, control: Path = Path("/dev/nvidiactl")) -> int:
    """GPUs this process can use, as the CUDA driver counts them, asked in a child process so
    that CUDA is not initialised in this one (it would then ignore a new
    ``CUDA_VISIBLE_DEVICES``). The driver sees only the devices the job's cgroup lets it open;
    ``/proc/driver/nvidia/gpus`` and ``nvidia-smi`` may list others. 0 when there is no
    driver, or it does not answer within ``timeout`` seconds."""
    if not control.exists():  # no NVIDIA driver on this node: no child process needed
        return 0
    try:
        out = subprocess.run(
            [sys.executable, "-I", "-c", _DRIVER_COUNT],
            capture_output=True,
            text=True,
            timeout=timeout,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    lines = out.split()
    return int(lines[-1]) if lines and lines[-1].isdigit() else 0


def plan(
    environ=os.environ,
    count_gpus: Callable[[], int] = _count_node_gpus,
    servers: int | None = None,
):
    """``(new CUDA_VISIBLE_DEVICES, record)`` for this rank, or ``(None, "")`` to leave it.

    ``servers``: ranks 0..servers−1 hold the center and no GPU (None: ``EASGD_SERVERS``, else
    1). Pure apart from ``count_gpus``, asked only when ``CUDA_VISIBLE_DEVICES`` is unset.
    """
    if environ.get(OPT_OUT_VAR, "").strip().lower() in _OFF:
        return None, ""
    launch = detect_launch(environ)
    if launch is None:
        return None, ""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        gpus = [str(i) for i in range(max(0, int(count_gpus())))]
    else:
        gpus = [g.strip() for g in visible.split(",") if g.strip()]
    if not gpus:
        return None, ""
    where = f"world rank {launch.rank}, local rank {launch.local_rank} ({launch.launcher})"
    listed = ",".join(gpus)
    if launch.rank == 0:
        return "", f"{where}: master -> no GPU (hides {listed})"
    servers = _servers(environ) if servers is None else max(1, int(servers))
    if launch.rank < servers:
        return "", f"{where}: server {launch.rank} of the center -> no GPU (hides {listed})"
    if len(gpus) == 1:
        return None, ""  # already this worker's one GPU (a job template, --gpus-per-task=1)
    index = launch.worker_on_node(servers)
    gpu = gpus[index % len(gpus)]
    return gpu, f"{where}: worker {index} on this node -> GPU {gpu} of {listed}"


def _servers(environ) -> int:
    value = environ.get(SERVERS_VAR, "").strip()
    return max(1, int(value)) if value.isdigit() else 1


def bind_gpu(
    environ: MutableMapping[str, str] | None = None,
    count_gpus: Callable[[], int] = _count_node_gpus,
    servers: int | None = None,
) -> str:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to this rank's GPU (none for the servers, the master
    among them) before MPI starts; returns the record written to ``EASGD_GPU_BINDING`` ("" when
    nothing changed).

    Never raises: a binding that cannot be worked out leaves the environment as it was.
    """
    env = os.environ if environ is None else environ
    try:
        if env.get(OPT_OUT_VAR, "").strip().lower() in _OFF:
            env.pop(RECORD_VAR, None)  # switched off: no record may claim otherwise
            return ""
        visible, record = plan(env, count_gpus, servers)
        if visible is None:
            return ""
        env["CUDA_VISIBLE_DEVICES"] = visible
        env[RECORD_VAR] = record
        return record
    except Exception:  # noqa: BLE001 - binding is an optimisation; it must never fail a run
        return ""


def bind_before_mpi(
    servers: int | None = None,
    modules: Mapping[str, object] = sys.modules,
    environ: MutableMapping[str, str] | None = None,
) -> str:
    """:func:`bind_gpu` for ``easgd_mpi.train()`` called from a script, while it still can
    work: MPI not started in this process (``mpi4py.MPI`` not imported: importing it starts
    MPI; ``easgd train`` has imported it after binding) and CUDA not initialised (a new
    ``CUDA_VISIBLE_DEVICES`` would not apply, and the record would claim a binding that did
    not happen). Returns the record ("" when nothing changed)."""
    if "mpi4py.MPI" in modules or _cuda_initialised(modules):
        return ""
    return bind_gpu(environ, servers=servers)


def _cuda_initialised(modules) -> bool:
    """Whether this process has initialised CUDA: PyTorch says so, or the driver's control
    device is open (cuInit opens /dev/nvidiactl; Linux only, else taken as not)."""
    torch = modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return True
    except Exception:  # noqa: BLE001 - a partly imported torch: look at the files instead
        pass
    try:
        fds = list(Path("/proc/self/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == "/dev/nvidiactl":
                return True
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
    return False


def bound_gpu(environ=os.environ) -> str | None:
    """The GPU this worker was bound to (as named in the node's list), or None.

    Only when the record and ``CUDA_VISIBLE_DEVICES`` agree (exactly that one GPU visible), so
    a stale record inherited from elsewhere is ignored. The bound GPU is device 0 in here.
    """
    found = _RECORD_GPU.search(environ.get(RECORD_VAR, ""))
    visible = [g.strip() for g in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    if found is None or visible != [found.group(1)]:
        return None
    return found.group(1)
