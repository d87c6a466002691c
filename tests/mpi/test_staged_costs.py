"""The GPU path's costs, counted on the CPU.

A NumPy backend that declares itself a GPU takes the staged code path (pinned host buffers,
host↔device copies, stream synchronisations) and counts what it is asked to do; its array
module is a fake CuPy (tests/fake_device.py) whose arrays the problems must treat as device
memory, and PyTorch's synchronising calls are counted too. The budgets a real GPU needs: at
most one synchronisation per exchanged chunk and none per training step, whatever the batch
source; no allocation per step or exchange after warm-up; copies only of the chunk being
exchanged; every host buffer that MPI or a copy touches pinned; Σ e² of each chunk taken on
the device; and a loss that stays on the device until a worker reports it.
"""

from collections import Counter

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import config, train_quietly

import easgd_mpi.algorithms as algorithms
import easgd_mpi.session as training
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.backend.numpy_backend import HostStaging
from easgd_mpi.models import make_problem
from easgd_mpi.status_board import StatusBoard
from fake_device import DeviceArray, FakeCupy, count_torch_syncs

N = 5000  # quadratic.dim: the flat vector has 5000 floats
CHUNK = 1024  # five chunks per exchange
STEPS, TAU, WARMUP = 400, 4, 12


class CountingGPU(NumpyBackend):
    """Host arrays handled as device memory, with counters."""

    name = "numpy-counting"
    is_gpu = True

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.xp = FakeCupy(self.counts)
        self.sizes: list[int] = []  # floats moved by each copy, in order
        self.pinned: list[tuple[int, int]] = []

    def is_pinned(self, a) -> bool:
        ptr = a.__array_interface__["data"][0]
        return any(lo <= ptr and ptr + a.nbytes <= hi for lo, hi in self.pinned)

    def _copy(self, host, n_bytes):
        self.counts["copies"] += 1
        self.counts["copy_bytes"] += n_bytes
        self.sizes.append(n_bytes // 4)
        if not self.is_pinned(host):
            self.counts["pageable"] += 1

    def zeros(self, n):
        self.counts["alloc"] += 1
        return super().zeros(n).view(DeviceArray)

    def host_empty(self, n):
        self.counts["alloc"] += 1
        a = super().host_empty(n)
        self.pinned.append((a.ctypes.data, a.ctypes.data + a.nbytes))
        return a

    def synchronize(self):
        self.counts["sync"] += 1

    def sum_squares(self, a):
        # On a GPU worker Σ e² of a staged chunk is taken on the device, not from the pinned
        # host copy (that would be a float64 pass on the host, serial with MPI).
        self.counts["host_sumsq" if self.is_pinned(a) else "device_sumsq"] += 1
        return super().sum_squares(a)

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


class CountingStaging(HostStaging):
    """The GPU's overlapped chunk staging, counted: copies enqueued without waiting, one wait
    (an event synchronisation) when the exchange finishes the chunk."""

    def wait(self, slot):
        self.backend.counts["chunk_wait"] += 1
        return super().wait(slot)


def host_syncs(counts) -> int:
    """Every wait of the host for the device, the chunk waits of an exchange included."""
    return counts["sync"] + counts["chunk_wait"]


class CountedLoss:
    """A device scalar: converting it to a Python float is a host synchronisation."""

    conversions = 0

    def __init__(self, value):
        self.value = value

    def __float__(self):
        CountedLoss.conversions += 1
        return float(np.asarray(self.value))  # counted here, not as a device sync


def count_host_sum_squares(monkeypatch, backend) -> None:
    """A Σ e² taken by the worker's rule on a pinned host chunk, rather than by the device,
    is counted as ``host_sumsq``."""
    from easgd_mpi.backend.numpy_backend import host_sum_squares

    def counted(a):
        backend.counts["host_sumsq" if backend.is_pinned(a) else "device_sumsq"] += 1
        return host_sum_squares(a)

    monkeypatch.setattr(algorithms, "host_sum_squares", counted, raising=False)


def run(tmp_path, monkeypatch, algorithm, **extra):
    backend = CountingGPU()
    monkeypatch.setattr(training, "select_backend", lambda **kw: (backend, ""))
    count_host_sum_squares(monkeypatch, backend)
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
            trace.append((backend.counts["alloc"], len(backend.sizes), host_syncs(backend.counts)))
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
    # Σ e² of every chunk came back with it from the device.
    assert backend.counts["host_sumsq"] == 0
    assert backend.counts["device_sumsq"] >= chunks * exchanges_after
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


# ---- no host synchronisation in a step, whatever feeds it -----------------------------------
torch = pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

SOURCE_STEPS, SOURCE_TAU = 24, 4


def _torch_mlp(cfg):
    return torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 10)
    )


class _Digits(torch.utils.data.Dataset):
    """A map-style Dataset of the digits: items are fetched and collated on the host."""

    def __init__(self, x, y):
        self.x, self.y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def _digits():
    from easgd_mpi.config import Config
    from easgd_mpi.data import load_dataset

    return load_dataset(Config().data)


def _torch_pairs():
    from easgd_mpi.models import TorchProblem

    d = _digits()
    return TorchProblem.factory(_torch_mlp, (d.x_train, d.y_train), (d.x_test, d.y_test))


def _torch_dataset():
    from easgd_mpi.models import TorchProblem

    d = _digits()
    return TorchProblem.factory(
        _torch_mlp, _Digits(d.x_train, d.y_train), _Digits(d.x_test, d.y_test)
    )


def _images_no_crop():
    from easgd_mpi.models import TorchProblem
    from easgd_mpi.models.torch_data import ImageBatches
    from image_files import synthetic_images

    x, y = synthetic_images(64, shape=(3, 8, 8))
    mean, std = np.full(3, 128, np.float32), np.full(3, 64, np.float32)

    def images(train):
        return lambda dev: ImageBatches(torch, x, y, dev, mean, std, crop=0, train=train, batch=16)

    def build(cfg):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))

    return TorchProblem.factory(build, images(True), images(False))


def _cifar_files(tmp_path):
    from image_files import write_cifar_folder

    folder = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        folder = str(write_cifar_folder(tmp_path / "cifar", per_batch=20, test=20))
    return MPI.COMM_WORLD.bcast(folder, root=0)


# Every batch source a worker's step can draw from: the built-in NumPy/CuPy problems (indices
# and gradient noise uploaded by xp.asarray), and the PyTorch sources: (inputs, targets)
# tensors, a Dataset collated on the host, and uint8 images with CIFAR's random crops (indices,
# rows and columns) or without crops.
SOURCES = {
    "mlp": lambda tmp: ({"model.name": '"mlp"', "model.hidden": "[16]"}, None),
    "quadratic-noise": lambda tmp: (
        {"model.name": '"quadratic"', "quadratic.dim": 64, "quadratic.noise": 0.1},
        None,
    ),
    "torch-tensors": lambda tmp: ({}, _torch_pairs()),
    "torch-dataset": lambda tmp: ({}, _torch_dataset()),
    "images-cifar-crops": lambda tmp: (
        {
            "model.name": '"cifar-convnet"',
            "data.name": '"cifar10"',
            "data.path": f'"{_cifar_files(tmp)}"',
            "batch_size": 8,
            "model.eval_batch": 20,
        },
        None,
    ),
    "images-no-crop": lambda tmp: ({}, _images_no_crop()),
}


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("source", list(SOURCES))
def test_no_host_synchronisation_in_a_step_for_any_batch_source(tmp_path, monkeypatch, source):
    import easgd_mpi.models.torch_adapter as adapter

    backend = CountingGPU()
    monkeypatch.setattr(training, "select_backend", lambda **kw: (backend, ""))
    # The PyTorch module runs on the CPU next to the fake device's arrays, which it views as it
    # would view CuPy's on a GPU; only the device it is placed on, and the CUDA stream it would
    # share, are the host's.
    monkeypatch.setattr(adapter, "_device_for", lambda torch, xp: torch.device("cpu"))
    monkeypatch.setattr(adapter, "share_stream", lambda *a: None)
    count_torch_syncs(torch, monkeypatch, backend.counts)
    per_step = []  # (step, host syncs in it, chunk waits in it)
    step = algorithms.AsyncEASGD.step

    def traced(self, t):
        syncs, waits = backend.counts["sync"], backend.counts["chunk_wait"]
        loss = step(self, t)
        per_step.append((t, backend.counts["sync"] - syncs, backend.counts["chunk_wait"] - waits))
        return loss

    monkeypatch.setattr(algorithms.AsyncEASGD, "step", traced)
    overrides, problem = SOURCES[source](tmp_path)
    cfg = config(
        tmp_path,
        **{
            "algorithm": '"easgd"',
            "steps": SOURCE_STEPS,
            "tau": SOURCE_TAU,
            "batch_size": 16,
            "eval_interval": 60,
            "checkpoint.interval": 0,
            **overrides,
        },
    )
    summary = train_quietly(cfg, problem=problem)
    assert summary["steps"] == SOURCE_STEPS * summary["workers"]
    if not worker_only():
        return
    assert [t for t, _, _ in per_step] == list(range(SOURCE_STEPS))
    syncs = {t: n for t, n, _ in per_step if n}
    assert not syncs, f"host synchronisations in steps {syncs}: {dict(backend.counts)}"
    # An exchange waits once per chunk it stages, a local step never.
    waits = {t: n for t, _, n in per_step if n}
    assert set(waits) <= set(range(0, SOURCE_STEPS, SOURCE_TAU)), waits
