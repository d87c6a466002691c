"""The servers' inboxes of a center that computes, their counters and the center-side rows.

A rule whose center computes (``Config.is_active``, docs/ARCHITECTURE.md §3.11) adds three
windows to the center's, one slice per server, cut exactly as the center is:

- the **inbox** (float32, the slice): workers push their update u into it with
  ``Accumulate(SUM)``; the server takes what is there with a ``NO_OP`` read and subtracts what
  it read with ``Accumulate(SUM)``. Both are accumulates, and MPI keeps accumulates that use one
  operation or ``NO_OP`` element-wise atomic against each other (the default
  ``accumulate_ops = same_op_no_op``), so nothing pushed is ever lost: a push that lands
  between the read and the subtraction stays in the inbox for the next take (up to the rounding
  of that one subtraction);
- the **counters** (int64 × 4): ``arrived`` (pushes whose data is complete in the inbox: a
  worker flushes its data, then adds 1 with ``Fetch_and_op`` and learns its ticket), ``applied``
  (how many of them the server has applied; it sets it with ``REPLACE``), ``applies`` and
  ``busy_us`` (the server's apply count and time, for the metrics);
- the **rows** (float32, rows × slice): the center-side vectors of the rule (momentum, Adagrad
  sums, moving average, outer optimizer state), published by the server with ``REPLACE`` after
  every apply, read by the master for checkpoints and by a single worker for its cut.

With compressed pushes (``compress = "int8" | "fp8"``, docs/ARCHITECTURE.md §2.16) MPI
cannot add the codes (each block has its own scale), so each worker gets a **coded slot** of
its own at every server instead of adding to the inbox: two more windows, the **codes**
(uint8, workers × slice) and the **scales** (float32, workers × the slice's blocks), and one
more int64 counter per worker after :data:`COUNTER_FIELDS`, the pushes written to its slot.
A worker puts its codes and scales, flushes, adds 1 to its slot's counter, flushes, then adds
1 to ``arrived``; the server that sees ``arrived`` move reads the slot counters, decodes every
slot that holds a push it has not taken and sums the decoded values: the same float32 update
the inbox gives. A slot is written again only after its push was applied (``push_lag = 0``,
which config.py requires with compression on these rules), so the server never reads a slot
that is being written. None of this exists when compression is off.

Every rank keeps one ``Lock_all`` epoch on the three windows from construction to
:meth:`CenterInbox.close`, as the center's window does in its shared lock mode; nothing takes
a lock per transfer, so there is no lock order to keep. This module moves bytes and counts;
what a server computes is center_rules.py's, when it computes center_server.py's.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .center import pieces, scatter_slices
from .comm import MASTER
from .compress import BLOCK, decode_push

__all__ = ["CenterInbox", "COUNTER_FIELDS"]

#: The int64 counters of each server, in this order.
COUNTER_FIELDS = ("arrived", "applied", "applies", "busy_us")
_ARRIVED, _APPLIED, _APPLIES, _BUSY = range(4)
#: Polls of the applied counter a waiting worker spins before it sleeps between polls.
_SPIN_POLLS = 50
_WAIT_SLEEP = 50e-6


class CenterInbox:
    """Collective over ``center.comm``: the inboxes, counters and rows of every server.

    ``rows``: the rule's center-side vector names. ``initial_rows`` (rank 0; whole vectors,
    e.g. a checkpoint's) fill the rows; a row rank 0 does not give starts as ``fresh(name,
    center_slice)`` on each server (zeros, or a copy of the center for a moving average).
    ``codec`` ("int8", "fp8"; None: float32 pushes): the workers push codes into slots of
    their own, decoded by the server (module docstring); ``decoder`` is the backend whose
    ``decompress`` the server uses (the NumPy backend: the servers compute on the host).
    """

    def __init__(
        self,
        center,
        rows=(),
        initial_rows: dict | None = None,
        fresh=None,
        codec: str | None = None,
        decoder=None,
    ):
        from mpi4py import MPI  # noqa: PLC0415

        self._MPI = MPI
        self.center = center
        comm = self.comm = center.comm
        self.rank, self.servers = center.rank, center.servers
        self.slices = center.slices
        #: The workers: every rank that is not a server.
        self.n_workers = comm.Get_size() - self.servers
        self.row_names = tuple(rows)
        lo, hi = self.slices[self.rank] if self.rank < self.servers else (0, 0)
        self.lo, self.size = lo, hi - lo
        k = len(self.row_names)
        self._inbox = MPI.Win.Allocate(4 * self.size, 4, comm=comm)
        self.codec = codec
        n_counters = len(COUNTER_FIELDS) + (self.n_workers if codec else 0)
        self._counters = MPI.Win.Allocate(8 * n_counters if self.size else 0, 8, comm=comm)
        self._rows = MPI.Win.Allocate(4 * k * self.size, 4, comm=comm)
        self._inbox_mem = np.frombuffer(self._inbox.tomemory(), np.float32, count=self.size)
        self._inbox_mem[:] = 0.0
        if self.size:
            np.frombuffer(self._counters.tomemory(), np.int64)[:] = 0
        rows_mem = np.frombuffer(self._rows.tomemory(), np.float32, count=k * self.size)
        center_slice = center.local_slice()[2] if self.size else None
        for r, name in enumerate(self.row_names):
            local = rows_mem[r * self.size : (r + 1) * self.size]
            whole = (initial_rows or {}).get(name) if self.rank == MASTER else None
            if not scatter_slices(comm, self.slices, self.servers, whole, local) and self.size:
                local[:] = fresh(name, center_slice) if fresh else 0.0
        # The servers whose slice is not empty (a tiny model leaves the last ones empty).
        self.targets = [s for s, (a, b) in enumerate(self.slices) if b > a]
        self.chunk = center.chunk
        self._one = np.ones(1, np.int64)
        self._ticket = np.zeros(1, np.int64)
        self._count_origin = np.zeros(len(COUNTER_FIELDS), np.int64)
        self._count = np.zeros(len(COUNTER_FIELDS), np.int64)
        self._own_origin = np.zeros(len(COUNTER_FIELDS), np.int64)
        self._own = np.zeros(len(COUNTER_FIELDS), np.int64)
        self._noop = np.zeros(self.chunk, np.float32)
        self._taken_neg = np.empty(self.size, np.float32)
        self._windows = [self._inbox, self._counters, self._rows]
        if codec:
            self._init_slots(decoder)
        comm.Barrier()
        for win in self._windows:
            win.Lock_all()
        comm.Barrier()
        self._closed = False

    def _init_slots(self, decoder) -> None:
        """The coded slots: codes and scales windows, each worker's slot counter, the blocks
        of every server's slice in a whole vector of scales (:attr:`scale_slices`)."""
        MPI = self._MPI
        p, k, nb = self.n_workers, self.size, -(-self.size // BLOCK)
        self._codes = MPI.Win.Allocate(p * k, 1, comm=self.comm)
        self._scales = MPI.Win.Allocate(4 * p * nb, 4, comm=self.comm)
        self._windows += [self._codes, self._scales]
        #: Where each server's blocks sit in a worker's whole vector of scales.
        self.scale_slices, start = [], 0
        for lo, hi in self.slices:
            blocks = -(-(hi - lo) // BLOCK)
            self.scale_slices.append((start, start + blocks))
            start += blocks
        self.n_scales = start
        self.slot = self.rank - self.servers  # this worker's slot (negative on a server)
        self._decoder = decoder
        self._slot_counts = np.zeros(p, np.int64)
        self._slot_noop = np.zeros(p, np.int64)
        self._slot_taken = np.zeros(p, np.int64)  # pushes of each slot this server summed
        self._slot_codes = np.empty(k, np.uint8)
        self._slot_scales = np.empty(nb, np.float32)
        self._decoded = np.empty(k, np.float32)

    # ---- a worker's side ----------------------------------------------------------------
    def push(self, update: np.ndarray) -> list[int]:
        """Add ``update`` (host float32, the whole vector) to every server's inbox; returns
        this push's ticket at each server of :attr:`targets` (its arrival number there)."""
        MPI = self._MPI
        for s in self.targets:
            lo, hi = self.slices[s]
            for a, b in pieces(lo, hi, self.chunk):
                self._inbox.Accumulate(
                    update[a:b], s, target=(a - lo, b - a, MPI.FLOAT), op=MPI.SUM
                )
        for s in self.targets:
            self._inbox.Flush(s)  # the data is complete at the server before it is counted
        return self._count_arrival()

    def push_coded(self, codes: np.ndarray, scales: np.ndarray) -> list[int]:
        """Put a coded push into this worker's slot at every server: ``codes`` (host uint8,
        the whole vector, each server's slice coded in blocks from its start) and ``scales``
        (host float32, every server's blocks at :attr:`scale_slices`); returns the tickets
        as :meth:`push` does. The previous push of this worker must have been applied."""
        MPI = self._MPI
        for s in self.targets:
            lo, hi = self.slices[s]
            base = self.slot * (hi - lo)
            for a, b in pieces(lo, hi, self.chunk):
                self._codes.Put([codes[a:b], MPI.BYTE], s, target=(base + a - lo, b - a, MPI.BYTE))
            a, b = self.scale_slices[s]
            self._scales.Put(scales[a:b], s, target=(self.slot * (b - a), b - a, MPI.FLOAT))
        for s in self.targets:
            self._codes.Flush(s)
            self._scales.Flush(s)
        for s in self.targets:  # the slot holds a complete push, then it is counted
            self._counters.Accumulate(
                [self._one, MPI.INT64_T],
                s,
                target=(len(COUNTER_FIELDS) + self.slot, 1, MPI.INT64_T),
                op=MPI.SUM,
            )
        for s in self.targets:
            self._counters.Flush(s)
        return self._count_arrival()

    def _count_arrival(self) -> list[int]:
        """Add 1 to ``arrived`` at every server; returns this push's ticket at each."""
        MPI = self._MPI
        tickets = []
        for s in self.targets:
            self._counters.Fetch_and_op(
                [self._one, MPI.INT64_T], [self._ticket, MPI.INT64_T], s, _ARRIVED, op=MPI.SUM
            )
            self._counters.Flush(s)
            tickets.append(int(self._ticket[0]) + 1)
        return tickets

    def counters(self) -> np.ndarray:
        """Every server's counters (len(targets) × :data:`COUNTER_FIELDS`, int64; atomic
        element by element)."""
        MPI = self._MPI
        out = np.zeros((len(self.targets), len(COUNTER_FIELDS)), np.int64)
        for i, s in enumerate(self.targets):
            self._counters.Get_accumulate(
                [self._count_origin, MPI.INT64_T], [self._count, MPI.INT64_T], s, op=MPI.NO_OP
            )
            self._counters.Flush(s)
            out[i] = self._count
        return out

    def wait_applied(self, tickets: list[int], lag: int = 0) -> float:
        """Wait until every server has applied this worker's push ``tickets`` − ``lag``;
        returns the seconds waited. Spins briefly, then gives the core away between polls
        (the server it waits for may share it)."""
        start = time.perf_counter()
        need = np.asarray(tickets, np.int64) - int(lag)
        polls = 0
        while True:
            applied = self.counters()[:, _APPLIED]
            if np.all(applied >= need):
                return time.perf_counter() - start
            polls += 1
            if polls < _SPIN_POLLS:
                os.sched_yield()
            else:
                time.sleep(_WAIT_SLEEP)

    def read_row(self, name: str, out: np.ndarray) -> None:
        """``out`` (host, the whole vector) ← the center-side row ``name`` of every server
        (atomic element by element; the master's checkpoints, a single worker's cut)."""
        MPI = self._MPI
        r = self.row_names.index(name)
        for s in self.targets:
            lo, hi = self.slices[s]
            base = r * (hi - lo)
            for a, b in pieces(lo, hi, self.chunk):
                self._rows.Get_accumulate(
                    self._noop[: b - a],
                    out[a:b],
                    s,
                    target=(base + a - lo, b - a, MPI.FLOAT),
                    op=MPI.NO_OP,
                )
        for s in self.targets:
            self._rows.Flush(s)

    # ---- a server's side (its own slice) ------------------------------------------------
    def arrived(self) -> int:
        """Pushes whose data is complete in this server's inbox."""
        MPI = self._MPI
        # Buffers of their own: on the master this runs in the center's thread while the main
        # thread reads the counters for its metrics.
        self._counters.Get_accumulate(
            [self._own_origin, MPI.INT64_T], [self._own, MPI.INT64_T], self.rank, op=MPI.NO_OP
        )
        self._counters.Flush(self.rank)
        return int(self._own[_ARRIVED])

    def take(self, out: np.ndarray) -> None:
        """``out`` ← what this server's inbox holds, and that much taken out of it (coded
        pushes: the sum of the slots it has not taken yet, decoded)."""
        if self.codec:
            self._take_slots(out)
            return
        MPI = self._MPI
        for a, b in pieces(0, self.size, self.chunk):
            self._inbox.Get_accumulate(
                self._noop[: b - a], out[a:b], self.rank, target=(a, b - a, MPI.FLOAT), op=MPI.NO_OP
            )
        self._inbox.Flush(self.rank)
        np.negative(out, out=self._taken_neg)
        for a, b in pieces(0, self.size, self.chunk):
            self._inbox.Accumulate(
                self._taken_neg[a:b], self.rank, target=(a, b - a, MPI.FLOAT), op=MPI.SUM
            )
        self._inbox.Flush(self.rank)

    def _take_slots(self, out: np.ndarray) -> None:
        """out ← the sum of the decoded pushes of every slot whose counter moved since this
        server last took it. Read after ``arrived`` (CenterServer.poll): a slot counted there
        is complete here; one counted here but not yet there is only applied sooner."""
        MPI = self._MPI
        self._counters.Get_accumulate(
            [self._slot_noop, MPI.INT64_T],
            [self._slot_counts, MPI.INT64_T],
            self.rank,
            target=(len(COUNTER_FIELDS), self.n_workers, MPI.INT64_T),
            op=MPI.NO_OP,
        )
        self._counters.Flush(self.rank)
        out[:] = 0.0
        k, nb = self.size, self._slot_scales.size
        for w in np.flatnonzero(self._slot_counts > self._slot_taken):
            if self._slot_counts[w] - self._slot_taken[w] > 1:
                raise RuntimeError(
                    f"worker {w} wrote its coded slot again before its push was applied"
                )
            for a, b in pieces(0, k, self.chunk):
                into = [self._slot_codes[a:b], MPI.BYTE]
                self._codes.Get(into, self.rank, target=(w * k + a, b - a, MPI.BYTE))
            self._scales.Get(self._slot_scales, self.rank, target=(w * nb, nb, MPI.FLOAT))
            self._codes.Flush(self.rank)
            self._scales.Flush(self.rank)
            codes, scales = self._slot_codes, self._slot_scales
            decode_push(self._decoder, codes, scales, self._decoded, self.codec)
            out += self._decoded
            self._slot_taken[w] = self._slot_counts[w]

    def publish(self, rows: dict, applied: int, busy_s: float) -> None:
        """This server's rows ← ``rows`` (REPLACE), then ``applied`` and the apply counters:
        a worker that sees its ticket applied finds the new center and rows published."""
        MPI = self._MPI
        for r, name in enumerate(self.row_names):
            values = rows[name]
            for a, b in pieces(0, self.size, self.chunk):
                self._rows.Accumulate(
                    values[a:b],
                    self.rank,
                    target=(r * self.size + a, b - a, MPI.FLOAT),
                    op=MPI.REPLACE,
                )
        self._rows.Flush(self.rank)
        self._set_counter(_APPLIED, applied, MPI.REPLACE)
        self._set_counter(_APPLIES, 1, MPI.SUM)
        self._set_counter(_BUSY, int(busy_s * 1e6), MPI.SUM)
        self._counters.Flush(self.rank)

    def local_rows(self) -> dict[str, np.ndarray]:
        """Copies of this server's rows as they are now (its start state)."""
        self._rows.Sync()
        mem = np.frombuffer(
            self._rows.tomemory(), np.float32, count=len(self.row_names) * self.size
        )
        return {
            name: mem[r * self.size : (r + 1) * self.size].copy()
            for r, name in enumerate(self.row_names)
        }

    def _set_counter(self, index: int, value: int, op) -> None:
        buf = np.array([value], np.int64)
        self._counters.Accumulate(
            [buf, self._MPI.INT64_T], self.rank, target=(index, 1, self._MPI.INT64_T), op=op
        )
        self._counters.Flush(self.rank)

    # ---- collective teardown ------------------------------------------------------------
    def close(self) -> None:
        """Collective: end the epochs and free the windows (a second call does nothing)."""
        if self._closed:
            return
        self._closed = True
        for win in self._windows:
            win.Unlock_all()
        self.comm.Barrier()
        for win in self._windows:
            win.Free()
