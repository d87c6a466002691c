"""The state of the workers at one cut: one type for the snapshot channel, checkpoints and resume.

A worker's state is what it needs to continue exactly where it was: its named rows (``x``,
then ``v`` for a momentum method or ``pending`` for DOWNPOUR, then ``residual`` with compressed
pushes: ``Config.state_rows``), its
counters (steps, exchanges, resets) and its random-number generator as six words (a PCG64
state: 128-bit state and increment as two words each, the cached-bit flag and the cached
word). A worker of a user's own training loop (``easgd_mpi.torch``) also has a
:class:`UserState`: its optimizer, schedule, gradient scaler, sampler position and registered
dicts, as a JSON structure over plain arrays. The master's snapshot channel fills a
:class:`WorkerStates` at each checkpoint, the checkpoint file stores exactly its fields, and a
resumed run hands each worker its :class:`WorkerState` (``states.of(i)``): no other shape exists
(docs/ARCHITECTURE.md §4).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "COUNTERS",
    "ROW_NAMES",
    "RNG_WORDS",
    "UserState",
    "WorkerState",
    "WorkerStates",
    "encode_rng",
    "generator_from_words",
]

#: Per-worker integer counters, in this order everywhere (channel, file, summaries).
COUNTERS = ("steps", "exchanges", "resets")
#: Every row kind a worker may save, in the order a rule saves them (x first).
ROW_NAMES = ("x", "v", "pending", "residual")
#: int64 words of one generator state.
RNG_WORDS = 6
_MASK = (1 << 64) - 1


def encode_rng(rng: np.random.Generator) -> np.ndarray:
    """A PCG64 generator's full state as :data:`RNG_WORDS` int64 words."""
    st = rng.bit_generator.state
    if st["bit_generator"] != "PCG64":
        raise ValueError(f"cannot store a {st['bit_generator']} generator (PCG64 expected)")
    s, inc = st["state"]["state"], st["state"]["inc"]
    words = np.array(
        [s & _MASK, s >> 64, inc & _MASK, inc >> 64, st["has_uint32"], st["uinteger"]],
        dtype=np.uint64,
    )
    return words.view(np.int64)


def generator_from_words(words) -> np.random.Generator:
    """A new generator in the state that :func:`encode_rng` recorded."""
    w = [int(x) for x in np.asarray(words, dtype=np.int64).view(np.uint64)]
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": w[0] | (w[1] << 64), "inc": w[2] | (w[3] << 64)},
        "has_uint32": w[4],
        "uinteger": w[5],
    }
    return rng


#: Array kinds a user state may hold: booleans, integers, floats (numbers only, never objects).
_ARRAY_KINDS = "biuf"
_USER_MAGIC = b"EAUSER1\0"
_USER_HEADER = struct.Struct("<8sQ")


@dataclass
class UserState:
    """What a worker of a user's own loop saves besides its rows: a tree (nested dicts, lists,
    numbers, strings) as JSON text whose tensor leaves name an entry of ``arrays`` (plain
    numeric arrays). Safe to read from any file: JSON and numbers, never code (no pickles);
    the encoding of the tree is easgd_mpi/torch/state.py's (docs/CHECKPOINT.md, "User state").
    """

    structure: str
    arrays: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.arrays = [np.ascontiguousarray(a) for a in self.arrays]
        for k, a in enumerate(self.arrays):
            if a.dtype.kind not in _ARRAY_KINDS or a.dtype.hasobject:
                raise ValueError(f"user state array {k} has dtype {a.dtype}: numbers only")

    @property
    def nbytes(self) -> int:
        return len(self.structure.encode()) + sum(a.nbytes for a in self.arrays)

    def to_bytes(self) -> bytes:
        """One buffer for a message: a header (JSON: the structure, each array's dtype, shape
        and place), then the arrays' bytes, each 8-byte aligned."""
        places, offset = [], 0
        for a in self.arrays:
            places.append({"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset})
            offset += -(-a.nbytes // 8) * 8
        header = json.dumps({"structure": self.structure, "arrays": places}).encode()
        header += b" " * (-len(header) % 8)
        out = bytearray(_USER_HEADER.size + len(header) + offset)
        _USER_HEADER.pack_into(out, 0, _USER_MAGIC, len(header))
        body = _USER_HEADER.size + len(header)
        out[_USER_HEADER.size : body] = header
        for a, place in zip(self.arrays, places, strict=True):
            start = body + place["offset"]
            out[start : start + a.nbytes] = a.tobytes()
        return bytes(out)

    @classmethod
    def from_bytes(cls, data) -> UserState:
        """The state :meth:`to_bytes` wrote; a ``ValueError`` for anything else."""
        view = memoryview(data).cast("B")
        if len(view) < _USER_HEADER.size:
            raise ValueError("user state message is too short")
        magic, size = _USER_HEADER.unpack_from(view, 0)
        body = _USER_HEADER.size + size
        if magic != _USER_MAGIC or body > len(view):
            raise ValueError("user state message has no valid header")
        header = json.loads(bytes(view[_USER_HEADER.size : body]))
        arrays = []
        for place in header["arrays"]:
            dtype = np.dtype(place["dtype"])
            if dtype.kind not in _ARRAY_KINDS or dtype.hasobject:
                raise ValueError(f"user state array of dtype {dtype}: numbers only")
            count = int(np.prod(place["shape"], dtype=np.int64))
            start = body + int(place["offset"])
            if start + count * dtype.itemsize > len(view):
                raise ValueError("user state message is truncated")
            flat = np.frombuffer(view, dtype=dtype, count=count, offset=start)
            arrays.append(flat.reshape(place["shape"]).copy())
        return cls(structure=str(header["structure"]), arrays=arrays)


@dataclass
class WorkerState:
    """One worker's state: what it starts a segment from."""

    steps: int
    exchanges: int
    resets: int
    rng_words: np.ndarray
    #: Row name → float32 [n] host array (only the rows that were saved).
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    #: The center-side rows a synchronous rule keeps on every worker (diloco's outer
    #: momentum), from the checkpoint's center state: name → float32 [n].
    center: dict[str, np.ndarray] = field(default_factory=dict)
    #: A user loop's own state (None: none saved, or not a user loop).
    user: UserState | None = None

    def generator(self) -> np.random.Generator:
        return generator_from_words(self.rng_words)


@dataclass
class WorkerStates:
    """Every worker's state at one cut (``p`` workers, ``n`` floats per row)."""

    #: Counter name (:data:`COUNTERS`) → int64 [p].
    counters: dict[str, np.ndarray]
    #: int64 [p, RNG_WORDS].
    rng_words: np.ndarray
    #: Row name (:data:`ROW_NAMES`) → float32 [p, n]; empty when states are not kept.
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    #: Seconds between each worker's saved state and the cut (float64 [p]; None: unknown).
    age: np.ndarray | None = None
    #: A user loop's states, one per worker (None where a worker has none yet); None for the
    #: package's own loops.
    user: list[UserState | None] | None = None

    def __post_init__(self) -> None:
        self.counters = {k: np.asarray(self.counters[k], np.int64) for k in COUNTERS}
        self.rng_words = np.asarray(self.rng_words, np.int64).reshape(-1, RNG_WORDS)
        unknown = set(self.rows) - set(ROW_NAMES)
        if unknown:
            raise ValueError(f"unknown worker row(s) {sorted(unknown)}; known: {ROW_NAMES}")
        if self.user is not None and len(self.user) != self.p:
            raise ValueError(f"{len(self.user)} user states for {self.p} workers")

    @property
    def p(self) -> int:
        return int(self.counters["steps"].shape[0])

    def row(self, name: str) -> np.ndarray | None:
        return self.rows.get(name)

    def of(self, i: int) -> WorkerState:
        """Worker ``i``'s own state (copies of its rows)."""
        return WorkerState(
            steps=int(self.counters["steps"][i]),
            exchanges=int(self.counters["exchanges"][i]),
            resets=int(self.counters["resets"][i]),
            rng_words=self.rng_words[i].copy(),
            rows={name: np.array(rows[i], np.float32) for name, rows in self.rows.items()},
            user=None if self.user is None else self.user[i],
        )

    def resized(self, start: WorkerStates) -> WorkerStates:
        """These states for ``start.p`` workers: worker i < p keeps its own, the others take
        theirs from ``start`` (a fresh start: the center, step 0, their own generators). How an
        asynchronous run resumes with another number of workers (docs/CHECKPOINT.md)."""
        p, keep = start.p, min(start.p, self.p)

        def take(mine, fresh):
            return np.concatenate([np.asarray(mine)[:keep], np.asarray(fresh)[keep:]])

        user = None
        if self.user is not None or start.user is not None:
            mine = self.user or [None] * self.p
            user = list(mine[:keep]) + list((start.user or [None] * p)[keep:])
        return WorkerStates(
            counters={k: take(self.counters[k], start.counters[k]) for k in COUNTERS},
            rng_words=take(self.rng_words, start.rng_words),
            rows={
                name: take(self.rows[name], np.broadcast_to(start.rows[name], (p, rows.shape[1])))
                for name, rows in self.rows.items()
                if name in start.rows
            },
            age=None if self.age is None else take(self.age, np.zeros(p)),
            user=user,
        )

    @classmethod
    def starting(
        cls, p: int, generators: list[np.random.Generator], rows: dict[str, np.ndarray]
    ) -> WorkerStates:
        """``p`` workers at step 0 with the given generators, every one with the same ``rows``
        (each an [n] vector: the initial center, a zero velocity ...)."""
        return cls(
            counters={k: np.zeros(p, np.int64) for k in COUNTERS},
            rng_words=np.stack([encode_rng(g) for g in generators]),
            rows={
                name: np.broadcast_to(np.asarray(r, np.float32), (p, r.size))
                for name, r in rows.items()
            },
        )
