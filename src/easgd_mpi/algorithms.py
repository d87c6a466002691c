"""The update rules of docs/ARCHITECTURE.md §2, one small class each (§8: around a user's
optimizer).

An algorithm owns a worker's state (x, gradient, momentum...) on its backend and performs one
local step at a time. It knows the equations, not MPI: the center is reached only through
:class:`CenterWindow` (``exchange`` hands it one chunk of the center at a time and takes back
the difference to add to that chunk; ``add`` and ``read``), and the synchronous rules average
over the workers only through :class:`WorkerAllreduce`.

The synchronous rules (sync EASGD, all-reduce SGD) keep the master's window up to date so that
evaluation, metrics and checkpoints work as in the asynchronous case: after each round, the first
worker adds (replica − window) to the window, so the window equals the workers' common center.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from .backend.numpy_backend import host_sum_squares
from .collective import WorkerAllreduce

__all__ = [
    "WorkerAlgorithm",
    "AsyncEASGD",
    "EAMSGD",
    "SyncEASGD",
    "Downpour",
    "AllreduceSGD",
    "LoopEASGD",
    "LoopSyncEASGD",
    "LoopLocalSGD",
    "make_algorithm",
]


class _ChunkStaging:
    """Runs a chunk kernel where the worker's state lives.

    On the host the center's chunk buffers are used directly. On a GPU they are always pinned
    host buffers (MPI one-sided operations never see device memory: Open MPI documents them as
    unsupported on it even when the library is CUDA-aware), so each chunk is staged: pinned host
    → device, kernel, device → pinned host. With ``overlap`` (the default) the copies run on
    their own streams and a chunk is only started here; the exchange finishes it (waits for its
    difference on the host) after it has started the next one, so copies, kernels and MPI of
    neighbouring chunks overlap. Without, each chunk is finished before the next starts (the
    baseline the device check compares against). Σ e² (the worker-to-center distance, and the
    finiteness test) is taken from the host copy once it is there.
    """

    def __init__(self, backend, chunk: int, overlap: bool = True):
        self.backend = backend
        self.chunk = int(chunk)
        self.staged = backend.is_gpu
        self.overlap = overlap and self.staged
        if self.staged:
            self._pipeline = backend.staging_pipeline()
            # Device chunk pairs: one per chunk in flight (at most one started chunk per slice
            # of the center, plus the one starting); made on first need, then reused.
            self._free: list[tuple[object, object]] = []

    def start(self, c, e, kernel):
        """Start kernel(c_dev, e_dev) on one chunk; returns finish() → Σ e² (float64; inf or
        nan if e is not finite), which must be called before c or e is touched again."""
        b = self.backend
        if not self.staged:
            kernel(c, e)
            return lambda: b.sum_squares(e)
        pair = self._free.pop() if self._free else (b.zeros(self.chunk), b.zeros(self.chunk))
        k = c.shape[0]
        c_dev, e_dev = pair[0][:k], pair[1][:k]
        ticket = self._pipeline.start(c, c_dev, kernel, e_dev, e)

        def finish() -> float:
            self._pipeline.wait(ticket)
            self._free.append(pair)
            return host_sum_squares(e)

        if self.overlap:
            return finish
        sq = finish()
        return lambda: sq


class WorkerAlgorithm(ABC):
    """Common state: the local copy x, the gradient buffer, the step clock."""

    name = ""
    uses_momentum = False
    #: Whether the rule needs the workers' all-reduce (every worker steps in lockstep).
    collective = False
    #: Whether the rule takes its own gradient steps (a flat gradient buffer g); the rules of a
    #: user's own loop leave the step to the user's optimizer (docs/ARCHITECTURE.md §8).
    uses_gradient = True

    def __init__(self, cfg, problem, backend, center, alpha: float, rng):
        self.cfg = cfg
        self.problem = problem
        self.backend = backend
        self.center = center
        self.alpha = float(alpha)
        self.rng = rng
        n = problem.layout.size
        self.x = backend.zeros(n)
        self.g = backend.zeros(n) if self.uses_gradient else None
        self.v = backend.zeros(n) if self.uses_momentum else None
        self.exchanges = 0
        self.bytes = 0
        #: Times this worker went non-finite and was reset to the center.
        self.resets = 0
        #: ‖x − x̃‖ at the last exchange (before the elastic pull).
        self.distance = 0.0
        #: Gradient steps, weight decay and momentum run over x[:m] (the trainable prefix);
        #: the exchange runs over all of x. Floating-point buffers of a PyTorch model (BatchNorm
        #: running statistics) sit after the prefix: averaged with the center, never stepped.
        self.m = int(getattr(problem, "n_trainable", n))
        self._staging = _ChunkStaging(backend, center.chunk)
        # Reads of the whole center land here first on a GPU (pinned: a fast, asynchronous
        # copy); on the host MPI writes straight into the destination.
        self._center_host = backend.host_empty(n) if backend.is_gpu else None
        # A problem that binds a model to the flat buffers (the PyTorch adapter) learns once
        # where the worker's own state lives; the views then survive every step and exchange.
        bind = getattr(problem, "bind_state", None)
        if bind is not None:
            bind(self.x, self.g)

    def pull_center(self) -> None:
        """x ← x̃ (start of a run: every worker starts from the center)."""
        self._read_center(self.x)
        if self.v is not None:
            self.v[...] = 0
        self.backend.synchronize()

    def _read_center(self, out) -> None:
        """out ← x̃ (an atomic snapshot of the window, copied to the backend)."""
        if self._center_host is None:
            self.center.read(out)
            return
        self.center.read(self._center_host)
        self.backend.from_host(self._center_host, out)

    def _split_exchange(self, lo, hi, c, e, fused) -> None:
        """Exchange chunk [lo, hi): ``fused(lo, k, c, e)`` on its trainable part (the exchange
        fused with the local step), the plain elastic exchange on the part past ``m``."""
        k = max(0, min(hi, self.m) - lo)
        if k:
            fused(lo, lo + k, c[:k], e[:k])
        if k < hi - lo:
            self.backend.exchange(self.x[lo + k : hi], c[k:], e[k:], self.alpha)

    @abstractmethod
    def step(self, t: int) -> float:
        """Local step number ``t`` (exchanging first when t mod τ = 0); returns the loss."""

    def _exchange(self, chunk_kernel) -> None:
        """One elastic exchange; chunk_kernel(lo, hi, c, e) updates x[lo:hi] and writes e.

        A non-finite elastic difference never reaches the center: that chunk adds zero, and
        afterwards the worker starts again from the center (x ← x̃, v ← 0).
        """
        total_sq = 0.0
        poisoned = False

        def compute(lo, hi, c, e):
            sum_squares = self._staging.start(c, e, lambda cd, ed: chunk_kernel(lo, hi, cd, ed))

            def finish() -> None:
                nonlocal total_sq, poisoned
                sq = sum_squares()
                if math.isfinite(sq):
                    total_sq += sq
                else:
                    e[...] = 0
                    poisoned = True

            if self._staging.overlap:
                return finish  # the exchange calls it after it has started the next chunk
            finish()
            return None

        self.bytes += self.center.exchange(compute)
        self.exchanges += 1
        if poisoned:
            self.resets += 1
            self.pull_center()
            self.distance = float("nan")
        else:
            self.distance = math.sqrt(total_sq) / self.alpha if self.alpha > 0 else 0.0

    def saved_rows(self) -> list:
        """What a checkpoint stores of this worker (``Config.state_rows``): x, then v."""
        return [self.x] if self.v is None else [self.x, self.v]

    def cut_center(self):
        """The center at this moment, where this worker holds it exactly (the synchronous
        rules); None for the asynchronous rules, whose center is the window itself."""
        return None

    def restore(self, state) -> None:
        """Continue from a saved :class:`~easgd_mpi.workerstate.WorkerState`: its rows (x, and
        v for a momentum method) and its counters; rows it lacks keep their start values."""
        x_host, v_host = state.rows.get("x"), state.rows.get("v")
        if x_host is not None:
            self.backend.from_host(np.ascontiguousarray(x_host, np.float32), self.x)
        if v_host is not None and self.v is not None:
            self.backend.from_host(np.ascontiguousarray(v_host, np.float32), self.v)
        self.exchanges, self.resets = int(state.exchanges), int(state.resets)
        self.backend.synchronize()


class AsyncEASGD(WorkerAlgorithm):
    """Asynchronous EASGD: every τ steps an elastic exchange fused with the SGD step."""

    name = "easgd"

    def step(self, t: int) -> float:
        cfg, b = self.cfg, self.backend
        batch = self.problem.sample_batch(self.rng)
        loss = self.problem.loss_and_grad(self.x, batch, self.g)  # at x, before the exchange
        x, g, m = self.x, self.g, self.m
        if t % cfg.tau == 0:

            def fused(lo, hi, c, e):
                b.exchange_sgd_step(x[lo:hi], c, g[lo:hi], e, self.alpha, cfg.lr, cfg.weight_decay)

            self._exchange(lambda lo, hi, c, e: self._split_exchange(lo, hi, c, e, fused))
        else:
            b.sgd_step(x[:m], g[:m], cfg.lr, cfg.weight_decay)
        return loss


class EAMSGD(WorkerAlgorithm):
    """Asynchronous EAMSGD: the same exchange, Nesterov momentum for the local steps."""

    name = "eamsgd"
    uses_momentum = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.y = self.backend.zeros(self.problem.layout.size)

    def step(self, t: int) -> float:
        cfg, b = self.cfg, self.backend
        delta = cfg.momentum
        x, v, g, m = self.x, self.v, self.g, self.m
        b.nesterov_lookahead(x[:m], v[:m], delta, self.y[:m])
        batch = self.problem.sample_batch(self.rng)
        loss = self.problem.loss_and_grad(self.y, batch, g)  # at x + δv
        if t % cfg.tau == 0:

            def fused(lo, hi, c, e):
                b.exchange_nesterov_step(
                    x[lo:hi], v[lo:hi], c, g[lo:hi], e, self.alpha, cfg.lr, delta, cfg.weight_decay
                )

            self._exchange(lambda lo, hi, c, e: self._split_exchange(lo, hi, c, e, fused))
        else:
            b.nesterov_step(x[:m], v[:m], g[:m], cfg.lr, delta, cfg.weight_decay)
        return loss


class _Synchronous(WorkerAlgorithm):
    """Shared by the rules whose workers move in lockstep through an all-reduce.

    The momentum is optional (Nesterov, as in EAMSGD, when cfg.momentum > 0). The first worker
    keeps the master's window equal to the workers' common center (:meth:`_mirror_center`).
    """

    collective = True

    def __init__(self, cfg, *args, allreduce: WorkerAllreduce, **kwargs):
        self.uses_momentum = cfg.momentum > 0  # before the base class allocates v
        super().__init__(cfg, *args, **kwargs)
        n = self.problem.layout.size
        self.allreduce = allreduce
        self.y = self.backend.zeros(n) if self.uses_momentum else None
        self._writes_center = allreduce.rank == 0

    def _gradient(self) -> float:
        """g ← ∇f at x (plain) or at x + δv (Nesterov); returns the minibatch loss."""
        b = self.backend
        point, m = self.x, self.m
        if self.v is not None:
            b.nesterov_lookahead(self.x[:m], self.v[:m], self.cfg.momentum, self.y[:m])
            point = self.y
        batch = self.problem.sample_batch(self.rng)
        return self.problem.loss_and_grad(point, batch, self.g)

    def _local_step(self) -> None:
        cfg, b, m = self.cfg, self.backend, self.m
        if self.v is not None:
            b.nesterov_step(
                self.x[:m], self.v[:m], self.g[:m], cfg.lr, cfg.momentum, cfg.weight_decay
            )
        else:
            b.sgd_step(self.x[:m], self.g[:m], cfg.lr, cfg.weight_decay)

    def _mirror_center(self, source) -> None:
        """Window ← ``source`` exactly (first worker only; element-wise atomic ``REPLACE``).

        The master's snapshot sees each element either before or after the round, as with the
        asynchronous rules, and a checkpoint of the window is the workers' center bit for bit
        (an exact resume restarts every replica from it).
        """
        if not self._writes_center:
            return
        if self._center_host is None:
            self.center.write(source)
        else:
            self.center.write(self.backend.to_host(source, self._center_host))
        self.bytes += 4 * self.problem.layout.size


class SyncEASGD(_Synchronous):
    """Synchronous EASGD: every τ steps all workers and the center move at once.

    Each worker keeps a replica x̃ of the center; one all-reduce of the old x^i gives their mean,
    then x^i ← x^i − α(x^i − x̃) − η g(x^i) (the fused async exchange step, against the replica)
    and x̃ ← (1 − β)x̃ + β·mean(x^i), both from the old values. Every replica computes the same
    x̃ from the same mean, so they stay equal without further messages.
    """

    name = "sync-easgd"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n = self.problem.layout.size
        self.beta = self.alpha * self.allreduce.size
        self.c = self.backend.zeros(n)  # this worker's replica of the center
        self.xmean = self.backend.zeros(n)
        self.e = self.backend.zeros(n)

    def pull_center(self) -> None:
        super().pull_center()
        self._read_center(self.c)  # the replica starts as (and stays equal to) the window
        self.backend.synchronize()

    def cut_center(self):
        return self.c

    def _reset_if_not_finite(self) -> None:
        """A non-finite worker must not poison the mean every replica takes: it restarts from
        the center (a local decision; the all-reduce that follows stays in step)."""
        if not self.backend.all_finite(self.x):
            self.x[...] = self.c  # both on this worker's device
            if self.v is not None:
                self.v[...] = 0
            self.resets += 1

    def _center_half(self) -> None:
        """After the workers' half of a round (e holds α(x − c)): the distance, the center
        half of the fused sync update (α = 0 leaves its x, here the spent e, as is), the
        window set to the new center."""
        b = self.backend
        self.distance = math.sqrt(b.sum_squares(self.e)) / self.alpha
        b.sync_easgd_update(self.e, self.c, self.xmean, 0.0, self.beta)
        self._mirror_center(self.c)
        self.exchanges += 1

    def step(self, t: int) -> float:
        cfg, b = self.cfg, self.backend
        if t % cfg.tau == 0:
            self._reset_if_not_finite()  # before its gradient
        loss = self._gradient()  # at the old x (or x + δv)
        if t % cfg.tau != 0:
            self._local_step()
            return loss
        self.bytes += self.allreduce.mean(self.x, self.xmean)  # mean of the old x^i
        x, v, c, g, e, m = self.x, self.v, self.c, self.g, self.e, self.m
        if v is not None:
            b.exchange_nesterov_step(
                x[:m],
                v[:m],
                c[:m],
                g[:m],
                e[:m],
                self.alpha,
                cfg.lr,
                cfg.momentum,
                cfg.weight_decay,
            )
        else:
            b.exchange_sgd_step(x[:m], c[:m], g[:m], e[:m], self.alpha, cfg.lr, cfg.weight_decay)
        if m < x.shape[0]:  # buffers: the elastic pull only
            b.exchange(x[m:], c[m:], e[m:], self.alpha)
        self._center_half()
        return loss


class AllreduceSGD(_Synchronous):
    """Synchronous data-parallel SGD: the gradient is averaged over the workers every step.

    What Horovod and DDP do: the workers stay identical, so the center is simply their common
    x; the first worker copies it into the window every τ steps and after the last step
    (``exchanges`` counts those rounds; the all-reduce bytes of every step count in ``bytes``).
    """

    name = "allreduce-sgd"

    def cut_center(self):
        return self.x  # every worker's x is the center of this rule

    def step(self, t: int) -> float:
        loss = self._gradient()
        if not self.backend.all_finite(self.g):
            # This worker's gradient is dropped from the average (it adds zero) instead of
            # turning every worker's parameters into NaN.
            self.g[...] = 0
            self.resets += 1
        self.bytes += self.allreduce.mean(self.g, self.g)
        self._local_step()
        if (t + 1) % self.cfg.tau == 0 or t + 1 == self.cfg.steps:
            self._mirror_center(self.x)
            self.exchanges += 1
        return loss


class Downpour(WorkerAlgorithm):
    """DOWNPOUR: each worker sums its SGD updates Δ = −η Σ (g + λx) over τ steps, adds Δ to the
    center, then copies the center (the paper's baseline; no momentum).

    The push and the copy come after the τ-th local step (and after the last one, so the
    center holds every update of the budget); the next gradient is taken at the copy.
    """

    name = "downpour"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n = self.problem.layout.size
        self.acc = self.backend.zeros(n)
        self._host = self.backend.host_empty(n) if self.backend.is_gpu else None
        # Buffers past the trainable prefix are not stepped: their update is measured as the
        # change since the last copy of the center (``_buffers_base``).
        self._buffers_base = self.backend.zeros(n - self.m) if self.m < n else None
        # Running statistics are averages, not sums of updates: each of the p workers pushes
        # 1/p of its buffers' change (p whole changes would move the center's statistics p
        # times too far; a variance can go negative).
        self._buffers_share = 1.0 / max(1, int(getattr(self.center, "n_workers", 1)))
        self._pending = None  # the checkpoint row, made at the first checkpoint

    def pull_center(self) -> None:
        super().pull_center()
        self._remember_buffers()

    def saved_rows(self) -> list:
        """x and the pending row: the update sum not yet pushed, and past the trainable part
        the buffers' base (their value at the last copy), so a resume pushes the same Δ."""
        if self._pending is None:
            self._pending = self.backend.zeros(self.problem.layout.size)
        pending, m = self._pending, self.m
        pending[:m] = self.acc[:m]
        if self._buffers_base is not None:
            pending[m:] = self._buffers_base
        return [self.x, pending]

    def restore(self, state) -> None:
        super().restore(state)
        if state.rows.get("pending") is None:  # a checkpoint without it: nothing pending, base = x
            self._remember_buffers()
            return
        pending = np.ascontiguousarray(state.rows["pending"], np.float32)
        self.backend.from_host(pending[: self.m], self.acc[: self.m])
        if self._buffers_base is not None:
            self.backend.from_host(pending[self.m :], self._buffers_base)
        self.backend.synchronize()

    def _remember_buffers(self) -> None:
        if self._buffers_base is not None:
            self._buffers_base[...] = self.x[self.m :]

    def step(self, t: int) -> float:
        cfg, b = self.cfg, self.backend
        batch = self.problem.sample_batch(self.rng)
        loss = self.problem.loss_and_grad(self.x, batch, self.g)
        m = self.m
        b.downpour_step(self.x[:m], self.acc[:m], self.g[:m], cfg.lr, cfg.weight_decay)
        if (t + 1) % cfg.tau == 0 or t + 1 == cfg.steps:
            self._push_and_copy()
        return loss

    def _push_and_copy(self) -> None:
        b = self.backend
        if self._buffers_base is not None:  # Δ of the buffers: their change since the copy
            delta = self.acc[self.m :]
            delta[...] = self.x[self.m :] - self._buffers_base
            if self._buffers_share != 1.0:
                b.scale(delta, self._buffers_share)
        # ‖Δ‖: how far this worker moved away from the center it last copied.
        self.distance = math.sqrt(b.sum_squares(self.acc))
        if not b.all_finite(self.acc):
            # A non-finite update never reaches the center: drop it, restart from the center.
            self.acc[...] = 0
            self.resets += 1
            self.distance = float("nan")
        if self._host is None:  # host memory: MPI reads and writes the worker's own arrays
            self.center.add(self.acc)  # x̃ ← x̃ + Δ (atomic accumulate)
            self.center.read(self.x)  # x ← x̃, with every worker's updates so far
        else:
            b.to_host(self.acc, self._host)
            self.center.add(self._host)
            self.center.read(self._host)
            b.from_host(self._host, self.x)
        self.acc[...] = 0
        self._remember_buffers()
        b.synchronize()
        self.bytes += 8 * self.problem.layout.size
        self.exchanges += 1


# ---- the rules of a user's own loop (docs/ARCHITECTURE.md §8) ----------------------------------
#
# The user's optimizer takes every local step on the module's parameters, which are views of x
# (models/torch_binding.py); a rule only exchanges. ``step(t)`` is the rule's part of local step
# t; ``before_update`` says where it runs: inside the optimizer's step, before its update (the
# gradient was taken at the old x, as in the package's own EASGD rules, so e and the gradient
# come from the same point), or after the update (model averaging, as PyTorch's averager).


class LoopEASGD(WorkerAlgorithm):
    """Async EASGD around a user's optimizer: at local steps t with t mod τ = 0, before the
    optimizer's update, the elastic exchange on the whole vector (parameters and buffers):
    e ← α(x − x̃), x ← x − e, x̃ ← x̃ + e, pipelined in chunks through the window (§3.4)."""

    name = "easgd"
    uses_gradient = False
    before_update = True

    def step(self, t: int) -> None:
        if t % self.cfg.tau != 0:
            return
        x, b, alpha = self.x, self.backend, self.alpha
        self._exchange(lambda lo, hi, c, e: b.exchange(x[lo:hi], c, e, alpha))


class LoopSyncEASGD(SyncEASGD):
    """Sync EASGD around a user's optimizer: at local steps t with t mod τ = 0, before the
    optimizer's update, x̄ ← mean of the old x^i, e ← α(x − c), x ← x − e, c ← (1 − β)c + βx̄,
    the window set to c: the package's sync EASGD with the optimizer's step in place of the
    fused SGD step (the user's SGD(lr) gives its recurrence)."""

    uses_gradient = False
    before_update = True

    def step(self, t: int) -> None:
        if t % self.cfg.tau != 0:
            return
        self._reset_if_not_finite()
        self.bytes += self.allreduce.mean(self.x, self.xmean)
        self.backend.exchange(self.x, self.c, self.e, self.alpha)
        self._center_half()


class LoopLocalSGD(_Synchronous):
    """Periodic model averaging (local SGD) around a user's optimizer: after the optimizer's
    update of every local step t with t mod τ = 0, every worker takes the workers' mean of
    x, parameters and buffers (PyTorch's ``PeriodicModelAverager`` with period τ, which leaves
    buffers alone); the first worker sets the window to it. The center is that last mean."""

    name = "local-sgd"
    uses_gradient = False
    before_update = False

    def step(self, t: int) -> None:
        if t % self.cfg.tau != 0:
            return
        if not self.backend.all_finite(self.x):
            # A non-finite worker must not poison the mean: it brings the last mean instead.
            self._read_center(self.x)
            self.resets += 1
        self.bytes += self.allreduce.mean(self.x, self.x)
        self._mirror_center(self.x)
        self.exchanges += 1


_RULES = {cls.name: cls for cls in (AsyncEASGD, EAMSGD, SyncEASGD, Downpour, AllreduceSGD)}
_LOOP_RULES = {cls.name: cls for cls in (LoopEASGD, LoopSyncEASGD, LoopLocalSGD)}


def make_algorithm(
    cfg,
    problem,
    backend,
    center,
    alpha,
    rng,
    direct_mpi=False,
    workers_comm=None,
    own_loop: bool = False,
):
    """The worker-side rule named by ``cfg.algorithm``: the package's own (it takes the
    gradient steps), or with ``own_loop`` the one around a user's optimizer.

    ``workers_comm`` (the workers-only communicator, :attr:`Roles.workers`) is required by the
    synchronous rules, which average over the workers with one all-reduce; ``direct_mpi``
    (CUDA-aware MPI) lets that all-reduce take device buffers. The center's one-sided transfers
    always go through host memory.
    """
    rule = (_LOOP_RULES if own_loop else _RULES)[cfg.algorithm]
    extra = {}
    if rule.collective:
        if workers_comm is None:
            raise ValueError(f"algorithm {cfg.algorithm!r} needs workers_comm (Roles.workers)")
        extra["allreduce"] = WorkerAllreduce(
            workers_comm, problem.layout.size, backend, direct=direct_mpi
        )
    return rule(cfg, problem, backend, center, alpha, rng, **extra)
