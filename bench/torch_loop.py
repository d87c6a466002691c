"""The user-loop face of bench/bench_torch.py (``--face loop``): a plain PyTorch loop against the
same loop with ``easgd_mpi.torch.ElasticAveraging`` (async EASGD, an exchange every τ steps),
on the paper's CIFAR convnet, in one run of two ranks (``mpiexec -n 2``; bench_torch.py starts
it so): rank 0 serves the center, rank 1 times the two variants.

Both variants are the same loop on the same pre-made batches with the same optimizer
(``torch.optim.SGD(lr, weight_decay)``): ``zero_grad()``, forward, cross-entropy,
``backward()``, ``optimizer.step()``; ``elastic`` adds ``elastic.step(loss=loss)``, which makes
every τ-th step an elastic exchange with the center through the real RMA window (the module's
parameters are views of the flat buffer: nothing is copied). As in the adapter face, each
repeat runs both variants for ``--steps`` timed steps (a multiple of τ, each ``elastic`` block
starting at an exchange step), after one untimed step, in alternating order; the table shows
the median over repeats of the mean time per step (process CPU time on the host, the
headline; and wall time) and the ratio to ``plain``. Writes
``bench/results/torch-loop-<device>.json`` by default.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

from benchlib import machine_facts, timing_rows, timing_table

VARIANTS = ("plain", "elastic")


def run_loop_face(args, image, classes, cpu_name) -> int:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch  # noqa: PLC0415

    import easgd_mpi.torch as et  # noqa: PLC0415
    from easgd_mpi.models.cifar_convnet import build_cifar_convnet  # noqa: PLC0415

    config = {
        "algorithm": "easgd",
        "tau": args.tau,
        "steps": 1 << 30,  # the benchmark ends the loop, not the budget
        "alpha": 0.5,
        "chunk": args.chunk,
        "threads": args.threads,
        "eval_interval": 3600.0,
        "checkpoint.interval": 0,
        "output": tempfile.mkdtemp(prefix="bench-torch-loop-"),
    }
    if args.device == "cpu":
        config["device"] = "off"
    run = et.init(config)
    if run.serves:
        run.serve()
        run.finish()
        shutil.rmtree(config["output"], ignore_errors=True)  # the run folder: nothing to keep
        return 0
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    dev = run.device
    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        (
            torch.randn(args.batch, *image, generator=gen).to(dev),
            torch.randint(0, classes, (args.batch,), generator=gen).to(dev),
        )
        for _ in range(max(args.steps, 2))
    ]

    def build():
        torch.manual_seed(args.seed)
        return build_cifar_convnet(torch, image[0], image[1], classes).to(dev)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    models = {"plain": build(), "elastic": build()}
    opts = {name: sgd(model) for name, model in models.items()}
    elastic = et.ElasticAveraging(models["elastic"], opts["elastic"], run)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    clock = {"plain": 0, "elastic": 0}

    def one_step(name, k):
        x, y = batches[k % len(batches)]
        model, opt = models[name], opts[name]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if name == "elastic":
            elastic.step(loss=loss)

    def run_steps(name, count, first_batch, align=False):
        t = clock[name]
        if align and t % args.tau:  # untimed steps up to the next exchange step
            for _ in range(args.tau - t % args.tau):
                one_step(name, first_batch)
                t += 1
        for k in range(count):
            one_step(name, first_batch + k)
        clock[name] = t + count

    for name in VARIANTS:  # warm-up: allocations, the first exchange (t = 0), caches
        run_steps(name, args.warmup, 0)
    times = {"wall": {n: [] for n in VARIANTS}, "cpu": {n: [] for n in VARIANTS}}
    for rep in range(args.repeats):
        for name in VARIANTS[rep % 2 :] + VARIANTS[: rep % 2]:
            run_steps(name, 1, rep * args.steps)
            run_steps(name, 0, 0, align=True)
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            run_steps(name, args.steps, rep * args.steps)
            sync()
            times["cpu"][name].append((time.process_time() - cpu) / args.steps)
            times["wall"][name].append((time.perf_counter() - wall) / args.steps)
            print(
                f"# repeat {rep + 1}/{args.repeats} {name:8s} wall "
                f"{1e3 * times['wall'][name][-1]:9.2f} ms/step, cpu "
                f"{1e3 * times['cpu'][name][-1]:9.2f} ms/step",
                file=sys.stderr,
                flush=True,
            )
    exchange_ms = _exchange_cost(elastic, run_steps, args, sync)
    exchanges = elastic._rule.exchanges
    n_params = elastic._binding.layout.size
    run.finish()
    report = _report(args, torch, dev, cpu_name, image, n_params, times, exchanges, exchange_ms)
    print(format_loop_table(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


def _exchange_cost(elastic, run_steps, args, sync) -> float:
    """ms per exchange (RMA + kernel), from one instrumented block of the elastic loop."""
    rule = elastic._rule
    spent = []
    exchange = rule._exchange

    def timed(kernel):
        sync()
        start = time.process_time() if args.device == "cpu" else time.perf_counter()
        exchange(kernel)
        sync()
        spent.append((time.process_time() if args.device == "cpu" else time.perf_counter()) - start)

    rule._exchange = timed
    try:
        run_steps("elastic", args.steps, 0, align=True)
    finally:
        del rule._exchange
    return 1e3 * statistics.median(spent) if spent else float("nan")


def _report(args, torch, dev, cpu_name, image, n_params, times, exchanges, exchange_ms) -> dict:
    from mpi4py import MPI  # noqa: PLC0415

    primary = "cpu" if args.device == "cpu" else "wall"
    rows = timing_rows(times, VARIANTS, ("wall", "cpu") if args.device == "cpu" else ("wall",))
    device = (
        {"kind": "cpu", "name": cpu_name(), "cores": os.cpu_count(), "threads": args.threads}
        if dev.type == "cpu"
        else {"kind": "gpu", "name": torch.cuda.get_device_name(dev), "cpu": cpu_name()}
    )
    return {
        "benchmark": "bench_torch",
        "face": "loop",
        "device": device,
        **machine_facts(torch, MPI),
        "model": "cifar-convnet",
        "input": list(image),
        "parameters": int(n_params),
        "batch": args.batch,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "tau": args.tau,
        "threads": args.threads if dev.type == "cpu" else None,
        "optimizer": f"SGD(lr={args.lr}, weight_decay={args.weight_decay})",
        "quick": args.quick,
        "primary_metric": primary,
        "goal": "elastic <= 1.03 x plain per-step time on the CPU",
        "exchanges": int(exchanges),
        "exchange_ms": exchange_ms,
        "variants": rows,
    }


def format_loop_table(report: dict) -> str:
    dev = report["device"]
    where = f"{dev['name']}" + (f", {report['threads']} thread(s)" if report["threads"] else "")
    lines = [
        f"your own loop: cifar-convnet ({report['parameters']:,d} parameters), batch "
        f"{report['batch']}, {report['optimizer']}, {report['steps']} steps x "
        f"{report['repeats']} repeats, tau = {report['tau']} ({where}; torch "
        f"{report['torch_version']})",
    ]
    metrics = ("cpu", "wall") if report["primary_metric"] == "cpu" else ("wall",)
    lines += timing_table(report["variants"], metrics)
    lines.append(
        f"one exchange (RMA + kernel, {report['primary_metric']} time): "
        f"{report['exchange_ms']:.2f} ms, every {report['tau']} steps"
    )
    return "\n".join(lines)
