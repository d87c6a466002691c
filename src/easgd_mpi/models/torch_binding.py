"""A ``torch.nn.Module``'s floating-point tensors as views of flat float32 buffers.

The one binding behind both PyTorch faces (docs/ARCHITECTURE.md §1.5): the package's own loop
(:class:`~easgd_mpi.models.torch_adapter.TorchProblem`) and a user's own loop
(:mod:`easgd_mpi.torch`). The layout is the trainable parameters, then the frozen parameters
and the floating-point buffers (BatchNorm running statistics), all float32; integer buffers
(``num_batches_tracked``) stay with each process. Binding re-points each tensor's ``.data``
(and, for the package's loop, each ``.grad``) once to a view of a flat vector:
``torch.from_numpy`` on the host, DLPack over a CuPy array on a GPU. Nothing is copied per step.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import ConfigError
from ..flat import Layout

__all__ = ["ModuleBinding", "layout_of", "share_stream", "use_rank_threads"]


class ModuleBinding:
    """``module``'s tensors in the flat layout :func:`layout_of` gives, bound to flat buffers."""

    def __init__(self, torch, module):
        self.torch = torch
        self.module = module
        self.layout, self.n_trainable, self.local = layout_of(torch, module)
        #: The worker's own x: where the buffers live (None before :meth:`bind`).
        self.home = None
        #: The vector the trainable parameters view now (a look-ahead point may replace x).
        self.point = None
        #: The vector the gradients view now (None: PyTorch's own ``.grad``).
        self.grad = None
        #: The whole gradient vector as one tensor, zeroed in place (the views must survive).
        self.grad_flat = None
        self._views_cache: dict[int, tuple[object, dict]] = {}

    def named_state(self) -> dict:
        """Layout name → the module's tensor (parameter or buffer), in layout order."""
        params = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        return {s.name: params.get(s.name, buffers.get(s.name)) for s in self.layout.specs}

    def copy_into(self, x_host: np.ndarray) -> None:
        """``x_host`` ← the module's current values (padding zero)."""
        x_host[:] = 0.0
        views = self.layout.views(x_host)
        for name, tensor in self.named_state().items():
            views[name][...] = tensor.detach().cpu().numpy()

    def bind(self, x) -> None:
        """Every parameter and floating-point buffer views ``x`` from now on."""
        views = self.views(x)
        for name, tensor in self.named_state().items():
            tensor.data = views[name]
        self.home = self.point = x

    def bind_params(self, x) -> None:
        """Only the trainable parameters view ``x`` (a look-ahead point); buffers stay home."""
        views = self.views(x)
        params = dict(self.module.named_parameters())
        for spec in self.layout.specs:
            if spec.offset >= self.n_trainable:
                break
            params[spec.name].data = views[spec.name]
        self.point = x

    def bind_grad(self, g) -> None:
        """Every trainable parameter's ``.grad`` views ``g`` (backward() writes it in place)."""
        views = self.views(g)
        for name, p in self.module.named_parameters():
            if p.requires_grad:
                p.grad = views[name]
        self.grad_flat = views["__flat__"]
        self.grad = g

    def views(self, flat) -> dict:
        """Per-tensor torch views of a flat buffer, and ``"__flat__"``: all of it (cached: a
        worker has two or three)."""
        key = id(flat)
        cached = self._views_cache.get(key)
        if cached is not None and cached[0] is flat:
            return cached[1]
        whole = self.as_tensor(flat)
        views = {
            s.name: whole[s.offset : s.offset + s.size].view(s.shape) for s in self.layout.specs
        }
        views["__flat__"] = whole
        self._views_cache[key] = (flat, views)
        return views

    def as_tensor(self, flat):
        """A flat NumPy or CuPy vector as a torch tensor over the same memory."""
        if isinstance(flat, np.ndarray):
            return self.torch.from_numpy(flat)
        return self.torch.from_dlpack(flat)  # a CuPy array: same device memory, no copy

    def local_state(self) -> dict[str, np.ndarray]:
        """The integer buffers (kept per process, not averaged), as host arrays."""
        return {name: t.detach().cpu().numpy().copy() for name, t in self.local.items()}


def layout_of(torch, module):
    """(layout, n_trainable, integer buffers) of a module, with errors naming the tensor."""
    trainable, frozen = [], []
    for name, p in module.named_parameters():
        if p.dtype != torch.float32:
            raise ConfigError(
                f"model parameter '{name}' is {p.dtype}; easgd-mpi trains float32 parameters "
                f"(convert the model with .float(); mixed precision through torch.autocast "
                f"keeps them float32)"
            )
        (trainable if p.requires_grad else frozen).append((name, tuple(p.shape)))
    if not trainable:
        raise ConfigError("the model has no trainable parameters (requires_grad) to train")
    averaged, local = [], {}
    for name, b in module.named_buffers():
        if b.is_floating_point():
            if b.dtype != torch.float32:
                raise ConfigError(
                    f"model buffer '{name}' is {b.dtype}; easgd-mpi keeps float32 buffers "
                    f"(convert the model with .float())"
                )
            averaged.append((name, tuple(b.shape)))
        else:
            local[name] = b
    layout = Layout(trainable + frozen + averaged)
    last = layout[trainable[-1][0]]
    n_trainable = last.offset + _round4(last.size)
    return layout, n_trainable, local


def share_stream(torch, xp, device) -> None:
    """Run PyTorch's work on the worker's compute stream of ``device``, where the fused kernels
    run: the module's backward pass writes the gradient that the next kernel reads, ordered by
    issue order on one stream, without events.

    The stream is a real one, made once per device (``use_compute_stream``), whatever CuPy's
    default-stream mode: following CuPy's current stream by its handle would, under
    ``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1``, name a different stream in each thread, and
    autograd runs the backward pass in a thread of its own. PyTorch's view of it is made with
    its device, so it is right on a worker whose GPU is not device 0.
    """
    if device.type != "cuda":
        return
    from ..backend.cupy_backend import use_compute_stream  # noqa: PLC0415

    stream = use_compute_stream(device.index)
    torch.cuda.set_stream(torch.cuda.ExternalStream(int(stream.ptr), device=device))


def use_rank_threads(torch) -> None:
    """One rank's share of the cores (set by easgd's start-up as OMP_NUM_THREADS)."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0 and torch.get_num_threads() != int(threads):
        torch.set_num_threads(int(threads))


def _round4(n: int) -> int:
    return (n + 3) // 4 * 4
