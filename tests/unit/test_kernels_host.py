"""The kernels of kernels/, built for the host with g++, against the NumPy reference.

Two shared libraries, called through ctypes:

* kernels/host_shim.cpp loops over the per-element functions of easgd.cuh (the kernel math);
* kernels/host_grid_emulation.cpp runs the __global__ kernels of easgd.cu themselves, one
  (block, thread) after the other, which checks the float4 body, the aligning scalar head, the
  scalar tail and the all-scalar path for views whose addresses disagree modulo 16.

Both sides round every float32 operation once, in the same order, so the results must be equal
bit for bit, including signed zeros and subnormals. Views start at element offsets 0-3 of
16-byte aligned buffers, like chunks of flat buffers, and guard elements around each view must
stay untouched.
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

# Under pytest-xdist all of these run in one worker: the two libraries are compiled once.
pytestmark = pytest.mark.xdist_group("kernels_host")


def _build(tmp_path_factory, source: str, *flags: str) -> ctypes.CDLL:
    cxx = os.environ.get("CXX") or "g++"
    if not shutil.which(cxx):
        # A failure, not a skip: CI must not pass with the kernel math untested.
        pytest.fail(
            f"no C++ compiler: {'CXX=' + cxx if os.environ.get('CXX') else 'g++'} not found; "
            f"install g++ with `bash tools/install-test-tools.sh` (root, Debian) or set CXX to "
            f"a C++17 compiler",
            pytrace=False,
        )
    lib = tmp_path_factory.mktemp("kernels") / f"lib{Path(source).stem}.so"
    cmd = [
        cxx, "-fPIC", "-shared", "-std=c++17", "-ffp-contract=off", "-Wall", "-Wextra", *flags,
        "-I", str(KERNEL_DIR), str(KERNEL_DIR / source), "-o", str(lib),
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


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> ctypes.CDLL:
    return _build(tmp_path_factory, "host_shim.cpp", "-O3")


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> ctypes.CDLL:
    dll = _build(tmp_path_factory, "host_grid_emulation.cpp", "-O2", "-fno-strict-aliasing")
    dll.easgd_emu_set_thread.restype = None
    dll.easgd_emu_set_thread.argtypes = [ctypes.c_uint] * 4
    dll.easgd_emu_misaligned.restype = ctypes.c_longlong
    dll.easgd_emu_misaligned.argtypes = []
    return dll


def _values(rng: np.random.Generator, n: int) -> np.ndarray:
    """Mostly normal values, sprinkled with ±0, subnormals and large magnitudes."""
    v = rng.standard_normal(n).astype(np.float32)
    if n >= 8:
        idx = rng.integers(0, n, size=max(1, n // 50))
        special = np.array([0.0, -0.0, 1e-39, -3e-41, 1e30, -2e-20], dtype=np.float32)
        v[idx] = special[rng.integers(0, special.size, idx.size)]
    return v


def _aligned(values: np.ndarray) -> np.ndarray:
    """A copy of ``values`` whose first element is 16-byte aligned (like a CuPy allocation)."""
    raw = np.empty(values.size + 4, dtype=np.float32)
    start = (-raw.ctypes.data % 16) // 4
    out = raw[start : start + values.size]
    out[:] = values
    return out


def _make_inputs(spec, n: int, offsets: str, seed: int):
    """Buffers with guards and the views into them, one per array parameter."""
    rng = np.random.default_rng(seed)
    buffers, views = {}, {}
    for k, name in enumerate(spec.arrays):
        off = (k % 4) if offsets == "mixed" else int(offsets)
        buf = _aligned(_values(rng, n + 3 + GUARD))
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


def _check_against_numpy(name, n, offsets, run) -> None:
    """``run(spec, views, scalars)`` must leave the buffers exactly as NumpyBackend does."""
    spec = KERNELS[name]
    ref = NumpyBackend()
    for k, scalars in enumerate(SCALARS):
        seed = zlib.crc32(f"{name}/{n}/{offsets}/{k}".encode())  # stable across runs
        ref_bufs, ref_views = _make_inputs(spec, n, offsets, seed)
        got_bufs, got_views = _make_inputs(spec, n, offsets, seed)
        with np.errstate(all="ignore"):  # 1e30 · 1e30 overflows on purpose
            getattr(ref, name)(*_call_args(spec, ref_views, scalars, pointer=False))
        run(spec, _call_args(spec, got_views, scalars, pointer=True))
        for p in spec.arrays:
            want, got = ref_bufs[p].view(np.uint32), got_bufs[p].view(np.uint32)
            bad = np.flatnonzero(want != got)
            assert bad.size == 0, (
                f"{name}(n={n}, offsets={offsets}, scalars={scalars}): {p} differs at "
                f"{bad.size} buffer positions, first {bad[0]}: "
                f"numpy {ref_bufs[p][bad[0]]!r} vs kernel {got_bufs[p][bad[0]]!r}"
            )


@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_math_matches_numpy_bitwise(shim, name, n, offsets):
    def run(spec, args):
        getattr(shim, spec.symbol)(*args, n)

    _check_against_numpy(name, n, offsets, run)


@pytest.mark.parametrize("grid", [(1, 1), (3, 5)], ids=["1x1", "3x5"])
@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 4 * 1024 + 1, 65_539])
@pytest.mark.parametrize("name", list(KERNELS))
def test_emulated_cuda_kernel_matches_numpy_bitwise(emu, name, n, offsets, grid):
    blocks, threads = grid

    def run(spec, args):
        kernel = getattr(emu, spec.symbol)
        for b in range(blocks):
            for t in range(threads):
                emu.easgd_emu_set_thread(b, t, blocks, threads)
                kernel(*args, n)
        bad = emu.easgd_emu_misaligned()
        assert bad == 0, f"{bad} float4 accesses not 16-byte aligned (a GPU would fault)"

    _check_against_numpy(name, n, offsets, run)


def test_every_numpy_method_has_a_kernel():
    """The kernel table covers the reference's fused updates, with the same parameters."""
    import inspect

    for name, spec in KERNELS.items():
        params = tuple(inspect.signature(getattr(NumpyBackend, name)).parameters)[1:]
        assert params == spec.params, name
