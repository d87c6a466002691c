"""A server's part in a center that computes (docs/ARCHITECTURE.md §3.11).

Each server rank holds the authoritative copy of its slice of the center and of the rule's
center-side rows in its own memory. :meth:`CenterServer.poll` looks at its inbox's ``arrived``
counter; when pushes came in since the last apply, it takes their sum out of the inbox, applies
the rule (center_rules.py) and publishes the new slice into the center's window, the rows into
the rows window and the new ``applied`` count, in that order, so a worker that sees its push
applied pulls a center that includes it. Pushes that arrive together are one apply of their
sum: the center keeps up with any number of workers, and how many it merged is in the metrics.

The servers other than the master poll between the tests of the end-of-run barrier
(``comm.keep_progress``); the master, whose own loop evaluates and writes checkpoints (which
can take seconds), polls in a thread of its own (:meth:`CenterServer.start_thread`), so its
slice never waits for an evaluation.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from .backend import NumpyBackend
from .center_inbox import COUNTER_FIELDS, CenterInbox
from .center_rules import make_center_rule
from .comm import MpiTurn, run_or_abort

__all__ = ["ActiveCenter", "CenterServer", "SERVER_POLL"]

#: Seconds an idle server sleeps between looks at its inbox: the latency a push can wait for,
#: and about 1 % of a core in looks while nothing arrives (docs/SCALING.md §7).
SERVER_POLL = 0.0002


class CenterServer:
    """One server's slice of a center that computes: ``rule`` applied to the pushes that
    reach ``inbox``, the result published into ``center`` (its window). ``trainable``: where
    the model's trainable prefix ends (the rule steps it; buffers past it are only added)."""

    def __init__(self, rule, center, inbox, trainable: int):
        self.rule, self.center, self.inbox = rule, center, inbox
        lo, hi, values = center.local_slice()
        self.size = hi - lo
        self.x = values  # a private copy: the server is the slice's only writer
        self.rows = inbox.local_rows()
        self.trainable = int(min(max(trainable - lo, 0), self.size))
        self._update = np.empty(self.size, np.float32)
        self.applied = 0
        #: Applies made, and the seconds they took (take, rule, publish).
        self.applies = 0
        self.busy_s = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: Taken for each poll; shared with the master's loop when this server is a thread.
        self.turn = MpiTurn(threaded=False)

    def poll(self) -> bool:
        """Apply what arrived since the last apply; returns whether there was anything."""
        if not self.size:
            return False
        arrived = self.inbox.arrived()
        if arrived == self.applied:
            return False
        start = time.perf_counter()
        self.inbox.take(self._update)
        self.rule.apply(self.x, self.rows, self._update, self.trainable, self.applied + 1, arrived)
        self.center.replace_own_slice(self.x)
        busy = time.perf_counter() - start
        self.inbox.publish(self.rows, arrived, busy)
        self.applied = arrived
        self.applies += 1
        self.busy_s += busy
        return True

    def serve(self, stop, poll: float = SERVER_POLL) -> None:
        """Poll until ``stop()``, sleeping ``poll`` seconds whenever nothing arrived."""
        while not stop():
            with self.turn:
                worked = self.poll()
            if not worked:
                time.sleep(poll)
        with self.turn:
            self.poll()

    # ---- the master's thread -------------------------------------------------------------
    def start_thread(self) -> None:
        """Serve in a daemon thread until :meth:`stop_thread` (the master's slice); the
        master's loop takes turns with it (:attr:`turn`)."""
        self.turn = MpiTurn(threaded=True)
        # An exception here would leave every worker waiting for its pushes: it ends the job
        # like one in any rank's main thread (the traceback, then MPI_Abort).
        self._thread = threading.Thread(
            target=run_or_abort,
            args=(lambda: self.serve(self._stop.is_set) or 0,),
            name="easgd-center",
            daemon=True,
        )
        self._thread.start()

    def stop_thread(self) -> None:
        """Stop the thread after one last poll and wait for it."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None


class ActiveCenter:
    """A run's center that computes, as one rank sees it (collective to build and close).

    Every rank: the rule and the servers' :class:`~easgd_mpi.center_inbox.CenterInbox`; a
    server with a slice also its :class:`CenterServer`. ``initial_rows`` (rank 0): the
    center-side rows to start from (a checkpoint's), else the rule's fresh ones.
    """

    def __init__(self, cfg, center, workers: int, trainable: int, initial_rows=None):
        self.rule = make_center_rule(cfg, workers)
        fresh = self.rule.initial_rows
        coded = cfg.compress != "none"  # coded slots, decoded here (§2.16, §3.11)
        self.inbox = CenterInbox(
            center,
            self.rule.rows,
            initial_rows,
            fresh=lambda name, slice_: fresh(slice_)[name],
            codec=cfg.compress if coded else None,
            decoder=NumpyBackend() if coded else None,
        )
        self.center = center
        self.server = (
            CenterServer(self.rule, center, self.inbox, trainable)
            if (center.rank < center.servers and self.inbox.size)
            else None
        )

    def read_rows(self) -> dict[str, np.ndarray]:
        """Every center-side row, whole (the master's checkpoints)."""
        rows = {}
        for name in self.rule.rows:
            rows[name] = np.empty(self.center.n, np.float32)
            self.inbox.read_row(name, rows[name])
        return rows

    def read_evaluated(self, out: np.ndarray) -> None:
        """``out`` ← what the master evaluates: the center, or the rule's average."""
        if self.rule.evaluated == "center":
            self.center.read(out)
        else:
            self.inbox.read_row(self.rule.evaluated, out)

    def metrics(self) -> dict:
        """The servers' side for a metrics record: pushes arrived, applied, the pushes not
        yet applied (lag), applies, and the busiest server's seconds of applying."""
        counts = self.inbox.counters()
        field = {name: counts[:, i] for i, name in enumerate(COUNTER_FIELDS)}
        return {
            "center_pushes": int(field["arrived"].max(initial=0)),
            "center_lag": int((field["arrived"] - field["applied"]).max(initial=0)),
            "center_applies": int(field["applies"].max(initial=0)),
            "center_busy_s": round(float(field["busy_us"].max(initial=0)) / 1e6, 4),
        }

    def close(self) -> None:
        """Collective: free the inbox windows (after every server stopped serving)."""
        self.inbox.close()
