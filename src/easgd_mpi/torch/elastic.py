"""``ElasticAveraging``: a worker's model, optimizer and state in a run of a user's own loop
(docs/ARCHITECTURE.md §8.2).

Binding re-points the module's parameters and floating-point buffers once to views of the
worker's flat ``x`` (models/torch_binding.py): the user's optimizer then updates ``x`` in
place, and the rule's exchange with the center (algorithms.py: the pipelined, chunked exchange
of the package's own rules) updates the module in place. Nothing is copied per step.

Where the exchange runs: the elastic rules (async and sync EASGD) exchange at local steps t with
t mod τ = 0 *inside* the optimizer's step, before its update (a step pre-hook): the gradient was
taken at the old x, so the elastic difference and the gradient come from the same point, as
in the paper's rule and the package's own (with ``torch.optim.SGD(lr)`` the user loop follows
the package's recurrence exactly). Model averaging averages after the update, as PyTorch's
``PeriodicModelAverager``; DiLoCo (sync and async) takes its outer step after the update of
every τ-th step (H local steps, then the outer step), as the package's DiLoCo. When the
optimizer skips its step (a ``GradScaler`` that found an overflow), :meth:`ElasticAveraging.step`
makes the exchange itself, so every worker makes the same exchanges.
"""

from __future__ import annotations

import json
import math
import time

import torch

from ..algorithms import make_algorithm
from ..data.sampling import worker_rng
from ..errors import CheckpointError, UsageError
from ..models.torch_binding import share_stream
from ..side_channel import METRICS, STATE
from ..worker import STATUS_PERIOD, WorkerClock
from .state import decode_state, encode_state

__all__ = ["ElasticAveraging"]


class ElasticAveraging:
    """Bind ``model`` and ``optimizer`` to the run on a worker (collective with the serving
    ranks' ``run.serve()``): every worker starts from the center, a resumed one from its saved
    state. ``schedulers`` (one or a list) and ``scaler`` (a ``GradScaler``) are saved and
    restored with the optimizer; :meth:`register` adds any other state.

    Call :meth:`step` once per local step, after the optimizer, the schedulers and the scaler.
    """

    def __init__(self, model, optimizer, run, *, schedulers=(), scaler=None):
        run._worker_only("et.ElasticAveraging(model, optimizer, run)")
        if run._phase != "open":
            raise UsageError("et.ElasticAveraging(...) binds the worker's model once")
        if not isinstance(model, torch.nn.Module):
            run._refuse(f"et.ElasticAveraging: the model is a {type(model).__name__}, not a Module")
        self.run = run
        self.model = model
        self.optimizer = optimizer
        if schedulers is None:
            schedulers = ()
        many = isinstance(schedulers, (list, tuple))
        self.schedulers = list(schedulers) if many else [schedulers]
        self.scaler = scaler
        self._registered: dict[str, object] = {}
        self._metrics: dict[str, object] = {}
        self._last_report = 0.0
        self._finished = False
        run._bind(module=model, on_bound=self._on_bound)
        run._elastic = self

    # ---- binding (inside the run's collective binding) ---------------------------------------
    def _on_bound(self, side) -> None:
        run, session = self.run, self.run._session
        roles, cfg = session.roles, session.cfg
        self._side = side
        self._binding = session.problem.binding
        start = session.start_state
        rng = worker_rng(cfg.seed, roles.worker_index) if start is None else start.generator()
        share_stream(torch, session.backend.xp, run.device)
        self._rule = rule = make_algorithm(
            cfg,
            session.problem,
            session.backend,
            session.center,
            session.alpha,
            rng,
            direct_mpi=session.direct_mpi,
            workers_comm=roles.workers,
            # async-diloco pushes into the servers' inboxes, which run.serve() applies.
            inbox=session.active.inbox if session.active is not None else None,
            own_loop=True,
        )
        rule.pull_center()  # the module views x: it now holds the center
        if start is not None:
            rule.restore(start)
        saved = None if start is None or start.user is None else decode_state(start.user)
        run._saved = saved
        self._restore(saved)
        # Every leaf of the state can be saved: found now, on every rank, not at a checkpoint.
        encode_state(self._state_tree(), "this worker's state")
        self._tau = cfg.tau
        self._exchanged_for = -1
        self._exchanges_seen = rule.exchanges
        self._clock = WorkerClock(
            cfg,
            roles,
            session.status,
            session.channel,
            rule,
            rng,
            steps=0 if start is None else start.steps,
            stop_flag=session.stop_requested,
            on_saved=self._send_state,
        )
        self._hook = self.optimizer.register_step_pre_hook(self._before_update)

    # ---- the step ---------------------------------------------------------------------------
    def step(self, loss=None, **metrics) -> None:
        """After local step t's update: the exchange when one is due (unless the optimizer's
        step made it), the worker's bookkeeping (status, checkpoint requests, the stop).
        ``loss`` and any other numbers (tensors are read every 50 ms, not every step) reach
        the master's progress line and ``metrics.jsonl``."""
        if self._finished:
            raise UsageError("elastic.step() after run.finish()")
        clock = self._clock
        if self.must_stop():
            raise UsageError(
                f"elastic.step() after run.should_stop turned true (at local step "
                f"{clock.steps:,d}): leave the loop when it says so"
            )
        self._exchange_once()
        rule = self._rule
        exchanged = rule.exchanges != self._exchanges_seen
        self._exchanges_seen = rule.exchanges
        if self.run._sampler is not None:
            self.run._sampler.advance()
        if metrics:
            self._metrics.update(metrics)
            if time.monotonic() - self._last_report >= STATUS_PERIOD:
                self._report()
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()  # read every 50 ms (WorkerClock), never waited for per step
        clock.after_step(clock.steps + 1, math.nan if loss is None else loss, exchanged)

    def must_stop(self) -> bool:
        """A stop signal or the master's stop, or the step budget spent."""
        clock = self._clock
        return clock.stopped or clock.steps >= self.run.cfg.steps

    def _before_update(self, optimizer, args, kwargs) -> None:
        if self._rule.before_update:
            self._exchange_once()

    def _exchange_once(self) -> None:
        t = self._clock.steps
        if self._exchanged_for == t:
            return
        self._exchanged_for = t
        if t % self._tau == 0:
            self._check_binding()
        self._rule.step(t)

    def _check_binding(self) -> None:
        """The model is still the one bound: no tensor added, removed or moved off ``x``."""
        binding = self._binding
        views = binding.views(binding.home)
        float_names = [n for n, _ in self.model.named_parameters()] + [
            n for n, b in self.model.named_buffers() if b.is_floating_point()
        ]
        for name in float_names:
            if name not in views:
                raise UsageError(
                    f"model tensor '{name}' was added after et.ElasticAveraging bound the model: "
                    f"build the whole model first"
                )
        for name, tensor in binding.named_state().items():
            if tensor is None:
                raise UsageError(f"model tensor '{name}' was removed after binding")
            if tensor.data_ptr() != views[name].data_ptr():
                raise UsageError(
                    f"model tensor '{name}' no longer views the worker's flat buffer (moved or "
                    f"converted after binding, e.g. model.to() or .half()): move the model to "
                    f"run.device before et.ElasticAveraging"
                )

    def _report(self) -> None:
        self._last_report = time.monotonic()
        values = {name: float(_detached(value)) for name, value in self._metrics.items()}
        self._side.post(METRICS, 0, json.dumps(values).encode())

    # ---- state ------------------------------------------------------------------------------
    def register(self, name: str, obj) -> None:
        """Save ``obj`` with this worker's state: anything with ``state_dict()`` and
        ``load_state_dict()``, or a dict (restored in place). A resumed worker gets it back
        here."""
        if name in self._registered:
            raise UsageError(f"elastic.register('{name}', ...): that name is taken")
        if not (isinstance(obj, dict) or hasattr(obj, "load_state_dict")):
            raise UsageError(
                f"elastic.register('{name}', ...): a dict or an object with state_dict() and "
                f"load_state_dict(), not a {type(obj).__name__}"
            )
        encode_state(_state_of(obj), f"registered '{name}'")
        self._registered[name] = obj
        saved = (self.run._saved or {}).get("registered", {})
        if name in saved:
            _load_into(obj, saved[name], f"registered '{name}'")

    def _state_tree(self) -> dict:
        run = self.run
        tree = {
            "optimizer": {
                "class": type(self.optimizer).__name__,
                "state": self.optimizer.state_dict(),
            },
            "schedulers": [
                {"class": type(s).__name__, "state": s.state_dict()} for s in self.schedulers
            ],
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "sampler": None if run._sampler is None else run._sampler.state_dict(),
            "run": {"epoch": run._epoch},
            "registered": {name: _state_of(obj) for name, obj in self._registered.items()},
            "module_locals": {name: t.detach() for name, t in self._binding.local.items()},
            "torch_rng": torch.get_rng_state(),
        }
        if run.device.type == "cuda":
            tree["cuda_rng"] = torch.cuda.get_rng_state(run.device)
        return tree

    def _restore(self, saved: dict | None) -> None:
        """A resumed worker continues exactly: optimizer, schedulers, scaler, sampler, the
        run's epoch, integer buffers, PyTorch's generator; a mismatch is a CheckpointError."""
        if saved is None:
            return
        optimizer = saved["optimizer"]
        if optimizer["class"] != type(self.optimizer).__name__:
            raise CheckpointError(
                f"the checkpoint's optimizer is {optimizer['class']}, this run's is "
                f"{type(self.optimizer).__name__}: a resume continues the same optimizer (a "
                f"warm start, et.init(warm_start=...), takes only the center)"
            )
        _load_into(self.optimizer, optimizer["state"], "the optimizer")
        saved_schedulers = saved["schedulers"]
        mine = [type(s).__name__ for s in self.schedulers]
        theirs = [s["class"] for s in saved_schedulers]
        if mine != theirs:
            raise CheckpointError(
                f"the checkpoint's schedules are [{', '.join(theirs)}], this run's "
                f"[{', '.join(mine)}]: pass the same schedulers= to et.ElasticAveraging"
            )
        for scheduler, state in zip(self.schedulers, saved_schedulers, strict=True):
            _load_into(scheduler, state["state"], f"schedule {type(scheduler).__name__}")
        if (saved["scaler"] is None) != (self.scaler is None):
            had = "had a" if self.scaler is None else "had no"
            has = "has none" if self.scaler is None else "has one"
            raise CheckpointError(
                f"the checkpoint's worker {had} gradient scaler, this run {has}: pass the same "
                f"scaler= to et.ElasticAveraging"
            )
        if self.scaler is not None:
            _load_into(self.scaler, saved["scaler"], "the gradient scaler")
        if self.run._sampler is not None and saved.get("sampler") is not None:
            self.run._sampler.load_state_dict(saved["sampler"])
        self.run._epoch = int(saved.get("run", {}).get("epoch", 0))
        for name, value in saved.get("module_locals", {}).items():
            if name in self._binding.local:
                self._binding.local[name].copy_(value)
        torch.set_rng_state(saved["torch_rng"])
        if "cuda_rng" in saved and self.run.device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], self.run.device)

    def _send_state(self, epoch: int) -> None:
        """Right after this worker saved its rows for ``epoch``: its own state to the master."""
        state = encode_state(self._state_tree(), "this worker's state")
        self._side.post(STATE, epoch, state.to_bytes())

    # ---- the end ----------------------------------------------------------------------------
    def finish(self) -> None:
        """The worker's end (run.finish()): the last answers to the master, the side channel
        closed, the optimizer's hook removed."""
        self._finished = True
        self._hook.remove()
        if self._metrics:
            self._report()  # the last values, before the master's final record
        self._clock.finish()
        self._side.close()


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


def _state_of(obj) -> dict:
    return dict(obj) if isinstance(obj, dict) else obj.state_dict()


def _load_into(obj, state, what: str) -> None:
    if isinstance(obj, dict):
        obj.clear()
        obj.update(state)
        return
    try:
        obj.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"the checkpoint's state of {what} does not fit this run's: {str(exc).splitlines()[0]}"
        ) from None
