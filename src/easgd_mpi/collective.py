"""The workers' all-reduce: the one collective of the synchronous rules (docs/ARCHITECTURE.md
§2.5, §2.6, §3.8).

Sync EASGD averages the workers' parameters and all-reduce SGD their gradients; both need the
element-wise mean of one flat float32 vector over the workers-only communicator
(:attr:`Roles.workers`; the master never joins). Like :mod:`easgd_mpi.center`, this module knows
MPI and flat buffers, not models or update rules. The workers' other reduction, the vote of a
collective rule on when to stop (:func:`agree_epoch_and_stop`), lives here too.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["WorkerAllreduce", "allreduce_bytes", "agree_epoch_and_stop"]

#: Polls of a pending all-reduce before this rank starts to give up its core between polls.
_SPIN_POLLS = 50


def allreduce_bytes(n: int, p: int) -> int:
    """Bytes one worker sends plus receives in a ring all-reduce of n float32 values.

    The bandwidth-optimal algorithm moves 2(p − 1)/p · n values out and as many in; MPI
    libraries pick other algorithms for small vectors, so this is the nominal volume that makes
    the runs' ``bytes`` comparable with the 8n bytes of an elastic exchange.
    """
    return 0 if p <= 1 else int(round(16 * n * (p - 1) / p))


def agree_epoch_and_stop(workers, epoch: int, stop: bool) -> tuple[int, bool]:
    """(the smallest checkpoint epoch any worker has seen, whether any worker must stop).

    Collective over the workers-only communicator: the workers of a synchronous rule call it at
    the same round, so they copy their states for the same checkpoint and leave the loop at the
    same step (a worker that left alone would leave the others waiting in their next all-reduce
    forever). One ``Allreduce(MIN)`` of two integers; a stop is voted as −1.
    """
    from mpi4py import MPI  # noqa: PLC0415

    votes = np.array([epoch, -int(stop)], dtype=np.int64)
    workers.Allreduce(MPI.IN_PLACE, votes, op=MPI.MIN)
    return int(votes[0]), bool(votes[1] < 0)


class WorkerAllreduce:
    """Mean of a flat vector over the workers, staged through host memory when needed.

    ``comm`` is the workers-only communicator. With ``direct`` (CUDA-aware MPI) device arrays go
    to a *blocking* ``Allreduce`` as they are (the one collective the libraries document for
    device memory; non-blocking reductions on device buffers are not supported by Open MPI);
    otherwise a GPU vector is copied into a pinned host buffer and reduced there.
    """

    def __init__(self, comm, n: int, backend, direct: bool = False):
        from mpi4py import MPI  # noqa: PLC0415

        self._MPI = MPI
        self.comm = comm
        self.size = comm.Get_size()
        self.backend = backend
        self.direct = direct or not backend.is_gpu
        self._host = None if self.direct else backend.host_empty(n)
        #: This rank among the workers (0 on the first worker, world rank ``servers``).
        self.rank = comm.Get_rank()
        self._step_bytes = allreduce_bytes(n, self.size)

    def mean(self, src, out) -> int:
        """out ← mean over workers of ``src`` (every worker calls it; src may be out).

        Returns the bytes this worker moved (the nominal ring volume).
        """
        b = self.backend
        if self.direct:
            if out is not src:
                out[...] = src
            b.synchronize()  # MPI reads the device buffer: the stream must be done with it
            if b.is_gpu:
                self.comm.Allreduce(self._MPI.IN_PLACE, out, op=self._MPI.SUM)
            else:
                self._wait(self.comm.Iallreduce(self._MPI.IN_PLACE, out, op=self._MPI.SUM))
        else:
            host = self._host
            b.to_host(src, host)
            self._wait(self.comm.Iallreduce(self._MPI.IN_PLACE, host, op=self._MPI.SUM))
            b.from_host(host, out)
        b.scale(out, 1.0 / self.size)
        return self._step_bytes

    def _wait(self, request) -> None:
        # A blocking Allreduce spins in MPI's progress loop; on an oversubscribed node (more
        # ranks than cores, as in the tests and the benchmarks) the spinning ranks steal the
        # core from the rank whose data they wait for. Spin briefly, then yield between polls.
        for _ in range(_SPIN_POLLS):
            if request.Test():
                return
        while not request.Test():
            os.sched_yield()
