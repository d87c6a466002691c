#!/usr/bin/env python3
"""Compressed pushes: which block size and which rounding (docs/PERFORMANCE.md).

Real pushes are recorded first: two async EASGD (or EAMSGD) workers of the paper's CIFAR
convnet take turns on the synthetic CIFAR-format set of bench_convergence.py (in one process,
through the package's own rule classes and an in-memory center), and every elastic difference
e a worker hands to its exchange is kept as it is, uncompressed. Then, on that sequence:

- **block size** (int8, nearest): the error of coding one push, ‖Q(e) − e‖ / ‖e‖, averaged over
  the pushes, against the bytes per element, 1 + 4/B (one byte per code, a float32 scale per
  block of B);
- **codec, rounding and error feedback** (B = 256): int8 with round half to even, int8 with
  stochastic rounding (unbiased: floor(y + u), u uniform), FP8 E4M3 (round half to even), each
  with and without error feedback, replayed over the whole sequence of one worker's pushes:
  how far the sum of what reached the center is from the sum of the pushes,
  ‖Σ d − Σ e‖ / ‖Σ e‖, and the share of elements the center never saw move (|Σ d| = 0 where
  Σ e ≠ 0);
- the NumPy coder's time per push.

Open loop: the pushes come from an uncompressed run; how compression changes training itself
is bench_convergence.py --compress.

    python bench/bench_compress.py                  # 2 × 300 steps, τ = 4 (a minute or two)
    python bench/bench_compress.py --quick          # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench_convergence import SYNTHETIC, SYNTHETIC_FOLDER, ensure_synthetic_cifar
from easgd_mpi.algorithms import make_algorithm
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.config import Config
from easgd_mpi.data.sampling import worker_rng
from easgd_mpi.models import make_problem

REPO = Path(__file__).resolve().parents[1]
BLOCKS = (32, 64, 128, 256, 1024, 4096, 65536)
CHOSEN_BLOCK = 256
VARIANTS = (("int8", "nearest"), ("int8", "stochastic"), ("fp8", "nearest"))


class MemoryCenter:
    """The center as one host array, with CenterWindow's exchange/read, recording each push."""

    def __init__(self, initial):
        self.value = np.array(initial, dtype=np.float32)
        self.n = self.chunk = self.value.size
        self.pushes: list[np.ndarray] = []

    def exchange(self, compute):
        c = self.value.copy()
        e = np.empty_like(c)
        finish = compute(0, self.n, c, e)
        if finish is not None:
            finish()
        self.value += e
        self.pushes.append(e.copy())
        return 8 * self.n

    def read(self, out):
        out[...] = self.value


def record_pushes(args) -> tuple[list[list[np.ndarray]], dict]:
    """Every push of each of two workers (uncompressed), in the order they were made."""
    folder = ensure_synthetic_cifar(Path(args.data_cache), dict(SYNTHETIC))
    cfg = Config()
    values = {
        "algorithm": args.algorithm,
        "model.name": "cifar-convnet",
        "data.name": "cifar10",
        "data.path": str(folder),
        "data.crop": 16,
        "batch_size": 8,
        "lr": 0.05 if args.algorithm == "easgd" else 0.002,
        "momentum": 0.0 if args.algorithm == "easgd" else 0.99,
        "weight_decay": 1e-4,
        "tau": args.tau,
        "steps": args.steps,
    }
    for key, value in values.items():
        cfg.set(key, value)
    cfg.validate(workers=2)
    problems = [make_problem(cfg) for _ in range(2)]
    x0 = problems[0].layout.zeros()
    problems[0].init_params(x0, cfg.seed)
    center = MemoryCenter(x0)
    alpha = cfg.resolve_alpha(2)
    backend = NumpyBackend()
    workers = []
    for i, prob in enumerate(problems):
        algo = make_algorithm(cfg, prob, backend, center, alpha, worker_rng(cfg.seed, i))
        algo.pull_center()
        workers.append(algo)
    per_worker: list[list[np.ndarray]] = [[], []]
    started = time.monotonic()
    for t in range(cfg.steps):
        for i, algo in enumerate(workers):
            before = len(center.pushes)
            algo.step(t)
            per_worker[i].extend(center.pushes[before:])
            del center.pushes[before:]
    center_error = problems[0].evaluate(center.value)["error"]
    about = {
        "settings": values,
        "parameters": int(x0.size),
        "pushes_per_worker": len(per_worker[0]),
        "record_seconds": round(time.monotonic() - started, 1),
        "center_error_after": round(float(center_error), 4),
    }
    return per_worker, about


def _stochastic_int8(v, r, block, rng):
    """int8 with stochastic rounding (unbiased), the same scale as the kernels: for comparison
    only, in NumPy (the package's coder rounds to nearest)."""
    n = v.size
    x = v + r if r is not None else v.copy()
    nb = -(-n // block)
    pad = np.zeros(nb * block, np.float32)
    pad[:n] = np.abs(x)
    s = pad.reshape(nb, block).max(axis=1) / np.float32(127)
    s_each = np.repeat(s, block)[:n]
    y = np.divide(x, s_each, out=np.zeros(n, np.float32), where=s_each > 0)
    q = np.clip(np.floor(y + rng.random(n, dtype=np.float32)), -127, 127)
    d = (q * s_each).astype(np.float32)
    if r is not None:
        r[...] = x - d
    return d


def code(backend, codec, rounding, e, r, block, rng):
    """The push e coded (what the center receives); r updated in place when given."""
    if rounding == "stochastic":
        return _stochastic_int8(e, r, block, rng)
    d = e.copy()
    codes = np.empty(e.size, np.uint8)
    scales = np.empty(-(-e.size // block), np.float32)
    backend.compress(d, r, codes, scales, codec, block)
    return d


def block_sweep(backend, pushes) -> list[dict]:
    rows = []
    for block in BLOCKS:
        errs = []
        for e in pushes:
            norm = float(np.linalg.norm(e))
            if norm == 0:
                continue
            d = code(backend, "int8", "nearest", e, None, block, None)
            errs.append(float(np.linalg.norm(d - e)) / norm)
        rows.append(
            {
                "block": block,
                "bytes_per_element": 1 + 4 / block,
                "reduction_vs_float32": 4 / (1 + 4 / block),
                "push_error_mean": float(np.mean(errs)),
                "push_error_max": float(np.max(errs)),
            }
        )
    return rows


def replay(backend, pushes) -> list[dict]:
    rows = []
    total = np.zeros(pushes[0].size)
    for e in pushes:
        total += e
    moved = total != 0
    for codec, rounding in VARIANTS:
        for feedback in (True, False):
            rng = np.random.default_rng(0)
            r = np.zeros(pushes[0].size, np.float32) if feedback else None
            reached = np.zeros(pushes[0].size)
            for e in pushes:
                reached += code(backend, codec, rounding, e, r, CHOSEN_BLOCK, rng)
            rows.append(
                {
                    "codec": codec,
                    "rounding": rounding,
                    "error_feedback": feedback,
                    "sum_error": float(np.linalg.norm(reached - total) / np.linalg.norm(total)),
                    "never_moved": float(np.mean(moved & (reached == 0))),
                    "residual_norm": None
                    if r is None
                    else float(np.linalg.norm(r) / np.linalg.norm(total)),
                }
            )
    return rows


def coder_time(backend, e) -> dict:
    out = {}
    for codec in ("int8", "fp8"):
        r = np.zeros_like(e)
        best = float("inf")
        for _ in range(5):
            d = e.copy()
            started = time.perf_counter()
            code(backend, codec, "nearest", d, r, CHOSEN_BLOCK, None)
            best = min(best, time.perf_counter() - started)
        out[codec] = round(best * 1e3, 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--algorithm", choices=("easgd", "eamsgd"), default="easgd")
    ap.add_argument("--tau", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300, help="local steps per worker")
    ap.add_argument("--data-cache", default=str(SYNTHETIC_FOLDER))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "compress.json"))
    ap.add_argument("--quick", action="store_true", help="40 steps per worker")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = 40
    backend = NumpyBackend()
    per_worker, about = record_pushes(args)
    pushes = [e for e in per_worker[0] if np.any(e)]  # the first exchange moves nothing
    report = {
        "benchmark": "compress",
        "recorded": about,
        "block_sweep": block_sweep(backend, pushes),
        "replay": replay(backend, pushes),
        "coder_ms_per_push": coder_time(backend, pushes[-1]),
    }
    print(
        f"{len(pushes)} pushes of worker 0 ({about['parameters']:,d} parameters, "
        f"{args.algorithm}, τ = {args.tau}, {args.steps} steps per worker; center error after "
        f"{100 * about['center_error_after']:.1f}%)"
    )
    print("\nblock size (int8, nearest): bytes per element and the error of one push")
    print("| B | bytes/element | vs float32 | ‖Q(e) − e‖/‖e‖ mean | max |")
    print("|---:|---:|---:|---:|---:|")
    for r in report["block_sweep"]:
        print(
            f"| {r['block']} | {r['bytes_per_element']:.4f} | {r['reduction_vs_float32']:.2f}× | "
            f"{100 * r['push_error_mean']:.2f}% | {100 * r['push_error_max']:.2f}% |"
        )
    print(f"\nB = {CHOSEN_BLOCK}, over all {len(pushes)} pushes: ‖Σd − Σe‖/‖Σe‖")
    print("| codec | rounding | error feedback | ‖Σd − Σe‖/‖Σe‖ | elements never moved |")
    print("|---|---|---|---:|---:|")
    for r in report["replay"]:
        print(
            f"| {r['codec']} | {r['rounding']} | {'yes' if r['error_feedback'] else 'no'} | "
            f"{100 * r['sum_error']:.3f}% | {100 * r['never_moved']:.2f}% |"
        )
    print(f"\nNumPy coder, one push: {report['coder_ms_per_push']} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
