"""How the center is cut into the servers' slices (``servers = S``, docs/ARCHITECTURE.md §3.3)."""

import pytest

from easgd_mpi.center import CHUNK_MULTIPLE, describe_slice, shard_slices
from easgd_mpi.diagnostics import role_of


@pytest.mark.parametrize(
    "n, servers, chunk",
    [(50_003, 2, 4096), (10**7, 3, 1 << 18), (25 * 10**6, 8, 1 << 22), (4812, 2, 1 << 18)],
)
def test_slices_are_contiguous_balanced_and_chunk_aligned(n, servers, chunk):
    slices = shard_slices(n, servers, chunk)
    assert len(slices) == servers and slices[0][0] == 0 and slices[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(slices, slices[1:], strict=False))
    unit = chunk if n >= servers * chunk else CHUNK_MULTIPLE  # a chunk per server, or 64 floats
    assert all(lo % unit == 0 for lo, _ in slices)
    assert all(abs((hi - lo) - n / servers) <= unit for lo, hi in slices)


def test_one_server_holds_everything_and_a_tiny_model_leaves_slices_empty():
    assert shard_slices(100, 1, 4096) == [(0, 100)]
    assert shard_slices(100, 3, 4096) == [(0, 64), (64, 64), (64, 100)]
    assert shard_slices(0, 2, 4096) == [(0, 0), (0, 0)]
    with pytest.raises(ValueError):
        shard_slices(100, 0, 4096)


def test_names_for_people():
    assert describe_slice(2432, 4812) == "[2,432, 4,812), 9.3 KiB"
    assert describe_slice(0, 10) == "[0, 10), 40 B"
    assert [role_of(r, 1) for r in range(3)] == ["master", "worker 0", "worker 1"]
    assert [role_of(r, 2) for r in range(3)] == ["master, server 0", "server 1", "worker 0"]
