"""PyTorch's backward pass and the fused kernels run on one stream, whatever CuPy's default
stream is, on any device.

A lazy fake CUDA device: each stream is a queue that runs only when it is synchronised, and a
stream handle is resolved as CUDA resolves it, in the calling thread (0: the device's legacy
default stream; 2: the calling thread's per-thread default stream; any other: a stream made on
one device). The gradient is written by PyTorch's real backward pass (on the CPU) launched from
a thread of its own, on the stream its forward pass ran on, as autograd does; the kernel that
reads it is NumPy's sgd_step launched on CuPy's current stream, and the worker then waits for
CuPy's stream. On two streams the kernel runs before the gradient exists: a wrong step.
"""

from __future__ import annotations

import itertools
import threading
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from easgd_mpi.backend import NumpyBackend, cupy_backend  # noqa: E402
from easgd_mpi.models import torch_binding  # noqa: E402

LEGACY, PER_THREAD = 0, 2  # cudaStreamLegacy's and cudaStreamPerThread's handles


class LazyDevice:
    """The fake driver: queues of work, run only when their stream is synchronised."""

    def __init__(self):
        self.queues: dict[tuple, list] = {}
        self.stream_device: dict[int, int] = {}  # handle of a made stream -> its device
        self._handles = itertools.count(0x1000)

    def make_stream(self, device: int) -> int:
        handle = next(self._handles)
        self.stream_device[handle] = device
        return handle

    def _queue(self, handle: int, device: int) -> list:
        if handle == LEGACY:
            key = ("legacy", device)
        elif handle == PER_THREAD:
            key = ("per-thread", device, threading.get_ident())
        else:
            if self.stream_device[handle] != device:
                raise RuntimeError(
                    f"a stream of device {self.stream_device[handle]} used on {device}"
                )
            key = ("stream", handle)
        return self.queues.setdefault(key, [])

    def launch(self, handle: int, device: int, work) -> None:
        self._queue(handle, device).append(work)

    def synchronize(self, handle: int, device: int) -> None:
        queue = self._queue(handle, device)
        while queue:
            queue.pop(0)()


class _Local(threading.local):
    def __init__(self):
        self.current: dict[int, object] = {}


def fake_cupy(dev: LazyDevice, per_thread_default: bool):
    """CuPy's stream API over the fake driver: the current stream is per thread and device."""
    local = _Local()
    state = {"device": 0}
    default = PER_THREAD if per_thread_default else LEGACY

    class Stream:
        def __init__(self, non_blocking=False, handle=None):
            self.device = state["device"]
            self.ptr = dev.make_stream(self.device) if handle is None else handle

        def use(self):
            local.current[state["device"]] = self
            return self

        def synchronize(self):
            dev.synchronize(self.ptr, self.device)

    class Device:
        def __init__(self, index=None):
            self.id = state["device"] if index is None else index

        def use(self):
            state["device"] = self.id

        def __enter__(self):
            self._previous = state["device"]
            state["device"] = self.id

        def __exit__(self, *exc):
            state["device"] = self._previous

    def get_current_stream():
        d = state["device"]
        stream = local.current.get(d)
        if stream is None:
            stream = Stream(handle=default)
        return stream

    cuda = types.SimpleNamespace(
        Stream=Stream, Device=Device, get_current_stream=get_current_stream
    )
    return types.SimpleNamespace(cuda=cuda, __name__="cupy")


def fake_torch_cuda(dev: LazyDevice):
    """torch.cuda's stream API: current stream per thread and device, legacy default stream,
    ExternalStream on the current device unless told its device."""
    local = _Local()

    class ExternalStream:
        def __init__(self, stream_ptr, device=None):
            self.cuda_stream = stream_ptr
            self.device_index = 0 if device is None else device.index

    def set_stream(stream):
        local.current[stream.device_index] = stream

    def current_stream(device_index=0):
        stream = local.current.get(device_index)
        if stream is None:
            stream = ExternalStream(LEGACY, types.SimpleNamespace(index=device_index))
        return stream

    cuda = types.SimpleNamespace(
        ExternalStream=ExternalStream, set_stream=set_stream, current_stream=current_stream
    )
    return types.SimpleNamespace(cuda=cuda)


def one_step(dev: LazyDevice, torch_stream, cupy_stream, device: int) -> np.ndarray:
    """Forward on the main thread (on ``torch_stream``), backward from autograd's own thread on
    that stream, then the fused kernel on ``cupy_stream``; the worker waits for ``cupy_stream``.
    Returns x after the step."""
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 1)
    x = np.concatenate([p.detach().numpy().ravel() for p in module.parameters()])
    g = np.zeros_like(x)
    flat_x, flat_g = torch.from_numpy(x), torch.from_numpy(g)
    offset = 0
    for p in module.parameters():
        p.data = flat_x[offset : offset + p.numel()].view(p.shape)
        p.grad = flat_g[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    inputs, targets = torch.ones(3, 4), torch.zeros(3, 1)
    forward_stream = torch_stream  # autograd runs each backward op on its forward op's stream

    def backward():
        torch.nn.functional.mse_loss(module(inputs), targets).backward()

    thread = threading.Thread(
        target=dev.launch, args=(forward_stream.cuda_stream, device, backward)
    )
    thread.start()
    thread.join()
    dev.launch(cupy_stream.ptr, device, lambda: NumpyBackend().sgd_step(x, g, 0.5, 0.0))
    dev.synchronize(cupy_stream.ptr, device)  # backend.synchronize(): CuPy's stream
    return x


def expected_step() -> np.ndarray:
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 1)
    torch.nn.functional.mse_loss(module(torch.ones(3, 4)), torch.zeros(3, 1)).backward()
    x = np.concatenate([p.detach().numpy().ravel() for p in module.parameters()])
    g = np.concatenate([p.grad.numpy().ravel() for p in module.parameters()])
    NumpyBackend().sgd_step(x, g, 0.5, 0.0)
    return x


def test_on_two_streams_the_kernel_runs_before_the_gradient_and_on_one_it_does_not():
    dev = LazyDevice()
    cupy = fake_cupy(dev, per_thread_default=False)
    torch_cuda = fake_torch_cuda(dev).cuda
    own = cupy.cuda.Stream().use()
    other = torch_cuda.ExternalStream(dev.make_stream(0))
    wrong = one_step(dev, other, own, 0)
    assert not np.allclose(wrong, expected_step())  # the old x minus η·0: the step was lost
    same = torch_cuda.ExternalStream(own.ptr)
    np.testing.assert_allclose(one_step(dev, same, own, 0), expected_step(), rtol=1e-6)


@pytest.mark.parametrize("per_thread_default", [False, True], ids=["legacy", "per-thread"])
@pytest.mark.parametrize("device", [0, 1])
def test_torch_shares_the_compute_stream_in_every_mode_on_every_device(
    monkeypatch, per_thread_default, device
):
    dev = LazyDevice()
    cupy = fake_cupy(dev, per_thread_default)
    fake = fake_torch_cuda(dev)
    monkeypatch.setattr(cupy_backend, "cupy", cupy)
    monkeypatch.setattr(cupy_backend, "_STREAMS", {})
    cupy.cuda.Device(device).use()  # the worker's GPU, as CupyBackend makes it current
    where = types.SimpleNamespace(type="cuda", index=device)
    torch_binding.share_stream(fake, cupy, where)
    torch_stream = fake.cuda.current_stream(device)
    cupy_stream = cupy.cuda.get_current_stream()
    np.testing.assert_allclose(
        one_step(dev, torch_stream, cupy_stream, device), expected_step(), rtol=1e-6
    )
    assert cupy_stream.ptr not in (LEGACY, PER_THREAD)  # a real stream, the same in all threads
    # Made once per device: a second problem (or the backend) gets the same stream.
    torch_binding.share_stream(fake, cupy, where)
    assert cupy.cuda.get_current_stream() is cupy_stream
