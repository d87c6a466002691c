"""The master's side of a user's own loop (docs/ARCHITECTURE.md §8.3): the model as the master
knows it (no module: its layout, the initial values the first worker built, the user's
evaluation), and the worker-state channel with each worker's own state and metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np

from ..side_channel import METRICS, STATE
from ..snapshots import MasterSide
from ..workerstate import UserState
from .state import decode_state

__all__ = ["CenterProblem", "ChannelWithUserStates"]

_log = logging.getLogger(__name__)


class CenterProblem:
    """The problem protocol (models/__init__.py) on a serving rank of a user's loop.

    ``evaluate(state_dict) -> float | dict``: the user's evaluation of the center, given as a
    ``state_dict`` of CPU tensors (views of the master's snapshot, valid during the call; what
    ``module.state_dict()`` holds: no ``persistent=False`` buffer, ``transient``);
    a number is the loss; a dict may hold ``loss``, ``error`` (a rate, printed as a percentage)
    and more numbers, recorded as ``center_<key>``. ``channel`` (set once it exists) gives the
    workers' metrics and the integer buffers of the first worker's latest saved state.
    """

    def __init__(
        self, layout, n_trainable: int, initial: np.ndarray | None, evaluate=None, transient=()
    ):
        self.layout = layout
        self.n_trainable = int(n_trainable)
        #: Buffers the module's state_dict leaves out (persistent=False): not handed over.
        self._transient = set(transient)
        self._initial = initial
        self._evaluate = evaluate
        self.channel: ChannelWithUserStates | None = None
        self._locals: tuple[object, dict] = (None, {})
        #: False when the user's evaluation gives no error rate (progress prints numbers).
        self.error_is_rate = True

    def init_params(self, x_host: np.ndarray, seed: int) -> None:
        """The first worker's module as it built it (every worker starts from the center)."""
        x_host[:] = self._initial

    def local_state(self) -> dict[str, np.ndarray]:
        """The integer buffers of the first worker's state in the last cut (export adds them
        to the state_dict)."""
        locals_ = self._saved_locals()
        return {name: t.numpy().copy() for name, t in locals_.items()}

    def evaluate(self, x_host: np.ndarray) -> dict:
        import torch  # noqa: PLC0415

        record: dict = {"loss": float("nan"), "error": None}
        if self._evaluate is not None:
            state = {
                name: torch.from_numpy(view)
                for name, view in self.layout.views(x_host).items()
                if name not in self._transient
            }
            state.update(
                {n: t for n, t in self._saved_locals().items() if n not in self._transient}
            )
            result = self._evaluate(state)
            if isinstance(result, dict):
                for key, value in result.items():
                    if key in ("loss", "error"):
                        record[key] = None if value is None else float(value)
                    else:
                        record[f"center_{key}"] = float(value)
            elif result is not None:
                record["loss"] = float(result)
        self.error_is_rate = record["error"] is not None
        if record["loss"] is None:
            record["loss"] = float("nan")
        if self.channel is not None:
            record.update(self.channel.worker_metrics())
        return record

    def _saved_locals(self) -> dict:
        state = self.channel.latest_user_state(0) if self.channel is not None else None
        if state is None:
            return {}
        if self._locals[0] is not state:  # decoded once per saved state
            tree = decode_state(state, "the first worker's state")
            self._locals = (state, tree.get("module_locals", {}))
        return self._locals[1]


class ChannelWithUserStates:
    """The master's side of the worker-state channel (snapshots.MasterSide) with each worker's
    own state, which comes through the side channel (side_channel.SideReceiver).

    A worker writes its rows and names the half latest, then sends its own state for that
    epoch; a half counts as saved once both are here. So :meth:`table` shows, for each worker,
    its latest half whose own state has arrived (the other half while it is on its way), and
    the master's loop (master.py), unchanged, waits for it within ``checkpoint.state_wait`` as
    for the rows. The states of the two epochs in the halves are kept, older ones dropped.
    """

    def __init__(self, inner: MasterSide, receiver, initial: list[UserState | None]):
        self.inner = inner
        self.receiver = receiver
        self.p = inner.p
        #: Per worker: epoch → its state (None: saved without one, as a fresh start).
        self._states: list[dict[int, UserState | None]] = [{0: s} for s in initial]
        self._metrics: list[dict[str, float]] = [{} for _ in range(self.p)]
        self._last_cut: list[UserState | None] = list(initial)
        self._warned: set[int] = set()

    # ---- what the master loop calls -----------------------------------------------------
    def table(self) -> dict[str, np.ndarray]:
        self._drain(self.receiver.poll())
        table = self.inner.table()
        half = table["half"].copy()
        for i in range(self.p):
            ack, other = int(table["ack"][i]), int(table["other_ack"][i])
            kept = self._states[i]
            for epoch in [e for e in kept if e not in (ack, other)]:
                del kept[epoch]
            if ack not in kept and other in kept:
                half[i] ^= 1  # the latest half's own state is on its way: the other one is whole
        return self._with_halves(table, half)

    def cut(self, table, epoch: int | None = None) -> dict[str, np.ndarray]:
        chosen = self.inner.cut(table, epoch)
        half = chosen["half"].copy()
        other = MasterSide.describe_halves(table["meta"], 1 - half)["ack"]
        for i in range(self.p):
            if int(chosen["ack"][i]) not in self._states[i] and int(other[i]) in self._states[i]:
                half[i] ^= 1
        return MasterSide.describe_halves(table["meta"], half)

    def states(self, cut, age=None):
        states, center = self.inner.states(cut, age)
        user = []
        for i in range(self.p):
            epoch = int(cut["ack"][i])
            if epoch not in self._states[i] and i not in self._warned:
                self._warned.add(i)  # its message stalled in the middle: the rows go alone
                _log.warning(
                    f"easgd: warning: worker {i}'s own state for checkpoint epoch {epoch} has "
                    f"not arrived: this checkpoint holds its rows without it"
                )
            user.append(self._states[i].get(epoch))
        self._last_cut = user
        return dataclasses.replace(states, user=user), center

    def request(self, epoch: int) -> None:
        self.inner.request(epoch)

    def stop(self) -> None:
        self.inner.stop()

    def release(self) -> None:
        self.inner.release()

    # ---- what the master's problem asks ---------------------------------------------------
    def latest_user_state(self, worker: int) -> UserState | None:
        """Worker ``worker``'s state in the last checkpoint cut (its start state before)."""
        return self._last_cut[worker]

    def worker_metrics(self) -> dict[str, float]:
        """``worker_<name>``: the mean over the workers of the latest value each reported."""
        names = sorted({k for m in self._metrics for k in m})
        out = {}
        for name in names:
            values = [m[name] for m in self._metrics if name in m and math.isfinite(m[name])]
            out[f"worker_{name}"] = float(np.mean(values)) if values else float("nan")
        return out

    def finish(self) -> None:
        """Every message until each worker's last (after the release), then free it."""
        self._drain(self.receiver.close())

    def _drain(self, messages) -> None:
        for worker, kind, epoch, payload in messages:
            if kind == STATE:
                self._states[worker][epoch] = UserState.from_bytes(payload)
            elif kind == METRICS:
                self._metrics[worker] = {k: float(v) for k, v in json.loads(payload).items()}

    @staticmethod
    def _with_halves(table, half) -> dict[str, np.ndarray]:
        meta = table["meta"]
        return {
            **table,
            **MasterSide.describe_halves(meta, half),
            "other_ack": MasterSide.describe_halves(meta, 1 - half)["ack"],
        }
