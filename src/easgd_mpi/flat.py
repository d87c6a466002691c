"""Flat parameter buffers.

All model state (parameters, gradients, momentum, the center) lives in one contiguous float32
vector so that the exchange is a single RMA transfer and every update is one fused pass. A
:class:`Layout` maps tensor names to shapes and offsets inside that vector; offsets are padded to
16 bytes so that each tensor starts on a float4 boundary for the vectorised GPU kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ALIGN_FLOATS", "TensorSpec", "Layout"]

#: Tensors start on multiples of 4 float32 elements (16 bytes).
ALIGN_FLOATS = 4


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor inside a flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))


class Layout:
    """Names, shapes and aligned offsets of the tensors that make up one flat vector."""

    def __init__(self, tensors: Iterable[tuple[str, Sequence[int]]]):
        specs: list[TensorSpec] = []
        offset = 0
        seen: set[str] = set()
        for name, shape in tensors:
            if name in seen:
                raise ValueError(f"duplicate tensor name {name!r} in layout")
            seen.add(name)
            shape = tuple(int(d) for d in shape)
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r} has a negative dimension: {shape}")
            spec = TensorSpec(name, shape, offset)
            specs.append(spec)
            offset += _round_up(spec.size, ALIGN_FLOATS)
        self._specs = tuple(specs)
        self._by_name = {s.name: s for s in specs}
        #: Total length of the flat vector, padding included.
        self.size = offset

    @property
    def specs(self) -> tuple[TensorSpec, ...]:
        return self._specs

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self._specs)

    def __getitem__(self, name: str) -> TensorSpec:
        return self._by_name[name]

    def __len__(self) -> int:
        return len(self._specs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Layout) and self._specs == other._specs

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.name}{list(s.shape)}@{s.offset}" for s in self._specs)
        return f"Layout({inner}; size={self.size})"

    def zeros(self, xp=np, dtype=np.float32):
        """A new zero-filled flat vector (padding stays zero forever)."""
        return xp.zeros(self.size, dtype=dtype)

    def views(self, flat) -> dict:
        """Per-tensor views (no copies) of ``flat``, keyed by name, in layout order."""
        if flat.ndim != 1 or flat.shape[0] != self.size:
            raise ValueError(f"flat buffer has shape {flat.shape}, layout needs ({self.size},)")
        return {s.name: flat[s.offset : s.offset + s.size].reshape(s.shape) for s in self._specs}

    def to_records(self) -> list[dict]:
        """A JSON/HDF5-friendly description: name, shape, offset per tensor."""
        return [{"name": s.name, "shape": list(s.shape), "offset": s.offset} for s in self._specs]

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> Layout:
        return cls(shapes.items())


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple
