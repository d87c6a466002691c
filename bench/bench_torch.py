#!/usr/bin/env python3
"""Per-step cost of the PyTorch faces against a plain PyTorch loop, in one run.

Two faces (``--face``): ``adapter`` (the default, below), the package's own loop through the
PyTorch adapter (docs/ARCHITECTURE.md §1.5); ``loop``, your own loop with
``easgd_mpi.torch.ElasticAveraging`` (docs/ARCHITECTURE.md §8), in bench/torch_loop.py: a plain
loop against the same loop with an exchange every τ steps, under ``mpiexec -n 2`` (started
here when run as a plain script).

The paper's CIFAR convnet (3×28×28 inputs, 10 classes) trains on the same pre-made batches of
synthetic tensors in three variants:

- ``plain``: an ordinary PyTorch loop: ``zero_grad()``, forward, cross-entropy, ``backward()``,
  ``torch.optim.SGD(lr, momentum=0, weight_decay).step()``;
- ``adapter``: the worker's step through :class:`TorchProblem` and async EASGD with τ larger
  than the run, so no step exchanges (the module's parameters and gradients are views of the
  flat buffers; the fused SGD kernel of the NumPy backend, or CuPy's on ``--device cuda``);
- ``exchange``: the same with an elastic exchange every ``--tau`` (4) steps against a real
  :class:`CenterWindow` on ``MPI.COMM_WORLD`` of size 1 (rank 0 owns the window and exchanges
  with itself through RMA).

Each repeat runs every variant for ``--steps`` timed steps (a multiple of τ, so each timed block
holds the same number of exchanges), after one untimed step; the variants take turns, in a
rotated order, and all start from the same batch. The table shows, per variant, the median
over repeats of the mean time per step and its ratio to ``plain`` as an overhead in percent,
in process CPU time and in wall time on the host (CPU time is the headline there: with one
thread it equals wall time on an idle machine, and it leaves out the time other processes take
on a shared one), in wall time on a GPU. An instrumented pass afterwards splits each
variant's step into its parts (where the time goes). Writes JSON
(``bench/results/torch-<device>.json`` by default).

    python bench/bench_torch.py                         # CPU, batch 128, 1 thread
    python bench/bench_torch.py --quick --out /tmp/t.json   # smoke run (seconds)
    python bench/bench_torch.py --device cuda           # GPU: CuPy backend, CUDA torch
    python bench/bench_torch.py --face loop             # your own loop (2 ranks)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchlib import cpu_name, launcher, machine_facts, timing_rows, timing_table

REPO = Path(__file__).resolve().parents[1]
try:
    import easgd_mpi  # noqa: F401
except ImportError:  # run from a checkout without installing: use the repository's src/
    sys.path.insert(0, str(REPO / "src"))

VARIANTS = ("plain", "adapter", "exchange")
IMAGE = (3, 28, 28)
CLASSES = 10
#: τ of the adapter variant: larger than any run, so only its very first (warm-up) step exchanges.
NO_EXCHANGE_TAU = 1 << 40


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--face", choices=["adapter", "loop"], default="adapter")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, default=128, help="minibatch size (default 128)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per block (default 4)")
    ap.add_argument("--repeats", type=int, default=8, help="timed blocks per variant (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    ap.add_argument("--tau", type=int, default=4, help="exchange period of 'exchange'")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (CPU; default 1)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--chunk", type=int, default=262144, help="floats per RMA transfer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: batch 16, 4 steps, 2 repeats, 1 warm-up"
    )
    ap.add_argument(
        "--out", type=Path, help="JSON path (default bench/results/torch-<device>.json)"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.steps, args.repeats, args.warmup = 16, 4, 2, 1
    if min(args.batch, args.steps, args.repeats, args.tau, args.threads) < 1 or args.warmup < 0:
        ap.error("--batch, --steps, --repeats, --tau and --threads must be >= 1, --warmup >= 0")
    if args.steps % args.tau:
        # Every timed block must hold the same number of exchanges (steps / τ).
        args.steps += args.tau - args.steps % args.tau
        print(f"--steps rounded up to {args.steps}, a multiple of τ = {args.tau}", file=sys.stderr)
    face = "" if args.face == "adapter" else f"{args.face}-"
    args.out = args.out or REPO / "bench" / "results" / f"torch-{face}{args.device}.json"
    return args


class PremadeBatches:
    """Batch source of the adapter (``draw``/``batch``), shared with the plain loop: the same
    pre-made tensors in the same order, with no gathering cost for either."""

    def __init__(self, batches):
        self.batches = batches
        self.n = len(batches)
        self.cursor = 0

    def draw(self, rng=None) -> int:
        k = self.cursor % self.n
        self.cursor += 1
        return k

    def batch(self, k):
        return self.batches[k]


class Plain:
    """A plain PyTorch training loop."""

    period = 1  # no exchanges: a timed block may start at any step

    def __init__(self, torch, module, source, args):
        self.torch, self.module, self.source = torch, module, source
        self.opt = torch.optim.SGD(
            module.parameters(), lr=args.lr, momentum=0.0, weight_decay=args.weight_decay
        )

    def step(self, t):
        inputs, targets = self.source.batch(self.source.draw())
        self.opt.zero_grad()
        loss = self.torch.nn.functional.cross_entropy(self.module(inputs), targets)
        loss.backward()
        self.opt.step()
        return loss.detach()


class Adapter:
    """The worker's step: TorchProblem + async EASGD (``algo.step(t)``)."""

    def __init__(self, algo, period):
        #: Exchange period that timed blocks align to (1: never exchanges after t = 0).
        self.algo, self.period = algo, period

    def step(self, t):
        return self.algo.step(t)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.face == "loop":
        return _loop_face(args, argv)
    # TorchProblem adopts OMP_NUM_THREADS as the rank's share of the cores: keep them equal.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch  # noqa: PLC0415

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from mpi4py import MPI  # noqa: PLC0415

    from easgd_mpi.algorithms import make_algorithm  # noqa: PLC0415
    from easgd_mpi.backend import NumpyBackend  # noqa: PLC0415
    from easgd_mpi.center import CenterWindow  # noqa: PLC0415
    from easgd_mpi.config import Config  # noqa: PLC0415
    from easgd_mpi.data.sampling import worker_rng  # noqa: PLC0415
    from easgd_mpi.models.cifar_convnet import build_cifar_convnet  # noqa: PLC0415
    from easgd_mpi.models.torch_adapter import TorchProblem  # noqa: PLC0415

    comm = MPI.COMM_WORLD
    if comm.Get_size() != 1:
        print("bench_torch: run it as a plain script (one process), not under mpiexec")
        return 2

    backend, device_info, sync = _device(torch, args, NumpyBackend)
    dev = torch.device(args.device)

    # Pre-made batches, on the device, identical for every variant.
    gen = torch.Generator().manual_seed(args.seed)
    n_batches = max(args.steps, 2)
    batches = [
        (
            torch.randn(args.batch, *IMAGE, generator=gen).to(dev),
            torch.randint(0, CLASSES, (args.batch,), generator=gen).to(dev),
        )
        for _ in range(n_batches)
    ]
    source = PremadeBatches(batches)

    def build():
        torch.manual_seed(args.seed)  # the same initial parameters in every variant
        return build_cifar_convnet(torch, IMAGE[0], IMAGE[1], CLASSES)

    runners, windows = {}, []
    runners["plain"] = Plain(torch, build().to(dev), source, args)
    for name, tau in (("adapter", NO_EXCHANGE_TAU), ("exchange", args.tau)):
        prob = TorchProblem(build(), source, source, batch_size=args.batch, xp=backend.xp)
        cfg = Config()
        for key, value in (
            ("algorithm", "easgd"),
            ("lr", args.lr),
            ("weight_decay", args.weight_decay),
            ("batch_size", args.batch),
            ("chunk", args.chunk),
            ("tau", args.tau),
        ):
            cfg.set(key, value)
        cfg.validate(workers=1)
        cfg.tau = tau  # after validation: the adapter's τ is beyond any step count
        x0 = np.zeros(prob.layout.size, np.float32)
        prob.init_params(x0, args.seed)
        window = CenterWindow(
            comm,
            prob.layout.size,
            initial=x0,
            chunk=args.chunk,
            alloc_chunk=backend.host_empty,
        )
        windows.append(window)
        algo = make_algorithm(cfg, prob, backend, window, 0.9, worker_rng(args.seed, 0))
        algo.pull_center()
        runners[name] = Adapter(algo, args.tau if name == "exchange" else 1)
    n_params = prob.layout.size
    clock = {name: 0 for name in VARIANTS}  # each variant's local step counter t

    def run_steps(name, count, align=False):
        """``count`` steps of one variant; with ``align`` the first is a multiple of τ (an
        exchange step of 'exchange'), so every timed block holds steps / τ exchanges."""
        runner = runners[name]
        t0 = clock[name]
        if align and t0 % runner.period:
            t0 += runner.period - t0 % runner.period
        for t in range(t0, t0 + count):
            runner.step(t)
        clock[name] = t0 + count

    try:
        for name in VARIANTS:  # warm-up: allocations, the first exchange (t = 0), caches
            source.cursor = 0
            run_steps(name, args.warmup)
        times = {"wall": {name: [] for name in VARIANTS}, "cpu": {name: [] for name in VARIANTS}}
        for rep in range(args.repeats):
            for name in VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]:
                # One untimed step first (the other variants ran in between), then the block;
                # every variant's block of this repeat starts at the same batch.
                source.cursor = rep * args.steps
                run_steps(name, 1)
                sync()
                wall, cpu = time.perf_counter(), time.process_time()
                run_steps(name, args.steps, align=True)
                sync()
                cpu = (time.process_time() - cpu) / args.steps
                wall = (time.perf_counter() - wall) / args.steps
                times["wall"][name].append(wall)
                times["cpu"][name].append(cpu)
                print(
                    f"# repeat {rep + 1}/{args.repeats} {name:8s} wall {1e3 * wall:9.2f} "
                    f"ms/step, cpu {1e3 * cpu:9.2f} ms/step",
                    file=sys.stderr,
                    flush=True,
                )
        # On the host the parts are timed in process CPU time (see _report), on a GPU in
        # wall time with the device synchronised around each part.
        timer = time.process_time if args.device == "cpu" else time.perf_counter
        parts = {
            name: _breakdown(name, runners[name], args, sync, run_steps, timer) for name in VARIANTS
        }
        exchanges = {
            name: getattr(getattr(runners[name], "algo", None), "exchanges", 0) for name in VARIANTS
        }
        if exchanges["adapter"] != 1:  # once, at its first step (t = 0), and never again
            raise RuntimeError(f"the no-exchange variant exchanged: {exchanges}")
    finally:
        for window in windows:
            window.close()

    report = _report(args, torch, device_info, n_params, times, parts, exchanges, MPI)
    print(format_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)  # never leave a half-written result
    print(f"wrote {args.out}")
    return 0


def _loop_face(args, argv) -> int:
    """Your own loop's face: two ranks (rank 0 serves the center); as a plain script, start
    them."""
    if "PMI_RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        cmd = [launcher(), "-n", "2", sys.executable, str(Path(__file__).resolve())]
        return subprocess.run([*cmd, *(sys.argv[1:] if argv is None else argv)]).returncode
    from torch_loop import run_loop_face  # noqa: PLC0415

    return run_loop_face(args, IMAGE, CLASSES, cpu_name)


def _device(torch, args, NumpyBackend):
    """(backend, device description, synchronize())."""
    if args.device == "cpu":
        info = {
            "kind": "cpu",
            "name": cpu_name(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
        }
        return NumpyBackend(), info, lambda: None
    from easgd_mpi.backend import select_backend  # noqa: PLC0415

    if not torch.cuda.is_available():
        sys.exit("bench_torch: --device cuda but this PyTorch has no usable CUDA device")
    backend, why = select_backend(prefer_gpu=True, device_id=0)
    if not backend.is_gpu:
        sys.exit(f"bench_torch: --device cuda but the CuPy backend is unusable: {why}")
    import cupy  # noqa: PLC0415

    torch.cuda.set_device(backend.device_id)
    info = {
        "kind": "gpu",
        "name": torch.cuda.get_device_name(backend.device_id),
        "cupy_version": cupy.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": cpu_name(),
    }

    def sync():
        backend.synchronize()
        torch.cuda.synchronize()

    return backend, info, sync


def _breakdown(name, runner, args, sync, run_steps, clock) -> dict:
    """ms per step of each part of one variant's step, from one instrumented block (after the
    timed ones; the timers synchronise a GPU around every part, so parts add up to more)."""
    total: dict[str, float] = {}

    def wrap(obj, attr, label):
        fn = getattr(obj, attr)

        def timed(*a, **k):
            sync()
            t = clock()
            out = fn(*a, **k)
            sync()
            total[label] = total.get(label, 0.0) + clock() - t
            return out

        setattr(obj, attr, timed)  # an instance attribute shadowing the method
        return obj, attr

    if name == "plain":
        wrapped = [
            wrap(runner.opt, "zero_grad", "zero_grad"),
            wrap(runner.module, "forward", "forward"),
            wrap(runner.opt, "step", "update (optimizer.step)"),
        ]
    else:
        algo = runner.algo
        prob = algo.problem
        wrapped = [
            wrap(prob, "sample_batch", "sample_batch"),
            wrap(prob, "loss_and_grad", "loss_and_grad"),
            wrap(prob._g_flat, "zero_", "zero g"),
            wrap(prob.module, "forward", "forward"),
            wrap(algo.backend, "sgd_step", "update (fused sgd_step)"),
        ]
        if name == "exchange":
            wrapped.append(wrap(algo.center, "exchange", "exchange (RMA + fused kernel)"))
    try:
        sync()
        start = clock()
        run_steps(name, args.steps, align=True)
        sync()
        whole = clock() - start
    finally:
        for obj, attr in wrapped:
            delattr(obj, attr)  # the class's method again
    parts = {k: 1e3 * v / args.steps for k, v in total.items()}
    if name == "plain":  # loss, backward and the loop itself
        rest = "cross-entropy + backward"
        parts[rest] = 1e3 * whole / args.steps - sum(parts.values())
    else:  # loss_and_grad = zero g + forward + cross-entropy + backward
        parts["cross-entropy + backward"] = (
            parts.pop("loss_and_grad") - parts.get("zero g", 0.0) - parts.get("forward", 0.0)
        )
        parts["rest of step"] = 1e3 * whole / args.steps - sum(parts.values())
    parts["whole step"] = 1e3 * whole / args.steps
    return parts


def _report(args, torch, device_info, n_params, times, parts, exchanges, MPI) -> dict:
    # On the host the headline is process CPU time: single-threaded, it equals wall time on an
    # idle machine, and unlike wall time it does not count the time other processes take from
    # this one on a shared machine. On a GPU only wall time means anything.
    primary = "cpu" if args.device == "cpu" else "wall"
    rows = timing_rows(times, VARIANTS, ("wall", "cpu") if args.device == "cpu" else ("wall",))
    for row in rows:
        row["exchanges"] = int(exchanges[row["variant"]])  # the whole run, warm-up included
        row["parts_ms_per_step"] = parts[row["variant"]]
    return {
        "benchmark": "bench_torch",
        "device": device_info,
        **machine_facts(torch, MPI),
        "model": "cifar-convnet",
        "input": list(IMAGE),
        "classes": CLASSES,
        "parameters": int(n_params),
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "tau": args.tau,
        "threads": args.threads if args.device == "cpu" else None,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "quick": args.quick,
        "primary_metric": primary,
        "parts_metric": "cpu" if args.device == "cpu" else "wall",
        "goal": "adapter overhead <= 3 % over plain PyTorch on the CPU",
        "variants": rows,
    }


def format_table(report: dict) -> str:
    dev = report["device"]
    where = f"{dev['name']}" + (f", {report['threads']} thread(s)" if report["threads"] else "")
    lines = [
        f"cifar-convnet ({report['parameters']:,d} parameters), batch {report['batch']}, "
        f"{report['steps']} steps x {report['repeats']} repeats, tau = {report['tau']} "
        f"({where}; torch {report['torch_version']})",
    ]
    metrics = ("cpu", "wall") if report["primary_metric"] == "cpu" else ("wall",)
    lines += timing_table(report["variants"], metrics)
    lines.append("")
    lines.append(
        f"where the time goes ({report['parts_metric']} time, one instrumented block, ms per step):"
    )
    for r in report["variants"]:
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["parts_ms_per_step"].items())
        lines.append(f"  {r['variant']:<9} {parts}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
