"""A user's own PyTorch loop (easgd_mpi.torch) as the CLI tests launch it:

    mpiexec -n P python own_loop_train.py RUN_DIR [--resume SPEC] [--warm-start SPEC]
        [--delay SECONDS] [--optimizer adamw|sgd] [--wide] [KEY=VALUE ...]

A small MLP with BatchNorm (buffers, and an integer buffer) on a fixed synthetic set; AdamW
with a one-cycle schedule and a gradient scaler (bf16 autocast on the CPU), gradient clipping,
a DataLoader over ``run.sampler`` (with its own generator), a registered dict. Each worker
appends the sample indices of every step it trains on to ``RUN_DIR/indices-<worker>.txt`` and
records where its model starts in ``RUN_DIR/start-<worker>.npy``; ``--delay`` sleeps after
each step (the math untouched), so checkpoints and signals fall mid-run; ``--wide`` builds
another model (16 → 24 hidden).
"""

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import easgd_mpi.torch as et

# 128 samples per worker in batches of 12: 11 steps per epoch, so the stops that the
# synchronous rules agree on every 16 steps fall inside epochs.
SAMPLES, FEATURES, BATCH = 256, 8, 12


def parse(argv):
    options = {"resume": None, "warm-start": None, "delay": "0", "optimizer": "adamw"}
    flags, keys = set(), {}
    args = list(argv)
    run_dir = args.pop(0)
    while args:
        head = args.pop(0)
        if head in ("--wide",):
            flags.add(head[2:])
        elif head.startswith("--"):
            options[head[2:]] = args.pop(0)
        else:
            key, _, value = head.partition("=")
            keys[key] = value
    return run_dir, options, flags, keys


def data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return TensorDataset(x, y, torch.arange(SAMPLES))


def build(wide: bool):
    torch.manual_seed(11)
    hidden = 24 if wide else 16
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, hidden),
        torch.nn.BatchNorm1d(hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 2),
    )


def main():
    run_dir, options, flags, keys = parse(sys.argv[1:])
    config = {"run_dir": run_dir, "eval_interval": 0.05, **keys}
    run = et.init(config, resume=options["resume"], warm_start=options["warm-start"])
    dataset = data()
    if run.serves:
        model = build("wide" in flags)
        x, y, _ = dataset.tensors

        def evaluate(state):
            model.load_state_dict(state)
            model.eval()
            with torch.no_grad():
                out = model(x)
            return {
                "loss": F.cross_entropy(out, y).item(),
                "error": (out.argmax(1) != y).float().mean().item(),
            }

        run.serve(evaluate=evaluate)
        run.finish()
        return
    model = build("wide" in flags).to(run.device)
    if options["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    # A schedule longer than any budget here, so a resume may raise ``steps``.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=1000)
    device = run.device  # a worker's GPU where it has one
    scaler = torch.amp.GradScaler(device.type)
    elastic = et.ElasticAveraging(model, opt, run, schedulers=sched, scaler=scaler)
    seen = {"batches": 0}
    elastic.register("seen", seen)
    out = Path(run_dir)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    np.save(out / f"start-{run.worker}.npy", start.cpu().numpy())
    # The loader's own generator: each iter(loader) draws a seed from it, not from PyTorch's
    # global generator, which the worker's state holds (a resumed epoch starts its iterator at
    # another point of the stream than the uninterrupted run did).
    loader = DataLoader(
        dataset,
        batch_size=BATCH,
        sampler=run.sampler(dataset),
        generator=torch.Generator().manual_seed(run.worker),
    )
    delay = float(options["delay"])
    with open(out / f"indices-{run.worker}.txt", "a") as log:
        for epoch in run.epochs():
            for x, y, index in loader:
                log.write(f"{epoch}:{','.join(str(int(i)) for i in index)}\n")
                log.flush()
                x, y = x.to(device), y.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(opt)
                scaler.update()
                sched.step()
                seen["batches"] += 1
                elastic.step(loss=loss, lr=sched.get_last_lr()[0])
                if delay:
                    time.sleep(delay)
                if run.should_stop:
                    break
    run.finish()


main()
