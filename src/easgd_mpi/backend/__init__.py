"""Compute backends: NumPy (reference, host) and CuPy (fused CUDA kernels, GPU)."""

from ..errors import BackendError
from .numpy_backend import NumpyBackend

__all__ = ["NumpyBackend", "select_backend"]


def select_backend(prefer_gpu: bool = True, device_id: int | None = None, mode: str = "auto"):
    """The backend this rank should use, and in words why it is not a GPU ("" when it is).

    ``mode`` is the config's ``device``:

    - ``"auto"``: CuPy on a GPU when CuPy sees a CUDA device, NumPy when it sees none (or is
      not installed). A GPU that is there but cannot build or run the kernels (NVRTC missing or
      broken, a driver older than the compiler) raises :class:`BackendError`: a broken set-up
      must not train on the CPU, many times slower, without anyone asking for it;
    - ``"gpu"``: CuPy on a GPU, or :class:`BackendError` saying why there is none;
    - ``"cpu-fallback"``: CuPy when it works, NumPy otherwise, whatever the reason (returned);
    - ``"off"`` (or ``prefer_gpu=False``): NumPy.

    The errors are one line, to be reported on the rank that has no usable GPU.
    """
    if not prefer_gpu or mode == "off":
        return NumpyBackend(), "GPU use switched off"
    try:
        from .cupy_backend import CupyBackend, gpu_available  # noqa: PLC0415
    except ImportError as exc:  # CuPy not installed, or the backend module not present
        ok, why = False, f"CuPy not importable ({exc.__class__.__name__})"
    else:
        ok, why = gpu_available()
    if not ok:
        if mode == "gpu":
            raise BackendError(f"device = 'gpu' but this worker has no usable GPU: {why}")
        return NumpyBackend(), why
    try:  # compiles the kernels and runs one: a broken GPU set-up shows here
        return CupyBackend(device_id=device_id), ""
    except BackendError as exc:
        if mode == "cpu-fallback":
            return NumpyBackend(), f"a GPU is visible but {exc}"
        raise BackendError(
            f"device = '{mode}': a GPU is visible but {exc}; fix the CUDA set-up (`easgd check` "
            f"reports it), or set device = 'cpu-fallback' to train on the CPU instead"
        ) from None
