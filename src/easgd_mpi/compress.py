"""Compressed pushes with error feedback: what a worker sends toward the center, coded in bytes.

A worker that pushes a difference to the center (the elastic difference e of async EASGD and
EAMSGD, DOWNPOUR's summed update Δ) can code it in one byte per element with a float32 scale
per block of :data:`BLOCK` elements (``compress = "int8"`` or ``"fp8"``). With error feedback
(the default) the worker keeps the residual r of what its codes could not carry and adds it to
its next push, so nothing is lost, only delayed: over any number of pushes, what reached the
center plus the residual equals the sum of the uncompressed pushes (to float32 rounding of the
additions v = e + r). The residual is a row of the worker's state (``"residual"``), saved in
checkpoints and restored on resume.

The math is the backend's ``compress``/``decompress`` (NumPy reference, CUDA kernels in
``kernels/easgd.cuh``); this module holds the residual and the scratch, and counts the coded
bytes. What crosses which link is docs/ARCHITECTURE.md §2.16: on the passive window the
center receives the decoded float32 values (MPI's accumulate adds float32 only), so the codes
save bytes only where a receiver decodes them: a center that computes (issue 19's active
center) ships :meth:`PushCompressor.coded` and decodes with :func:`decode_push`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK", "PushCompressor", "coded_bytes", "decode_push", "make_push_compressor"]

#: Elements per scale. Measured in bench/bench_compress.py (docs/PERFORMANCE.md "Compressed
#: pushes"): 256 keeps the scales at 1.6 % of the bytes, and smaller blocks lower the error of
#: one push less than error feedback removes over a few pushes anyway.
BLOCK = 256


def coded_bytes(k: int, codec: str, block: int = BLOCK) -> int:
    """Bytes of a push of ``k`` elements in ``codec`` ("none": float32)."""
    if codec == "none":
        return 4 * int(k)
    return int(k) + 4 * (-(-int(k) // block))


def decode_push(backend, codes, scales, out, codec: str, block: int = BLOCK) -> None:
    """out ← the values a push's ``codes`` and ``scales`` stand for: what a receiving center
    adds to its slice (the sender's post-compression e, bit for bit)."""
    backend.decompress(codes, scales, out, codec, block)


class PushCompressor:
    """One worker's coder of pushes, with its residual (when error feedback is on).

    ``compress(lo, hi, e)`` codes the push for elements [lo, hi) of the flat vector in place
    (``e`` then holds what the center receives) and updates the residual of those elements;
    pushes are coded in chunks (the exchange's) or whole (DOWNPOUR's), blocks counted from
    the start of each. :meth:`coded` gives the codes and scales of the last call: the bytes a
    coded transport sends.
    """

    def __init__(self, backend, codec: str, n: int, error_feedback: bool = True, block=BLOCK):
        self.backend = backend
        self.codec = codec
        self.block = int(block)
        self.n = int(n)
        self.residual = backend.zeros(self.n) if error_feedback else None
        self._codes = None
        self._scales = None
        self._last = (0, 0)

    def compress(self, lo: int, hi: int, e) -> int:
        """Code e (the push of elements [lo, hi)) in place; returns its coded bytes."""
        k = int(hi) - int(lo)
        nb = -(-k // self.block)
        self._ensure(k, nb)
        r = None if self.residual is None else self.residual[lo:hi]
        self.backend.compress(e, r, self._codes[:k], self._scales[:nb], self.codec, self.block)
        self._last = (k, nb)
        return coded_bytes(k, self.codec, self.block)

    def coded(self):
        """(codes, scales) of the last :meth:`compress`, on the backend's device; valid until
        the next call."""
        k, nb = self._last
        return self._codes[:k], self._scales[:nb]

    def reset(self, lo: int = 0, hi: int | None = None) -> None:
        """Forget the residual (a worker restarted from the center after a non-finite push)."""
        if self.residual is not None:
            self.residual[lo:hi] = 0

    def restore(self, row) -> None:
        """The residual from a saved state (a host float32 row; None: start from zero)."""
        if self.residual is None:
            return
        if row is None:
            self.residual[...] = 0
            return
        self.backend.from_host(np.ascontiguousarray(row, np.float32), self.residual)

    def _ensure(self, k: int, nb: int) -> None:
        xp = self.backend.xp
        if self._codes is None or self._codes.size < k:
            self._codes = xp.zeros(k, dtype=np.uint8)
        if self._scales is None or self._scales.size < nb:
            self._scales = xp.zeros(nb, dtype=np.float32)


def make_push_compressor(cfg, backend, n: int) -> PushCompressor | None:
    """The compressor of ``cfg.compress`` for a worker of an n-element model (None: "none")."""
    if cfg.compress == "none":
        return None
    return PushCompressor(backend, cfg.compress, n, error_feedback=cfg.error_feedback)
