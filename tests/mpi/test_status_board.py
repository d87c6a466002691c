"""The status board: each worker's row on rank 0, as the workers publish it and the master reads it.

Run under ``mpiexec -n P python -m pytest --with-mpi tests/mpi`` (P ≥ 2): rank 0 reads, ranks
1..P−1 are the workers (one server).
"""

import numpy as np
import pytest
from mpi4py import MPI

from easgd_mpi.status_board import STATUS_FIELDS, StatusBoard


@pytest.mark.mpi(min_size=2)
def test_rows_start_from_the_resumed_counters_and_each_worker_writes_only_its_own():
    comm = MPI.COMM_WORLD
    rank, workers = comm.Get_rank(), comm.Get_size() - 1
    resumed = {"steps": 100 + 10 * np.arange(workers), "resets": np.full(workers, 3)}
    board = StatusBoard(comm, workers, initial=resumed if rank == 0 else None)
    before = None
    if rank == 0:
        before = board.read()
        assert set(before) == set(STATUS_FIELDS)
        assert list(before["steps"]) == list(resumed["steps"])
        assert list(before["resets"]) == [3] * workers
        assert all(not before[f].any() for f in STATUS_FIELDS if f not in resumed)
    comm.Barrier()
    if rank > 0:
        me = rank - 1
        board.publish(me, steps=7 + me, loss=0.5 * me, done=1.0)
        # A later report that names one field: the others keep this worker's last report.
        board.publish(me, exchanges=2 + me)
    comm.Barrier()
    if rank == 0:
        after = board.read()
        mine = np.arange(workers)
        np.testing.assert_array_equal(after["steps"], 7 + mine)
        np.testing.assert_array_equal(after["exchanges"], 2 + mine)
        np.testing.assert_array_equal(after["loss"], 0.5 * mine)
        np.testing.assert_array_equal(after["done"], np.ones(workers))
        # A report is a whole row: the resumed resets are replaced by the report's (zero here).
        np.testing.assert_array_equal(after["resets"], np.zeros(workers))
        # Each read gives new arrays: the earlier read still holds what it saw.
        assert list(before["steps"]) == list(resumed["steps"])
    comm.Barrier()
    board.close()
    board.close()  # a second close does nothing (no second collective)
