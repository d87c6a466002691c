"""Problems with flat parameters: the only code that knows a model.

A *problem* (docs/ARCHITECTURE.md §1.4) offers:

- ``layout``: the :class:`~easgd_mpi.flat.Layout` of its parameters;
- ``init_params(x_host, seed)``: fill a host float32 vector with initial parameters;
- ``sample_batch(rng)``: draw one minibatch for a worker (opaque to the package);
- ``loss_and_grad(x, batch, g) -> float``: loss of the minibatch at ``x`` and its gradient
  written into ``g`` (``x``, ``g`` are flat arrays of the problem's array module);
- ``evaluate(x_host) -> {"loss": ..., "error": ...}``: the held-out loss and error of a host
  parameter vector (the master's evaluation of the center);
- optionally ``error_is_rate = False`` when "error" is not a fraction of misclassified samples
  (progress lines then print it as a number instead of a percentage).

Two optional parts of the protocol serve models whose state is more than parameters (the
PyTorch adapter, :class:`~easgd_mpi.models.torch_adapter.TorchProblem`):

- ``n_trainable``: gradient steps, weight decay and momentum run over ``x[:n_trainable]``; the
  rest (floating-point buffers such as BatchNorm statistics) is only averaged by the exchange;
- ``bind_state(x, g)``: called once by each worker with its own flat state and gradient
  buffers, so the model can view them instead of copying;
- ``local_state()``: tensors kept per process and stored with checkpoints (integer buffers).

Built-in problems are made by :func:`make_problem` from the config; a user passes their own
factory ``f(cfg, xp) -> problem`` to :func:`easgd_mpi.train`.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..flat import Layout
from .mlp import MLPProblem
from .quadratic import QuadraticProblem

__all__ = ["Problem", "make_problem", "MLPProblem", "QuadraticProblem", "TorchProblem"]


def __getattr__(name):
    # TorchProblem is importable from here without importing torch for everyone else.
    if name == "TorchProblem":
        from .torch_adapter import TorchProblem  # noqa: PLC0415

        return TorchProblem
    raise AttributeError(name)


class Problem(Protocol):
    layout: Layout

    def init_params(self, x_host: np.ndarray, seed: int) -> None: ...

    def sample_batch(self, rng: np.random.Generator) -> Any: ...

    def loss_and_grad(self, x, batch, g) -> float: ...

    def evaluate(self, x_host: np.ndarray) -> dict: ...


def make_problem(cfg, xp=np) -> Problem:
    """The built-in problem named by ``cfg.model.name``, computing with array module ``xp``."""
    name = cfg.model.name
    if name == "quadratic":
        return QuadraticProblem(cfg.quadratic, xp=xp)
    if name in ("cifar-convnet", "torch"):
        from .torch_builtin import make_torch_problem  # noqa: PLC0415  (imports torch)

        return make_torch_problem(cfg, xp=xp)
    from ..data import load_dataset  # noqa: PLC0415  (only classification problems need data)

    data = load_dataset(cfg.data, batch_size=cfg.batch_size)
    hidden = [] if name == "softmax" else list(cfg.model.hidden)
    return MLPProblem(
        data,
        hidden=hidden,
        activation=cfg.model.activation,
        batch_size=cfg.batch_size,
        init_scale=cfg.model.init_scale,
        xp=xp,
    )
