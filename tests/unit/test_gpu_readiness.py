"""Where a GPU is visible but unusable for the kernels, workers fall back to NumPy and say why;
the one place that decides how each transfer reaches MPI."""

import easgd_mpi.backend as backend_pkg
from easgd_mpi.backend import NumpyBackend, cupy_backend
from easgd_mpi.comm import gpu_transfer_plan
from easgd_mpi.errors import BackendError


def test_broken_nvrtc_falls_back_to_numpy_with_the_reason(monkeypatch):
    def broken(device_id=None):
        raise BackendError("the CUDA kernels cannot be built for GPU 0: nvrtc64 not found")

    monkeypatch.setattr(cupy_backend, "gpu_available", lambda: (True, ""))
    monkeypatch.setattr(cupy_backend, "CupyBackend", broken)
    backend, why = backend_pkg.select_backend(prefer_gpu=True, device_id=0)
    assert isinstance(backend, NumpyBackend)
    assert "cannot be built" in why and "nvrtc64 not found" in why


def test_one_sided_transfers_never_take_device_buffers():
    for requested in (False, True):
        for supported in (None, False, True):
            plan = gpu_transfer_plan(True, requested, supported)
            assert plan["center"] == plan["states"] == "staged (pinned host)"
    assert gpu_transfer_plan(True, True, True)["allreduce"] == "device (CUDA-aware)"
    assert gpu_transfer_plan(True, True, False)["allreduce"] == "staged (pinned host)"
    assert gpu_transfer_plan(True, False, True)["allreduce"] == "staged (pinned host)"
    assert set(gpu_transfer_plan(False, True, True).values()) == {"host"}


def test_finiteness_is_decided_in_float64_like_on_the_gpu():
    import numpy as np

    from easgd_mpi.backend.numpy_backend import host_sum_squares

    big = np.full(300_000, 1e20, np.float32)  # finite; a float32 dot product overflows
    with np.errstate(over="ignore"):
        assert np.isinf(np.dot(big, big))
    assert host_sum_squares(big) == np.float64(np.float32(1e20)) ** 2 * 300_000
    assert NumpyBackend().sum_squares(big) == host_sum_squares(big)
    big[123_456] = np.inf
    assert not np.isfinite(host_sum_squares(big))
    big[123_456] = np.nan
    assert np.isnan(host_sum_squares(big))


def test_chunks_are_multiples_of_64_floats():
    from easgd_mpi.center import round_chunk

    assert round_chunk(262144) == 262144
    assert round_chunk(100_003) == 99_968
    assert round_chunk(10) == 64


def test_default_chunk_is_large_on_a_gpu_worker():
    from easgd_mpi.config import Config

    cfg = Config().validate()
    assert cfg.resolve_chunk(on_gpu=False) == 262144
    assert cfg.resolve_chunk(on_gpu=True) == 4194304
    cfg.set("chunk", 8192)
    assert cfg.resolve_chunk(on_gpu=True) == cfg.resolve_chunk(on_gpu=False) == 8192
