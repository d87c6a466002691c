"""A ``torch.nn.Module`` as a problem on the flat buffers (docs/ARCHITECTURE.md §1.5).

The module's trainable parameters, then its frozen parameters and floating-point buffers
(BatchNorm running statistics), are laid out in one flat float32 vector (torch_binding.py, the
binding shared with a user's own loop). On a worker every
parameter's storage and every ``.grad`` are re-pointed once to views of the worker's own flat
``x`` and ``g`` (``torch.from_numpy`` on the host, DLPack over the CuPy arrays on a GPU):
``loss.backward()`` writes straight into ``g``, the fused kernels update ``x`` in place, and
after an exchange the module sees the new values. Nothing is copied per step.

Gradient steps, weight decay and momentum run over the trainable prefix ``[0, n_trainable)``;
the elastic exchange over the whole vector, so the buffers are averaged with the center and
never stepped. Integer buffers (``num_batches_tracked``) stay local to each process.

PyTorch is imported only when a torch model is asked for (the ``torch`` extra).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np

from ..errors import ConfigError, DataError
from .torch_binding import ModuleBinding, share_stream, use_rank_threads
from .torch_data import device_upload, largest_label, make_batches

__all__ = ["TorchProblem", "import_torch", "MEMORY_COPIES"]

#: Flat float32 vectors of the model's size a worker holds at most (x, g, v, the Nesterov
#: look-ahead y, the module's own first copy, DOWNPOUR's sum or sync EASGD's replicas):
#: used to check a model against the memory it needs before anything of its size is allocated.
MEMORY_COPIES = 6


def import_torch(what: str = "a PyTorch model"):
    """``torch``, or a one-line error that says what to install."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise ConfigError(
            f"{what} needs PyTorch, which is not installed: pip install 'easgd-mpi[torch]' "
            f"(or pip install torch)"
        ) from None
    return torch


class TorchProblem:
    """A PyTorch module, its loss and its data as an easgd-mpi problem.

    ``module`` is built on the host; it moves to the device of the array module ``xp`` (the
    worker's GPU for CuPy). ``train_data`` / ``test_data``: a pair ``(inputs, targets)`` of
    tensors or arrays, a ``torch.utils.data.Dataset``, or a batch source of
    :mod:`~easgd_mpi.models.torch_data`. ``loss(outputs, targets)`` defaults to cross-entropy;
    the held-out "error" is the misclassification rate when the outputs are (N, classes)
    scores and the targets class indices, else the loss itself.
    """

    def __init__(
        self,
        module,
        train_data,
        test_data,
        loss: Callable | None = None,
        batch_size: int = 128,
        xp=np,
        eval_batch: int = 1000,
    ):
        torch = import_torch()
        self.torch = torch
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"the model is a {type(module).__name__}, not a torch.nn.Module")
        self.xp = xp
        self.device = _device_for(torch, xp)
        share_stream(torch, xp, self.device)
        use_rank_threads(torch)
        self.module = module.to(self.device)
        self.loss_fn = loss or torch.nn.functional.cross_entropy
        self.eval_batch = int(eval_batch)
        self._binding = ModuleBinding(torch, self.module)
        self.layout, self.n_trainable = self._binding.layout, self._binding.n_trainable
        self._upload = device_upload(torch, xp)
        self._train = make_batches(
            torch, train_data, self.device, batch=batch_size, upload=self._upload
        )
        # Evaluation happens on the master, on its host; workers never touch the held-out set.
        self._test_source = test_data
        self._test = None
        self._stochastic = any(
            isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in self.module.modules()
        )
        #: False once an evaluation finds that "error" is not a misclassification rate.
        self.error_is_rate = True
        self._probe()

    # ---- construction from a builder ----------------------------------------------------
    @classmethod
    def factory(
        cls,
        build_model: Callable,
        train_data,
        test_data,
        loss: Callable | None = None,
        batch_size: int | None = None,
        eval_batch: int = 1000,
    ):
        """A problem factory ``f(cfg, xp)`` for :func:`easgd_mpi.train`.

        ``build_model(cfg)`` (or ``build_model()``) returns the module; it is called with
        PyTorch's random state seeded from ``cfg.seed``, so every rank builds the same initial
        parameters. ``batch_size`` defaults to ``cfg.batch_size``.
        """

        def make(cfg, xp=np):
            torch = import_torch()
            module = build_module(torch, build_model, cfg, f"{_qualname(build_model)}()")
            return cls(
                module,
                train_data,
                test_data,
                loss=loss,
                batch_size=batch_size or cfg.batch_size,
                xp=xp,
                eval_batch=eval_batch,
            )

        return make

    # ---- the problem protocol -----------------------------------------------------------
    def init_params(self, x_host: np.ndarray, seed: int) -> None:
        """The module's values as built (the factory seeded them from ``cfg.seed``)."""
        self._binding.copy_into(x_host)

    def sample_batch(self, rng: np.random.Generator):
        drawn = self._train.draw(rng)
        # Dropout and other stochastic layers draw from PyTorch's generator: seeded from the
        # worker's stream, they follow it (and a resumed worker continues them exactly).
        seed = int(rng.integers(0, 2**62)) if self._stochastic else None
        return drawn, seed

    def bind_state(self, x, g) -> None:
        """Where the worker's state lives: buffers in ``x`` for good, gradients in ``g``."""
        self.module.train()
        self._binding.bind(x)
        self._binding.bind_grad(g)

    @property
    def _g_flat(self):
        """The gradient vector as one tensor (the benchmark times its zeroing)."""
        return self._binding.grad_flat

    def loss_and_grad(self, x, batch, g):
        """Minibatch loss at parameters ``x`` (a 0-d tensor, read only when reported; no host
        synchronisation per step), its gradient accumulated into ``g``."""
        bound = self._binding
        if bound.point is None:  # first step, or after an evaluation rebound the module
            self.bind_state(x if bound.home is None else bound.home, g)
        if x is not bound.point:
            bound.bind_params(x)  # e.g. EAMSGD's look-ahead point; buffers stay in x
        if g is not bound.grad:
            bound.bind_grad(g)
        drawn, seed = batch
        if seed is not None:
            self.torch.manual_seed(seed)
        bound.grad_flat.zero_()  # in place: the .grad views must survive
        inputs, targets = self._train.batch(drawn)
        loss = self.loss_fn(self.module(inputs), targets)
        loss.backward()
        return loss.detach()

    def evaluate(self, x_host: np.ndarray) -> dict:
        """Held-out loss and error of ``x_host``: the module in eval mode on the host, in
        batches of ``eval_batch``, with its parameters and buffers viewing ``x_host``."""
        torch = self.torch
        if self._test is None:
            # Built lazily: only the master evaluates.
            self._test = make_batches(
                torch,
                self._test_source,
                self.device,
                batch=self.eval_batch,
                what="held-out data",
                upload=self._upload,
            )
        views = self._binding.views(x_host)
        for name, tensor in self._binding.named_state().items():
            tensor.data = views[name]
        self._binding.point = None  # a worker rebinds on its next step
        self.module.eval()
        total, errors, count, rate = 0.0, 0, 0, True
        with torch.no_grad():
            for inputs, targets in self._test.batches(self.eval_batch):
                outputs = self.module(inputs)
                m = int(targets.shape[0])
                total += float(self.loss_fn(outputs, targets)) * m
                count += m
                if outputs.ndim == 2 and not targets.is_floating_point() and targets.ndim == 1:
                    errors += int((outputs.argmax(dim=1) != targets).sum())
                else:
                    rate = False
        self.module.train()
        if count == 0:
            raise DataError("the held-out set is empty: nothing to evaluate the center on")
        self.error_is_rate = rate
        loss = total / count
        return {"loss": loss, "error": errors / count if rate else loss}

    def _probe(self) -> None:
        """One forward pass and loss on two training samples, in eval mode and without
        gradients (nothing changes): a model that does not fit its data fails here, at
        start-up on every rank, as one line, instead of deep inside a worker's first step.

        Two samples show only their own labels: a classifier's outputs are then checked
        against the largest label of the whole training and held-out data."""
        torch = self.torch
        drawn = self._train.draw(np.random.default_rng(0))
        try:
            self.module.eval()
            with torch.no_grad():
                inputs, targets = self._train.batch(drawn)
                outputs = self.module(inputs[:2])
                self.loss_fn(outputs, targets[:2])
        except Exception as exc:  # noqa: BLE001  (whatever the user's model raises)
            text = str(exc).strip().splitlines()
            raise ConfigError(
                f"the model fails on a batch of the training data ({exc.__class__.__name__}: "
                f"{text[0] if text else 'no message'}): check its input size and number of "
                f"outputs against the data"
            ) from None
        finally:
            self.module.train()
        # (N, classes) scores against class indices: what evaluate() counts as classification.
        if outputs.ndim == 2 and targets.ndim == 1 and not targets.is_floating_point():
            self._check_outputs_cover(int(outputs.shape[1]))

    def _check_outputs_cover(self, outputs: int) -> None:
        for split, source in (("training", self._train), ("held-out", self._test_source)):
            top = largest_label(source)
            if top is not None and top >= outputs:
                raise ConfigError(
                    f"the model gives {outputs} outputs per sample but the {split} data has "
                    f"label {top}: a classifier needs one output per class ({top + 1} or "
                    f"more here); check its number of outputs against the data"
                )

    # ---- what checkpoints and exports need -------------------------------------------------
    def local_state(self) -> dict[str, np.ndarray]:
        """The integer buffers (kept per process, not averaged), as host arrays."""
        return self._binding.local_state()


def build_module(torch, build: Callable, cfg, label: str):
    """``build(cfg)`` under PyTorch's RNG seeded from ``cfg.seed``; checked to be a Module."""
    takes_cfg = _takes_one_argument(build)
    check_memory_before_building(torch, build, cfg, takes_cfg, label)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(cfg.seed))
        module = build(cfg) if takes_cfg else build()
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"{label} returned a {type(module).__name__}, not a torch.nn.Module")
    return module.cpu()


def check_memory_before_building(torch, build, cfg, takes_cfg, label) -> None:
    """Build the module on PyTorch's ``meta`` device (shapes, no memory) and refuse a model
    whose worker state would not fit in this machine's available memory."""
    from ..data.images import available_memory_bytes  # noqa: PLC0415

    try:
        with torch.device("meta"):
            module = build(cfg) if takes_cfg else build()
        numel = sum(t.numel() for t in module.parameters()) + sum(
            t.numel() for t in module.buffers()
        )
    except Exception:  # noqa: BLE001  (a builder that cannot run on meta is checked later)
        return
    need = numel * 4 * MEMORY_COPIES
    have = available_memory_bytes()
    if need > have:
        raise ConfigError(
            f"{label} builds a model of {numel:,d} parameters: a worker needs about "
            f"{need / 2**30:.1f} GiB for it ({MEMORY_COPIES} float32 copies), this machine has "
            f"{have / 2**30:.1f} GiB available"
        )


def _device_for(torch, xp):
    if xp is np or getattr(xp, "__name__", "") == "numpy":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "this worker computes on a GPU (CuPy) but the installed PyTorch has no CUDA: install "
            "a CUDA build of torch, or set device = 'off'"
        )
    return torch.device("cuda", int(xp.cuda.Device().id))


def _takes_one_argument(fn) -> bool:
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):
        return True
    return bool(params)


def _qualname(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
