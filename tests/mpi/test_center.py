"""The RMA center under concurrent exchanges: the conservation invariant, status slots.

Run under ``mpiexec -n P python -m pytest --with-mpi tests/mpi`` (P ≥ 2).
"""

import numpy as np
import pytest
from mpi4py import MPI

from easgd_mpi.center import CenterWindow

N = 50_003  # not a multiple of the chunk: the last chunk is short
ROUNDS = 40


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("lock_mode", ["shared", "exclusive"])
@pytest.mark.parametrize("chunk", [4096, N])
def test_center_equals_initial_plus_every_accumulated_difference(lock_mode, chunk):
    comm = MPI.COMM_WORLD
    rank, workers = comm.Get_rank(), comm.Get_size() - 1
    initial = (np.arange(N) % 13 - 6).astype(np.float32)
    window = CenterWindow(
        comm, N, workers, initial=initial if rank == 0 else None, lock_mode=lock_mode, chunk=chunk
    )
    sent = np.zeros(N, np.float64)
    seen_ok = True
    if rank > 0:
        rng = np.random.default_rng(rank)
        for round_ in range(ROUNDS):

            def difference(lo, hi, c, e):
                nonlocal seen_ok
                # Integer values: every sum is exact in float32, so equality is exact too.
                seen_ok &= bool(np.all(c == np.round(c)))
                e[...] = rng.integers(-4, 5, hi - lo)
                sent[lo:hi] += e

            window.exchange(difference)
            window.publish_status(rank - 1, steps=round_ + 1, exchanges=round_ + 1)
    total = comm.reduce(sent, op=MPI.SUM, root=0)
    assert comm.allreduce(seen_ok, op=MPI.LAND), "a read saw a torn (non-integer) element"
    comm.Barrier()
    if rank == 0:
        final = np.empty(N, np.float32)
        window.read(final)
        np.testing.assert_array_equal(final.astype(np.float64), initial + total)
        status = window.read_status()
        assert list(status["exchanges"]) == [ROUNDS] * workers
    window.close()


@pytest.mark.mpi(min_size=2)
def test_add_and_read_round_trip():
    comm = MPI.COMM_WORLD
    rank, workers = comm.Get_rank(), comm.Get_size() - 1
    window = CenterWindow(comm, 1000, workers, chunk=128)
    if rank > 0:
        window.add(np.full(1000, float(rank), np.float32))
    comm.Barrier()
    snapshot = np.empty(1000, np.float32)
    window.read(snapshot)
    assert np.all(snapshot == sum(range(1, workers + 1)))
    comm.Barrier()
    window.close()
