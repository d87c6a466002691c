"""Messages from the workers to the master that never make the master wait (docs/ARCHITECTURE.md
§4.7): a user loop's own state at each checkpoint epoch, and the metrics its workers report.

Their sizes are not known when the run starts (an optimizer makes its state at its first step),
so they cannot live in the fixed windows of snapshots.py. They are point-to-point messages on a
communicator of the master and the workers (split off the world; the other servers are not in
it). Each message is one byte buffer: an int64 header (kind, epoch, payload size), then the
payload. The master only ever looks: ``Improbe`` finds a message that has arrived, a matched
``Imrecv`` starts receiving it into a buffer of its size, ``Test`` says when it is complete. A
worker that stalls in the middle of a large message leaves it incomplete, and the master goes on
(its wait for that state is bounded by ``checkpoint.state_wait``, as for the rows).

Bounded on both sides: a worker has at most one state message in flight (it waits for the last
one to leave before it saves the next, by then long gone) and at most :data:`METRICS_IN_FLIGHT`
metrics messages (a newer report is dropped while they are stuck: it is a sample, not a
record). At the end each worker sends ``BYE`` last; the master receives until it has every
worker's, so no message is left in flight when the communicator is freed.
"""

from __future__ import annotations

import os
import time

import numpy as np

from .comm import MASTER

__all__ = [
    "STATE",
    "METRICS",
    "BYE",
    "METRICS_IN_FLIGHT",
    "SideSender",
    "SideReceiver",
    "open_side",
]

#: Message kinds (also the tags): a worker's state for an epoch; its latest metrics; its last.
STATE, METRICS, BYE = 1, 2, 3
#: Metrics messages a worker keeps in flight at most.
METRICS_IN_FLIGHT = 2
_HEADER = 3  # int64 words: kind, epoch, payload bytes
_POLL = 0.002


def _split(world, member: bool):
    """The master (rank 0 here too) and the workers; the other servers get COMM_NULL."""
    from mpi4py import MPI  # noqa: PLC0415

    return world.Split(0 if member else MPI.UNDEFINED, world.Get_rank())


class SideSender:
    """A worker's end: sends without waiting, keeps its buffers until MPI is done with them."""

    def __init__(self, comm):
        from mpi4py import MPI  # noqa: PLC0415

        self._MPI = MPI
        self.comm = comm
        self._in_flight: list[tuple[object, np.ndarray, int]] = []

    def post(self, kind: int, epoch: int, payload: bytes) -> bool:
        """Start sending ``payload``; returns False when a metrics report is dropped instead."""
        self._reap()
        if kind == METRICS and self._count(METRICS) >= METRICS_IN_FLIGHT:
            return False
        if kind == STATE:
            self.wait_sent(STATE)  # at most one state in flight
        buffer = np.empty(_HEADER * 8 + len(payload), np.uint8)
        buffer[: _HEADER * 8].view(np.int64)[:] = (kind, epoch, len(payload))
        buffer[_HEADER * 8 :] = np.frombuffer(payload, np.uint8)
        request = self.comm.Isend([buffer, self._MPI.BYTE], dest=MASTER, tag=kind)
        self._in_flight.append((request, buffer, kind))
        return True

    def wait_sent(self, kind: int | None = None) -> None:
        """Until no message (of ``kind``) is in flight; yields the core between tests."""
        while any(kind is None or k == kind for _, _, k in self._in_flight):
            self._reap()
            if any(kind is None or k == kind for _, _, k in self._in_flight):
                time.sleep(_POLL)

    def close(self) -> None:
        """Send BYE, wait until every message has left, free the communicator."""
        self.post(BYE, 0, b"")
        self.wait_sent()
        self.comm.Free()

    def _count(self, kind: int) -> int:
        return sum(1 for _, _, k in self._in_flight if k == kind)

    def _reap(self) -> None:
        self._in_flight = [item for item in self._in_flight if not item[0].Test()]


class SideReceiver:
    """The master's end: :meth:`poll` returns what has arrived completely, never waiting."""

    def __init__(self, comm, n_workers: int):
        from mpi4py import MPI  # noqa: PLC0415

        self._MPI = MPI
        self.comm = comm
        self.p = int(n_workers)
        self._incoming: list[tuple[object, np.ndarray, int]] = []
        self._byes: set[int] = set()

    def poll(self) -> list[tuple[int, int, int, bytes]]:
        """(worker, kind, epoch, payload) of every message complete by now, in arrival order
        per worker (BYE messages are kept, not returned)."""
        MPI = self._MPI
        status = MPI.Status()
        while True:
            message = self.comm.Improbe(MPI.ANY_SOURCE, MPI.ANY_TAG, status)
            if message is None:
                break
            buffer = np.empty(status.Get_count(MPI.BYTE), np.uint8)
            self._incoming.append((message.Irecv([buffer, MPI.BYTE]), buffer, status.Get_source()))
        done, waiting = [], []
        for item in self._incoming:
            (done if item[0].Test() else waiting).append(item)
        self._incoming = waiting
        out = []
        for _, buffer, source in done:
            kind, epoch, size = (int(v) for v in buffer[: _HEADER * 8].view(np.int64))
            worker = source - 1  # rank 0 is the master, worker i is rank i + 1 here
            if kind == BYE:
                self._byes.add(worker)
                continue
            out.append((worker, kind, epoch, buffer[_HEADER * 8 : _HEADER * 8 + size].tobytes()))
        return out

    def close(self) -> list[tuple[int, int, int, bytes]]:
        """Receive until every worker's BYE (they send it after the master's release), free
        the communicator; returns what arrived meanwhile."""
        late = []
        while len(self._byes) < self.p or self._incoming:
            late.extend(self.poll())
            if len(self._byes) < self.p or self._incoming:
                os.sched_yield()
                time.sleep(_POLL)
        self.comm.Free()
        return late


def open_side(world, role: str, n_workers: int):
    """Collective over ``world``: ``"master"``, ``"worker"`` or ``"none"`` (a server other than
    the master: it takes part in the split only). Returns this rank's end, or None."""
    comm = _split(world, role != "none")
    if role == "master":
        return SideReceiver(comm, n_workers)
    if role == "worker":
        return SideSender(comm)
    return None
