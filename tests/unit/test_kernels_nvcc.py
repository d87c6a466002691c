"""kernels/easgd.cu compiles for the GPUs we target, without a GPU.

nvcc (where installed) builds a cubin for sm_80 (A100) and sm_90 (H100/H200) and PTX for sm_90,
whose text shows what matters for speed and for matching NumPy: 16-byte vector loads and
stores, and no fused multiply-add. Where CuPy and its NVRTC library are installed, the exact
text CupyBackend compiles (easgd.cu with easgd.cuh inlined) also goes through NVRTC, and a
compile error is reported against the real file and line.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from easgd_mpi.backend import cupy_backend
from easgd_mpi.errors import BackendError

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "kernels" / "easgd.cu"
NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None
)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH or /usr/local/cuda")


def _nvcc(*args: str) -> None:
    cmd = [NVCC, "-std=c++14", "-Werror", "all-warnings", *args, str(SOURCE)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_builds_cubin(tmp_path, arch):
    out = tmp_path / f"easgd_{arch}.cubin"
    _nvcc(f"-arch={arch}", "-cubin", "-o", str(out))  # a file: PTX to /dev/stdout hangs
    assert out.stat().st_size > 0


@needs_nvcc
def test_ptx_uses_vector_access_and_no_fma(tmp_path):
    out = tmp_path / "easgd.ptx"
    _nvcc("-arch=sm_90", "--ptx", "-o", str(out))
    ptx = out.read_text()
    symbols = [s.symbol for s in cupy_backend.KERNELS.values()]
    for symbol in [*symbols, *cupy_backend.CODEC_KERNELS.values()]:
        assert f".entry {symbol}(" in ptx, f"kernel {symbol} missing from the PTX"
    assert "ld.global.v4.f32" in ptx and "st.global.v4.f32" in ptx
    # nvcc contracts a*b+c by default; the header's __f*_rn intrinsics must prevent it,
    # or the GPU would round differently from NumPy.
    assert not re.search(r"\bfma\.", ptx), "FMA found in the kernels' PTX"


def _nvrtc_or_skip():
    if cupy_backend.cupy is None:
        pytest.skip("CuPy not installed")
    try:
        cupy_backend._nvrtc().getVersion()
    except Exception as exc:  # noqa: BLE001 - NVRTC missing is a reason to skip, not a failure
        pytest.skip(f"CuPy's NVRTC library not loadable: {exc.__class__.__name__}")


def test_nvrtc_compiles_the_assembled_source():
    _nvrtc_or_skip()
    cupy_backend._nvrtc_compile_without_device("sm_90")


def test_nvrtc_error_points_at_the_header(tmp_path, monkeypatch):
    _nvrtc_or_skip()
    for f in ("easgd.cu", "easgd.cuh"):
        shutil.copy(ROOT / "kernels" / f, tmp_path / f)
    cuh = tmp_path / "easgd.cuh"
    lines = cuh.read_text().splitlines()
    target = next(i for i, line in enumerate(lines) if "EASGD_FN void scale(" in line)
    lines[target] += " this_is_not_cuda"
    cuh.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(cupy_backend, "kernel_source_dir", lambda: tmp_path)
    with pytest.raises(BackendError) as info:
        cupy_backend._nvrtc_compile_without_device("sm_90")
    assert f"{cuh.as_posix()}({target + 1})" in str(info.value)


def test_kernel_source_inlines_the_header():
    src = cupy_backend.kernel_source()
    assert '#include "easgd.cuh"' not in src
    assert src.count("namespace easgd {") == 1
    assert src.startswith('#line 1 "') and "easgd.cu" in src.splitlines()[0]
