"""The update rules of docs/ARCHITECTURE.md §2, one small class each (§8: around a user's
optimizer).

An algorithm owns a worker's state (x, gradient, momentum...) on its backend and performs one
local step at a time. It knows the equations, not MPI: the center is reached only through
:class:`CenterWindow` (``exchange`` hands it one chunk of the center at a time and takes back
the difference to add to that chunk; ``add`` and ``read``), and the synchronous rules average
over the workers only through :class:`WorkerAllreduce`.

The synchronous rules (sync EASGD, all-reduce SGD) keep the master's window up to date so that
evaluation, metrics and checkpoints work as in the asynchronous case: after each round, the first
worker sets the window to the workers' common center (``CenterWindow.write``, an element-wise
``Accumulate(REPLACE)``: nothing is added, so the window is that center bit for bit).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from .center_rules import outer_nesterov, staleness_weight
from .collective import WorkerAllreduce
from .compress import make_push_compressor

__all__ = [
    "WorkerAlgorithm",
    "AsyncEASGD",
    "EAMSGD",
    "SyncEASGD",
    "Downpour",
    "AllreduceSGD",
    "MDownpour",
    "ADownpour",
    "MVADownpour",
    "LocalSGD",
    "DiLoCo",
    "AsyncDiLoCo",
    "LoopEASGD",
    "LoopSyncEASGD",
    "LoopLocalSGD",
    "LoopDiLoCo",
    "LoopAsyncDiLoCo",
    "make_algorithm",
]


def _ends_round(t: int, cfg) -> bool:
    """Whether local step ``t`` ends a round of the rules that exchange after their local
    steps: after every τ-th step ((t + 1) mod τ = 0) and after the last of the budget."""
    return (t + 1) % cfg.tau == 0 or t + 1 == cfg.steps


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
    finiteness test) is taken where e is computed, on the device, and comes back with the chunk.
    """

    def __init__(self, backend, chunk: int, overlap: bool = True):
        self.backend = backend
        self.chunk = int(chunk)
        self.staged = backend.is_gpu
        self.overlap = overlap and self.staged
        if self.staged:
            self._pipeline = backend.staging_pipeline()
            # Slots (device buffers and events): one per chunk in flight (at most one started
            # chunk per slice of the center, plus the one starting); made on first need, then
            # reused.
            self._free: list = []

    def start(self, c, e, kernel, on_finish) -> _StartedChunk:
        """Start kernel(c_dev, e_dev) on one chunk; the returned chunk, once called, calls
        ``on_finish(Σ e²)`` (float64; inf or nan if e is not finite). c and e must not be
        touched before then (c may be refilled once ``input_consumed()`` says so)."""
        if not self.staged:
            kernel(c, e)
            return _StartedChunk(None, None, None, on_finish, self.backend.sum_squares(e))
        slot = self._free.pop() if self._free else self._pipeline.slot(self.chunk)
        self._pipeline.start(slot, c, kernel, e)
        return _StartedChunk(self._pipeline, slot, self._free, on_finish)


class _StartedChunk:
    """A chunk whose copies and kernel may still be in flight (see :data:`center.ChunkKernel`):
    calling it waits for its difference and Σ e², hands its slot back and calls on_finish."""

    __slots__ = ("_pipeline", "_slot", "_free", "_on_finish", "_sq")

    def __init__(self, pipeline, slot, free, on_finish, sq=None):
        self._pipeline, self._slot, self._free = pipeline, slot, free
        self._on_finish = on_finish
        self._sq = sq

    def input_consumed(self) -> bool:
        """Whether the center's chunk has been copied in (never waits)."""
        return self._slot is None or self._pipeline.input_consumed(self._slot)

    def __call__(self) -> None:
        if self._slot is not None:
            self._sq = self._pipeline.wait(self._slot)
            self._free.append(self._slot)
            self._slot = None
        self._on_finish(self._sq)


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
        #: Bytes of this worker's pushes toward the center in the form it codes them (float32,
        #: or the codes and scales of ``compress``): docs/ARCHITECTURE.md §2.16.
        self.push_bytes = 0
        #: The coder of pushes, holding the residual (None: float32 pushes, ``compress = none``).
        self.compressor = make_push_compressor(cfg, backend, n)
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
            def finished(sq: float) -> None:
                nonlocal total_sq, poisoned
                if math.isfinite(sq):
                    total_sq += sq
                else:
                    e[...] = 0
                    poisoned = True

            started = self._staging.start(
                c, e, lambda cd, ed: self._coded_chunk(chunk_kernel, lo, hi, cd, ed), finished
            )
            if self._staging.overlap:
                return started  # the exchange finishes it after it has started the next chunk
            started()
            return None

        self.bytes += self.center.exchange(compute)
        self.exchanges += 1
        if poisoned:
            self.resets += 1
            self.pull_center()
            if self.compressor is not None:
                self.compressor.reset()  # the residual of a trajectory that was abandoned
            self.distance = float("nan")
        else:
            self.distance = math.sqrt(total_sq) / self.alpha if self.alpha > 0 else 0.0

    def _coded_chunk(self, chunk_kernel, lo, hi, c, e) -> None:
        """chunk_kernel(lo, hi, c, e), then e coded in place for the push (where the chunk's
        kernels run: on a GPU before the difference is copied out)."""
        chunk_kernel(lo, hi, c, e)
        self.push_bytes += self._code_push(lo, hi, e)

    def _code_push(self, lo, hi, e) -> int:
        """Code the push of elements [lo, hi) in place (nothing without ``compress``); returns
        its bytes in that form."""
        if self.compressor is None:
            return 4 * (hi - lo)
        return self.compressor.compress(lo, hi, e)

    def saved_rows(self) -> list:
        """What a checkpoint stores of this worker (``Config.state_rows``): x, then v, then
        the residual of compressed pushes."""
        return ([self.x] if self.v is None else [self.x, self.v]) + self._residual_row()

    def _residual_row(self) -> list:
        c = self.compressor
        return [] if c is None or c.residual is None else [c.residual]

    def cut_center(self):
        """The center at this moment, where this worker holds it exactly (the synchronous
        rules); None for the asynchronous rules, whose center is the window itself."""
        return None

    def cut_state(self) -> list:
        """The center-side rows (``Config.center_rows``) at this moment, where this worker
        holds them exactly (saved with :meth:`cut_center`); none by default."""
        return []

    def finish(self) -> None:
        """Complete this worker's part before it reports done (a center that computes: its
        pushes applied)."""
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
        if self.compressor is not None:  # none saved (compress was off): nothing pending
            self.compressor.restore(state.rows.get("residual"))
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
        self.push_bytes += 4 * self.problem.layout.size


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
        if _ends_round(t, self.cfg):
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
        self._buffers_share = 1.0 / self.center.n_workers
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
        return [self.x, pending] + self._residual_row()

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
        if _ends_round(t, cfg):
            self._push_and_copy()
        return loss

    def _push_and_copy(self) -> None:
        b = self.backend
        self._complete_update()
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

    def _complete_update(self) -> None:
        """acc ← the whole Δ to push: the buffers' share past the trainable part; ‖Δ‖ as the
        distance; a non-finite Δ dropped (the copy that follows restarts the worker)."""
        b = self.backend
        if self._buffers_base is not None:  # Δ of the buffers: their change since the copy
            delta = self.acc[self.m :]
            delta[...] = self.x[self.m :] - self._buffers_base
            if self._buffers_share != 1.0:
                b.scale(delta, self._buffers_share)
        # ‖Δ‖: how far this worker moved away from the center it last copied.
        self.distance = math.sqrt(b.sum_squares(self.acc))
        self.push_bytes += self._code_push(0, self.acc.shape[0], self.acc)
        if not b.all_finite(self.acc):
            # A non-finite update never reaches the center: drop it, restart from the center.
            self.acc[...] = 0
            self.resets += 1
            self.distance = float("nan")
            if self.compressor is not None:
                self.compressor.reset()


class LocalSGD(_Synchronous):
    """Local SGD (model averaging): τ local steps (SGD, or Nesterov when momentum > 0), then
    every worker's x becomes the mean of all of them.

    Each worker keeps a replica θ of the center (the last mean). After the τ-th local step (and
    after the last step) one all-reduce averages the workers' Δ = θ − x; θ ← θ − mean(Δ) (the
    mean of the x, computed from the small differences) and x ← θ. The velocity v stays each
    worker's own across rounds. The first worker mirrors θ into the window (§2.13).
    """

    name = "localsgd"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n = self.problem.layout.size
        self.theta = self.backend.zeros(n)  # this worker's replica of the center
        self.d = self.backend.zeros(n)  # Δ = θ − x, then its mean over the workers

    def pull_center(self) -> None:
        super().pull_center()
        self._read_center(self.theta)
        self.backend.synchronize()

    def cut_center(self):
        return self.theta

    def step(self, t: int) -> float:
        loss = self._gradient()
        self._local_step()
        if _ends_round(t, self.cfg):
            self._round()
        return loss

    def _round(self) -> None:
        b, d = self.backend, self.d
        b.xp.subtract(self.theta, self.x, out=d)
        self.distance = math.sqrt(b.sum_squares(d))  # ‖θ − x‖: how far this worker went
        finite = math.isfinite(self.distance)
        if not finite:  # it adds nothing to the mean and restarts from the center
            d[...] = 0
            self.resets += 1
        self.bytes += self.allreduce.mean(d, d)
        self._center_step(d)
        self.x[...] = self.theta
        if not finite and self.v is not None:
            self.v[...] = 0
        self._mirror_center(self.theta)
        self.exchanges += 1

    def _center_step(self, mean_delta) -> None:
        """θ ← θ − mean(θ − x^i): the mean of the workers' x."""
        self.theta -= mean_delta


class DiLoCo(LocalSGD):
    """DiLoCo (Douillard et al. 2023): local SGD whose average is an outer Nesterov step.

    The mean pseudo-gradient D = mean(θ − x^i) goes to the outer optimizer on the trainable
    part: m ← μm + D, θ ← θ − η_o(D + μm) (:func:`~easgd_mpi.center_rules.outer_nesterov`);
    buffers are averaged. Every worker runs the same step on the same D, so the replicas and
    their outer momenta stay equal; the momentum is checkpointed with the center (§2.14).
    """

    name = "diloco"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outer_lr = self.cfg.resolve_center("outer_lr")
        self.outer_momentum_rate = self.cfg.resolve_center("outer_momentum")
        self.outer_m = self.backend.zeros(self.m)
        self._scratch = self.backend.zeros(self.m)

    def _center_step(self, mean_delta) -> None:
        m = self.m
        outer_nesterov(
            self.theta[:m],
            self.outer_m,
            mean_delta[:m],
            self.outer_lr,
            self.outer_momentum_rate,
            self._scratch,
        )
        if m < self.theta.shape[0]:
            self.theta[m:] -= mean_delta[m:]

    def cut_state(self) -> list:
        return [self._full(self.outer_m)]

    def restore(self, state) -> None:
        super().restore(state)
        saved = state.center.get("outer_momentum")
        if saved is not None:
            self.backend.from_host(np.ascontiguousarray(saved[: self.m], np.float32), self.outer_m)
            self.backend.synchronize()

    def _full(self, row):
        """A trainable-part row as a whole vector (zeros past m), as checkpoints store it."""
        if self.m == self.problem.layout.size:
            return row
        full = self.backend.zeros(self.problem.layout.size)
        full[: self.m] = row
        return full


class _Pushing:
    """The worker's side of a center that computes (§3.11), mixed into a rule.

    A push: read the servers' counters (how many pushes reached the center since this
    worker's base: its staleness s), form the payload (:meth:`_form_push`, the one place a
    worker's push is made: compression hooks in there), push it into every server's inbox,
    wait until the servers have applied it (or all but ``push_lag`` of this worker's pushes),
    note the version, pull the center.
    """

    def _init_pushing(self, inbox) -> None:
        n = self.problem.layout.size
        self.inbox = inbox
        self.lag = int(self.cfg.push_lag)
        self._payload = (
            self.backend.host_empty(n) if self.backend.is_gpu else np.zeros(n, np.float32)
        )
        if self.compressor is not None:  # coded pushes: host codes and scales (§2.16)
            self._codes_host = np.zeros(n, np.uint8)
            self._scales_host = np.zeros(inbox.n_scales, np.float32)
        self._tickets: list[int] | None = None
        self._base = None  # the servers' applied counters when this worker last pulled
        #: Pushes, their summed and largest staleness, seconds spent waiting for the center.
        self.pushes = 0
        self.staleness_sum = 0
        self.staleness_max = 0
        self.wait_s = 0.0

    def _pull_version(self) -> None:
        self._base = self.inbox.counters()[:, 1]

    def _staleness(self) -> int:
        """Pushes the center received since the version this worker started from (its own
        pushes still waiting included)."""
        if self._base is None or not len(self._base):
            return 0
        arrived = self.inbox.counters()[:, 0]
        return int(np.max(arrived - self._base))

    def _form_push(self, update, staleness: int):
        """The host payload of one push from the update (on the worker's device): float32,
        or with ``compress`` each server's slice coded (blocks from the slice's start, the
        residual kept) into host codes and scales, what the server decodes (§2.16). Counts
        the bytes sent in :attr:`push_bytes`."""
        if self.compressor is None:
            self.push_bytes += 4 * update.shape[0]
            if self.backend.is_gpu:
                return self.backend.to_host(update, self._payload)
            return update
        inbox, b = self.inbox, self.backend
        for s in inbox.targets:
            lo, hi = inbox.slices[s]
            self.push_bytes += self.compressor.compress(lo, hi, update[lo:hi])
            codes, scales = self.compressor.coded()
            a, z = inbox.scale_slices[s]
            self._codes_host[lo:hi] = b.xp.asnumpy(codes) if b.is_gpu else codes
            self._scales_host[a:z] = b.to_host(scales) if b.is_gpu else scales
        return self._codes_host, self._scales_host

    def _code_push(self, lo, hi, e) -> int:
        """Nothing: a push to a center that computes is coded and counted per server slice
        when it is sent (:meth:`_form_push`)."""
        return 0

    def _push_update(self, update) -> None:
        """Push ``update`` (already weighted), wait for the center, pull it into x."""
        staleness = self._last_staleness
        sent = self.push_bytes
        payload = self._form_push(update, staleness)
        if self.compressor is None:
            self._tickets = self.inbox.push(payload)
        else:
            self._tickets = self.inbox.push_coded(*payload)
        self.wait_s += self.inbox.wait_applied(self._tickets, self.lag)
        self.pushes += 1
        self.staleness_sum += staleness
        self.staleness_max = max(self.staleness_max, staleness)
        self._pull_version()
        self._read_center(self.x)
        # The push as sent (float32 or coded) and the float32 read of the center.
        self.bytes += self.push_bytes - sent + 4 * self.problem.layout.size
        self.exchanges += 1

    def finish(self) -> None:
        """Wait until every push of this worker is applied (the end of its run, a cut)."""
        if self._tickets is not None:
            self.wait_s += self.inbox.wait_applied(self._tickets, 0)

    def cut_center(self):
        """One worker (p = 1, the only time the channel asks): with its pushes applied nobody
        moves the center, so it and the rows read now are the cut's."""
        self.finish()
        host = np.empty(self.problem.layout.size, np.float32)
        self.center.read(host)
        return host

    def cut_state(self) -> list:
        rows = []
        for name in self.inbox.row_names:
            host = np.empty(self.problem.layout.size, np.float32)
            self.inbox.read_row(name, host)
            rows.append(host)
        return rows


class ActiveDownpour(_Pushing, Downpour):
    """DOWNPOUR's worker for the master-side variants (mdownpour, adownpour, mvadownpour):
    τ local SGD steps summed into Δ, pushed into the servers' inboxes; the servers apply their
    rule (center_rules.py) and the worker pulls the result (§2.10-2.12)."""

    def __init__(self, *args, inbox, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_pushing(inbox)
        self._buffers_share = 1.0 / inbox.n_workers  # each worker's share of the statistics

    def pull_center(self) -> None:
        super().pull_center()
        self._pull_version()

    def _push_and_copy(self) -> None:
        self._last_staleness = self._staleness()
        self._complete_update()
        self._push_update(self.acc)
        self.acc[...] = 0
        self._remember_buffers()
        self.backend.synchronize()


class MDownpour(ActiveDownpour):
    name = "mdownpour"


class ADownpour(ActiveDownpour):
    name = "adownpour"


class MVADownpour(ActiveDownpour):
    name = "mvadownpour"


class AsyncDiLoCo(_Pushing, WorkerAlgorithm):
    """Asynchronous DiLoCo: τ local steps (SGD, or Nesterov when momentum > 0) from the
    center last pulled, θ_b; then u = w(s)·(x − θ_b) is pushed, the negative pseudo-gradient
    weighted for its staleness s (:func:`~easgd_mpi.center_rules.staleness_weight`), and the
    servers take their outer step on it as it arrives (§2.15). The buffers push their change
    times 1/p and are averaged.
    """

    name = "async-diloco"

    def __init__(self, cfg, *args, inbox, **kwargs):
        self.uses_momentum = cfg.momentum > 0  # before the base class allocates v
        super().__init__(cfg, *args, **kwargs)
        n = self.problem.layout.size
        self._init_pushing(inbox)
        self.y = self.backend.zeros(n) if self.uses_momentum else None
        self.base = self.backend.zeros(n)  # θ_b: the center this worker's round started from
        self.u = self.backend.zeros(n)
        self.workers = inbox.n_workers
        self.scale_rule = cfg.resolve_center("staleness_scale")
        self._last_staleness = 0

    def pull_center(self) -> None:
        super().pull_center()
        self.base[...] = self.x
        self._pull_version()

    def saved_rows(self) -> list:
        rows = [self.x] if self.v is None else [self.x, self.v]
        return [*rows, self.base, *self._residual_row()]

    def restore(self, state) -> None:
        super().restore(state)
        base = state.rows.get("pending")
        if base is not None:
            self.backend.from_host(np.ascontiguousarray(base, np.float32), self.base)
            self.backend.synchronize()

    def step(self, t: int) -> float:
        cfg, b, m = self.cfg, self.backend, self.m
        point = self.x
        if self.v is not None:
            b.nesterov_lookahead(self.x[:m], self.v[:m], cfg.momentum, self.y[:m])
            point = self.y
        batch = self.problem.sample_batch(self.rng)
        loss = self.problem.loss_and_grad(point, batch, self.g)
        if self.v is not None:
            b.nesterov_step(
                self.x[:m], self.v[:m], self.g[:m], cfg.lr, cfg.momentum, cfg.weight_decay
            )
        else:
            b.sgd_step(self.x[:m], self.g[:m], cfg.lr, cfg.weight_decay)
        if _ends_round(t, cfg):
            self._exchange_outer()
        return loss

    def _exchange_outer(self) -> None:
        b, u, m = self.backend, self.u, self.m
        staleness = self._last_staleness = self._staleness()
        weight = staleness_weight(staleness, self.workers, self.scale_rule)
        b.xp.subtract(self.x, self.base, out=u)
        self.distance = math.sqrt(b.sum_squares(u))  # ‖x − θ_b‖: this round's pseudo-gradient
        if not math.isfinite(self.distance):  # it never reaches the center
            u[...] = 0
            self.resets += 1
            if self.v is not None:
                self.v[...] = 0
            if self.compressor is not None:
                self.compressor.reset()  # the residual of a trajectory that was abandoned
        else:
            b.scale(u[:m], weight)
            if m < u.shape[0]:
                b.scale(u[m:], 1.0 / self.workers)
        self._push_update(u)
        self.base[...] = self.x
        b.synchronize()


# ---- the rules of a user's own loop (docs/ARCHITECTURE.md §8) ----------------------------------
#
# The user's optimizer takes every local step on the module's parameters, which are views of x
# (models/torch_binding.py); a rule only exchanges. ``step(t)`` is the rule's part of local step
# t; ``before_update`` says where it runs: inside the optimizer's step, before its update (the
# gradient was taken at the old x, as in the package's own EASGD rules, so e and the gradient
# come from the same point), or after the update (model averaging, as PyTorch's averager; the
# DiLoCo rules, whose round follows H local steps). The DiLoCo rules subclass the package's own
# and run their round unchanged: x is the module's state, whoever stepped it.


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

    name = "localsgd"
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


class LoopDiLoCo(DiLoCo):
    """DiLoCo around a user's optimizer: H = τ local steps of the user's optimizer, then, after
    the optimizer's update of local step t with (t + 1) mod τ = 0 (and of the last step of the
    budget), the package's DiLoCo round on x, parameters and buffers (§2.14): D ← mean(θ − x^i)
    (one all-reduce), the outer Nesterov step on θ, x ← θ, the window set to θ. The user's
    optimizer state (its momentum, Adam's moments) stays each worker's own across rounds, as
    the inner optimizer's state does in DiLoCo."""

    uses_gradient = False
    before_update = False

    def step(self, t: int) -> None:
        if _ends_round(t, self.cfg):
            self._round()


class LoopAsyncDiLoCo(AsyncDiLoCo):
    """Async DiLoCo around a user's optimizer: H = τ local steps of the user's optimizer from
    θ_b, then, after the optimizer's update of local step t with (t + 1) mod τ = 0 (and of the
    last step of the budget), the package's push (§2.15, §3.11): u = w(s)·(x − θ_b) into the
    servers' inboxes, the servers' outer step, x ← θ_b ← the center pulled."""

    uses_gradient = False
    before_update = False

    def step(self, t: int) -> None:
        if _ends_round(t, self.cfg):
            self._exchange_outer()


_RULES = {
    cls.name: cls
    for cls in (
        AsyncEASGD,
        EAMSGD,
        SyncEASGD,
        Downpour,
        AllreduceSGD,
        MDownpour,
        ADownpour,
        MVADownpour,
        LocalSGD,
        DiLoCo,
        AsyncDiLoCo,
    )
}


_LOOP_RULES = {
    cls.name: cls for cls in (LoopEASGD, LoopSyncEASGD, LoopLocalSGD, LoopDiLoCo, LoopAsyncDiLoCo)
}


def make_algorithm(
    cfg,
    problem,
    backend,
    center,
    alpha,
    rng,
    direct_mpi=False,
    workers_comm=None,
    inbox=None,
    own_loop: bool = False,
):
    """The worker-side rule named by ``cfg.algorithm``: the package's own (it takes the
    gradient steps), or with ``own_loop`` the one around a user's optimizer.

    ``workers_comm`` (the workers-only communicator, :attr:`Roles.workers`) is required by the
    synchronous rules, which average over the workers with one all-reduce; ``direct_mpi``
    (CUDA-aware MPI) lets that all-reduce take device buffers. ``inbox`` (a
    :class:`~easgd_mpi.center_inbox.CenterInbox`) is required by the rules whose center
    computes. The center's one-sided transfers always go through host memory.
    """
    rule = (_LOOP_RULES if own_loop else _RULES)[cfg.algorithm]
    extra = {}
    if issubclass(rule, _Pushing):
        if inbox is None:
            raise ValueError(f"algorithm {cfg.algorithm!r} needs the servers' inbox")
        extra["inbox"] = inbox
    if rule.collective:
        if workers_comm is None:
            raise ValueError(f"algorithm {cfg.algorithm!r} needs workers_comm (Roles.workers)")
        extra["allreduce"] = WorkerAllreduce(
            workers_comm, problem.layout.size, backend, direct=direct_mpi
        )
    return rule(cfg, problem, backend, center, alpha, rng, **extra)
