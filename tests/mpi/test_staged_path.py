"""The GPU code path's staging logic, exercised on the CPU.

A GPU worker does not hand its device arrays to MPI: the exchange, the all-reduce and the
checkpoint copies go through separate host buffers (pinned on a real GPU). Here a NumPy backend
that declares itself a GPU (``is_gpu = True``) takes exactly those paths, so a chunk-offset or
copy-back mistake shows up as a different result from the direct host path, without a GPU.
"""

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import config, train_quietly

import easgd_mpi.session as training
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.checkpoint import list_checkpoints, load_checkpoint


class StagedNumpy(NumpyBackend):
    """NumPy arrays, but handled as device memory: MPI only ever sees the host buffers."""

    name = "numpy-staged"
    is_gpu = True


class _LazyStaging:
    """A "device" that does nothing until asked: a chunk's copy in, kernel and copy out run
    only at ``wait``. An exchange that reused a chunk's host buffers before finishing it (an
    MPI read into them, the next chunk's copy out) would then compute from, or send, the wrong
    values: what overlapped streams on a GPU would do, made certain."""

    def __init__(self, backend):
        self.backend = backend

    def start(self, c_host, c_dev, kernel, e_dev, e_host):
        def run():
            self.backend.from_host(c_host, c_dev)
            kernel(c_dev, e_dev)
            self.backend.to_host(e_dev, e_host)

        return run

    def wait(self, ticket) -> None:
        ticket()


class LazyStagedNumpy(StagedNumpy):
    """The staged path with the overlapped pipeline's worst case: nothing runs until waited."""

    name = "numpy-lazy-staged"

    def staging_pipeline(self):
        return _LazyStaging(self)


def final_center(tmp_path, **overrides):
    summary = train_quietly(config(tmp_path, **overrides))
    center = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        center = load_checkpoint(list_checkpoints(summary["run_dir"])[-1]).center
    return MPI.COMM_WORLD.bcast(center, root=0), summary


# Deterministic on exact gradients at any world size: the synchronous rules, and DOWNPOUR or
# async EASGD with a single worker. A chunk smaller than the model makes several chunks.
CASES = [
    ("sync-easgd", {"momentum": 0.5, "lr": 0.05}),
    ("allreduce-sgd", {}),
    ("easgd", {}),
    ("eamsgd", {"momentum": 0.5, "lr": 0.05}),
    ("downpour", {"lr": 0.02}),
    # Compressed pushes: the codes are made where the chunk's kernels run (the device), with
    # each chunk's residual at its offset in the worker's vector.
    ("easgd", {"compress": '"int8"'}),
    ("eamsgd", {"momentum": 0.5, "lr": 0.05, "compress": '"fp8"'}),
    ("downpour", {"lr": 0.02, "compress": '"int8"'}),
]
IDS = [c[0] + (f"-{c[1]['compress'][1:-1]}" if "compress" in c[1] else "") for c in CASES]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("staging", [StagedNumpy, LazyStagedNumpy], ids=["staged", "lazy"])
@pytest.mark.parametrize("algorithm, extra", CASES, ids=IDS)
def test_staged_path_gives_the_host_paths_result(tmp_path, monkeypatch, algorithm, extra, staging):
    deterministic = algorithm.startswith(("sync", "allreduce")) or MPI.COMM_WORLD.Get_size() == 2
    params = {
        "algorithm": f'"{algorithm}"',
        "model.name": '"quadratic"',
        "quadratic.dim": 5000,
        "quadratic.curvature": "[" + ", ".join(str(0.5 + (j % 7) / 7) for j in range(5000)) + "]",
        "quadratic.optimum": 1.5,
        "steps": 120,
        "tau": 4,
        "chunk": 1024,
        "checkpoint.interval": 0,
        **extra,
    }
    host, _ = final_center(tmp_path / "host", **params)
    monkeypatch.setattr(training, "select_backend", lambda **kw: (staging(), ""))
    staged, summary = final_center(tmp_path / "staged", **params)
    assert summary["steps"] == 120 * summary["workers"]
    if deterministic:
        np.testing.assert_array_equal(staged, host)
    else:  # concurrent async workers interleave differently each run: both must converge
        np.testing.assert_allclose(staged, host, atol=0.05)
