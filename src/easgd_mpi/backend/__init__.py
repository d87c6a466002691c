"""Compute backends: NumPy (reference, host) and CuPy (fused CUDA kernels, GPU)."""

from ..errors import BackendError
from .numpy_backend import NumpyBackend

__all__ = ["NumpyBackend", "select_backend"]


def select_backend(prefer_gpu: bool = True, device_id: int | None = None):
    """The backend this rank should use: CuPy on a GPU when one is usable, NumPy otherwise.

    Returns ``(backend, reason)`` where ``reason`` says in words why a GPU is not used.
    """
    if not prefer_gpu:
        return NumpyBackend(), "GPU use switched off"
    try:
        from .cupy_backend import CupyBackend, gpu_available  # noqa: PLC0415
    except ImportError as exc:  # CuPy not installed, or the backend module not present
        return NumpyBackend(), f"CuPy not importable ({exc.__class__.__name__})"
    ok, why = gpu_available()
    if not ok:
        return NumpyBackend(), why
    try:  # compiles the kernels now: a missing or broken NVRTC falls back, it does not fail
        return CupyBackend(device_id=device_id), ""
    except BackendError as exc:
        return NumpyBackend(), f"a GPU is visible but {exc}"
