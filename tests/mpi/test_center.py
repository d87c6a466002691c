"""The RMA center under concurrent exchanges: the conservation invariant, slices, and with it
the status board and the idle servers' loop, as training uses them.

Run under ``mpiexec -n P python -m pytest --with-mpi tests/mpi`` (P ≥ 2). With S servers
(ranks 0..S−1 hold a slice each) the workers are ranks S..P−1; an S that leaves no worker is
skipped at this world size.
"""

import numpy as np
import pytest
from mpi4py import MPI

from easgd_mpi.center import CHUNK_MULTIPLE, CenterWindow
from easgd_mpi.comm import keep_progress
from easgd_mpi.status_board import StatusBoard

N = 50_003  # not a multiple of the chunk: the last chunk is short
ROUNDS = 40


def world_with_workers(servers):
    comm = MPI.COMM_WORLD
    if servers >= comm.Get_size():
        pytest.skip(
            f"servers = {servers} needs at least {servers + 1} ranks (a worker), "
            f"this world has {comm.Get_size()}"
        )
    return comm, comm.Get_rank(), comm.Get_size() - servers


def wait_for_all(comm):
    """The end-of-run barrier, as the master and the workers join it (comm.wait_for_all)."""
    from easgd_mpi.comm import wait_for_all as join

    join(comm)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("servers", [1, 2, 3])
@pytest.mark.parametrize("lock_mode", ["shared", "exclusive"])
@pytest.mark.parametrize("chunk", [4096, N])
def test_center_equals_initial_plus_every_accumulated_difference(servers, lock_mode, chunk):
    """Every worker hammers the center; each server's slice, and the whole center, end exactly
    at initial + Σ e (integer values: every float32 sum is exact)."""
    comm, rank, workers = world_with_workers(servers)
    initial = (np.arange(N) % 13 - 6).astype(np.float32)
    window = CenterWindow(
        comm,
        N,
        initial=initial if rank == 0 else None,
        lock_mode=lock_mode,
        chunk=chunk,
        servers=servers,
    )
    board = StatusBoard(comm, workers)
    sent = np.zeros(N, np.float64)
    visits = np.zeros(N, np.int64)  # each element must be handed to the kernel once per round
    seen_ok = True
    if rank >= servers:
        rng = np.random.default_rng(rank)
        for round_ in range(ROUNDS):

            def difference(lo, hi, c, e):
                nonlocal seen_ok
                seen_ok &= bool(np.all(c == np.round(c)))  # a torn read would not be integer
                e[...] = rng.integers(-4, 5, hi - lo)
                sent[lo:hi] += e
                visits[lo:hi] += 1

            window.exchange(difference)
            board.publish(rank - servers, steps=round_ + 1, exchanges=round_ + 1)
        assert np.all(visits == ROUNDS)
        wait_for_all(comm)
    elif rank > 0:
        served = keep_progress(comm)  # the idle server's loop, until every worker is done
        assert served["tests"] >= 1 and served["cpu_s"] <= served["wall_s"] + 0.05
    else:
        wait_for_all(comm)
    total = comm.allreduce(sent, op=MPI.SUM)
    assert comm.allreduce(seen_ok, op=MPI.LAND), "a read saw a torn (non-integer) element"
    expected = initial + total
    # Per shard: each server's own memory holds its slice, and it balances exactly.
    lo, hi, mine = window.local_slice()
    assert (lo, hi) == (window.slices[rank] if rank < servers else (0, 0))
    np.testing.assert_array_equal(mine.astype(np.float64), expected[lo:hi])
    sizes = [b - a for a, b in window.slices]
    assert sum(sizes) == N and max(sizes) - min(sizes) <= max(chunk, CHUNK_MULTIPLE)
    # In total: rank 0 reads every slice back.
    if rank == 0:
        final = np.empty(N, np.float32)
        window.read(final)
        np.testing.assert_array_equal(final.astype(np.float64), expected)
        status = board.read()
        assert list(status["exchanges"]) == [ROUNDS] * workers
    comm.Barrier()
    board.close()
    window.close()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("servers", [1, 2])
def test_add_and_read_round_trip(servers):
    comm, rank, workers = world_with_workers(servers)
    window = CenterWindow(comm, 1000, chunk=128, servers=servers)
    if rank >= servers:
        window.add(np.full(1000, float(rank), np.float32))
    comm.Barrier()
    snapshot = np.empty(1000, np.float32)
    window.read(snapshot)
    assert np.all(snapshot == sum(range(servers, servers + workers)))
    comm.Barrier()
    window.close()
