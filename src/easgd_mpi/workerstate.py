"""The state of the workers at one cut: one type for the snapshot channel, checkpoints and resume.

A worker's state is what it needs to continue exactly where it was: its named rows (``x``,
then ``v`` for a momentum method or ``pending`` for DOWNPOUR, then ``residual`` with compressed
pushes: ``Config.state_rows``), its
counters (steps, exchanges, resets) and its random-number generator as six words (a PCG64
state: 128-bit state and increment as two words each, the cached-bit flag and the cached
word). The master's snapshot channel fills a :class:`WorkerStates` at each checkpoint, the
checkpoint file stores exactly its fields, and a resumed run hands each worker its
:class:`WorkerState` (``states.of(i)``): no other shape exists (docs/ARCHITECTURE.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "COUNTERS",
    "ROW_NAMES",
    "RNG_WORDS",
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

    def __post_init__(self) -> None:
        self.counters = {k: np.asarray(self.counters[k], np.int64) for k in COUNTERS}
        self.rng_words = np.asarray(self.rng_words, np.int64).reshape(-1, RNG_WORDS)
        unknown = set(self.rows) - set(ROW_NAMES)
        if unknown:
            raise ValueError(f"unknown worker row(s) {sorted(unknown)}; known: {ROW_NAMES}")

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
