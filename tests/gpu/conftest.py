"""What the GPU tests need, decided in one place.

Each skip names the one thing that is missing ("CuPy is not installed", "CuPy ... sees no usable
CUDA device (...)", "PyTorch ... has no CUDA"), so the summary (``-ra``, on by default) says which
tests did not run and why. ``EASGD_TEST_GPU=1`` (GPU CI runners) turns every such skip into a
failure, so a broken driver cannot pass as "skipped".
"""

from __future__ import annotations

import os

import pytest


def skip_or_fail(missing: str | None) -> None:
    """Nothing when ``missing`` is None; else skip with it (fail under EASGD_TEST_GPU=1)."""
    if missing is None:
        return
    if os.environ.get("EASGD_TEST_GPU") == "1":
        pytest.fail(f"EASGD_TEST_GPU=1 but {missing}", pytrace=False)
    pytest.skip(missing)


def missing_gpu() -> str | None:
    """Why CuPy cannot use a CUDA device here (None: it can): the backend's own reason."""
    from easgd_mpi.backend.cupy_backend import gpu_available

    ok, why = gpu_available()
    return None if ok else why


def missing_torch_cuda() -> str | None:
    """Why PyTorch cannot use the GPU here (None: it can)."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (pip install -e '.[torch]')"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} has no CUDA (a CPU-only build, or no device for it)"
    return None


@pytest.fixture(scope="session")
def usable_gpu() -> None:
    """A CUDA device that CuPy can use (session-wide: decided once)."""
    skip_or_fail(missing_gpu())


@pytest.fixture(scope="session")
def torch_on_gpu(usable_gpu):
    """PyTorch with CUDA, on top of a usable GPU; returns the torch module."""
    skip_or_fail(missing_torch_cuda())
    import torch

    return torch
