"""The GPU path's costs, counted on the CPU.

A NumPy backend that declares itself a GPU takes the staged code path (pinned host buffers,
host↔device copies, stream synchronisations) and counts what it is asked to do. The budgets a
real GPU needs: at most one synchronisation per exchanged chunk and none per training step,
no allocation per step or exchange after warm-up, copies only of the chunk being exchanged,
every host buffer that MPI or a copy touches pinned, and a loss that stays on the device
until a worker reports it.
"""

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import config, train_quietly

import easgd_mpi.session as training
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.models import make_problem
from easgd_mpi.status_board import StatusBoard

N = 5000  # quadratic.dim: the flat vector has 5000 floats
CHUNK = 1024  # five chunks per exchange
STEPS, TAU, WARMUP = 400, 4, 12


class CountingGPU(NumpyBackend):
    """Host arrays handled as device memory, with counters."""

    name = "numpy-counting"
    is_gpu = True

    def __init__(self):
        super().__init__()
        self.counts = {"sync": 0, "copies": 0, "copy_bytes": 0, "alloc": 0, "pageable": 0}
        self.sizes: list[int] = []  # floats moved by each copy, in order
        self.pinned: list[tuple[int, int]] = []

    def _pinned(self, a) -> bool:
        ptr = a.__array_interface__["data"][0]
        return any(lo <= ptr and ptr + a.nbytes <= hi for lo, hi in self.pinned)

    def _copy(self, host, n_bytes):
        self.counts["copies"] += 1
        self.counts["copy_bytes"] += n_bytes
        self.sizes.append(n_bytes // 4)
        if not self._pinned(host):
            self.counts["pageable"] += 1

    def zeros(self, n):
        self.counts["alloc"] += 1
        return super().zeros(n)

    def host_empty(self, n):
        self.counts["alloc"] += 1
        a = super().host_empty(n)
        self.pinned.append((a.ctypes.data, a.ctypes.data + a.nbytes))
        return a

    def synchronize(self):
        self.counts["sync"] += 1

    def to_host(self, a, out=None):
        if out is None:
            out = super().host_empty(a.shape[0])  # pageable: counted as such below
        self._copy(out, a.nbytes)
        np.copyto(out, a)
        self.counts["sync"] += 1  # a blocking copy waits for the stream
        return out

    def from_host(self, host, out):
        self._copy(np.asarray(host), out.nbytes)
        np.copyto(out, host)
        self.counts["sync"] += 1
        return out

    def to_host_async(self, a, out):
        self._copy(out, a.nbytes)
        np.copyto(out, a)
        return out

    def from_host_async(self, host, out):
        self._copy(np.asarray(host), out.nbytes)
        np.copyto(out, host)
        return out

    def staging_pipeline(self):
        return CountingStaging(self)


class CountingStaging:
    """The GPU's overlapped chunk staging, counted: copies enqueued without waiting, one wait
    (an event synchronisation) when the exchange finishes the chunk."""

    def __init__(self, backend):
        self.backend = backend

    def start(self, c_host, c_dev, kernel, e_dev, e_host):
        self.backend.from_host_async(c_host, c_dev)
        kernel(c_dev, e_dev)
        self.backend.to_host_async(e_dev, e_host)

    def wait(self, ticket):
        self.backend.counts["sync"] += 1


class CountedLoss:
    """A device scalar: converting it to a Python float is a host synchronisation."""

    conversions = 0

    def __init__(self, value):
        self.value = value

    def __float__(self):
        CountedLoss.conversions += 1
        return float(self.value)


def run(tmp_path, monkeypatch, algorithm, **extra):
    backend = CountingGPU()
    monkeypatch.setattr(training, "select_backend", lambda **kw: (backend, ""))
    reports = []  # the worker's status reports: the only moments its loss may reach the host
    publish = StatusBoard.publish

    def counted_publish(self, slot, **values):
        reports.append(slot)
        return publish(self, slot, **values)

    monkeypatch.setattr(StatusBoard, "publish", counted_publish)
    trace = []  # (allocations, copies so far, syncs) at each step, after the step's gradient

    class Traced:
        def __init__(self, cfg, xp):
            self.inner = make_problem(cfg, xp)
            self.layout = self.inner.layout
            self.error_is_rate = False

        def init_params(self, x, seed):
            self.inner.init_params(x, seed)

        def sample_batch(self, rng):
            return self.inner.sample_batch(rng)

        def evaluate(self, x):
            return self.inner.evaluate(x)

        def loss_and_grad(self, x, batch, g):
            loss = self.inner.loss_and_grad(x, batch, g)
            assert not isinstance(loss, float), "the problem converted its loss on the host"
            trace.append((backend.counts["alloc"], len(backend.sizes), backend.counts["sync"]))
            return CountedLoss(loss)

    CountedLoss.conversions = 0
    cfg = config(
        tmp_path,
        algorithm=f'"{algorithm}"',
        **{
            "model.name": '"quadratic"',
            "quadratic.dim": N,
            "quadratic.curvature": 0.5,
            "quadratic.optimum": 1.0,
            "steps": STEPS,
            "tau": TAU,
            "chunk": CHUNK,
            "lr": 0.1,
            "eval_interval": 60,
            "checkpoint.interval": 0,
            **extra,
        },
    )
    summary = train_quietly(cfg, problem=Traced)
    backend.reports = len(reports)
    return backend, trace, summary


def worker_only():
    return MPI.COMM_WORLD.Get_rank() != 0


ASYNC = [("easgd", {}), ("eamsgd", {"momentum": 0.5})]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm, extra", ASYNC, ids=[a[0] for a in ASYNC])
def test_exchange_budgets(tmp_path, monkeypatch, algorithm, extra):
    backend, trace, summary = run(tmp_path, monkeypatch, algorithm, **extra)
    if not worker_only():
        return
    assert len(trace) == STEPS
    chunks = -(-N // CHUNK)  # the flat vector is N floats (already a multiple of 4)
    exchanges = STEPS // TAU
    allocs, copies_warm, syncs_warm = trace[WARMUP]
    # Syncs from the warm step to the last: one per exchanged chunk, none per local step.
    syncs = trace[-1][2] - syncs_warm
    exchanges_after = sum(1 for t in range(WARMUP, STEPS - 1) if t % TAU == 0)
    assert syncs <= chunks * exchanges_after, (syncs, chunks, exchanges_after)
    # No allocation per step or per exchange after warm-up.
    assert trace[-1][0] == allocs
    # Copies after warm-up move one chunk at a time (the whole vector only at the start).
    assert backend.sizes[0] == N  # the start-up pull of the center
    after = backend.sizes[copies_warm : trace[-1][1]]
    assert after and max(after) <= CHUNK
    assert len(after) == 2 * chunks * exchanges_after  # each chunk in and out, once
    assert backend.counts["pageable"] == 0, "a host buffer of a copy was not pinned"
    # The loss reached the host only when the worker reported it (every 50 ms), not per step.
    assert CountedLoss.conversions <= backend.reports, (CountedLoss.conversions, backend.reports)
    assert summary["exchanges"] == exchanges * (MPI.COMM_WORLD.Get_size() - 1)


@pytest.mark.mpi(min_size=2)
def test_sync_easgd_budget(tmp_path, monkeypatch):
    backend, trace, _ = run(tmp_path, monkeypatch, "sync-easgd", momentum=0.5)
    if not worker_only():
        return
    allocs, _, syncs_warm = trace[WARMUP]
    rounds_after = sum(1 for t in range(WARMUP, STEPS - 1) if t % TAU == 0)
    chunks = -(-N // CHUNK)
    # Per round: the all-reduce's copy out and back (2), the distance's reduction and the
    # first worker's mirror of the center (one per chunk); nothing per local step.
    per_round = 2 + 1 + chunks
    assert trace[-1][2] - syncs_warm <= per_round * rounds_after
    assert trace[-1][0] == allocs
    assert backend.counts["pageable"] == 0
    assert CountedLoss.conversions <= backend.reports
