"""The center as a host array with CenterWindow's chunked interface, for driving the real update
rules in one process (no MPI): a single worker's trajectory is then deterministic. A lock makes
it usable by several in-process workers at once."""

import threading

import numpy as np


class LocalCenter:
    def __init__(self, initial, chunk=100):
        self.value = np.array(initial, dtype=np.float32)
        self.n = self.value.size
        self.chunk = chunk  # small chunks: several per exchange even for small vectors
        self.lock = threading.Lock()

    def exchange(self, compute):
        with self.lock:
            for lo in range(0, self.n, self.chunk):
                hi = min(lo + self.chunk, self.n)
                c = self.value[lo:hi].copy()
                e = np.empty_like(c)
                finish = compute(lo, hi, c, e)
                if finish is not None:  # a staged worker's chunk, started: finish it first
                    finish()
                self.value[lo:hi] += e
        return 8 * self.n

    def read(self, out):
        with self.lock:
            out[...] = self.value

    def add(self, delta):
        with self.lock:
            self.value += delta

    def write(self, values):
        with self.lock:
            self.value[...] = values
