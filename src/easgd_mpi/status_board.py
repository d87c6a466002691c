"""The status board: each worker's counters in a small MPI one-sided window on rank 0.

Every worker overwrites its own row (steps, exchanges, loss, distance to the center, resets,
bytes moved, done, bytes of its pushes as coded) about every 50 ms and when it finishes; the
master reads all rows for its progress lines and metrics without ever messaging a worker. The
rows are float64 and live in memory that MPI allocates on rank 0 (``Win.Allocate``; the other
ranks expose nothing). Every rank keeps one passive-target epoch (``Lock_all``) open from
construction to :meth:`StatusBoard.close`. A worker writes its row with ``Accumulate(REPLACE)``
and the master reads with ``Get_accumulate(NO_OP)``: element-wise atomic against each other, so
the master never sees a torn number (a row may mix two reports: each number is one report's).
"""

from __future__ import annotations

import numpy as np

from .comm import MASTER

__all__ = ["StatusBoard", "STATUS_FIELDS"]

#: The numbers in each worker's row, in order. ``push_bytes``: its pushes in coded form
#: (docs/ARCHITECTURE.md §2.16). The last four are a center that computes (§3.11): the pushes,
#: their summed and largest staleness, and the seconds the worker waited for the servers.
STATUS_FIELDS = (
    "steps",
    "exchanges",
    "loss",
    "distance",
    "resets",
    "bytes",
    "done",
    "push_bytes",
    "pushes",
    "staleness",
    "staleness_max",
    "wait",
)
_SLOTS = len(STATUS_FIELDS)


class StatusBoard:
    """One row of :data:`STATUS_FIELDS` per worker, in a window on rank 0 (the master).

    Collective: every rank of ``comm`` constructs it, and closes it with :meth:`close`.
    ``initial`` (read on rank 0) maps some fields to per-worker values: a resumed run's rows
    start from the checkpoint's counters, so the master's first reports continue from there
    instead of from zero. Every other number starts at zero.
    """

    def __init__(self, comm, n_workers: int, initial: dict[str, np.ndarray] | None = None):
        from mpi4py import MPI  # noqa: PLC0415

        self._MPI = MPI
        self.comm = comm
        self.n_workers = int(n_workers)
        rank = comm.Get_rank()
        self._win = MPI.Win.Allocate(
            self.n_workers * _SLOTS * 8 if rank == MASTER else 0, 8, comm=comm
        )
        if rank == MASTER:
            rows = np.frombuffer(self._win.tomemory(), dtype=np.float64)
            rows[:] = 0.0
            for name, values in (initial or {}).items():
                rows.reshape(self.n_workers, _SLOTS)[:, STATUS_FIELDS.index(name)] = values
        self._row = np.zeros(_SLOTS, dtype=np.float64)
        self._all = np.zeros(max(1, self.n_workers * _SLOTS), dtype=np.float64)
        self._noop_origin = np.zeros_like(self._all)
        # The initial rows must be written before anyone locks, and every lock granted before
        # the master goes busy (MPICH progresses passive targets only inside MPI calls).
        comm.Barrier()
        self._win.Lock_all()
        comm.Barrier()
        self._closed = False

    def publish(self, worker: int, **values: float) -> None:
        """Overwrite worker ``worker``'s row (0-based: world rank − servers) with ``values``
        (field name → number; a field not named keeps this rank's last value published)."""
        row = self._row
        for name, value in values.items():
            row[STATUS_FIELDS.index(name)] = value
        self._win.Accumulate(
            row,
            MASTER,
            target=(worker * _SLOTS, _SLOTS, self._MPI.DOUBLE),
            op=self._MPI.REPLACE,
        )
        self._win.Flush(MASTER)

    def read(self) -> dict[str, np.ndarray]:
        """Every worker's row: field name → array of length n_workers (new arrays)."""
        if self.n_workers == 0:
            return {f: np.zeros(0) for f in STATUS_FIELDS}
        out = self._all
        self._win.Get_accumulate(
            self._noop_origin,
            out,
            MASTER,
            target=(0, out.size, self._MPI.DOUBLE),
            op=self._MPI.NO_OP,
        )
        self._win.Flush(MASTER)
        table = out.reshape(self.n_workers, _SLOTS)
        return {name: table[:, i].copy() for i, name in enumerate(STATUS_FIELDS)}

    def close(self) -> None:
        """Collective: end the epoch and free the window (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        self._win.Unlock_all()
        self.comm.Barrier()
        self._win.Free()
