"""Worker states for checkpoints, and the stop signal, through RMA windows on the master.

The master never messages a worker and a worker never waits for the master. Three windows on
rank 0, all in one long ``Lock_all`` epoch like the center:

- *control* (int64): the checkpoint epoch the master asks for, a stop flag (end training now),
  and a release flag (the final checkpoint has every state: finished workers may leave);
- *meta* (int64, one row per worker): the epoch the worker last answered, its counters at that
  moment (steps, exchanges, resets), whether it finished or wants the run stopped, and the
  words of its random-number generator state;
- *states* (float32, p rows of n or 2n): the worker's x (and v), written with
  ``Accumulate(REPLACE)`` when it answers an epoch.

A worker looks at *control* every 50 ms (the collective rules: every ~16 steps, on the same
round on every worker, deciding together); when the epoch is new it copies its state into its
row — training pauses only for that copy — then writes its *meta* row. The master reads the
rows only after every worker has answered the epoch, and asks for no new epoch until it has
read them, so a row is never read while it is written.
"""

from __future__ import annotations

import json

import numpy as np

from .comm import MASTER

__all__ = ["StateChannel", "encode_rng", "decode_rng"]

# control slots: the epoch asked for; stop training; release finished workers (run is over)
_EPOCH, _STOP, _RELEASE, _CONTROL = 0, 1, 2, 4
# meta slots per worker
_ACK, _STEPS, _EXCH, _RESETS, _FINISHED, _WANTS_STOP, _RNG0 = range(7)
_RNG_WORDS = 6
_META = _RNG0 + _RNG_WORDS + 3  # room to grow


def encode_rng(rng: np.random.Generator) -> np.ndarray:
    """A PCG64 generator's full state as 6 int64 words."""
    st = rng.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise ValueError(f"cannot store a {st['bit_generator']} generator (PCG64 expected)")
    mask = (1 << 64) - 1
    s, inc = st["state"]["state"], st["state"]["inc"]
    words = np.array(
        [s & mask, s >> 64, inc & mask, inc >> 64, st["has_uint32"], st["uinteger"]],
        dtype=np.uint64,
    )
    return words.view(np.int64)


def decode_rng(words) -> dict:
    w = [int(x) for x in np.asarray(words, dtype=np.int64).view(np.uint64)]
    return {
        "bit_generator": "PCG64",
        "state": {"state": w[0] | (w[1] << 64), "inc": w[2] | (w[3] << 64)},
        "has_uint32": w[4],
        "uinteger": w[5],
    }


class StateChannel:
    """Collective: every rank constructs it. ``keep_states`` False: counters only, no x/v."""

    def __init__(self, comm, n: int, n_workers: int, keep_states: bool, with_v: bool):
        from mpi4py import MPI  # noqa: PLC0415

        self._MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.n = int(n)
        self.p = int(n_workers)
        self.rows = (2 if with_v else 1) if keep_states else 0
        owner = self.rank == MASTER
        self._control = MPI.Win.Allocate(_CONTROL * 8 if owner else 0, 8, comm=comm)
        self._meta = MPI.Win.Allocate(self.p * _META * 8 if owner else 0, 8, comm=comm)
        state_bytes = self.p * self.rows * self.n * 4
        self._states = MPI.Win.Allocate(state_bytes if owner else 0, 4, comm=comm)
        if owner:
            np.frombuffer(self._control.tomemory(), np.int64)[:] = 0
            np.frombuffer(self._meta.tomemory(), np.int64)[:] = 0
            self._state_mem = np.frombuffer(
                self._states.tomemory(), np.float32, count=self.p * self.rows * self.n
            )
        self._ctl_buf = np.zeros(_CONTROL, np.int64)
        self._ctl_origin = np.zeros(_CONTROL, np.int64)  # NO_OP still wants an origin
        self._row = np.zeros(_META, np.int64)
        self._table_buf = np.zeros(self.p * _META, np.int64)
        self._table_origin = np.zeros_like(self._table_buf)
        self._acked = 0
        self._host = None  # a worker's pinned staging buffer, made at its first GPU copy
        comm.Barrier()
        for win in (self._control, self._meta, self._states):
            win.Lock_all()
        comm.Barrier()

    def close(self) -> None:
        for win in (self._control, self._meta, self._states):
            win.Unlock_all()
        self.comm.Barrier()
        for win in (self._control, self._meta, self._states):
            win.Free()

    # ---- worker side --------------------------------------------------------------------
    def serve(
        self, slot: int, algo, rng, steps: int, finished: bool = False, wants_stop: bool = False
    ) -> tuple[bool, bool]:
        """Answer a new checkpoint epoch if there is one. Returns (stop, release): stop training
        now; the master has everything, a finished worker may leave."""
        epoch, stop, release = self.peek()
        self.answer(slot, algo, rng, steps, epoch, finished=finished, wants_stop=wants_stop)
        return stop, release

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
    ) -> None:
        """Copy the state for ``epoch`` if not done yet, then report counters and flags."""
        if epoch == self._acked and not (wants_stop or finished):
            return
        MPI = self._MPI
        if epoch != self._acked and self.rows:
            self._write_state(slot, algo)
        self._acked = epoch
        row = self._row
        row[_ACK], row[_STEPS], row[_EXCH] = epoch, steps, algo.exchanges
        row[_RESETS], row[_FINISHED], row[_WANTS_STOP] = algo.resets, finished, wants_stop
        row[_RNG0 : _RNG0 + _RNG_WORDS] = encode_rng(rng)
        self._meta.Accumulate(
            [row, MPI.INT64_T], MASTER, target=(slot * _META, _META, MPI.INT64_T), op=MPI.REPLACE
        )
        self._meta.Flush(MASTER)

    def _write_state(self, slot: int, algo) -> None:
        MPI = self._MPI
        arrays = [algo.x] + ([algo.v] if self.rows == 2 else [])
        b = algo.backend
        for r, arr in enumerate(arrays):
            src = arr
            if b.is_gpu:  # staged through pinned memory (allocated once)
                if self._host is None:
                    self._host = b.host_empty(self.n)
                src = b.to_host(arr, self._host)
            base = (slot * self.rows + r) * self.n
            chunk = 1 << 22  # keeps each MPI message under 2^31 bytes
            for lo in range(0, self.n, chunk):
                hi = min(lo + chunk, self.n)
                self._states.Accumulate(
                    src[lo:hi],
                    MASTER,
                    target=(base + lo, hi - lo, MPI.FLOAT),
                    op=MPI.REPLACE,
                )
        self._states.Flush(MASTER)

    # ---- master side --------------------------------------------------------------------
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
        """The workers' meta rows (atomic read; the master calls it every poll, so no
        allocation beyond the small result and no decoding: see :meth:`rng_states`)."""
        MPI = self._MPI
        out = self._table_buf
        self._meta.Get_accumulate(
            [self._table_origin, MPI.INT64_T], [out, MPI.INT64_T], MASTER, op=MPI.NO_OP
        )
        self._meta.Flush(MASTER)
        rows = out.reshape(self.p, _META).copy()
        return {
            "ack": rows[:, _ACK],
            "steps": rows[:, _STEPS],
            "exchanges": rows[:, _EXCH],
            "resets": rows[:, _RESETS],
            "finished": rows[:, _FINISHED].astype(bool),
            "wants_stop": rows[:, _WANTS_STOP].astype(bool),
            "rng_words": rows[:, _RNG0 : _RNG0 + _RNG_WORDS],
        }

    @staticmethod
    def rng_states(table) -> list[str]:
        """Each worker's generator state, as JSON text, from a :meth:`table`."""
        return [json.dumps(decode_rng(words)) for words in table["rng_words"]]

    def states(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Copies of every worker's x (and v) as [p, n]; call only when all acked the epoch."""
        if not self.rows:
            return None, None
        self._states.Sync()  # the workers' flushed writes, visible to this process's loads
        mem = self._state_mem.reshape(self.p, self.rows, self.n)
        x = mem[:, 0, :].copy()
        v = mem[:, 1, :].copy() if self.rows == 2 else None
        return x, v
