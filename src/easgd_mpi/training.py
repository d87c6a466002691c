"""``train()``: one run of distributed training, the call behind ``easgd train``.

Every rank calls it. Start-up steps that depend on input (config, data, model, checkpoint) run
on every rank and agree collectively, so bad input becomes the same clean error everywhere;
after that, ranks 0..S−1 serve the center in slices (``servers = S``; rank 0 is also the master)
and ranks S..S+p−1 train.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .backend import NumpyBackend, select_backend
from .center import CenterWindow, describe_slice, shard_slices
from .checkpoint import CheckpointData, check_matches, load_checkpoint, newest_valid_checkpoint
from .comm import (
    EXIT_STALLED,
    agree_or_fail,
    allreduce_on_device,
    broadcast,
    check_layout,
    end_job,
    gather_to_master,
    limit_blas_threads,
    make_roles,
    node_position,
    node_sum,
    rank_and_size,
    receive_object,
    send_object,
    wait_for_all,
    world_comm,
)
from .config import SYNC_ALGORITHMS, Config
from .data.sampling import worker_rng
from .errors import (
    CheckpointError,
    ConfigError,
    EasgdError,
    RunFolderError,
    os_reason,
)
from .gpu_binding import bind_before_mpi
from .master import run_master
from .metrics import MetricsLog, format_error
from .models import make_problem
from .runlock import acquire as lock_run_folder
from .runlock import release as release_run_folder
from .snapshots import InitialStates, StateChannel, encode_rng
from .worker import run_worker

__all__ = ["train", "resolve_resume", "STOP_SIGNALS"]

#: Signals that end a run early with a final checkpoint (Slurm sends them before a time limit).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def train(cfg: Config, problem=None, comm=None, out=None, resume=None) -> dict:
    """Train with the server/worker layout on ``comm`` (default COMM_WORLD).

    ``problem`` is a problem object, a factory ``f(cfg, xp) -> problem`` or None for the
    built-in problem of ``cfg.model.name``. ``resume`` (read on rank 0): a checkpoint file, a
    run folder (its newest valid checkpoint), ``"auto"`` (the same for ``cfg.run_dir``, or a
    fresh start when it has none) or a loaded :class:`CheckpointData`. ``out`` prints the
    master's progress lines (default: stdout). Returns a summary dict, the same on every rank.
    """
    bind_before_mpi(cfg.servers)  # a script's train(): as `easgd train` binds (gpu_binding.py)
    base = world_comm(comm)
    # A bad servers value is every rank's same mistake: one line each, agreed before roles.
    agree_or_fail(base, lambda: check_layout(rank_and_size(base)[1], cfg.servers))
    roles = make_roles(base, servers=cfg.servers)
    say = out or (lambda line: print(line, flush=True))
    p = roles.n_workers
    limit_blas_threads(roles.world, cfg.threads)

    def setup():
        cfg.validate(workers=p)
        backend, why_cpu, device_id = _choose_backend(cfg, roles)
        prob = _build_problem(cfg, problem, backend.xp)
        return backend, why_cpu, device_id, prob, allreduce_on_device(backend.is_gpu)

    backend, why_cpu, device_id, prob, direct_mpi = agree_or_fail(roles.world, setup)
    alpha = cfg.resolve_alpha(p)
    _check_memory(cfg, roles, prob, backend)

    def open_checkpoint():
        if not roles.is_master or resume is None:
            return None
        data = (
            resume
            if isinstance(resume, CheckpointData)
            else resolve_resume(resume, cfg.run_dir, say)[1]
        )
        if data is not None:
            _check_resumable(data, cfg, prob, p)
        return data

    checkpoint = agree_or_fail(roles.world, open_checkpoint)
    resuming = broadcast(roles.world, checkpoint is not None)
    run_dir = agree_or_fail(
        roles.world, lambda: _make_run_dir(cfg, checkpoint) if roles.is_master else None
    )
    run_dir = broadcast(roles.world, run_dir)
    devices = gather_to_master(roles.world, (backend.name, why_cpu, device_id))

    initial = None
    if roles.is_master:
        initial = np.zeros(prob.layout.size, dtype=np.float32)
        if checkpoint is not None:
            initial[:] = checkpoint.center
        else:
            prob.init_params(initial, cfg.seed)
        _announce(say, cfg, p, alpha, devices[roles.servers :], run_dir, prob, checkpoint)

    center = CenterWindow(
        roles.world,
        prob.layout.size,
        p,
        initial=initial,
        lock_mode=cfg.lock_mode,
        chunk=cfg.resolve_chunk(backend.is_gpu),
        # Pinned host chunks on a GPU: the one-sided operations never see device memory.
        alloc_chunk=backend.host_empty,
        initial_status=None
        if checkpoint is None
        else {k: checkpoint.worker_counters[k] for k in ("steps", "exchanges", "resets")},
        servers=roles.servers,
    )
    if roles.is_master and roles.servers > 1:
        say(
            f"easgd: the center on {roles.servers} servers: "
            + "; ".join(f"rank {s} {describe_slice(*sl)}" for s, sl in enumerate(center.slices))
        )
    channel = StateChannel(
        roles.world,
        prob.layout.size,
        p,
        rows=len(cfg.state_rows) if cfg.checkpoint.worker_states else 0,
        # Where the center of a cut is known exactly: the synchronous rules' common replica,
        # or the window of a single worker (nobody else moves it).
        cut_center=cfg.algorithm in SYNC_ALGORITHMS or p == 1,
        initial=_initial_states(cfg, prob, p, initial, checkpoint) if roles.is_master else None,
    )
    worker_resume = _scatter_worker_states(roles, checkpoint, resuming)

    start = time.monotonic()
    served = None
    with _stop_signals() as stop_flag:
        if roles.is_server and not roles.is_master:
            # Nothing to compute here: keep MPI progress going for this slice until every
            # rank has joined the end-of-run barrier (the loop is that barrier).
            served = center.serve()
        elif roles.is_master:
            metrics = MetricsLog(
                Path(run_dir) / "metrics.jsonl", history=checkpoint.metrics if checkpoint else None
            )
            try:
                final = run_master(
                    cfg,
                    roles,
                    prob,
                    center,
                    channel,
                    metrics,
                    run_dir,
                    out=say,
                    resume=checkpoint,
                    stop_flag=stop_flag,
                )
            finally:
                metrics.close()
            if final["abandoned"]:
                _end_stalled(final, run_dir, say, cfg.checkpoint.state_wait)
        else:
            run_worker(
                cfg,
                roles,
                prob,
                backend,
                center,
                channel,
                alpha,
                direct_mpi=direct_mpi,
                resume=worker_resume,
                stop_flag=stop_flag,
            )
            final = None
        if served is None:
            wait_for_all(roles.world)
    channel.close()
    center.close()

    def finish():
        # The outcome on disk (rank 0). A final checkpoint or marker that cannot be written
        # fails the job on every rank, with no marker; the folder's lock goes either way.
        if not roles.is_master:
            return None
        try:
            failure = final.pop("failure", None)
            if failure is not None:
                raise failure
            stopped = final.pop("stopped")
            _write_marker(Path(run_dir), "PREEMPTED" if stopped else "COMPLETED")
            return stopped
        finally:
            release_run_folder(run_dir)

    try:
        stopped = agree_or_fail(roles.world, finish)
    except EasgdError:
        roles.free()
        raise
    # How much of a core each idle server used (a sleeping poll loop should use next to none).
    served = gather_to_master(roles.world, served)
    summary = None
    if roles.is_master:
        summary = {
            "run_dir": str(run_dir),
            "algorithm": cfg.algorithm,
            "workers": p,
            "servers": roles.servers,
            "server_cpu": [x for x in served if x is not None],
            "alpha": alpha,
            "wall_time": round(time.monotonic() - start, 3),
            "stopped": stopped,
            "resumed": resuming,
            **final,
        }
        verb = "stopped early" if stopped else "done"
        say(
            f"{verb}: {cfg.algorithm} with {p} workers, {summary['steps']:,d} worker steps, "
            f"{summary['exchanges']:,d} exchanges in {summary['wall_time']:.1f}s; "
            f"center test error "
            f"{format_error(summary['center_error'], getattr(prob, 'error_is_rate', True))}, "
            f"loss {summary['center_loss']:.4f}{_servers_text(summary['server_cpu'])}; "
            f"run folder {run_dir}"
        )
    summary = broadcast(roles.world, summary)
    roles.free()
    return summary


def _check_memory(cfg, roles, prob, backend) -> None:
    """Refuse, before the model-sized buffers exist, a run whose state would not fit.

    Host memory is shared by the ranks of a node: their needs are summed there. A GPU worker's
    vectors live on its device, so only its staging buffers count against the host.
    """
    from .data.images import available_memory_bytes, human_bytes  # noqa: PLC0415

    n_bytes = 4 * prob.layout.size
    p = roles.n_workers
    if roles.is_server:
        # A server's window holds its slice only (cut as CenterWindow cuts it, near enough).
        lo, hi = shard_slices(prob.layout.size, roles.servers, cfg.resolve_chunk(False))[roles.rank]
        need = 4 * (hi - lo)
        if roles.is_master:
            # The state window holds two halves of every worker's rows (snapshots.py) and two
            # of the cut's center; a checkpoint copies one half of each.
            rows = len(cfg.state_rows) * p if cfg.checkpoint.worker_states else 0
            need += n_bytes * (2 + 3 * rows + 2)  # snapshot, copy, states, cut center
    else:
        # x, g, v, y + scratch on the host; a GPU worker's host side is its pinned chunks.
        need = 4 * 4 * cfg.resolve_chunk(True) if backend.is_gpu else n_bytes * 6
    node_need, ranks = node_sum(roles.world, need)

    def check():
        have = available_memory_bytes()
        if node_need > have:
            raise ConfigError(
                f"the model has {prob.layout.size:,d} parameters: the {ranks} ranks on this node "
                f"need about {human_bytes(node_need)} for it (rank 0 keeps "
                f"{'every worker state' if cfg.checkpoint.worker_states else 'the center'}), "
                f"but only {human_bytes(have)} is available; use a smaller model, fewer ranks "
                f"per node, or checkpoint.worker_states = false"
            )

    agree_or_fail(roles.world, check)


def resolve_resume(spec, run_dir: str, report=print) -> tuple[Path | None, CheckpointData | None]:
    """Find and load the checkpoint that ``--resume spec`` means (rank 0 only).

    ``auto``: the newest valid checkpoint of ``run_dir``, or (None, None) when it holds no
    checkpoint at all (a first segment of a preemptible job); an error when it holds only
    damaged ones. A folder: its newest valid checkpoint (an error when it has none). A file:
    that file.
    """
    if str(spec) == "auto":
        if not run_dir:
            raise ConfigError(
                "--resume auto needs the run folder: set run_dir (e.g. --set run_dir=runs/myjob)"
            )
        found = newest_valid_checkpoint(run_dir, report)
        if found is None:
            report(f"easgd: no checkpoint in {run_dir}: starting a new run")
            return None, None
        return found
    path = Path(spec)
    if path.is_dir():
        found = newest_valid_checkpoint(path, report)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path} (checkpoint-NNNNNN.h5 files)")
        return found
    return path, load_checkpoint(path)


def _check_resumable(data: CheckpointData, cfg, prob, p: int) -> None:
    check_matches(data, prob.layout, f"#{data.sequence}")
    if data.workers != p:
        # The servers are free to change (the file holds the whole center): only p must match.
        raise CheckpointError(
            f"checkpoint #{data.sequence} was written by {data.workers} workers, this launch "
            f"has {p}: launch with {data.workers + cfg.servers} ranks to resume it with "
            f"servers = {cfg.servers} (ranks = {data.workers} workers + servers)"
        )
    if data.algorithm != cfg.algorithm:
        raise CheckpointError(
            f"checkpoint #{data.sequence} is from algorithm "
            f"'{data.algorithm}', the config says '{cfg.algorithm}'"
        )


def _scatter_worker_states(roles, data, resuming: bool) -> dict | None:
    """Rank 0 sends each worker (world rank servers + i) its counters, RNG state and (if
    stored) x and v."""
    if not resuming:
        return None
    if roles.is_master:
        for i in range(roles.n_workers):
            send_object(
                roles.world,
                {
                    "steps": int(data.worker_counters["steps"][i]),
                    "exchanges": int(data.worker_counters["exchanges"][i]),
                    "resets": int(data.worker_counters["resets"][i]),
                    "rng": json.loads(data.worker_rng[i]),
                    "x": None if data.worker_x is None else data.worker_x[i],
                    "second": _second_row(data, i),
                },
                dest=roles.servers + i,
                tag=7,
            )
        return None
    if roles.is_server:
        return None
    return receive_object(roles.world, source=0, tag=7)


def _initial_states(cfg, prob, p: int, center: np.ndarray, data) -> InitialStates:
    """The state every worker starts this segment from, as the master stores it before any
    worker answers (snapshots.py): a worker that never answers is saved as it started."""
    n = prob.layout.size
    if data is None:
        second = np.zeros(n, np.float32)
        m = int(getattr(prob, "n_trainable", n))
        if cfg.algorithm == "downpour":  # nothing pending; the buffers' base is the center's
            second[m:] = center[m:]
        return InitialStates(
            rows=[center, second],
            center=center,
            counters={k: np.zeros(p, np.int64) for k in ("steps", "exchanges", "resets")},
            rng_words=np.stack([encode_rng(worker_rng(cfg.seed, i)) for i in range(p)]),
        )
    words = []
    for text in data.worker_rng:
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = json.loads(text)
        words.append(encode_rng(rng))
    second = data.worker_v if data.worker_v is not None else data.worker_pending
    return InitialStates(
        rows=[
            center if data.worker_x is None else data.worker_x,
            np.zeros(n, np.float32) if second is None else second,
        ],
        center=center,
        counters=data.worker_counters,
        rng_words=np.stack(words),
    )


def _end_stalled(final: dict, run_dir, say, wait: float) -> None:
    """The master after a stop that some worker never answered: the final checkpoint holds
    that worker's last saved state; mark the folder, let it go, and end every rank (the stalled
    one would never reach the end of the run)."""
    ranks = ", ".join(str(r) for r in final["abandoned"])
    if final.get("failure") is None:
        with contextlib.suppress(EasgdError):
            _write_marker(Path(run_dir), "PREEMPTED")
    release_run_folder(run_dir)
    outcome = (
        f"the final checkpoint {final['checkpoint']} holds their last saved states"
        if final.get("checkpoint")
        else f"the final checkpoint failed: {final['failure']}"
    )
    say(
        f"easgd: worker rank(s) {ranks} did not answer the stop within {wait:g}s "
        f"(checkpoint.state_wait): {outcome}; ending the job (exit {EXIT_STALLED})"
    )
    sys.stdout.flush()
    end_job(EXIT_STALLED)


def _second_row(data: CheckpointData, i: int):
    """Worker i's second saved row: its velocity, or DOWNPOUR's pending sum (or None)."""
    for rows in (data.worker_v, data.worker_pending):
        if rows is not None:
            return rows[i]
    return None


@contextmanager
def _stop_signals():
    """SIGTERM / SIGUSR1 set a flag the loops look at; the previous handlers come back after."""
    state = {"stop": False}

    def handler(signum, frame):
        state["stop"] = True

    previous = {}
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals stay with whoever owns them
        previous.clear()
    try:
        yield lambda: state["stop"]
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


#: Markers of how a run ended; a starting run clears those of an earlier segment.
_MARKERS = ("PREEMPTED", "COMPLETED")


def _write_marker(run_dir: Path, name: str) -> None:
    try:
        for old in _MARKERS:
            action, target = "remove", run_dir / old
            target.unlink(missing_ok=True)
        action, target = "write", run_dir / name
        target.write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
    except OSError as exc:
        raise RunFolderError(f"cannot {action} {target}: {os_reason(exc)}") from None


def _choose_backend(cfg, roles):
    """Workers use a GPU when one is usable; the servers (the master evaluates) use the host."""
    if roles.is_server:
        return NumpyBackend(), "", None
    if cfg.device == "off":
        return NumpyBackend(), "device = off", None
    from .gpu_binding import bound_gpu  # noqa: PLC0415

    # The index among the workers on this node picks the GPU: the servers, which hold none,
    # do not shift the numbering, whatever the launcher's local rank says. (Collective over
    # the workers: every worker takes part, bound or not.)
    local_worker = node_position(roles.workers)[0]
    bound = bound_gpu()
    if bound is not None:
        # Bound before MPI started (gpu_binding: the same numbering): CUDA_VISIBLE_DEVICES holds
        # this worker's GPU alone, device 0 in here. The start-up line names the node's GPU.
        backend, why = select_backend(prefer_gpu=True, device_id=0, mode=cfg.device)
        label = int(bound) if bound.isdigit() else bound
        return backend, why, label if getattr(backend, "is_gpu", False) else None
    backend, why = select_backend(prefer_gpu=True, device_id=local_worker, mode=cfg.device)
    return backend, why, getattr(backend, "device_id", None)


def _build_problem(cfg, problem, xp):
    if problem is None:
        return make_problem(cfg, xp=xp)
    # A class or a factory function builds one per rank with that rank's array module.
    if isinstance(problem, type) or (callable(problem) and not hasattr(problem, "loss_and_grad")):
        return problem(cfg, xp)
    return problem


def _make_run_dir(cfg, checkpoint) -> str:
    """Create or reuse the run folder and lock it for this run (rank 0; docs/CHECKPOINT.md).

    The lock comes before anything is written there, so a second run on the folder changes
    nothing of the first's. Markers of an earlier segment are cleared: a run that fails later
    leaves none behind.
    """
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"run folder {path} cannot be created: {os_reason(exc)}") from None
    else:
        base = Path(cfg.output) / time.strftime("%Y%m%d-%H%M%S")
        path, k = base, 1
        while True:  # created exclusively: two runs started in the same second never share one
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                path, k = Path(f"{base}-{k}"), k + 1
            except OSError as exc:
                raise RunFolderError(
                    f"run folder {path} cannot be created: {os_reason(exc)}"
                ) from None
    lock_run_folder(path)
    tmp = path / ".config.toml.tmp"
    try:
        for name in _MARKERS:
            action, target = "remove", path / name
            target.unlink(missing_ok=True)
        action, target = "write", path / "config.toml"
        tmp.write_text(cfg.to_toml(), encoding="utf-8")
        os.replace(tmp, target)
        if checkpoint is None:  # a fresh run in a reused folder starts a fresh metrics file
            action, target = "remove", path / "metrics.jsonl"
            target.unlink(missing_ok=True)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        release_run_folder(path)
        raise RunFolderError(f"cannot {action} {target}: {os_reason(exc)}") from None
    return str(path)


def _servers_text(served: list[dict]) -> str:
    """What the servers other than the master cost: the most CPU any of them used."""
    if not served:
        return ""
    busiest = max(x["cpu_s"] / max(x["wall_s"], 1e-9) for x in served)
    return f"; {len(served) + 1} servers, the idle ones at most {busiest:.1%} of a core"


def _announce(say, cfg, p, alpha, devices, run_dir, prob, checkpoint) -> None:
    kinds = {}
    for name, why, dev in devices:
        if name == "numpy":
            label = f"NumPy, no GPU: {why}" if why else "NumPy"
        else:
            label = f"GPU {dev}" if dev is not None else "GPU"
        kinds[label] = kinds.get(label, 0) + 1
    where = "; ".join(f"{n} on {k}" for k, n in kinds.items())
    say(
        f"easgd: {cfg.algorithm}, {p} workers ({where}), tau = {cfg.tau}, "
        f"alpha = {alpha:.4g} (beta = {alpha * p:.3g}), lr = {cfg.lr:g}, "
        f"{prob.layout.size:,d} parameters, {cfg.steps:,d} steps per worker; "
        f"run folder {run_dir}"
    )
    if checkpoint is not None:
        changes = cfg.changes_from(checkpoint.config_toml)
        say(
            f"easgd: resuming from checkpoint #{checkpoint.sequence}: "
            f"{checkpoint.total_steps:,d} worker steps, {checkpoint.wall_time:.1f}s done; "
            + ("config changes: " + ", ".join(changes) if changes else "config as the checkpoint's")
        )
    sys.stdout.flush()
