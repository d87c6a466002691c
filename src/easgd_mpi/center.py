"""The center variable in an MPI one-sided window on the master, and the exchange protocol.

DESIGN.md §4. The window is allocated by MPI (``Win.Allocate``) on rank 0 only; every rank
opens one passive-target epoch (``Lock_all``) right after a barrier and keeps it open for the
whole run, so workers read and accumulate while the master computes. Reads are
``Get_accumulate(NO_OP)`` and writes ``Accumulate(SUM)``: both element-wise atomic against each
other, so concurrent exchanges never tear an element and the center is exactly
``initial + Σ e`` (the conservation invariant the tests check).

The exchange is pipelined in chunks: while the caller's kernel works on chunk k, the read of
chunk k+1 and the accumulate of chunk k−1 are in flight (request-based RMA), and the chunk
buffers stay small enough to be cache- (or pinned-) resident.

A second small window holds per-worker status slots (float64): the master's progress report and
checkpoints read them without ever messaging the workers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .comm import MASTER
from .config import LOCK_MODES

__all__ = ["CenterWindow", "STATUS_FIELDS", "LOCK_MODES", "CHUNK_MULTIPLE", "round_chunk"]

#: Per-worker status slots in the status window, in order.
STATUS_FIELDS = ("steps", "exchanges", "loss", "distance", "resets", "bytes", "done", "spare")
_SLOTS = len(STATUS_FIELDS)

#: compute(lo, hi, c_chunk, e_chunk): given the center's elements [lo, hi) in ``c_chunk``, write
#: the elastic difference to add to them into ``e_chunk`` (and update the worker's own state).
ChunkKernel = Callable[[int, int, object, object], None]


#: Chunks are whole multiples of this many floats, so every chunk starts on a float4 (16-byte)
#: boundary and the GPU kernels keep their vectorised path for all of them.
CHUNK_MULTIPLE = 64


def round_chunk(chunk: int) -> int:
    """``chunk`` rounded down to a multiple of :data:`CHUNK_MULTIPLE` (at least one)."""
    return max(CHUNK_MULTIPLE, int(chunk) // CHUNK_MULTIPLE * CHUNK_MULTIPLE)


class CenterWindow:
    """The center x̃ (float32, n elements) in an RMA window owned by rank 0.

    Collective: every rank of ``comm`` constructs it, rank 0 passes the initial center.
    ``n_workers`` status slots are reserved, one per worker (world rank w uses slot w − 1).
    """

    def __init__(
        self,
        comm,
        n: int,
        n_workers: int,
        initial: np.ndarray | None = None,
        lock_mode: str = "shared",
        chunk: int = 1 << 18,
        alloc_chunk: Callable[[int], object] | None = None,
        initial_status: dict[str, np.ndarray] | None = None,
    ):
        from mpi4py import MPI  # noqa: PLC0415

        if lock_mode not in LOCK_MODES:
            raise ValueError(f"lock_mode must be one of {LOCK_MODES}, got {lock_mode!r}")
        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.n = int(n)
        self.n_workers = int(n_workers)
        self.lock_mode = lock_mode
        self.chunk = max(1, min(round_chunk(chunk), self.n or 1))
        is_owner = self.rank == MASTER

        itemsize = np.dtype(np.float32).itemsize
        self._win = MPI.Win.Allocate(self.n * itemsize if is_owner else 0, itemsize, comm=comm)
        self._status_win = MPI.Win.Allocate(
            self.n_workers * _SLOTS * 8 if is_owner else 0, 8, comm=comm
        )
        if is_owner:
            self._local = np.frombuffer(self._win.tomemory(), dtype=np.float32, count=self.n)
            status = np.frombuffer(self._status_win.tomemory(), dtype=np.float64)
            status[:] = 0.0
            # A resumed run starts from the checkpoint's counters, so the master's first
            # reports continue from there instead of from zero.
            for name, values in (initial_status or {}).items():
                status.reshape(self.n_workers, _SLOTS)[:, STATUS_FIELDS.index(name)] = values
            if initial is not None:
                if initial.shape != (self.n,):
                    raise ValueError(f"initial center has shape {initial.shape}, need ({self.n},)")
                self._local[:] = initial
            else:
                self._local[:] = 0.0
        else:
            self._local = None

        alloc = alloc_chunk or (lambda k: np.empty(k, dtype=np.float32))
        # Double buffers: chunk k computes in one while chunk k±1 is in flight in the other.
        self._c = [alloc(self.chunk), alloc(self.chunk)]
        self._e = [alloc(self.chunk), alloc(self.chunk)]
        # NO_OP still needs an origin buffer of the right size (mpi4py 4.1), never read.
        self._noop_origin = np.zeros(self.chunk, dtype=np.float32)
        self._status_buf = np.zeros(_SLOTS, dtype=np.float64)
        self._status_all = np.zeros(max(1, self.n_workers * _SLOTS), dtype=np.float64)

        # The initial fill must be complete before anyone locks, and every lock must be granted
        # before rank 0 goes busy (MPICH only progresses passive targets inside MPI calls).
        comm.Barrier()
        if lock_mode == "shared":
            self._win.Lock_all()
        self._status_win.Lock_all()
        comm.Barrier()
        self._closed = False

    # ---- collective teardown ------------------------------------------------------------
    def close(self) -> None:
        """Collective: end the epochs and free both windows."""
        if self._closed:
            return
        self._closed = True
        if self.lock_mode == "shared":
            self._win.Unlock_all()
        self._status_win.Unlock_all()
        self.comm.Barrier()
        self._win.Free()
        self._status_win.Free()

    # ---- center transfers ---------------------------------------------------------------
    def exchange(self, compute: ChunkKernel) -> int:
        """One elastic exchange with the center, pipelined over chunks.

        For each chunk the center's current values are read atomically, ``compute`` turns them
        into the difference e to add, and e is accumulated atomically. Returns bytes moved.
        """
        MPI = self._MPI
        bounds = self._bounds()
        if not bounds:
            return 0
        self._lock()
        try:
            acc_reqs: list = [None, None]
            read_req = self._rget(0, *bounds[0])
            for k, (lo, hi) in enumerate(bounds):
                buf = k % 2
                read_req.Wait()
                if k + 1 < len(bounds):
                    # Buffer 1-buf was last read by compute k-1, which has returned.
                    read_req = self._rget(1 - buf, *bounds[k + 1])
                if acc_reqs[buf] is not None:
                    acc_reqs[buf].Wait()  # e[buf] is still the origin of accumulate k-2
                compute(lo, hi, self._c[buf][: hi - lo], self._e[buf][: hi - lo])
                acc_reqs[buf] = self._win.Raccumulate(
                    self._e[buf][: hi - lo], MASTER, target=(lo, hi - lo, MPI.FLOAT), op=MPI.SUM
                )
            MPI.Request.Waitall([r for r in acc_reqs if r is not None])
            self._win.Flush(MASTER)
        finally:
            self._unlock()
        return 8 * self.n

    def read(self, out: np.ndarray) -> None:
        """Atomic read of the whole center into host array ``out`` (a snapshot)."""
        self._lock(shared_ok=True)
        try:
            for lo, hi in self._bounds():
                self._win.Get_accumulate(
                    self._noop_origin[: hi - lo],
                    out[lo:hi],
                    MASTER,
                    target=(lo, hi - lo, self._MPI.FLOAT),
                    op=self._MPI.NO_OP,
                )
            self._win.Flush(MASTER)
        finally:
            self._unlock(shared_ok=True)

    def add(self, delta: np.ndarray) -> None:
        """Atomic x̃ ← x̃ + delta (host array)."""
        self._accumulate_whole(delta, self._MPI.SUM)

    def write(self, values: np.ndarray) -> None:
        """Atomic x̃ ← values (host array), element by element (``REPLACE``): the synchronous
        rules set the window to the workers' common center exactly, so a checkpoint of the
        window is their center bit for bit."""
        self._accumulate_whole(values, self._MPI.REPLACE)

    def _accumulate_whole(self, values: np.ndarray, op) -> None:
        self._lock()
        try:
            for lo, hi in self._bounds():
                self._win.Accumulate(
                    values[lo:hi], MASTER, target=(lo, hi - lo, self._MPI.FLOAT), op=op
                )
            self._win.Flush(MASTER)
        finally:
            self._unlock()

    # ---- status slots -------------------------------------------------------------------
    def publish_status(self, worker_slot: int, **values: float) -> None:
        """Overwrite this worker's status slot (atomic element-wise REPLACE)."""
        buf = self._status_buf
        for name, value in values.items():
            buf[STATUS_FIELDS.index(name)] = value
        self._status_win.Accumulate(
            buf,
            MASTER,
            target=(worker_slot * _SLOTS, _SLOTS, self._MPI.DOUBLE),
            op=self._MPI.REPLACE,
        )
        self._status_win.Flush(MASTER)

    def read_status(self) -> dict[str, np.ndarray]:
        """All workers' status slots: field name → array of length n_workers."""
        if self.n_workers == 0:
            return {f: np.zeros(0) for f in STATUS_FIELDS}
        out = self._status_all
        self._status_win.Get_accumulate(
            np.zeros_like(out),
            out,
            MASTER,
            target=(0, out.size, self._MPI.DOUBLE),
            op=self._MPI.NO_OP,
        )
        self._status_win.Flush(MASTER)
        table = out.reshape(self.n_workers, _SLOTS)
        return {name: table[:, i].copy() for i, name in enumerate(STATUS_FIELDS)}

    # ---- internals ----------------------------------------------------------------------
    def _bounds(self) -> list[tuple[int, int]]:
        return [(lo, min(lo + self.chunk, self.n)) for lo in range(0, self.n, self.chunk)]

    def _rget(self, buf: int, lo: int, hi: int):
        return self._win.Rget_accumulate(
            self._noop_origin[: hi - lo],
            self._c[buf][: hi - lo],
            MASTER,
            target=(lo, hi - lo, self._MPI.FLOAT),
            op=self._MPI.NO_OP,
        )

    def _lock(self, shared_ok: bool = False) -> None:
        if self.lock_mode == "exclusive":
            kind = self._MPI.LOCK_SHARED if shared_ok else self._MPI.LOCK_EXCLUSIVE
            self._win.Lock(MASTER, kind)

    def _unlock(self, shared_ok: bool = False) -> None:
        if self.lock_mode == "exclusive":
            self._win.Unlock(MASTER)
