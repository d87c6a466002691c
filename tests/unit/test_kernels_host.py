"""The kernel math of kernels/easgd.cuh, built for the host, against the NumPy reference.

kernels/host_shim.cpp loops over the same inline functions the CUDA kernels call; g++ builds it
into a shared library that is called through ctypes. Both sides round every float32 operation
once, in the same order, so the results must be equal bit for bit, including signed zeros and
subnormals. Views start at element offsets 0-3 of larger buffers to mimic chunks of flat
buffers, and guard elements around each view must stay untouched.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from easgd_mpi.backend.cupy_backend import KERNELS
from easgd_mpi.backend.numpy_backend import NumpyBackend

ROOT = Path(__file__).resolve().parents[2]
KERNEL_DIR = ROOT / "kernels"
GUARD = 5  # elements of buffer after the largest view offset
LENGTHS = [0, 1, 3, 4 * 1024 + 1, 1_000_003]
OFFSETS = ["0", "1", "2", "3", "mixed"]  # element offset of every view, or a different one each

# Scalars a run uses (α = β/p with β = 0.9, p = 4; δ = 0.99 as in the paper) and a second set
# with no weight decay and a larger step, so both code paths of every λ term are seen.
SCALARS = [
    {"s": 0.7, "lr": 0.05, "wd": 1e-4, "alpha": 0.225, "beta": 0.9, "delta": 0.99},
    {"s": -3.0, "lr": 0.5, "wd": 0.0, "alpha": 0.9, "beta": 0.5, "delta": 0.9},
]


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx or not shutil.which(cxx):
        pytest.skip("g++ not found (set CXX to a C++ compiler to run the host kernel tests)")
    lib = tmp_path_factory.mktemp("shim") / "libeasgd_host.so"
    cmd = [
        cxx, "-O3", "-fPIC", "-shared", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra",
        "-I", str(KERNEL_DIR), str(KERNEL_DIR / "host_shim.cpp"), "-o", str(lib),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    assert "warning" not in res.stderr, res.stderr
    dll = ctypes.CDLL(str(lib))
    for spec in KERNELS.values():
        fn = getattr(dll, spec.symbol)
        fn.restype = None
        fn.argtypes = [
            ctypes.c_void_p if p in spec.arrays else ctypes.c_float for p in spec.params
        ] + [ctypes.c_longlong]
    return dll


def _values(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mostly normal values, sprinkled with ±0, subnormals and large magnitudes."""
    v = rng.standard_normal(n).astype(np.float32)
    if n >= 8:
        idx = rng.integers(0, n, size=max(1, n // 50))
        special = np.array([0.0, -0.0, 1e-39, -3e-41, 1e30, -2e-20], dtype=np.float32)
        v[idx] = special[rng.integers(0, special.size, idx.size)]
    return v


def _make_inputs(spec, n: int, offsets: str, seed: int):
    """Buffers with guards and the views into them, one per array parameter."""
    rng = np.random.default_rng(seed)
    buffers, views = {}, {}
    for k, name in enumerate(spec.arrays):
        off = (k % 4) if offsets == "mixed" else int(offsets)
        buf = _values(rng, n + 3 + GUARD)
        if name not in spec.reads:  # output only: poison, so an unwritten element shows
            buf[off : off + n] = np.nan
        buffers[name] = buf
        views[name] = buf[off : off + n]
    return buffers, views


def _call_args(spec, views, scalars, pointer: bool):
    return [
        (views[p].ctypes.data if pointer else views[p]) if p in spec.arrays else scalars[p]
        for p in spec.params
    ]


@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", list(KERNELS))
def test_host_kernel_matches_numpy_bitwise(shim, name, n, offsets):
    spec = KERNELS[name]
    ref = NumpyBackend()
    for k, scalars in enumerate(SCALARS):
        seed = zlib.crc32(f"{name}/{n}/{offsets}/{k}".encode())  # stable across runs
        ref_bufs, ref_views = _make_inputs(spec, n, offsets, seed)
        got_bufs, got_views = _make_inputs(spec, n, offsets, seed)
        with np.errstate(all="ignore"):  # 1e30 · 1e30 overflows on purpose
            getattr(ref, name)(*_call_args(spec, ref_views, scalars, pointer=False))
        getattr(shim, spec.symbol)(*_call_args(spec, got_views, scalars, pointer=True), n)
        for p in spec.arrays:
            want, got = ref_bufs[p].view(np.uint32), got_bufs[p].view(np.uint32)
            bad = np.flatnonzero(want != got)
            assert bad.size == 0, (
                f"{name}(n={n}, offsets={offsets}, scalars={scalars}): {p} differs at "
                f"{bad.size} buffer positions, first {bad[0]}: "
                f"numpy {ref_bufs[p][bad[0]]!r} vs host kernel {got_bufs[p][bad[0]]!r}"
            )


def test_every_numpy_method_has_a_kernel():
    """The kernel table covers the reference's fused updates, with the same parameters."""
    import inspect

    for name, spec in KERNELS.items():
        params = tuple(inspect.signature(getattr(NumpyBackend, name)).parameters)[1:]
        assert params == spec.params, name
