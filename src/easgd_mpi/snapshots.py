"""Worker states for checkpoints, and the stop signal, through RMA windows on the master.

The master never messages a worker and a training worker never waits for the master (a finished
one polls for the master's release, which its final checkpoint needs). Three windows on rank 0,
all in one long ``Lock_all`` epoch (whatever the center's lock mode):

- *control* (int64): the checkpoint epoch the master asks for, a stop flag (end training now),
  and a release flag (the final checkpoint has every state: finished workers may leave);
- *meta* (int64, one block per worker): whether it finished or wants the run stopped, which of
  its two halves holds its latest complete state, and per half the epoch answered, its counters
  at that moment (steps, exchanges, resets) and the words of its random-number generator state;
- *states* (float32): per worker two halves of its saved rows (x, and v or DOWNPOUR's pending
  sum), written with ``Accumulate(REPLACE)``; and two halves of one "cut center" row, written
  by the first worker where the rule defines the center at the moment of the cut (the
  synchronous rules: the workers' common replica; a single worker: the window, which nobody
  else moves).

A worker looks at *control* every 50 ms (the collective rules: every ~16 steps, on the same
round on every worker, deciding together); when the epoch is new it copies its state into the
half it did not write last time — training pauses only for that copy — then writes that half's
meta block, then flips its *latest* word to it. The half named *latest* is therefore always
complete and is not written again until the worker answers a newer epoch, which the master
asks for only after it has read what it needs: a worker that is stopped (SIGSTOP, a hung GPU)
and wakes while the master reads writes the other half. So the master can write a checkpoint
with the states at hand after a bounded wait (``checkpoint.state_wait``) instead of waiting
for a stalled worker, and every state it stores is whole and matches its counters.

Before any worker answers, the master fills half 0 of every worker with the state it starts
from (the center and a zero velocity, or the resumed checkpoint's rows), so a worker that never
answers still has a state at hand.
"""

from __future__ import annotations

import numpy as np

from .comm import MASTER
from .workerstate import COUNTERS, RNG_WORDS, WorkerStates, encode_rng

__all__ = ["WorkerSide", "MasterSide", "open_state_channel"]

# control slots: the epoch asked for; stop training; release finished workers (run is over)
_EPOCH, _STOP, _RELEASE, _CONTROL = 0, 1, 2, 4
# meta: per worker a common block, then two half blocks
_FINISHED, _WANTS_STOP, _LATEST, _COMMON = 0, 1, 2, 4
_ACK, _STEPS, _EXCH, _RESETS, _RNG0 = range(5)
_COUNTER_SLOTS = dict(zip(COUNTERS, (_STEPS, _EXCH, _RESETS), strict=True))
_RNG_WORDS = RNG_WORDS
_HALF = _RNG0 + _RNG_WORDS + 1  # room to grow
_META = _COMMON + 2 * _HALF
#: Largest float count per MPI message (keeps each under 2^31 bytes).
_MESSAGE = 1 << 22


class _StateWindows:
    """The three windows on rank 0 and their layout; every rank builds them (collective).

    ``row_names``: the rows each worker saves (``Config.state_rows``; empty: counters and
    generators only). ``cut_center``: whether the first worker also saves the center of its cut,
    and with it the rule's center-side rows ``center_rows`` (``Config.center_rows``).
    """

    def __init__(
        self, comm, n: int, n_workers: int, row_names=(), cut_center: bool = False, center_rows=()
    ):
        from mpi4py import MPI  # noqa: PLC0415

        self._MPI = MPI
        self.comm = comm
        self.n = int(n)
        self.p = int(n_workers)
        self.row_names = tuple(row_names)
        self.rows = len(self.row_names)
        self.cut_center = bool(cut_center) and self.rows > 0
        #: The rows of a cut: the center, then the center-side rows.
        self.cut_names = ("center", *center_rows) if self.cut_center else ()
        owner = comm.Get_rank() == MASTER
        self._control = MPI.Win.Allocate(_CONTROL * 8 if owner else 0, 8, comm=comm)
        self._meta = MPI.Win.Allocate(self.p * _META * 8 if owner else 0, 8, comm=comm)
        # [p][2 halves][rows][n], then [2 halves][cut rows][n] for the cut center
        self._center_base = self.p * 2 * self.rows * self.n
        self._floats = self._center_base + 2 * len(self.cut_names) * self.n
        self._states = MPI.Win.Allocate(self._floats * 4 if owner else 0, 4, comm=comm)

    def _open(self) -> None:
        """Every rank: the long shared epoch on all three windows (after the owner filled them)."""
        self.comm.Barrier()
        for win in (self._control, self._meta, self._states):
            win.Lock_all()
        self.comm.Barrier()

    def _row_offset(self, slot: int, half: int, row: int) -> int:
        return ((slot * 2 + half) * self.rows + row) * self.n

    def _cut_offset(self, half: int, row: int) -> int:
        return self._center_base + (half * len(self.cut_names) + row) * self.n

    def close(self) -> None:
        """Collective: end the epoch and free the windows."""
        for win in (self._control, self._meta, self._states):
            win.Unlock_all()
        self.comm.Barrier()
        for win in (self._control, self._meta, self._states):
            win.Free()


class WorkerSide(_StateWindows):
    """A worker's end of the channel: look at the master's control word, answer its epochs."""

    def __init__(
        self, comm, n: int, n_workers: int, row_names=(), cut_center: bool = False, center_rows=()
    ):
        super().__init__(comm, n, n_workers, row_names, cut_center, center_rows)
        self._ctl_buf = np.zeros(_CONTROL, np.int64)
        self._ctl_origin = np.zeros(_CONTROL, np.int64)  # NO_OP still wants an origin
        self._half_row = np.zeros(_HALF, np.int64)
        self._common_row = np.zeros(_COMMON, np.int64)
        self._acked = 0
        self._latest = 0  # the half the master filled; a worker's first answer writes half 1
        self._host = None  # staging buffer, made at the first copy that needs one
        self._open()

    def peek(self) -> tuple[int, bool, bool]:
        """The master's control word: (epoch asked for, stop, release)."""
        MPI = self._MPI
        ctl = self._ctl_buf
        self._control.Get_accumulate(
            [self._ctl_origin, MPI.INT64_T], [ctl, MPI.INT64_T], MASTER, op=MPI.NO_OP
        )
        self._control.Flush(MASTER)
        return int(ctl[_EPOCH]), bool(ctl[_STOP]), bool(ctl[_RELEASE])

    def answer(
        self,
        slot: int,
        algo,
        rng,
        steps: int,
        epoch: int,
        finished: bool = False,
        wants_stop: bool = False,
    ) -> bool:
        """Save the state for ``epoch`` if not done yet (into the other half), then report the
        flags and which half is the latest. Returns whether it saved a new epoch's state."""
        saved = epoch != self._acked
        if not saved and not (wants_stop or finished):
            return False
        MPI = self._MPI
        if saved:
            half = 1 - self._latest
            if self.rows:
                self._write_state(slot, half, algo)
            row = self._half_row
            row[_ACK], row[_STEPS], row[_EXCH] = epoch, steps, algo.exchanges
            row[_RESETS] = algo.resets
            row[_RNG0 : _RNG0 + _RNG_WORDS] = encode_rng(rng)
            target = slot * _META + _COMMON + half * _HALF
            self._meta.Accumulate(
                [row, MPI.INT64_T], MASTER, target=(target, _HALF, MPI.INT64_T), op=MPI.REPLACE
            )
            self._meta.Flush(MASTER)  # the half is complete before it is named the latest
            self._latest, self._acked = half, epoch
        common = self._common_row
        common[_FINISHED], common[_WANTS_STOP], common[_LATEST] = finished, wants_stop, self._latest
        self._meta.Accumulate(
            [common, MPI.INT64_T],
            MASTER,
            target=(slot * _META, _COMMON, MPI.INT64_T),
            op=MPI.REPLACE,
        )
        self._meta.Flush(MASTER)
        return saved

    def _write_state(self, slot: int, half: int, algo) -> None:
        b = algo.backend
        for r, arr in enumerate(algo.saved_rows()[: self.rows]):
            self._put(self._row_offset(slot, half, r), self._host_copy(b, arr))
        if self.cut_center and slot == 0:
            cut = algo.cut_center()
            if cut is None:  # an asynchronous rule with one worker: nobody else moves the center
                if self._host is None:
                    self._host = b.host_empty(self.n)
                algo.center.read(self._host)
                cut = self._host
            else:
                cut = self._host_copy(b, cut)
            self._put(self._cut_offset(half, 0), cut)
            for r, row in enumerate(algo.cut_state()[: len(self.cut_names) - 1]):
                self._put(self._cut_offset(half, 1 + r), self._host_copy(b, row))

    def _host_copy(self, b, arr):
        if not b.is_gpu or isinstance(arr, np.ndarray):  # already in host memory
            return arr
        if self._host is None:  # pinned, allocated once
            self._host = b.host_empty(self.n)
        return b.to_host(arr, self._host)

    def _put(self, base: int, src) -> None:
        MPI = self._MPI
        for lo in range(0, self.n, _MESSAGE):
            hi = min(lo + _MESSAGE, self.n)
            self._states.Accumulate(
                src[lo:hi], MASTER, target=(base + lo, hi - lo, MPI.FLOAT), op=MPI.REPLACE
            )
        # Complete before the next put may reuse the host staging buffer.
        self._states.Flush(MASTER)


class MasterSide(_StateWindows):
    """The master's end: ask for epochs, stop and release the workers, read their states.

    ``initial``: the state every worker starts this segment from (:class:`WorkerStates` whose
    rows are [p, n] or broadcast [n]), stored in half 0 before any worker answers, so a worker
    that never answers still has a state at hand; ``initial_center``: the cut center row, and
    ``initial_center_rows`` the center-side rows of the cut (name → [n]).
    """

    def __init__(
        self,
        comm,
        n: int,
        n_workers: int,
        row_names=(),
        cut_center: bool = False,
        initial: WorkerStates | None = None,
        initial_center: np.ndarray | None = None,
        center_rows=(),
        initial_center_rows: dict | None = None,
    ):
        super().__init__(comm, n, n_workers, row_names, cut_center, center_rows)
        self._initial_center_rows = initial_center_rows or {}
        np.frombuffer(self._control.tomemory(), np.int64)[:] = 0
        self._meta_mem = np.frombuffer(self._meta.tomemory(), np.int64).reshape(self.p, _META)
        self._meta_mem[:] = 0
        self._state_mem = np.frombuffer(self._states.tomemory(), np.float32, count=self._floats)
        if initial is not None:
            self._fill(initial, initial_center)
        self._table_buf = np.zeros(self.p * _META, np.int64)
        self._table_origin = np.zeros_like(self._table_buf)
        self._open()

    def _fill(self, initial: WorkerStates, center) -> None:
        """Half 0 of every worker: the state it starts from (before the first lock)."""
        for r, name in enumerate(self.row_names):
            row = initial.row(name)
            if row is None:
                continue
            for i in range(self.p):
                self._row_view(i, 0, r)[:] = row[i]
        if self.cut_center and center is not None:
            self._center_view(0)[:] = center
        for r, name in enumerate(self.cut_names[1:], start=1):
            row = self._initial_center_rows.get(name)
            if row is not None:
                self._center_view(0, r)[:] = row
        meta = self._meta_mem
        meta[:, _LATEST] = 0
        half0 = meta[:, _COMMON : _COMMON + _HALF]
        for name, slot in _COUNTER_SLOTS.items():
            half0[:, slot] = initial.counters[name]
        half0[:, _RNG0 : _RNG0 + _RNG_WORDS] = initial.rng_words

    def _row_view(self, slot: int, half: int, row: int) -> np.ndarray:
        lo = self._row_offset(slot, half, row)
        return self._state_mem[lo : lo + self.n]

    def _center_view(self, half: int, row: int = 0) -> np.ndarray:
        lo = self._cut_offset(half, row)
        return self._state_mem[lo : lo + self.n]

    def request(self, epoch: int) -> None:
        self._set(_EPOCH, epoch)

    def stop(self) -> None:
        self._set(_STOP, 1)

    def release(self) -> None:
        self._set(_RELEASE, 1)

    def _set(self, index: int, value: int) -> None:
        MPI = self._MPI
        buf = np.array([value], np.int64)
        self._control.Accumulate(
            [buf, MPI.INT64_T], MASTER, target=(index, 1, MPI.INT64_T), op=MPI.REPLACE
        )
        self._control.Flush(MASTER)

    def table(self) -> dict[str, np.ndarray]:
        """The workers' meta blocks (atomic read; the master calls it every poll, so nothing
        is decoded). ``ack``, ``steps``, ... are the latest half's; ``half`` says which half
        that is and ``other_ack`` the epoch of the other one."""
        MPI = self._MPI
        out = self._table_buf
        self._meta.Get_accumulate(
            [self._table_origin, MPI.INT64_T], [out, MPI.INT64_T], MASTER, op=MPI.NO_OP
        )
        self._meta.Flush(MASTER)
        meta = out.reshape(self.p, _META).copy()
        half = meta[:, _LATEST].clip(0, 1)
        return self.describe_halves(meta, half) | {
            "finished": meta[:, _FINISHED].astype(bool),
            "wants_stop": meta[:, _WANTS_STOP].astype(bool),
            "other_ack": self.describe_halves(meta, 1 - half)["ack"],
            "meta": meta,
        }

    @staticmethod
    def describe_halves(meta: np.ndarray, half: np.ndarray) -> dict[str, np.ndarray]:
        """Of each worker's meta block, the half ``half`` names: ``half``, ``ack``, the
        counters and ``rng_words``."""
        rows = np.take_along_axis(
            meta[:, _COMMON:].reshape(-1, 2, _HALF), half[:, None, None], axis=1
        )[:, 0, :]
        return {
            "half": half,
            "ack": rows[:, _ACK],
            **{name: rows[:, slot] for name, slot in _COUNTER_SLOTS.items()},
            "rng_words": rows[:, _RNG0 : _RNG0 + _RNG_WORDS],
        }

    def cut(self, table, epoch: int | None = None) -> dict[str, np.ndarray]:
        """Which half of each worker a checkpoint takes, with that half's counters.

        ``epoch`` None: each worker's latest state (the asynchronous rules: each worker resumes
        exactly where it was). An epoch: the half of each worker that answered it, where one
        has (the synchronous rules: one common round for all; a worker one epoch ahead still
        has it in its other half); a worker that has not reached it contributes its latest.
        """
        half = table["half"].copy()
        if epoch is not None:
            other = table["other_ack"] == epoch
            half[(table["ack"] != epoch) & other] ^= 1
        return self.describe_halves(table["meta"], half)

    def states(self, cut, age: np.ndarray | None = None) -> tuple[WorkerStates, dict | None]:
        """The workers' states in the halves ``cut`` names (copies), and the first worker's
        cut: ``{"center": …, <center-side row>: …}`` (None where not saved)."""
        self._states.Sync()  # the workers' flushed writes, visible to this process's loads
        rows = {}
        for r, name in enumerate(self.row_names):
            out = np.empty((self.p, self.n), np.float32)
            for i in range(self.p):
                out[i] = self._row_view(i, int(cut["half"][i]), r)
            rows[name] = out
        half = int(cut["half"][0])
        center = (
            {name: self._center_view(half, r).copy() for r, name in enumerate(self.cut_names)}
            if self.cut_center
            else None
        )
        states = WorkerStates(
            counters={k: np.array(cut[k], np.int64) for k in COUNTERS},
            rng_words=np.array(cut["rng_words"], np.int64),
            rows=rows,
            age=age,
        )
        return states, center


def open_state_channel(
    comm,
    side: str,
    n: int,
    n_workers: int,
    row_names=(),
    cut_center: bool = False,
    initial: WorkerStates | None = None,
    initial_center: np.ndarray | None = None,
    center_rows=(),
    initial_center_rows: dict | None = None,
):
    """Collective: every rank opens its side, ``"master"``, ``"worker"`` or ``"none"`` (a
    server other than the master: it takes part in building the windows, nothing else)."""
    if side == "master":
        return MasterSide(
            comm,
            n,
            n_workers,
            row_names,
            cut_center,
            initial,
            initial_center,
            center_rows,
            initial_center_rows,
        )
    if side == "worker":
        return WorkerSide(comm, n, n_workers, row_names, cut_center, center_rows)
    windows = _StateWindows(comm, n, n_workers, row_names, cut_center, center_rows)
    windows._open()
    return windows
