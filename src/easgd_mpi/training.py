"""``train()``: one run of distributed training, the call behind ``easgd train``.

Every rank calls it. Start-up steps that depend on input (config, data, model) run on every
rank and agree collectively, so bad input becomes the same clean error everywhere; after that,
rank 0 serves the center and ranks 1..p train.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from .backend import NumpyBackend, select_backend
from .center import CenterWindow
from .comm import agree_or_fail, limit_blas_threads, make_roles
from .config import Config
from .errors import ConfigError
from .master import run_master
from .metrics import MetricsLog
from .models import make_problem
from .worker import run_worker, wait_for_all

__all__ = ["train"]


def train(cfg: Config, problem=None, comm=None, out=None) -> dict:
    """Train with the master/worker layout on ``comm`` (default COMM_WORLD).

    ``problem`` is a problem object, a factory ``f(cfg, xp) -> problem`` or None for the
    built-in problem of ``cfg.model.name``. Returns a summary dict (the same on every rank).
    ``out`` prints the master's progress lines (default: stdout).
    """
    roles = make_roles(comm)
    say = out or (lambda line: print(line, flush=True))
    p = roles.n_workers

    limit_blas_threads(roles.world, cfg.threads)

    def setup():
        cfg.validate(workers=p)
        backend, why_cpu, device_id = _choose_backend(cfg, roles)
        prob = _build_problem(cfg, problem, backend.xp)
        return backend, why_cpu, device_id, prob

    backend, why_cpu, device_id, prob = agree_or_fail(roles.world, setup)
    alpha = cfg.resolve_alpha(p)
    direct_mpi = backend.is_gpu and os.environ.get("EASGD_CUDA_MPI", "0") == "1"

    run_dir = agree_or_fail(roles.world, lambda: _make_run_dir(cfg) if roles.is_master else None)
    run_dir = roles.world.bcast(run_dir)
    devices = roles.world.gather((backend.name, why_cpu, device_id))

    initial = None
    if roles.is_master:
        initial = np.zeros(prob.layout.size, dtype=np.float32)
        prob.init_params(initial, cfg.seed)
        _announce(say, cfg, p, alpha, devices[1:], run_dir, prob)

    center = CenterWindow(
        roles.world, prob.layout.size, p, initial=initial, lock_mode=cfg.lock_mode,
        chunk=cfg.chunk, alloc_chunk=_chunk_allocator(backend, direct_mpi),
        before_mpi=backend.synchronize,
    )
    start = time.monotonic()
    if roles.is_master:
        metrics = MetricsLog(Path(run_dir) / "metrics.jsonl")
        try:
            final = run_master(cfg, roles, prob, center, metrics, out=say)
        finally:
            metrics.close()
    else:
        run_worker(cfg, roles, prob, backend, center, alpha, direct_mpi=direct_mpi)
        wait_for_all(roles.world)
        final = None
    center.close()
    summary = None
    if roles.is_master:
        summary = {
            "run_dir": str(run_dir),
            "algorithm": cfg.algorithm,
            "workers": p,
            "alpha": alpha,
            "wall_time": round(time.monotonic() - start, 3),
            **final,
        }
        say(
            f"done: {cfg.algorithm} with {p} workers, {summary['steps']:,d} worker steps, "
            f"{summary['exchanges']:,d} exchanges in {summary['wall_time']:.1f}s; "
            f"center test error {_pct(summary['center_error'], cfg)}, "
            f"loss {summary['center_loss']:.4f}; run folder {run_dir}"
        )
    summary = roles.world.bcast(summary)
    if roles.workers != _comm_null():
        roles.workers.Free()
    roles.world.Free()
    return summary


def _pct(error: float, cfg) -> str:
    return f"{error:.3e}" if cfg.model.name == "quadratic" else f"{100 * error:.2f}%"


def _comm_null():
    from mpi4py import MPI  # noqa: PLC0415

    return MPI.COMM_NULL


def _choose_backend(cfg, roles):
    """Workers use a GPU when one is usable; the master always evaluates on the host."""
    if roles.is_master:
        return NumpyBackend(), "", None
    if cfg.device == "off":
        return NumpyBackend(), "device = off", None
    # The index among the workers on this node picks the GPU: the master, which holds none,
    # does not shift the numbering, whatever the launcher's local rank says.
    node = roles.workers.Split_type(_shared_type(), key=roles.workers.Get_rank())
    local_worker = node.Get_rank()
    node.Free()
    backend, why = select_backend(prefer_gpu=True, device_id=local_worker)
    return backend, why, getattr(backend, "device_id", None)


def _shared_type():
    from mpi4py import MPI  # noqa: PLC0415

    return MPI.COMM_TYPE_SHARED


def _build_problem(cfg, problem, xp):
    if problem is None:
        return make_problem(cfg, xp=xp)
    # A class or a factory function builds one per rank with that rank's array module.
    if isinstance(problem, type) or (callable(problem) and not hasattr(problem, "loss_and_grad")):
        return problem(cfg, xp)
    return problem


def _chunk_allocator(backend, direct_mpi):
    if direct_mpi:
        return backend.zeros
    return backend.host_empty


def _make_run_dir(cfg) -> str:
    if cfg.run_dir:
        path = Path(cfg.run_dir)
    else:
        base = Path(cfg.output) / time.strftime("%Y%m%d-%H%M%S")
        path, k = base, 1
        while path.exists():
            path, k = Path(f"{base}-{k}"), k + 1
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"run folder {path} cannot be created: {exc.strerror}") from None
    return str(path)


def _announce(say, cfg, p, alpha, devices, run_dir, prob) -> None:
    kinds = {}
    for name, why, dev in devices:
        label = name if name != "numpy" else f"numpy ({why})" if why else "numpy"
        kinds[label] = kinds.get(label, 0) + 1
    where = ", ".join(f"{n} on {k}" for k, n in kinds.items())
    say(
        f"easgd: {cfg.algorithm}, {p} workers ({where}), tau = {cfg.tau}, "
        f"alpha = {alpha:.4g} (beta = {alpha * p:.3g}), lr = {cfg.lr:g}, "
        f"{prob.layout.size:,d} parameters, {cfg.steps:,d} steps per worker; "
        f"run folder {run_dir}"
    )
    sys.stdout.flush()

