"""Where a GPU is visible but unusable for the kernels, a worker stops with one line unless the
config asked for the CPU fallback (then it says why it trains on NumPy); the one place that
decides how each transfer reaches MPI."""

import pytest

import easgd_mpi.backend as backend_pkg
from easgd_mpi import comm
from easgd_mpi.backend import NumpyBackend, cupy_backend
from easgd_mpi.comm import CUDA_MPI_VAR, CudaMpi, cuda_mpi_mode, gpu_transfer_plan
from easgd_mpi.errors import BackendError, LaunchError


def _broken_gpu(monkeypatch, visible=True):
    def broken(device_id=None):
        raise BackendError("the CUDA kernels cannot be built for GPU 0: nvrtc64 not found")

    why = "" if visible else "CuPy 14.2 sees no usable CUDA device (0 devices)"
    monkeypatch.setattr(cupy_backend, "gpu_available", lambda: (visible, why))
    monkeypatch.setattr(cupy_backend, "CupyBackend", broken)


def test_a_gpu_that_cannot_run_the_kernels_stops_the_worker_in_one_line(monkeypatch):
    _broken_gpu(monkeypatch)
    for mode in ("auto", "gpu"):
        with pytest.raises(BackendError) as info:
            backend_pkg.select_backend(prefer_gpu=True, device_id=0, mode=mode)
        text = str(info.value)
        assert "\n" not in text and "nvrtc64 not found" in text
        assert f"device = '{mode}'" in text and "device = 'cpu-fallback'" in text


def test_the_cpu_fallback_is_taken_only_when_asked_for(monkeypatch):
    _broken_gpu(monkeypatch)
    backend, why = backend_pkg.select_backend(prefer_gpu=True, device_id=0, mode="cpu-fallback")
    assert isinstance(backend, NumpyBackend)
    assert "cannot be built" in why and "nvrtc64 not found" in why
    backend, why = backend_pkg.select_backend(prefer_gpu=True, device_id=0, mode="off")
    assert isinstance(backend, NumpyBackend) and why == "GPU use switched off"


def test_no_gpu_at_all_is_the_cpu_unless_a_gpu_was_required(monkeypatch):
    _broken_gpu(monkeypatch, visible=False)
    for mode in ("auto", "cpu-fallback"):
        backend, why = backend_pkg.select_backend(prefer_gpu=True, device_id=0, mode=mode)
        assert isinstance(backend, NumpyBackend) and "no usable CUDA device" in why
    with pytest.raises(BackendError, match="device = 'gpu' but this worker has no usable GPU"):
        backend_pkg.select_backend(prefer_gpu=True, device_id=0, mode="gpu")


def test_one_sided_transfers_never_take_device_buffers():
    for mode in CudaMpi:
        for supported in (None, False, True):
            plan = gpu_transfer_plan(True, mode, supported)
            assert plan["center"] == plan["states"] == "staged (pinned host)"
            assert set(gpu_transfer_plan(False, mode, supported).values()) == {"host"}


@pytest.mark.parametrize(
    "mode, supported, allreduce",
    [
        (CudaMpi.AUTO, True, "device (CUDA-aware)"),
        (CudaMpi.AUTO, None, "staged (pinned host)"),
        (CudaMpi.AUTO, False, "staged (pinned host)"),
        (CudaMpi.OFF, True, "staged (pinned host)"),
        (CudaMpi.ON, True, "device (CUDA-aware)"),
        (CudaMpi.ON, None, "device (CUDA-aware)"),  # the library does not say: the user does
        (CudaMpi.ON, False, "refused: EASGD_CUDA_MPI=1 but this MPI library reports no CUDA"),
    ],
)
def test_the_plan_decides_the_allreduce(mode, supported, allreduce):
    assert gpu_transfer_plan(True, mode, supported)["allreduce"].startswith(allreduce)


@pytest.mark.parametrize(
    "value, mode",
    [(None, CudaMpi.AUTO), ("", CudaMpi.AUTO), ("0", CudaMpi.OFF), (" 1 ", CudaMpi.ON)],
)
def test_cuda_mpi_setting_has_three_states(value, mode):
    assert cuda_mpi_mode({} if value is None else {CUDA_MPI_VAR: value}) is mode


@pytest.mark.parametrize("value", ["yes", "true", "2", "auto", "on"])
def test_any_other_cuda_mpi_setting_is_one_line_naming_the_variable(value):
    with pytest.raises(LaunchError) as info:
        cuda_mpi_mode({CUDA_MPI_VAR: value})
    text = str(info.value)
    assert text.startswith(f"EASGD_CUDA_MPI={value!r} is not a setting") and "\n" not in text


@pytest.mark.parametrize(
    "env, gpu, supported, device",
    [
        ({}, True, True, True),
        ({}, True, None, False),
        ({"EASGD_CUDA_MPI": "0"}, True, True, False),
        ({"EASGD_CUDA_MPI": "1"}, True, None, True),
        ({"EASGD_CUDA_MPI": "1"}, False, True, False),
    ],
)
def test_allreduce_on_device_follows_the_plan(monkeypatch, env, gpu, supported, device):
    monkeypatch.delenv(CUDA_MPI_VAR, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(comm, "cuda_aware_mpi", lambda: supported)
    assert comm.allreduce_on_device(gpu) is device


def test_a_refused_request_for_device_buffers_is_an_error(monkeypatch):
    monkeypatch.setenv(CUDA_MPI_VAR, "1")
    monkeypatch.setattr(comm, "cuda_aware_mpi", lambda: False)
    with pytest.raises(BackendError, match="reports no CUDA support .* set EASGD_CUDA_MPI=0"):
        comm.allreduce_on_device(True)
    monkeypatch.setenv(CUDA_MPI_VAR, "maybe")
    with pytest.raises(LaunchError, match="EASGD_CUDA_MPI='maybe'"):
        comm.allreduce_on_device(False)  # every rank reads the setting, GPU or not


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
