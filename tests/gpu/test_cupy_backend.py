"""CupyBackend against the NumPy reference, on a real GPU.

Skipped where CuPy or a usable GPU is missing (tests/gpu/conftest.py names which), unless
EASGD_TEST_GPU=1 (set on GPU CI runners), which turns a missing GPU into a failure so a broken
driver cannot pass as "skipped".

Every fused kernel runs on awkward lengths and on views at element offsets 0-3 of larger device
buffers (equal offsets take the float4 path after a scalar head; different offsets per array
take the scalar path). Output-only arrays are poisoned with NaN so an unwritten element shows,
and guard elements outside each view must be untouched. The kernels round like NumPy (no FMA),
so results are bit-identical except for subnormals, which CuPy's -ftz=true flushes to zero: the
test allows a relative error of 1e-6 and an absolute error of the smallest normal float32.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from easgd_mpi.backend import NumpyBackend, cupy_backend
from easgd_mpi.backend.cupy_backend import KERNELS, CupyBackend
from easgd_mpi.errors import BackendError

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("usable_gpu")]

LENGTHS = [0, 1, 3, 4 * 1024 + 1, 1_000_003]
OFFSETS = ["0", "1", "2", "3", "mixed"]
GUARD = 5
SCALARS = [
    {"s": 0.7, "lr": 0.05, "wd": 1e-4, "alpha": 0.225, "beta": 0.9, "delta": 0.99},
    {"s": -3.0, "lr": 0.5, "wd": 0.0, "alpha": 0.9, "beta": 0.5, "delta": 0.9},
]
RTOL = 1e-6
ATOL = float(np.finfo(np.float32).tiny)  # a flushed subnormal (CuPy: -ftz=true), no more


@pytest.fixture(scope="module")
def backend(usable_gpu) -> CupyBackend:
    return CupyBackend(device_id=0)


@pytest.fixture(scope="module")
def cp(backend):
    return cupy_backend.cupy


def _values(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal(n).astype(np.float32)
    if n >= 8:
        idx = rng.integers(0, n, size=max(1, n // 50))
        special = np.array([0.0, -0.0, 1e-39, -3e-41, 1e30, -2e-20], dtype=np.float32)
        v[idx] = special[rng.integers(0, special.size, idx.size)]
    return v


def _host_inputs(spec, n: int, offsets: str, seed: int):
    rng = np.random.default_rng(seed)
    bufs, offs = {}, {}
    for k, name in enumerate(spec.arrays):
        off = (k % 4) if offsets == "mixed" else int(offsets)
        buf = _values(rng, n + 3 + GUARD)
        if name not in spec.reads:
            buf[off : off + n] = np.nan  # poison: must be overwritten
        bufs[name], offs[name] = buf, off
    return bufs, offs


def _args(spec, views, scalars):
    return [views[p] if p in spec.arrays else scalars[p] for p in spec.params]


@pytest.mark.parametrize("offsets", OFFSETS)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_matches_numpy(backend, cp, name, n, offsets):
    spec = KERNELS[name]
    ref = NumpyBackend()
    for k, scalars in enumerate(SCALARS):
        seed = zlib.crc32(f"{name}/{n}/{offsets}/{k}".encode())  # stable across runs
        bufs, offs = _host_inputs(spec, n, offsets, seed)
        dev = {p: cp.asarray(b) for p, b in bufs.items()}
        dviews = {p: dev[p][offs[p] : offs[p] + n] for p in spec.arrays}
        hviews = {p: bufs[p][offs[p] : offs[p] + n] for p in spec.arrays}
        with np.errstate(all="ignore"):
            getattr(ref, name)(*_args(spec, hviews, scalars))
        getattr(backend, name)(*_args(spec, dviews, scalars))
        backend.synchronize()
        for p in spec.arrays:
            got = cp.asnumpy(dev[p])
            np.testing.assert_allclose(
                got, bufs[p], rtol=RTOL, atol=ATOL, equal_nan=True,
                err_msg=f"{name}(n={n}, offsets={offsets}, scalars={scalars}): array {p}",
            )  # fmt: skip


def test_scalars_may_be_numpy_or_python_numbers(backend, cp):
    x = cp.ones(10, dtype=cp.float32)
    g = cp.ones(10, dtype=cp.float32)
    backend.sgd_step(x, g, np.float64(0.5), 0)
    backend.sgd_step(x, g, np.float32(0.25), np.float32(0.0))
    assert cp.asnumpy(x).tolist() == [0.25] * 10


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda cp: (cp.zeros(8, cp.float32), cp.zeros(8, cp.float64)), "dtype"),
        (lambda cp: (cp.zeros(8, cp.float32), cp.zeros(7, cp.float32)), "same length"),
        (lambda cp: (cp.zeros(8, cp.float32), cp.zeros(16, cp.float32)[::2]), "contiguous"),
        (lambda cp: (cp.zeros(8, cp.float32), np.zeros(8, np.float32)), "cupy.ndarray"),
    ],
)
def test_bad_arrays_are_rejected(backend, cp, make, match):
    x, g = make(cp)
    with pytest.raises(BackendError, match=match):
        backend.sgd_step(x, g, 0.1, 0.0)


def test_array_on_another_device_is_rejected(backend, cp):
    count = cp.cuda.runtime.getDeviceCount()
    if count < 2:
        pytest.skip(f"needs two GPUs, CuPy sees {count}")
    with cp.cuda.Device(1):
        other = cp.zeros(8, cp.float32)
    with pytest.raises(BackendError, match="GPU 1"):
        backend.scale(other, 2.0)


def test_host_empty_is_pinned(backend, cp):
    h = backend.host_empty(1000)
    assert isinstance(h, np.ndarray) and h.dtype == np.float32 and h.shape == (1000,)
    attrs = cp.cuda.runtime.pointerGetAttributes(h.ctypes.data)
    assert attrs.type == cp.cuda.runtime.memoryTypeHost  # page-locked, registered with CUDA
    assert backend.host_empty(0).size == 0


@pytest.mark.parametrize("n", [0, 1, 3, 1_000_003])
@pytest.mark.parametrize("offset", [0, 3])
def test_to_host_from_host_round_trip(backend, cp, n, offset):
    src = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    pinned = backend.host_empty(n + offset)[offset:]
    pinned[:] = src
    dbuf = cp.full(n + offset + GUARD, np.nan, dtype=cp.float32)
    dview = dbuf[offset : offset + n]
    assert backend.from_host(pinned, dview) is dview
    back = backend.host_empty(n)
    assert backend.to_host(dview, back) is back
    np.testing.assert_array_equal(back, src)
    outside = cp.concatenate([dbuf[:offset], dbuf[offset + n :]])
    assert cp.isnan(outside).all(), "a copy wrote outside its view"
    np.testing.assert_array_equal(backend.to_host(dview), src)  # out=None: a new array
    # pageable host memory and non-float32 input work too (synchronous copies)
    backend.from_host(src.astype(np.float64), dview)
    np.testing.assert_array_equal(cp.asnumpy(dview), src)


def test_async_copies_then_synchronize(backend, cp):
    n = 1 << 20
    h_in, h_out = backend.host_empty(n), backend.host_empty(n)
    h_in[:] = np.arange(n, dtype=np.float32)
    d = backend.zeros(n)
    backend.from_host_async(h_in, d)
    backend.scale(d, 2.0)
    backend.to_host_async(d, h_out)
    backend.synchronize()
    np.testing.assert_array_equal(h_out, 2 * np.arange(n, dtype=np.float32))


def test_memory_helpers(backend, cp):
    z = backend.zeros(5)
    assert isinstance(z, cp.ndarray) and z.dtype == cp.float32 and float(z.sum()) == 0
    a = backend.asarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    assert a.dtype == cp.float32 and a.flags.c_contiguous
    assert backend.sum_squares(a) == pytest.approx(55.0)
    assert backend.all_finite(a)
    a[1, 1] = np.inf
    assert not backend.all_finite(a)
    x = _values(np.random.default_rng(1), 100_003)
    x[np.abs(x) > 1e10] = 1.0
    want = NumpyBackend().sum_squares(x)
    assert backend.sum_squares(cp.asarray(x)) == pytest.approx(want, rel=1e-5)


def test_describe_reports_the_device(backend):
    info = cupy_backend.describe()
    assert info["gpu_available"] and info["kernels_compile"], info
    assert info["devices"] and info["devices"][0]["total_memory_bytes"] > 0
    assert backend.name == "cupy" and backend.is_gpu


def test_overlapped_chunk_staging_matches_the_host_exchange(backend, cp):
    """The stream pipeline (copy in, kernel and Σ e², copy out on three streams, finished one
    chunk later, as the exchange runs it) gives the NumPy exchange's e, x and Σ e², chunk by
    chunk, with two chunks in flight at once; a chunk's input is reported consumed once its
    copy in is done, and the slots (buffers and events) are reused."""
    from easgd_mpi.algorithms import _ChunkStaging  # noqa: PLC0415

    rng = np.random.default_rng(7)
    n, chunk, alpha = 1_000_000, 131_072, np.float32(0.3)
    x_host = rng.standard_normal(n).astype(np.float32)
    c_host = rng.standard_normal(n).astype(np.float32)
    x_ref, e_ref = x_host.copy(), np.empty(n, np.float32)
    NumpyBackend().exchange(x_ref, c_host, e_ref, alpha)

    x = backend.asarray(x_host)
    staging = _ChunkStaging(backend, chunk)
    assert staging.overlap
    c_bufs = [backend.host_empty(chunk) for _ in range(2)]
    e_bufs = [backend.host_empty(chunk) for _ in range(2)]
    e_out = np.empty(n, np.float32)
    sums = []
    previous = None
    for k, lo in enumerate(range(0, n, chunk)):
        hi = min(lo + chunk, n)
        c, e = c_bufs[k % 2][: hi - lo], e_bufs[k % 2][: hi - lo]
        c[...] = c_host[lo:hi]
        started = staging.start(
            c,
            e,
            lambda cd, ed, lo=lo, hi=hi: backend.exchange(x[lo:hi], cd, ed, alpha),
            sums.append,
        )
        if previous is not None:  # the chunk before, finished after this one started
            plo, phi, pe, pstarted = previous
            pstarted()
            assert pstarted.input_consumed()
            e_out[plo:phi] = pe
        previous = (lo, hi, e, started)
    plo, phi, pe, pstarted = previous
    pstarted()
    e_out[plo:phi] = pe
    backend.synchronize()
    np.testing.assert_allclose(e_out, e_ref, rtol=1e-6, atol=ATOL)
    np.testing.assert_allclose(cp.asnumpy(x), x_ref, rtol=1e-6, atol=ATOL)
    want = [
        float(np.sum(e_ref[lo : lo + chunk].astype(np.float64) ** 2)) for lo in range(0, n, chunk)
    ]
    np.testing.assert_allclose(sums, want, rtol=1e-5)
    assert len(staging._free) == 2  # two slots made, both handed back


@pytest.mark.parametrize("residual", [True, False], ids=["feedback", "no-feedback"])
@pytest.mark.parametrize("n", [1, 257, 4 * 1024 + 1, 1_000_003])
@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_codec_kernels_match_numpy(backend, cp, codec, n, residual):
    """Compressed pushes (docs/ARCHITECTURE.md §2.16): codes, scales, e and r as NumPy's, then
    the decoder gives back e. Scales and codes are bit-identical (subnormal blocks aside)."""
    rng = np.random.default_rng(zlib.crc32(f"{codec}/{n}/{residual}".encode()))
    e = (_values(rng, n) * np.exp(2 * rng.standard_normal(n))).astype(np.float32)
    r = (_values(rng, n) * np.float32(1e-2)) if residual else None
    nb = -(-n // 256)
    want = [e.copy(), None if r is None else r.copy()]
    want += [np.zeros(n, np.uint8), np.zeros(nb, np.float32)]
    NumpyBackend().compress(*want, codec, 256)
    got = [
        cp.asarray(e),
        None if r is None else cp.asarray(r),
        cp.zeros(n, cp.uint8),
        cp.zeros(nb, cp.float32),
    ]
    backend.compress(*got, codec, 256)
    for name, w, g in zip(("e", "r", "codes", "scales"), want, got, strict=True):
        if w is None:
            continue
        g = cp.asnumpy(g)
        if w.dtype == np.uint8:
            assert (w != g).mean() < 1e-4, name  # a subnormal scale or value may flush
        else:
            np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=name)
    out = cp.full(n, cp.nan, cp.float32)
    backend.decompress(got[2], got[3], out, codec, 256)
    np.testing.assert_array_equal(cp.asnumpy(out), cp.asnumpy(got[0]))
