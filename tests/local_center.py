"""The center as a host array with CenterWindow's chunked interface, for driving the real update
rules in one process (no MPI): a single worker's trajectory is then deterministic. A lock makes
it usable by several in-process workers at once."""

import threading

import numpy as np


class LocalCenter:
    def __init__(self, initial, chunk=100, n_workers=1):
        self.value = np.array(initial, dtype=np.float32)
        self.n = self.value.size
        self.n_workers = n_workers
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


class LocalInbox:
    """The servers' inboxes of a center that computes (center_inbox.CenterInbox's interface for
    a worker), in one process: each push is applied at once by the real rule of
    center_rules.py to the LocalCenter's values, as one server that keeps up would."""

    def __init__(self, center, rule, trainable, workers=1):
        self.center, self.rule, self.trainable = center, rule, trainable
        self.rows = rule.initial_rows(center.value)
        self.row_names = rule.rows
        self.n_workers = workers
        self.arrived = self.applied = 0

    def push(self, update):
        with self.center.lock:
            u = np.array(update, dtype=np.float32)
            self.arrived += 1
            self.rule.apply(
                self.center.value, self.rows, u, self.trainable, self.applied + 1, self.arrived
            )
            self.applied = self.arrived
        return [self.arrived]

    def counters(self):
        return np.array([[self.arrived, self.applied, self.applied, 0]], dtype=np.int64)

    def wait_applied(self, tickets, lag=0):
        return 0.0

    def read_row(self, name, out):
        out[...] = self.rows[name]
