#!/usr/bin/env python3
"""Convergence: EASGD, EAMSGD, sync EASGD, DOWNPOUR and all-reduce SGD, as in the paper.

For p workers and each τ, every algorithm trains the same problem (default: the digits MLP)
for the same budget of worker steps, with several seeds. Each run is a real launch,
``mpiexec -n p+1 python -m easgd_mpi train --set ...`` (the mpiexec next to this Python), and
is read back from its metrics.jsonl: the center's test error against worker steps and against
wall time, and the bytes the workers communicated. Prints a table (mean ± sd over seeds),
writes JSON and figures (PNG, via ``easgd_mpi.plot``).

    python bench/bench_convergence.py                      # p = 4, τ ∈ {1, 4, 16, 64}, 2 seeds
    python bench/bench_convergence.py --quick              # a smoke run (seconds)
    python bench/bench_convergence.py --set data.name=synthetic --set model.hidden=[32]
    python bench/bench_convergence.py --set eamsgd:momentum=0.99 --set eamsgd:lr=0.001

``--set KEY=VALUE`` goes to every run; ``--set ALGORITHM:KEY=VALUE`` to that algorithm's runs
only (after its defaults below). Wall times are from one oversubscribed node unless you launch
on more cores: compare them as ratios within one run of this script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALGORITHMS = ("easgd", "eamsgd", "sync-easgd", "downpour", "allreduce-sgd")
#: Per-algorithm settings on top of the shared ones. EAMSGD gets δ = 0.9 and η = 0.01, an
#: effective step η/(1 − δ) = 0.1, twice the plain methods' η (``--set eamsgd:momentum=0.99``
#: gives the paper's δ); β = 0.9 (the paper's) is the default for the elastic ones.
DEFAULTS = {
    "easgd": {},
    "eamsgd": {"momentum": "0.9", "lr": "0.01"},
    "sync-easgd": {},
    "downpour": {},
    "allreduce-sgd": {},
}
SHARED = {"lr": "0.05", "batch_size": "128", "eval_interval": "0.25"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", "-p", type=int, default=4)
    ap.add_argument("--taus", default="1,4,16,64", help="comma-separated τ values")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument("--seeds", type=int, default=2, help="seeds per configuration (0, 1, ...)")
    ap.add_argument("--steps", type=int, default=3000, help="local steps per worker")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="[ALGORITHM:]KEY=VALUE",
        help="passed to the runs; repeatable",
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "convergence.json"))
    ap.add_argument(
        "--figures",
        default=None,
        help="folder for the PNGs (default: next to --out; 'none' for no figures)",
    )
    ap.add_argument(
        "--runs-dir",
        default=None,
        help="keep the run folders here (default: a temporary folder, removed)",
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke configuration: p = 2, τ ∈ {1, 8}, 1 seed, 150 steps",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.workers, args.taus, args.seeds, args.steps = 2, "1,8", 1, 150
    args.taus = [int(t) for t in str(args.taus).split(",") if t.strip()]
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in args.algorithms if a not in ALGORITHMS]
    if unknown or args.workers < 1 or args.seeds < 1 or args.steps < 1 or not args.taus:
        ap.error(f"bad --algorithms/--workers/--seeds/--steps/--taus ({unknown or 'range'})")
    return args


def split_overrides(pairs):
    """Shared and per-algorithm ``--set`` values."""
    shared, per = {}, {a: {} for a in ALGORITHMS}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects [ALGORITHM:]KEY=VALUE, got {pair!r}")
        algorithm, colon, key = key.partition(":")
        if colon:
            if algorithm not in per:
                raise SystemExit(f"--set {pair!r}: unknown algorithm {algorithm!r}")
            per[algorithm][key.strip()] = value.strip()
        else:
            shared[algorithm.strip()] = value.strip()
    return shared, per


def launcher() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        raise SystemExit("no mpiexec next to this Python or on PATH")
    return found


def run_one(args, algorithm, tau, seed, settings, runs_dir) -> dict:
    """Launch one training run and read its metrics back."""
    run_dir = runs_dir / f"{algorithm}-tau{tau}-seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    values = {
        **SHARED,
        **DEFAULTS[algorithm],
        **settings["shared"],
        **settings[algorithm],
        "algorithm": algorithm,
        "tau": str(tau),
        "seed": str(seed),
        "steps": str(args.steps),
        "run_dir": str(run_dir),
    }
    cmd = [
        launcher(),
        "-n",
        str(args.workers + 1),
        sys.executable,
        "-m",
        "easgd_mpi",
        "train",
        "--quiet",
    ]
    for key, value in values.items():
        cmd += ["--set", f"{key}={value}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASGD_")}
    env["PYTHONUNBUFFERED"] = "1"
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=args.timeout,
            stdin=subprocess.DEVNULL,
        )
        code, stderr = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        code, stderr = 124, f"timed out after {args.timeout:.0f}s"
    launch_time = time.monotonic() - start
    records = read_records(run_dir / "metrics.jsonl")
    result = {
        "algorithm": algorithm,
        "tau": tau,
        "seed": seed,
        "returncode": code,
        "launch_time": round(launch_time, 2),
        "run_dir": str(run_dir),
        "settings": {k: v for k, v in values.items() if k != "run_dir"},
        "curve": [
            [r.get("time"), r.get("steps"), r.get("center_error"), r.get("center_loss")]
            for r in records
        ],
    }
    result.update(summarize(records, args.steps * args.workers))
    if code != 0:
        result["error"] = (stderr.strip().splitlines() or ["?"])[-1][:300]
    return result


def read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def summarize(records: list[dict], budget: int) -> dict:
    """Final and best center error, wall time and bytes of one run; diverged if not finite."""
    if not records:
        return {
            "final_error": None,
            "best_error": None,
            "time": None,
            "bytes": None,
            "steps": 0,
            "diverged": True,
        }
    last = records[-1]
    errors = [r["center_error"] for r in records if _finite(r.get("center_error"))]
    diverged = not (_finite(last.get("center_loss")) and _finite(last.get("center_error")))
    return {
        "final_error": last.get("center_error") if not diverged else None,
        "best_error": min(errors) if errors else None,
        "final_loss": last.get("center_loss") if not diverged else None,
        "time": last.get("time"),
        "bytes": last.get("bytes"),
        "steps": last.get("steps"),
        "complete": last.get("steps") == budget,
        "diverged": diverged,
    }


def aggregate(results: list[dict]) -> list[dict]:
    """Mean ± sd over seeds per (algorithm, τ); diverged runs count as error 1 in the mean."""
    rows = []
    keys = sorted(
        {(r["algorithm"], r["tau"]) for r in results}, key=lambda k: (ALGORITHMS.index(k[0]), k[1])
    )
    for algorithm, tau in keys:
        group = [r for r in results if r["algorithm"] == algorithm and r["tau"] == tau]
        row = {
            "algorithm": algorithm,
            "tau": tau,
            "runs": len(group),
            "diverged": sum(1 for r in group if r["diverged"] or r["returncode"] != 0),
        }
        for key, missing in (
            ("final_error", 1.0),
            ("best_error", 1.0),
            ("time", None),
            ("bytes", None),
        ):
            values = [r[key] if _finite(r.get(key)) else missing for r in group]
            values = [v for v in values if v is not None]
            row[key] = statistics.fmean(values) if values else None
            row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def _pm(mean, sd, fmt) -> str:
    return "—" if mean is None else f"{fmt(mean)} ± {fmt(sd)}"


def format_table(rows: list[dict]) -> str:
    pct = lambda v: f"{100 * v:5.2f}%"  # noqa: E731
    sec = lambda v: f"{v:5.1f}s"  # noqa: E731
    mb = lambda v: f"{v / 1e6:7.1f}"  # noqa: E731
    header = (
        f"| {'algorithm':<13} | {'τ':>3} | {'final error':>17} | {'best error':>17} | "
        f"{'time':>15} | {'MB sent+received':>18} | diverged |"
    )
    lines = [header, "|" + "|".join("-" * (len(c) + 0) for c in header.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(
            f"| {r['algorithm']:<13} | {r['tau']:>3} | "
            f"{_pm(r['final_error'], r['final_error_sd'], pct):>17} | "
            f"{_pm(r['best_error'], r['best_error_sd'], pct):>17} | "
            f"{_pm(r['time'], r['time_sd'], sec):>15} | "
            f"{_pm(r['bytes'], r['bytes_sd'], mb):>18} | "
            f"{r['diverged']}/{r['runs']:<6} |"
        )
    return "\n".join(lines)


def make_figures(results, folder: Path, stem: str) -> list[str]:
    """One figure per τ (every algorithm, first seed) and the final error against τ."""
    try:
        from easgd_mpi.plot import PlotError, load_run, plot_runs
    except ImportError:
        return []
    written = []
    first_seed = min(r["seed"] for r in results)
    for tau in sorted({r["tau"] for r in results}):
        runs = []
        for r in results:
            if r["tau"] == tau and r["seed"] == first_seed:
                try:
                    runs.append(load_run(r["run_dir"]))
                except PlotError:
                    continue
        if runs:
            try:
                path = plot_runs(
                    runs,
                    folder / f"{stem}-tau{tau}.png",
                    title=f"center on held-out data, τ = {tau}, seed {first_seed}",
                )
                written.append(str(path))
            except PlotError as exc:
                print(f"figure for τ = {tau} skipped: {exc}", file=sys.stderr)
    written.extend(_error_vs_tau(results, folder / f"{stem}-final-error.png"))
    return written


def _error_vs_tau(results, path: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = aggregate(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algorithm in ALGORITHMS:
        mine = [r for r in rows if r["algorithm"] == algorithm]
        if mine:
            ax.errorbar(
                [r["tau"] for r in mine],
                [100 * r["final_error"] for r in mine],
                yerr=[100 * r["final_error_sd"] for r in mine],
                marker="o",
                capsize=3,
                label=algorithm,
            )
    ax.set_xscale("log", base=2)
    taus = sorted({r["tau"] for r in rows})
    ax.set_xticks(taus, [str(t) for t in taus])
    ax.set_yscale("log")
    ax.set_xlabel("communication period τ")
    ax.set_ylabel("final center test error (%), mean ± sd")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [str(path)]


def main(argv=None) -> int:
    args = parse_args(argv)
    shared, per = split_overrides(args.overrides)
    settings = {"shared": shared, **per}
    out = Path(args.out)
    temporary = args.runs_dir is None
    runs_dir = Path(tempfile.mkdtemp(prefix="easgd-conv-")) if temporary else Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = []
    total = len(args.algorithms) * len(args.taus) * args.seeds
    try:
        for tau in args.taus:
            for algorithm in args.algorithms:
                for seed in range(args.seeds):
                    r = run_one(args, algorithm, tau, seed, settings, runs_dir)
                    results.append(r)
                    status = "diverged" if r["diverged"] else f"{100 * r['final_error']:.2f}%"
                    if r["returncode"] != 0:
                        status += f" (exit {r['returncode']}: {r.get('error', '')})"
                    print(
                        f"[{len(results):>3}/{total}] {algorithm:<13} τ={tau:<3} seed {seed}: "
                        f"{status}, {r['time'] or 0:.1f}s",
                        flush=True,
                    )
        rows = aggregate(results)
        figures = []
        if args.figures is None or args.figures.lower() != "none":
            folder = Path(args.figures) if args.figures else out.parent
            figures = make_figures(results, folder, out.stem)
    finally:
        if temporary:
            shutil.rmtree(runs_dir, ignore_errors=True)
    table = format_table(rows)
    print()
    print(
        f"p = {args.workers} workers, {args.steps} steps per worker, {args.seeds} seed(s); "
        f"mean ± sd over seeds (a diverged run counts as error 100%)"
    )
    print(table)
    report = {
        "benchmark": "convergence",
        "workers": args.workers,
        "taus": args.taus,
        "algorithms": args.algorithms,
        "seeds": args.seeds,
        "steps_per_worker": args.steps,
        "shared_settings": {**SHARED, **shared},
        "algorithm_settings": {a: {**DEFAULTS[a], **per[a]} for a in args.algorithms},
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "total_time": round(time.monotonic() - started, 1),
        "summary": rows,
        "runs": results,
        "figures": figures,
        "table": table,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {out}" + (f" and {len(figures)} figure(s)" if figures else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
