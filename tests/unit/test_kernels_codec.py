"""The compressed-push kernels of kernels/ (docs/ARCHITECTURE.md §2.16), built for the host with
g++, against NumpyBackend.compress / decompress bit for bit.

As in test_kernels_host.py: host_shim.cpp runs the per-block math of easgd.cuh, and
host_grid_emulation.cpp runs the ``__global__`` kernels of easgd.cu one (block, thread) after the
other (one CUDA thread codes one block of elements; no thread talks to another, so the sequential
emulation computes what the GPU computes). With and without a residual (a null pointer: no error
feedback), blocks cut short at the end, views at odd element offsets, guard elements untouched,
and blocks of zeros, of NaN and of infinity.
"""

from __future__ import annotations

import ctypes
import zlib

import numpy as np
import pytest
from test_kernels_host import _aligned, _build

from easgd_mpi.backend.cupy_backend import CODEC_KERNELS
from easgd_mpi.backend.numpy_backend import NumpyBackend, e4m3_decode

GUARD = 5
_FP8 = np.unique(np.abs(e4m3_decode(np.arange(127, dtype=np.uint8))))
FP8_MIDPOINTS = (_FP8[:-1] + np.diff(_FP8) / 2).astype(np.float32)
LENGTHS = [0, 1, 255, 256, 257, 1300, 65_539]
CODECS = ("int8", "fp8")
_P = ctypes.c_void_p
_N = ctypes.c_longlong


def _declare(dll: ctypes.CDLL) -> ctypes.CDLL:
    for name, symbol in CODEC_KERNELS.items():
        fn = getattr(dll, symbol)
        fn.restype = None
        fn.argtypes = (
            [_P, _P, _P, _P, _N, _N] if name.startswith("compress") else [_P] * 3 + [_N] * 2
        )
    return dll


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> ctypes.CDLL:
    return _declare(_build(tmp_path_factory, "host_shim.cpp", "-O3"))


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> ctypes.CDLL:
    dll = _build(tmp_path_factory, "host_grid_emulation.cpp", "-O2", "-fno-strict-aliasing")
    dll.easgd_emu_set_thread.restype = None
    dll.easgd_emu_set_thread.argtypes = [ctypes.c_uint] * 4
    return _declare(dll)


def _push(rng, n) -> np.ndarray:
    """Magnitudes over many orders, ±0, subnormals, and whole blocks of zeros, NaN and ±inf."""
    v = (rng.standard_normal(n) * np.exp(3 * rng.standard_normal(n))).astype(np.float32)
    if n >= 8:
        idx = rng.integers(0, n, size=max(1, n // 50))
        special = np.array([0.0, -0.0, 1e-39, -3e-41, 1e30, -2e-20], dtype=np.float32)
        v[idx] = special[rng.integers(0, special.size, idx.size)]
    if n >= 1300:
        v[:256] = 0.0
        v[300] = np.nan
        v[600] = -np.inf
        v[768:1024] = _ties(448.0, FP8_MIDPOINTS, rng)  # scale 1: every value a tie of fp8
        v[1024:1280] = _ties(127.0, np.arange(-126.5, 127, 1.0), rng)  # and of int8
    return v


def _ties(top, midpoints, rng):
    """A block whose largest magnitude is ``top`` (its scale is then exactly 1) and whose other
    values lie halfway between two codes: round half to even decides each of them."""
    block = rng.choice(midpoints, 256).astype(np.float32)
    block[0] = top
    return block


class Case:
    """The buffers of one call (guards around each view) and their views."""

    def __init__(self, n, block, residual, offset, seed):
        rng = np.random.default_rng(seed)
        nb = -(-n // block)

        def padded(view):  # guards of other values before and after the view
            return _aligned(np.concatenate([_push(rng, offset), view, _push(rng, GUARD)]))

        r = _push(rng, n) * np.float32(1e-2)
        r[768:1280] = 0.0  # the tie blocks stay ties: nothing is added to them
        self.bufs = {
            "e": padded(_push(rng, n)),
            "r": padded(r),
            "codes": np.full(n + offset + GUARD, 0xAB, np.uint8),
            "scales": np.full(nb + GUARD, 7.0, np.float32),
            "out": np.full(n + offset + GUARD, 3.0, np.float32),
        }
        self.bufs["scales"][:nb] = np.nan  # output only: an unwritten scale shows
        if not residual:
            self.bufs.pop("r")
        self.views = {
            k: (b[:nb] if k == "scales" else b[offset : offset + n]) for k, b in self.bufs.items()
        }

    def ptr(self, name):
        return self.views[name].ctypes.data if name in self.views else None


def _same(name, want, got):
    """Bit for bit, except that any NaN stands for any NaN (its sign bit is the CPU's choice)."""
    kind = np.uint8 if want.dtype == np.uint8 else np.uint32
    differ = want.view(kind) != got.view(kind)
    if want.dtype == np.float32:
        differ &= ~(np.isnan(want) & np.isnan(got))
    bad = np.flatnonzero(differ)
    assert bad.size == 0, (
        f"{name} differs at {bad.size} positions, first {bad[0]}: "
        f"numpy {want[bad[0]]!r} vs kernel {got[bad[0]]!r}"
    )


def _check_compress(codec, n, block, residual, offset, run):
    seed = zlib.crc32(f"{codec}/{n}/{block}/{residual}/{offset}".encode())
    ref, got = Case(n, block, residual, offset, seed), Case(n, block, residual, offset, seed)
    v = ref.views
    NumpyBackend().compress(v["e"], v.get("r"), v["codes"], v["scales"], codec, block)
    run(got)
    for name in ref.bufs:
        _same(name, ref.bufs[name], got.bufs[name])


@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("residual", [True, False], ids=["feedback", "no-feedback"])
@pytest.mark.parametrize("block", [256, 100])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("codec", CODECS)
def test_compress_math_matches_numpy_bitwise(shim, codec, n, block, residual, offset):
    def run(case):
        fn = getattr(shim, CODEC_KERNELS[f"compress_{codec}"])
        fn(case.ptr("e"), case.ptr("r"), case.ptr("codes"), case.ptr("scales"), block, n)

    _check_compress(codec, n, block, residual, offset, run)


@pytest.mark.parametrize("grid", [(1, 1), (3, 5)], ids=["1x1", "3x5"])
@pytest.mark.parametrize("residual", [True, False], ids=["feedback", "no-feedback"])
@pytest.mark.parametrize("n", [0, 1, 257, 1300, 65_539])
@pytest.mark.parametrize("codec", CODECS)
def test_emulated_compress_kernel_matches_numpy_bitwise(emu, codec, n, residual, grid):
    blocks, threads = grid

    def run(case):
        fn = getattr(emu, CODEC_KERNELS[f"compress_{codec}"])
        for b in range(blocks):
            for t in range(threads):
                emu.easgd_emu_set_thread(b, t, blocks, threads)
                fn(case.ptr("e"), case.ptr("r"), case.ptr("codes"), case.ptr("scales"), 256, n)

    _check_compress(codec, n, 256, residual, 1, run)


@pytest.mark.parametrize("which", ["shim", "emulated"])
@pytest.mark.parametrize("n", [0, 1, 257, 1300, 65_539])
@pytest.mark.parametrize("codec", CODECS)
def test_decompress_matches_numpy_and_the_coder(shim, emu, which, codec, n):
    ref = Case(n, 256, True, 2, zlib.crc32(f"d/{codec}/{n}".encode()))
    v, backend = ref.views, NumpyBackend()
    backend.compress(v["e"], v["r"], v["codes"], v["scales"], codec, 256)
    got = ref.bufs["out"].copy()
    view = got[2 : 2 + n]
    fn_args = (v["codes"].ctypes.data, v["scales"].ctypes.data, view.ctypes.data, 256, n)
    if which == "shim":
        getattr(shim, CODEC_KERNELS[f"decompress_{codec}"])(*fn_args)
    else:
        for t in range(7):
            emu.easgd_emu_set_thread(0, t, 1, 7)
            getattr(emu, CODEC_KERNELS[f"decompress_{codec}"])(*fn_args)
    want = ref.bufs["out"].copy()
    backend.decompress(v["codes"], v["scales"], want[2 : 2 + n], codec, 256)
    _same("out", want, got)
    _same("decoded e", v["e"], view)  # the codes carry exactly what the coder left in e
