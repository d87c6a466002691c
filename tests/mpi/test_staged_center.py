"""The issue-19 rules on the GPU code path's staging, exercised on the CPU (as
tests/mpi/test_staged_path.py does for the others): a NumPy backend that declares itself a GPU
makes every push, pull, all-reduce and checkpoint copy go through separate host buffers, so a
staging mistake shows up as a different result from the direct host path."""

import numpy as np
import pytest
from mpi4py import MPI
from test_staged_path import LazyStagedNumpy, StagedNumpy, final_center

import easgd_mpi.session as training

CASES = [
    ("localsgd", {"momentum": 0.5, "lr": 0.05}),
    ("diloco", {"momentum": 0.5, "lr": 0.05}),
    ("mdownpour", {"momentum": 0.5, "lr": 0.02}),
    ("adownpour", {"lr": 0.02}),
    ("mvadownpour", {"lr": 0.02}),
    ("async-diloco", {"momentum": 0.5, "lr": 0.05}),
]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("staging", [StagedNumpy, LazyStagedNumpy], ids=["staged", "lazy"])
@pytest.mark.parametrize("algorithm, extra", CASES, ids=[c[0] for c in CASES])
def test_staged_path_gives_the_host_paths_result(tmp_path, monkeypatch, algorithm, extra, staging):
    # Deterministic: local SGD and DiLoCo at any p, a center that computes with one worker.
    deterministic = algorithm in ("localsgd", "diloco") or MPI.COMM_WORLD.Get_size() == 2
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
    else:  # concurrent pushes interleave (and are weighted) differently each run: both moved
        # from the start (0) toward the optimum (1.5), by about as much
        moved = np.abs(host).max()
        assert moved > 0.05 and np.abs(staged).max() > 0.05
        np.testing.assert_allclose(staged, host, atol=0.1 * moved + 0.02)
