"""The center variable in an MPI one-sided window on the server ranks, and the exchange protocol.

The flat center is cut into ``servers`` contiguous slices, one per server rank 0..S−1, balanced
by bytes and cut on whole exchange chunks (:func:`shard_slices`). Each server exposes its slice
as its own memory of one window that MPI allocates (``Win.Allocate``: on ``Win.Create`` over
user memory passive-target RMA stalls while the owner is busy). In the default lock mode
(``shared``) every rank opens one passive-target epoch (``Lock_all``) right after a barrier and
keeps it open for the whole run, so workers read and accumulate while the servers compute or
sleep; in ``exclusive`` mode each transfer locks every server it touches instead, one after the
other in rank order (the same order on every rank: no deadlock). Reads are
``Get_accumulate(NO_OP)`` (``Rget_accumulate`` in the exchange) and differences go in with
``Accumulate(SUM)`` (``Raccumulate``); a synchronous rule's exact write is ``Accumulate(REPLACE)``:
all element-wise atomic against each other, so concurrent exchanges never tear an element and
every slice is exactly ``initial + Σ e`` (the conservation invariant the tests check, per slice
and in total).

The exchange is pipelined in chunks: the first read of every slice goes out at once, the
caller's kernel runs on whichever chunk arrives first, and while it does, the next read of that
slice and the accumulates of earlier chunks are in flight (request-based RMA). The chunk
buffers stay small enough to be cache- (or pinned-) resident.

This module is the center's exchange only: the workers' counters are on the status board
(status_board.py), and the servers other than the master wait in the end-of-run barrier with
``comm.keep_progress``, which keeps MPI's progress going for their slices meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .comm import MASTER
from .config import LOCK_MODES

__all__ = [
    "CenterWindow",
    "LOCK_MODES",
    "CHUNK_MULTIPLE",
    "round_chunk",
    "shard_slices",
    "describe_slice",
    "scatter_slices",
    "pieces",
]

#: compute(lo, hi, c_chunk, e_chunk): given the center's elements [lo, hi) in ``c_chunk``, write
#: the elastic difference to add to them into ``e_chunk`` (and update the worker's own state).
#: It may instead start that work and return a callable that finishes it (a GPU worker's copies
#: and kernel in flight): the exchange then starts the next chunk before it finishes this one,
#: and touches neither buffer of this chunk before the callable has returned, except that when
#: the callable has an ``input_consumed()`` method that returns True (the chunk's copy to the
#: device is done; it must never wait), the next read of the center goes into ``c_chunk`` at
#: once, before the exchange waits for the difference.
ChunkKernel = Callable[[int, int, object, object], Callable[[], None] | None]


#: Chunks are whole multiples of this many floats, so every chunk starts on a float4 (16-byte)
#: boundary and the GPU kernels keep their vectorised path for all of them.
CHUNK_MULTIPLE = 64

#: Floats per message of the initial fill of the other servers (each under 2^31 bytes).
_FILL_PIECE = 1 << 26
_FILL_TAG = 31


def round_chunk(chunk: int) -> int:
    """``chunk`` rounded down to a multiple of :data:`CHUNK_MULTIPLE` (at least one)."""
    return max(CHUNK_MULTIPLE, int(chunk) // CHUNK_MULTIPLE * CHUNK_MULTIPLE)


def shard_slices(n: int, servers: int, chunk: int) -> list[tuple[int, int]]:
    """[lo, hi) of each server's slice of an n-element center, in server (rank) order.

    Contiguous and balanced by bytes: each cut is the nearest multiple of the exchange chunk to
    s·n/servers, so a chunk never straddles two servers and an exchange has no more chunks than
    with one server. When the model holds fewer than one chunk per server the cuts fall on
    multiples of :data:`CHUNK_MULTIPLE` instead (16-byte aligned); a model smaller still leaves
    the last slices empty.
    """
    n, servers = int(n), int(servers)
    if servers < 1:
        raise ValueError(f"servers must be >= 1, got {servers}")
    unit = round_chunk(chunk)
    if n < servers * unit:
        unit = CHUNK_MULTIPLE
    cuts = [0]
    for s in range(1, servers):
        cut = round(s * n / servers / unit) * unit
        cuts.append(min(n, max(cut, cuts[-1])))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def describe_slice(lo: int, hi: int) -> str:
    """``[lo, hi), size`` of a slice of float32 elements, for people."""
    size = 4 * (hi - lo)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"[{lo:,d}, {hi:,d}), {size / scale:.1f} {unit}"
    return f"[{lo:,d}, {hi:,d}), {size} B"


class _Shard:
    """One server's slice as this rank addresses it: the target rank, where the slice starts,
    its chunks (global [lo, hi)) and the double buffers of its pipeline."""

    def __init__(self, target: int, lo: int, hi: int, chunk: int, alloc):
        self.target, self.lo = target, lo
        self.chunks = _pieces(lo, hi, chunk)
        k = min(chunk, hi - lo)
        # Double buffers: chunk k computes in one while chunk k±1 is in flight in the other.
        self.c = [alloc(k), alloc(k)]
        self.e = [alloc(k), alloc(k)]


class CenterWindow:
    """The center x̃ (float32, n elements) in an RMA window spread over ranks 0..servers−1.

    Collective: every rank of ``comm`` constructs it, and closes it with :meth:`close`; rank 0
    passes the whole initial center (zeros when none) and sends each other server its slice
    before anyone locks. ``chunk`` is this rank's exchange chunk (GPU workers take larger ones
    than the servers); the slices are cut on the largest chunk of any rank, so every rank cuts
    the same ones. ``alloc_chunk(k)`` makes the pipeline's host buffers (pinned ones on a GPU).
    """

    def __init__(
        self,
        comm,
        n: int,
        *,
        initial: np.ndarray | None = None,
        lock_mode: str = "shared",
        chunk: int = 1 << 18,
        alloc_chunk: Callable[[int], object] | None = None,
        servers: int = 1,
        n_workers: int = 1,
    ):
        from mpi4py import MPI  # noqa: PLC0415

        if lock_mode not in LOCK_MODES:
            raise ValueError(f"lock_mode must be one of {LOCK_MODES}, got {lock_mode!r}")
        if not 1 <= int(servers) <= comm.Get_size():
            raise ValueError(f"servers = {servers} must be in [1, {comm.Get_size()}]")
        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.n = int(n)
        self.lock_mode = lock_mode
        self.servers = int(servers)
        #: How many workers exchange with this center: rules that add averages (DOWNPOUR's
        #: buffers) add each worker's 1/n_workers share.
        self.n_workers = max(1, int(n_workers))
        self.chunk = max(1, min(round_chunk(chunk), self.n or 1))
        #: [lo, hi) of the slice each server rank holds (index = rank).
        self.slices = shard_slices(
            self.n, self.servers, comm.allreduce(round_chunk(chunk), op=MPI.MAX)
        )
        lo, hi = self.slices[self.rank] if self.rank < self.servers else (0, 0)

        itemsize = np.dtype(np.float32).itemsize
        self._win = MPI.Win.Allocate((hi - lo) * itemsize, itemsize, comm=comm)
        self._local = np.frombuffer(self._win.tomemory(), dtype=np.float32, count=hi - lo)
        self._fill(initial)

        alloc = alloc_chunk or (lambda k: np.empty(k, dtype=np.float32))
        # Empty slices (a model of fewer than 64 floats per server) are never addressed.
        self._shards = [
            _Shard(s, a, b, self.chunk, alloc) for s, (a, b) in enumerate(self.slices) if b > a
        ]
        # NO_OP still needs an origin buffer of the right size (mpi4py 4.1), never read.
        self._noop_origin = np.zeros(self.chunk, dtype=np.float32)
        self._probe = np.zeros(1, dtype=np.float32)

        # The initial fill must be complete before anyone locks, and every lock must be granted
        # before a server goes busy (MPICH only progresses passive targets inside MPI calls).
        comm.Barrier()
        if lock_mode == "shared":
            self._win.Lock_all()
        comm.Barrier()
        self._closed = False

    def _fill(self, initial) -> None:
        """This server's slice ← rank 0's initial center (zeros when there is none)."""
        self._local[:] = 0.0
        if self.rank == MASTER and initial is not None and initial.shape != (self.n,):
            raise ValueError(f"initial center has shape {initial.shape}, need ({self.n},)")
        scatter_slices(self.comm, self.slices, self.servers, initial, self._local)

    def replace_own_slice(self, values: np.ndarray) -> None:
        """A server's own slice ← ``values`` (element-wise atomic ``REPLACE``): a center that
        computes publishes its new slice while workers read it (docs/ARCHITECTURE.md §3.11)."""
        lo, hi = self.slices[self.rank]
        for a, b in _pieces(0, hi - lo, self.chunk):
            self._win.Accumulate(
                values[a:b], self.rank, target=(a, b - a, self._MPI.FLOAT), op=self._MPI.REPLACE
            )
        self._win.Flush(self.rank)

    # ---- collective teardown ------------------------------------------------------------
    def close(self) -> None:
        """Collective: end the epoch and free the window (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        if self.lock_mode == "shared":
            self._win.Unlock_all()
        self.comm.Barrier()
        self._win.Free()

    # ---- center transfers ---------------------------------------------------------------
    def exchange(self, compute: ChunkKernel) -> int:
        """One elastic exchange with the center, pipelined over chunks of every slice.

        For each chunk the center's current values are read atomically, ``compute`` turns them
        into the difference e to add, and e is accumulated atomically. Chunks of different
        slices are computed in the order their reads complete. When ``compute`` defers its
        work (returns a finisher), chunk k of a slice is started before chunk k−1 is finished
        and accumulated: the device works on k while MPI reads k+1 and accumulates k−1.
        Returns bytes moved.
        """
        MPI = self._MPI
        shards = self._shards
        if not shards:
            return 0
        self._lock()
        try:
            reads = [self._rget(sh, 0) for sh in shards]  # every server's first chunk at once
            done = [0] * len(shards)  # chunks of each slice read so far
            accs = [[None, None] for _ in shards]
            # Per slice, the chunk started but not yet finished: (its buffer, index, finisher).
            started: list[tuple[int, int, Callable[[], None]] | None] = [None] * len(shards)
            while True:
                i = MPI.Request.Waitany(reads)  # completed reads become REQUEST_NULL
                if i == MPI.UNDEFINED:
                    break
                sh, k = shards[i], done[i]
                done[i] += 1
                buf = k % 2
                more = k + 1 < len(sh.chunks)
                if more and started[i] is None:
                    # Buffer 1-buf was last read by compute k-1 of this slice, which finished.
                    reads[i] = self._rget(sh, k + 1)
                if accs[i][buf] is not None:
                    accs[i][buf].Wait()  # e[buf] is still the origin of accumulate k-2
                lo, hi = sh.chunks[k]
                finish = compute(lo, hi, sh.c[buf][: hi - lo], sh.e[buf][: hi - lo])
                if started[i] is not None:  # chunk k-1: finish it, send it, reuse its buffers
                    consumed = getattr(started[i][2], "input_consumed", None)
                    early = more and consumed is not None and consumed()
                    if early:  # its center chunk is on the device: read k+1 before waiting
                        reads[i] = self._rget(sh, k + 1)
                    self._finish(i, *started[i], accs)
                    started[i] = None
                    if more and not early:
                        reads[i] = self._rget(sh, k + 1)
                if finish is None:
                    self._accumulate(i, buf, k, accs)
                else:
                    started[i] = (buf, k, finish)
            for i, pending in enumerate(started):
                if pending is not None:
                    self._finish(i, *pending, accs)
            MPI.Request.Waitall([r for pair in accs for r in pair if r is not None])
            for sh in shards:
                self._win.Flush(sh.target)
        finally:
            self._unlock()
        return 8 * self.n

    def _finish(self, i: int, buf: int, k: int, finish: Callable[[], None], accs) -> None:
        finish()
        self._accumulate(i, buf, k, accs)

    def _accumulate(self, i: int, buf: int, k: int, accs) -> None:
        sh = self._shards[i]
        lo, hi = sh.chunks[k]
        accs[i][buf] = self._win.Raccumulate(
            sh.e[buf][: hi - lo],
            sh.target,
            target=(lo - sh.lo, hi - lo, self._MPI.FLOAT),
            op=self._MPI.SUM,
        )

    def read(self, out: np.ndarray) -> None:
        """Atomic read of the whole center (every slice) into host array ``out``."""
        MPI = self._MPI
        self._lock(shared_ok=True)
        try:
            for sh in self._shards:  # all in flight at once; one flush per server
                for lo, hi in sh.chunks:
                    self._win.Get_accumulate(
                        self._noop_origin[: hi - lo],
                        out[lo:hi],
                        sh.target,
                        target=(lo - sh.lo, hi - lo, MPI.FLOAT),
                        op=MPI.NO_OP,
                    )
            for sh in self._shards:
                self._win.Flush(sh.target)
        finally:
            self._unlock()

    def add(self, delta: np.ndarray) -> None:
        """Atomic x̃ ← x̃ + delta (host array), over every slice."""
        self._accumulate_whole(delta, self._MPI.SUM)

    def write(self, values: np.ndarray) -> None:
        """Atomic x̃ ← values (host array), element by element (``REPLACE``), over every slice:
        the synchronous rules set the window to the workers' common center exactly, so a
        checkpoint of the window is their center bit for bit."""
        self._accumulate_whole(values, self._MPI.REPLACE)

    def _accumulate_whole(self, values: np.ndarray, op) -> None:
        MPI = self._MPI
        self._lock()
        try:
            for sh in self._shards:
                for lo, hi in sh.chunks:
                    self._win.Accumulate(
                        values[lo:hi], sh.target, target=(lo - sh.lo, hi - lo, MPI.FLOAT), op=op
                    )
            for sh in self._shards:
                self._win.Flush(sh.target)
        finally:
            self._unlock()

    def local_slice(self) -> tuple[int, int, np.ndarray]:
        """(lo, hi, a copy of the values) of the slice this rank serves ((0, 0, empty) on a
        worker), read from its own memory. For checks when no exchange is in flight."""
        lo, hi = self.slices[self.rank] if self.rank < self.servers else (0, 0)
        exclusive = self.lock_mode == "exclusive"
        if exclusive:  # Win_sync needs an epoch; the shared mode's Lock_all is one
            self._win.Lock(self.rank, self._MPI.LOCK_SHARED)
        try:
            self._win.Sync()  # the workers' flushed accumulates, visible to this process's loads
            return lo, hi, self._local.copy()
        finally:
            if exclusive:
                self._win.Unlock(self.rank)

    # ---- internals ----------------------------------------------------------------------
    def _rget(self, sh: _Shard, k: int):
        """Start the read of chunk k of slice ``sh`` into its buffer k mod 2."""
        lo, hi = sh.chunks[k]
        return self._win.Rget_accumulate(
            self._noop_origin[: hi - lo],
            sh.c[k % 2][: hi - lo],
            sh.target,
            target=(lo - sh.lo, hi - lo, self._MPI.FLOAT),
            op=self._MPI.NO_OP,
        )

    def _lock(self, shared_ok: bool = False) -> None:
        """Exclusive mode: lock every server of a slice, one after the other in rank order."""
        if self.lock_mode != "exclusive":
            return
        MPI = self._MPI
        kind = MPI.LOCK_SHARED if shared_ok else MPI.LOCK_EXCLUSIVE
        several = len(self._shards) > 1
        for sh in self._shards:
            self._win.Lock(sh.target, kind)
            if several:
                # MPI may grant a lock only at the first operation, so two ranks could each get
                # one server and wait for the other's forever. A one-element read completes the
                # grant before the next server is asked: all ranks lock in one order, no cycle.
                self._win.Get_accumulate(
                    self._noop_origin[:1],
                    self._probe,
                    sh.target,
                    target=(0, 1, MPI.FLOAT),
                    op=MPI.NO_OP,
                )
                self._win.Flush(sh.target)

    def _unlock(self) -> None:
        if self.lock_mode == "exclusive":
            for sh in self._shards:
                self._win.Unlock(sh.target)


def scatter_slices(comm, slices, servers: int, whole: np.ndarray | None, local: np.ndarray) -> bool:
    """Collective: each server's ``local`` ← its slice of rank 0's ``whole`` vector, sent in
    pieces before any window is locked. Returns whether rank 0 had one (when not, ``local``
    is left as it is)."""
    rank = comm.Get_rank()
    given = comm.bcast(whole is not None, root=MASTER)
    if not given or rank >= servers:
        return given
    if rank == MASTER:
        lo, hi = slices[MASTER]
        local[:] = whole[lo:hi]
        for s in range(1, servers):
            for a, b in _pieces(*slices[s], _FILL_PIECE):
                comm.Send(whole[a:b], dest=s, tag=_FILL_TAG)
        return given
    lo, hi = slices[rank]
    for a, b in _pieces(lo, hi, _FILL_PIECE):
        comm.Recv(local[a - lo : b - lo], source=MASTER, tag=_FILL_TAG)
    return given


def _pieces(lo: int, hi: int, size: int):
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


#: [lo, hi) in pieces of at most ``size`` (the chunks of a transfer).
pieces = _pieces
