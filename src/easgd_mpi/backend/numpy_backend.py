"""The NumPy backend: the reference math of every per-element update.

Each method is one fused pass over flat float32 vectors of equal length, updated in place. The
CuPy backend (``cupy_backend.py``) calls one CUDA kernel from ``kernels/easgd.cu`` per method with
exactly this signature and the same per-element formula, written in ``kernels/easgd.cuh``; the
tests hold both to this reference. The formulas below are evaluated in float32 in the order
written, so that a host build of the C++ header matches them bit for bit.

Notation (docs/ARCHITECTURE.md §2): lr = η, alpha = α, beta = β, delta = δ (momentum), wd = λ
(weight decay, part of the gradient: g + λ·point where the gradient was taken).
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = [
    "NumpyBackend",
    "HostStaging",
    "HostSlot",
    "host_sum_squares",
    "CODECS",
    "e4m3_encode",
    "e4m3_decode",
]

_f32 = np.float32
#: The codes of a compressed push and the largest magnitude each codes (docs/ARCHITECTURE.md
#: §2.16): ``int8`` is a signed byte in [−127, 127]; ``fp8`` the OCP FP8 E4M3 byte (4 exponent
#: bits with bias 7, 3 mantissa bits, subnormals, no infinity; 448 is its largest finite value).
CODECS = {"int8": 127.0, "fp8": 448.0}
_E4M3_MIN_NORMAL = _f32(2.0**-6)
#: Elements per cache block: the vectors and temporaries of one block (up to 7 × 256 KiB) stay
#: in cache, so each fused update reads and writes main memory once instead of once per NumPy
#: pass. Measured here on 2.5e7 elements: sgd_step 58 ms unblocked, 27-31 ms in blocks.
_BLOCK = 1 << 16


def host_sum_squares(a: np.ndarray) -> float:
    """Σ a² of a host float32 vector, accumulated in float64 block by block.

    The same finiteness verdict as the GPU's float64 reduction: finite values up to float32's
    largest never overflow (a float32 dot product does, above ~1.8e19), and no temporary of the
    vector's size is made.
    """
    a = np.asarray(a)
    n = a.shape[0]
    total = 0.0
    scratch = np.empty(min(n, _BLOCK), dtype=np.float64)
    for lo in range(0, n, _BLOCK):
        block = a[lo : lo + _BLOCK]
        t = scratch[: block.shape[0]]
        np.multiply(block, block, out=t, dtype=np.float64)
        total += float(t.sum())
    return total


def _blockwise(update):
    """Run a per-element update block by block over every 1-D array argument of length n."""

    @functools.wraps(update)
    def run(self, *args):
        n = args[0].shape[0]
        if n <= 2 * _BLOCK:
            return update(self, *args)
        split = [isinstance(a, np.ndarray) and a.ndim == 1 and a.shape[0] == n for a in args]
        for lo in range(0, n, _BLOCK):
            hi = min(lo + _BLOCK, n)
            update(self, *(a[lo:hi] if cut else a for a, cut in zip(args, split, strict=True)))
        return None

    return run


class HostSlot:
    """One chunk in flight of :class:`HostStaging`: its "device" buffers and its Σ e²."""

    def __init__(self, backend, n: int):
        self.c = backend.zeros(n)
        self.e = backend.zeros(n)
        self.sq = 0.0


class HostStaging:
    """Staging where there is nothing to overlap: every step runs at once, in order.

    The interface of the GPU's stream pipeline (``CupyBackend.staging_pipeline``): ``slot``
    makes the buffers of one chunk in flight; ``start`` copies the center's chunk in, runs the
    kernel, takes Σ e² where e was computed (the "device") and copies e out; ``input_consumed``
    says whether the host chunk may be refilled; ``wait`` is where a GPU would block until e and
    Σ e² are on the host, and returns Σ e².
    """

    def __init__(self, backend):
        self.backend = backend

    def slot(self, n: int) -> HostSlot:
        return HostSlot(self.backend, n)

    def start(self, slot: HostSlot, c_host, kernel, e_host) -> None:
        k = c_host.shape[0]
        c_dev, e_dev = slot.c[:k], slot.e[:k]
        self.backend.from_host_async(c_host, c_dev)
        kernel(c_dev, e_dev)
        slot.sq = self.backend.sum_squares(e_dev)
        self.backend.to_host_async(e_dev, e_host)

    @staticmethod
    def input_consumed(slot: HostSlot) -> bool:
        """Always: the copy in happened in ``start``."""
        return True

    @staticmethod
    def wait(slot: HostSlot) -> float:
        """Nothing is in flight on the host: Σ e² of the chunk."""
        return slot.sq


class NumpyBackend:
    """Reference implementation on host memory."""

    name = "numpy"
    xp = np
    is_gpu = False

    def __init__(self):
        self._scratch: dict[tuple[int, int], np.ndarray] = {}

    # ---- memory -------------------------------------------------------------------------
    def zeros(self, n: int) -> np.ndarray:
        return np.zeros(int(n), dtype=np.float32)

    def asarray(self, a) -> np.ndarray:
        return np.ascontiguousarray(a, dtype=np.float32)

    def to_host(self, a, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return np.array(a, dtype=np.float32, copy=True)
        np.copyto(out, a)
        return out

    def from_host(self, host: np.ndarray, out: np.ndarray) -> np.ndarray:
        np.copyto(out, host)
        return out

    # On the host there is nothing to overlap: the "asynchronous" copies are the copies.
    to_host_async = to_host
    from_host_async = from_host

    def host_empty(self, n: int) -> np.ndarray:
        """A host buffer for MPI staging (pinned memory on the GPU backend)."""
        return np.empty(int(n), dtype=np.float32)

    def staging_pipeline(self) -> HostStaging:
        """The chunk staging of a worker whose state is in host memory: see CupyBackend's."""
        return HostStaging(self)

    def synchronize(self) -> None:
        """Nothing to wait for on the host."""

    def sum_squares(self, a) -> float:
        """Σ a² in float64 (inf or nan when a holds a non-finite value)."""
        return host_sum_squares(a)

    def all_finite(self, a) -> bool:
        return bool(np.isfinite(a).all())

    def scale(self, a, s) -> None:
        """a ← s·a"""
        np.multiply(a, _f32(s), out=a)

    # ---- fused updates ------------------------------------------------------------------
    # Temporaries come from _tmp(): allocating fresh multi-megabyte arrays on every step costs
    # page faults that, measured here, made these updates 10-40x slower than the copy.
    @_blockwise
    def sgd_step(self, x, g, lr, wd) -> None:
        """x ← x − η(g + λx)"""
        t = self._tmp(x.shape[0])
        np.multiply(x, _f32(wd), out=t)
        t += g
        t *= _f32(lr)
        x -= t

    @_blockwise
    def exchange(self, x, c, e, alpha) -> None:
        """e ← α(x − c);  x ← x − e"""
        np.subtract(x, c, out=e)
        e *= _f32(alpha)
        x -= e

    @_blockwise
    def exchange_sgd_step(self, x, c, g, e, alpha, lr, wd) -> None:
        """e ← α(x − c);  x ← (x − e) − η(g + λx)   (gradient taken at the old x)"""
        t = self._tmp(x.shape[0])
        np.multiply(x, _f32(wd), out=t)
        t += g
        t *= _f32(lr)
        np.subtract(x, c, out=e)
        e *= _f32(alpha)
        x -= e
        x -= t

    @_blockwise
    def nesterov_lookahead(self, x, v, delta, y) -> None:
        """y ← x + δv   (the point where EAMSGD takes its gradient; y may be x or v)"""
        t = self._tmp(x.shape[0])
        np.multiply(v, _f32(delta), out=t)
        np.add(x, t, out=y)

    @_blockwise
    def nesterov_step(self, x, v, g, lr, delta, wd) -> None:
        """v ← δv − η(g + λ(x + δv));  x ← x + v   (v on the right is the old v)"""
        dv, t = self._tmp(x.shape[0], 0), self._tmp(x.shape[0], 1)
        np.multiply(v, _f32(delta), out=dv)
        np.add(x, dv, out=t)
        t *= _f32(wd)
        t += g
        t *= _f32(lr)
        np.subtract(dv, t, out=v)
        x += v

    @_blockwise
    def exchange_nesterov_step(self, x, v, c, g, e, alpha, lr, delta, wd) -> None:
        """e ← α(x − c);  v ← δv − η(g + λ(x + δv));  x ← (x − e) + v   (old x, v on the right)"""
        dv, t = self._tmp(x.shape[0], 0), self._tmp(x.shape[0], 1)
        np.multiply(v, _f32(delta), out=dv)
        np.add(x, dv, out=t)
        t *= _f32(wd)
        t += g
        t *= _f32(lr)
        np.subtract(x, c, out=e)
        e *= _f32(alpha)
        np.subtract(dv, t, out=v)
        x -= e
        x += v

    @_blockwise
    def downpour_step(self, x, acc, g, lr, wd) -> None:
        """d ← −η(g + λx);  x ← x + d;  acc ← acc + d"""
        d = self._tmp(x.shape[0])
        np.multiply(x, _f32(wd), out=d)
        d += g
        d *= _f32(-lr)
        x += d
        acc += d

    @_blockwise
    def sync_easgd_update(self, x, c, xmean, alpha, beta) -> None:
        """x ← x − α(x − c);  c ← (1 − β)c + β·x̄   (both from the old x and c)"""
        diff, t = self._tmp(x.shape[0], 0), self._tmp(x.shape[0], 1)
        np.subtract(x, c, out=diff)
        diff *= _f32(alpha)
        c *= _f32(1) - _f32(beta)
        np.multiply(xmean, _f32(beta), out=t)
        c += t
        x -= diff

    # ---- compressed pushes (docs/ARCHITECTURE.md §2.16) -----------------------------------
    def compress(self, e, r, codes, scales, codec: str, block: int) -> None:
        """Blockwise quantization with error feedback, in place. Per block of ``block``
        consecutive elements (the last may be shorter), with Q = :data:`CODECS` [codec]:

            v ← e + r   (v ← e when r is None: no error feedback)
            s ← max|v| / Q
            q ← code(v / s)         int8: round half to even, clamp to ±127;  fp8: E4M3, RNE
            d ← value(q) · s        (s = 0: q = 0, d = 0;  s not finite: q = 0, d = NaN)
            codes ← q;  scales[block] ← s;  r ← v − d;  e ← d

        ``e`` leaves holding what the center receives, ``r`` what it did not (exactly: v − d
        is exact since d is within a factor 2 of v or 0). ``codes`` (uint8, len(e)) and
        ``scales`` (float32, ⌈len(e)/block⌉) are the coded form that would cross a link.
        """
        n = e.shape[0]
        if n == 0:
            return
        qmax = _f32(CODECS[codec])
        v = e + r if r is not None else e.copy()
        with np.errstate(invalid="ignore", over="ignore"):
            mag = np.abs(v)
            full = n // block
            amax = np.empty(-(-n // block), dtype=_f32)
            amax[:full] = mag[: full * block].reshape(full, block).max(axis=1)
            if full < amax.size:
                amax[full] = mag[full * block :].max()
            s = amax / qmax
            usable = np.isfinite(s) & (s > 0)
            s_each = np.repeat(s, block)[:n]
            y = np.zeros(n, dtype=_f32)
            np.divide(v, s_each, out=y, where=np.repeat(usable, block)[:n])
            if codec == "int8":
                q = np.clip(np.rint(y), -qmax, qmax).astype(np.int8)
                codes[...] = q.view(np.uint8)
                d = q.astype(_f32) * s_each
            else:
                codes[...] = e4m3_encode(y)
                d = e4m3_decode(codes) * s_each
        scales[...] = s
        if r is not None:
            np.subtract(v, d, out=r)
        e[...] = d

    def decompress(self, codes, scales, out, codec: str, block: int) -> None:
        """out ← value(codes) · scale of each element's block: the d that :meth:`compress`
        returned, from the coded form alone (what a receiving center computes)."""
        n = out.shape[0]
        if n == 0:
            return
        s_each = np.repeat(np.asarray(scales, _f32), block)[:n]
        with np.errstate(invalid="ignore"):
            if codec == "int8":
                np.multiply(codes.view(np.int8).astype(_f32), s_each, out=out)
            else:
                np.multiply(e4m3_decode(codes), s_each, out=out)

    # ---- scratch ------------------------------------------------------------------------
    def _tmp(self, n: int, slot: int = 0) -> np.ndarray:
        """A reusable float32 scratch vector of length n (slot: several at once)."""
        key = (int(n), slot)
        buf = self._scratch.get(key)
        if buf is None:
            if len(self._scratch) >= 32:  # bounded: sizes are few (model, chunk, last chunk)
                self._scratch.clear()
            buf = self._scratch[key] = np.empty(int(n), dtype=np.float32)
        return buf


def e4m3_encode(y: np.ndarray) -> np.ndarray:
    """The FP8 E4M3 byte nearest to each float32 in ``y`` (|y| ≤ 448 + rounding; round half to
    even; larger magnitudes saturate to 448), as the CUDA kernels compute it bit by bit."""
    y = np.asarray(y, dtype=_f32)
    sign = ((y.view(np.uint32) >> 31) << 7).astype(np.uint8)
    a = np.abs(y)
    bits = a.view(np.uint32)
    # Normal range: keep 3 mantissa bits, rounding half to even on the 20 dropped bits.
    rounded = (bits + np.uint32(0x7FFFF) + ((bits >> 20) & 1)) & np.uint32(0xFFF00000)
    rounded = np.minimum(rounded, np.uint32(0x43E00000))  # 448 = 1.75 · 2^8
    normal = (((rounded >> 23) - 120) << 3) | ((rounded >> 20) & 7)
    # Below 2^-6: the subnormal codes, multiples of 2^-9 (8 · 2^-9 is the code of 2^-6).
    small = np.rint(a * _f32(512.0)).astype(np.uint32)
    code = np.where(a < _E4M3_MIN_NORMAL, small, normal).astype(np.uint8)
    return code | sign


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """The float32 value of each FP8 E4M3 byte (exact)."""
    c = np.asarray(codes, dtype=np.uint8).astype(np.uint32)
    exp, man = (c >> 3) & 15, c & 7
    normal = (((exp + 120) << 23) | (man << 20)).view(_f32)
    small = man.astype(_f32) * _f32(2.0**-9)
    a = np.where(exp == 0, small, normal)
    return np.where(c & 0x80, -a, a).astype(_f32)
