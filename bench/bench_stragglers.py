#!/usr/bin/env python3
"""Stragglers: what asynchrony buys when one worker is slow.

p workers train the digits MLP; every worker's gradient takes ``--step-time`` seconds, except
the first worker's, which takes k times as long (k = 1, 2, 4). The delay is injected by a
problem wrapper around the built-in problem (a sleep before each gradient; the math is
untouched), not by a product setting. Each (algorithm, k) is a real launch of
``mpiexec -n p+1`` running :func:`easgd_mpi.train` for a fixed wall time, stopped by SIGUSR1 on
the master as a scheduler would stop it. From the run's metrics.jsonl:

- aggregate worker steps per second (the slope of total steps over the run, after a warm-up);
- its ratio to the same algorithm with k = 1, next to the expectation: an asynchronous rule
  keeps the fast workers going, (p − 1 + 1/k)/p of its throughput; a synchronous one moves at
  the slowest worker's pace, 1/k;
- the center's held-out error at the same wall time for every run.

The sleeps dominate the step (10 ms against ~0.3 ms of MLP math), so the ratios hold on an
oversubscribed 2-core machine as on a real node: sleeping ranks leave the cores free.

    python bench/bench_stragglers.py                 # p = 4, k ∈ {1, 2, 4}, 8 s per run
    python bench/bench_stragglers.py --quick         # a smoke run (about a minute)

``--ratios 1,1.3,2.6,5.7`` (one factor per worker, a published async-DiLoCo setting) replaces
the single slow worker: every algorithm runs once with all workers at ``--step-time`` and once
with worker i at ratio_i × ``--step-time``, and the report adds the wall time to each of
``--targets`` and the fastest worker's own step rate in both runs (each worker counts its
gradients and writes them at exit): with sleeps that dominate the step it must not rise when
the others slow down, or the sharing of the cores is what the result shows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import launcher

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = ("easgd", "eamsgd", "sync-easgd", "allreduce-sgd")
SYNCHRONOUS = ("sync-easgd", "allreduce-sgd", "localsgd", "diloco")
#: Settings per algorithm (as bench_convergence: EAMSGD with δ = 0.9 and η = 0.01; local SGD
#: with the same Nesterov step; DiLoCo with plain SGD inside, docs/STABILITY.md §7).
SETTINGS = {
    "eamsgd": {"momentum": 0.9, "lr": 0.01},
    "localsgd": {"momentum": 0.9, "lr": 0.01},
    "mdownpour": {"momentum": 0.9, "lr": 0.01},
}
#: Seconds between the launch and the stop beyond the measured window (MPI start-up, data).
START_MARGIN = 4.0
#: Seconds at the start of a run left out of the throughput slope.
WARM_UP = 0.5


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4, help="p (default 4)")
    ap.add_argument("--slowdowns", default="1,2,4", help="k values (default 1,2,4)")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--seconds", type=float, default=8.0, help="measured wall time per run")
    ap.add_argument("--step-time", type=float, default=0.01, help="s per gradient (default 10 ms)")
    ap.add_argument("--tau", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="k ∈ {1, 4}, 3 s per run")
    ap.add_argument("--ratios", default="", help="per-worker step-time factors, e.g. 1,1.3,2.6,5.7")
    ap.add_argument("--targets", default="0.1,0.05,0.03", help="center errors for --ratios")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "stragglers.json"))
    # Internal: one run inside mpiexec.
    ap.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--algorithm", help=argparse.SUPPRESS)
    ap.add_argument("--slowdown", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--factors", default="", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.slowdowns, args.seconds = "1,4", 3.0
    return args


# ---- inside one launch ---------------------------------------------------------------------
def run_inside_mpi(args) -> int:
    from mpi4py import MPI

    import easgd_mpi as ea

    rank = MPI.COMM_WORLD.Get_rank()
    delay = args.step_time * (args.slowdown if rank == 1 else 1.0)  # world rank 1: worker 0
    if args.factors:  # one factor per worker (world rank i + 1)
        factors = [float(f) for f in args.factors.split(",")]
        delay = args.step_time * (factors[rank - 1] if rank >= 1 else 1.0)
    counted = {"steps": 0, "first": None, "last": None}

    def write_count():
        if rank >= 1 and counted["first"] is not None:
            path = Path(args.run_dir) / f"worker-rank{rank}.json"
            path.write_text(json.dumps({"rank": rank, "delay": delay, **counted}))

    class Straggling:
        """The built-in problem, with a sleep before every gradient of this rank."""

        def __init__(self, cfg, xp):
            self.inner = ea.make_problem(cfg, xp)
            self.layout = self.inner.layout

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def loss_and_grad(self, x, batch, g):
            time.sleep(delay)
            now = time.monotonic()
            counted["steps"] += 1
            counted["first"] = counted["first"] or now
            counted["last"] = now
            return self.inner.loss_and_grad(x, batch, g)

    overrides = {
        "algorithm": args.algorithm,
        "tau": args.tau,
        "steps": 10**9,
        "eval_interval": 0.25,
        "checkpoint.interval": 0,
        "run_dir": args.run_dir,
        "threads": 1,
        **SETTINGS.get(args.algorithm, {}),
    }
    cfg = ea.Config.from_toml(None, overrides=overrides, environ={})
    if rank == 0:  # the master stops the run as a scheduler's signal would
        timer = threading.Timer(
            args.seconds + START_MARGIN, lambda: os.kill(os.getpid(), signal.SIGUSR1)
        )
        timer.daemon = True
        timer.start()
    logging.getLogger("easgd_mpi").setLevel(logging.WARNING)  # the table is the output
    ea.train(cfg, problem=Straggling)
    write_count()
    return 0


# ---- the driver ----------------------------------------------------------------------------


def run_one(args, algorithm: str, k: float, runs: Path, factors: str = "") -> dict:
    run_dir = runs / f"{algorithm}-k{k:g}{'-ratios' if factors else ''}"
    cmd = [
        launcher(),
        "-n",
        str(args.workers + 1),
        sys.executable,
        str(Path(__file__).resolve()),
        "--run",
        "--algorithm",
        algorithm,
        "--slowdown",
        str(k),
        "--run-dir",
        str(run_dir),
        "--seconds",
        str(args.seconds),
        "--step-time",
        str(args.step_time),
        "--tau",
        str(args.tau),
        "--factors",
        factors,
    ]
    env = {key: v for key, v in os.environ.items() if not key.startswith("EASGD_")}
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        timeout=args.seconds + START_MARGIN + 120,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{algorithm} k={k:g} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row = measure(records, args.seconds) | {"algorithm": algorithm, "slowdown": k}
    if factors:
        row["factors"] = factors
        row["time_to"] = {
            t: next((r["time"] for r in records if r["center_error"] <= t), None)
            for t in (float(x) for x in args.targets.split(","))
        }
    counts = [json.loads(f.read_text()) for f in sorted(run_dir.glob("worker-rank*.json"))]
    fastest = min(counts, key=lambda c: c["delay"]) if counts else None
    if fastest and fastest["last"] > fastest["first"]:
        row["fastest_worker_steps_per_s"] = fastest["steps"] / (fastest["last"] - fastest["first"])
    return row


def measure(records: list[dict], seconds: float) -> dict:
    """Throughput (least-squares slope of total steps over time, warm-up left out) and the
    center's error at ``seconds`` (the last evaluation at or before it)."""
    window = [r for r in records if WARM_UP <= r["time"] <= seconds]
    if len(window) < 3:
        raise SystemExit(
            f"only {len(window)} evaluations between {WARM_UP}s and {seconds}s: the run "
            f"started too slowly (raise START_MARGIN)"
        )
    ts = [r["time"] for r in window]
    ss = [r["steps"] for r in window]
    mt, ms = sum(ts) / len(ts), sum(ss) / len(ss)
    slope = sum((t - mt) * (s - ms) for t, s in zip(ts, ss, strict=True)) / sum(
        (t - mt) ** 2 for t in ts
    )
    at = window[-1]
    return {
        "steps_per_s": slope,
        "error_at": at["time"],
        "center_error": at["center_error"],
        "center_loss": at["center_loss"],
        "steps_at": at["steps"],
    }


def expected_ratio(algorithm: str, k: float, p: int) -> float:
    return 1.0 / k if algorithm in SYNCHRONOUS else (p - 1 + 1.0 / k) / p


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run:
        return run_inside_mpi(args)
    algorithms = [a for a in args.algorithms.split(",") if a]
    slowdowns = [float(k) for k in args.slowdowns.split(",")]
    if 1.0 not in slowdowns:
        slowdowns.insert(0, 1.0)  # the baseline every ratio is taken against
    rows = []
    if args.ratios:
        return _heterogeneous(args, algorithms)
    with tempfile.TemporaryDirectory(prefix="easgd-stragglers-") as tmp:
        for algorithm in algorithms:
            base = None
            for k in slowdowns:
                row = run_one(args, algorithm, k, Path(tmp))
                base = row["steps_per_s"] if k == 1.0 else base
                row["ratio"] = row["steps_per_s"] / base
                row["expected_ratio"] = expected_ratio(algorithm, k, args.workers)
                rows.append(row)
                print(_format(row), flush=True)
    report = {
        "benchmark": "stragglers",
        "workers": args.workers,
        "tau": args.tau,
        "step_time_s": args.step_time,
        "seconds": args.seconds,
        "model": "digits MLP (built-in defaults)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"\n{_table(rows, args)}\nwrote {out}")
    return 0


def _heterogeneous(args, algorithms) -> int:
    """Every algorithm with all workers alike, then with the per-worker ``--ratios``."""
    rows = []
    equal = ",".join(["1"] * args.workers)
    with tempfile.TemporaryDirectory(prefix="easgd-stragglers-") as tmp:
        for algorithm in algorithms:
            for name, factors in (("equal", equal), ("ratios", args.ratios)):
                row = run_one(args, algorithm, 1.0, Path(tmp) / name, factors)
                row["setting"] = name
                rows.append(row)
                times = ", ".join(
                    f"≤{100 * float(t):g}%: " + ("—" if v is None else f"{v:.1f}s")
                    for t, v in row["time_to"].items()
                )
                print(
                    f"{algorithm:<14} {name:<6} {row['steps_per_s']:7.1f} steps/s, fastest "
                    f"worker {row.get('fastest_worker_steps_per_s', float('nan')):6.1f}/s, "
                    f"error {100 * row['center_error']:.2f}% at {row['error_at']:.1f}s; {times}",
                    flush=True,
                )
    report = {
        "benchmark": "stragglers (per-worker ratios)",
        "workers": args.workers,
        "ratios": args.ratios,
        "tau": args.tau,
        "step_time_s": args.step_time,
        "seconds": args.seconds,
        "targets": args.targets,
        "model": "digits MLP (built-in defaults)",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def _format(row: dict) -> str:
    return (
        f"{row['algorithm']:<14} k={row['slowdown']:<3g} {row['steps_per_s']:8.1f} steps/s  "
        f"ratio {row['ratio']:.2f} (expected {row['expected_ratio']:.2f})  "
        f"center error {100 * row['center_error']:.2f}% at {row['error_at']:.1f}s"
    )


def _table(rows: list[dict], args) -> str:
    lines = [
        f"p = {args.workers}, tau = {args.tau}, {1000 * args.step_time:g} ms per gradient, "
        f"the first worker k times slower; center error at {args.seconds:g} s",
        "| algorithm | k | worker steps/s | ratio to k = 1 | expected | center error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['algorithm']} | {r['slowdown']:g} | {r['steps_per_s']:.1f} | "
            f"{r['ratio']:.2f} | {r['expected_ratio']:.2f} | {100 * r['center_error']:.2f} % |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
