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
    python bench/bench_convergence.py --model cifar-convnet          # the paper's convnet on a
                                                                     # synthetic CIFAR-format set
    python bench/bench_convergence.py --model cifar-convnet --data ~/cifar-10-batches-py
    python bench/bench_convergence.py --model cifar-convnet --algorithms eamsgd --taus 4,16 \
        --compress none,int8,int8-nofeedback            # compressed pushes (§2.16)

With ``--model cifar-convnet`` every run also reports the worker steps and the wall time the
center needed to reach each held-out error of ``--targets`` (the first evaluation at or below
it). Without ``--data`` the runs train on a synthetic data set in the CIFAR-10 python format
(oriented textures in random windows under noise, with overlapping classes and 10 % training
label noise; see :func:`write_synthetic_cifar`), built once into ``bench/data/`` and sized for
a sweep of minutes on a laptop; ``--data`` runs the same comparison on the real CIFAR-10 (the
``cifar-10-batches-py`` folder or ``cifar-10-python.tar.gz``) with the paper's settings.

``--compress`` runs each configuration once per coding of the workers' pushes (``none``,
``int8``, ``fp8``, or ``int8-nofeedback``/``fp8-nofeedback`` without error feedback) and adds
the bytes of the pushes as coded (``push_bytes``) beside the bytes the transfers moved, to each
target and in a comparison with ``none``.

``--set KEY=VALUE`` goes to every run; ``--set ALGORITHM:KEY=VALUE`` to that algorithm's runs
only (after its defaults below). Wall times are from one oversubscribed node unless you launch
on more cores: compare them as ratios within one run of this script.
"""

from __future__ import annotations

import argparse
import hashlib
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

import numpy as np

from benchlib import launcher
from easgd_mpi.config import ALGORITHMS as CONFIG_ALGORITHMS

REPO = Path(__file__).resolve().parents[1]
#: The default sweep: the paper's methods of the first comparison.
ALGORITHMS = ("easgd", "eamsgd", "sync-easgd", "downpour", "allreduce-sgd")
#: Every method this script knows (``--algorithms``): every rule of the package's own loop.
KNOWN = CONFIG_ALGORITHMS
#: Per-algorithm settings on top of the shared ones. EAMSGD gets δ = 0.9 and η = 0.01, an
#: effective step η/(1 − δ) = 0.1, twice the plain methods' η (``--set eamsgd:momentum=0.99``
#: gives the paper's δ); β = 0.9 (the paper's) is the default for the elastic ones.
DEFAULTS = {
    "easgd": {},
    "eamsgd": {"momentum": "0.9", "lr": "0.01"},
    "sync-easgd": {},
    "downpour": {},
    "allreduce-sgd": {},
    "mdownpour": {"momentum": "0.9", "lr": "0.01"},
    "adownpour": {"outer_lr": "0.01"},
    "mvadownpour": {},
    "localsgd": {"momentum": "0.9", "lr": "0.01"},
    "diloco": {},
    "async-diloco": {},
}
SHARED = {"lr": "0.05", "batch_size": "128", "eval_interval": "0.25"}

MODELS = ("mlp", "cifar-convnet")
#: The paper's CIFAR convnet (model.name = "cifar-convnet"): weight decay 1e-4, β = 0.9 (the
#: default), EAMSGD with the paper's δ = 0.99. η: one value per method, from short pilots on
#: the synthetic set and a lower-contrast draft of it (one worker, plain SGD / Nesterov, 400-500
#: steps of 8-16): plain SGD η = 0.05 (0.1 and 0.2 oscillated around 75-90 % error), Nesterov
#: δ = 0.99 η = 0.002 (effective step η/(1 − δ) = 0.2; η = 0.001 was slower). All plain
#: methods share η = 0.05, so DOWNPOUR's center, which adds the p workers' summed updates, moves
#: with an effective step of p·η.
CONVNET_SHARED = {
    "model.name": "cifar-convnet",
    "data.name": "cifar10",
    "lr": "0.05",
    "weight_decay": "1e-4",
    "checkpoint.interval": "0",
}
CONVNET_DEFAULTS = {
    "easgd": {},
    "eamsgd": {"momentum": "0.99", "lr": "0.002"},
    "sync-easgd": {},
    "downpour": {},
    "allreduce-sgd": {},
    # Issue 19, from one pilot each at τ = 4 (docs/PERFORMANCE.md): the master's δ = 0.5 with
    # η = 0.005 (δ = 0.9 at η = 0.005 or 0.0025 stayed at 80-90 % error; the paper's 0.99 is
    # outside the round-robin stability region at p = 4, docs/STABILITY.md §7); Adagrad at the
    # master with η_o = 0.001 (0.01 stayed at chance); MVADOWNPOUR on DOWNPOUR with η = 0.05/p
    # and ν = 0.05; local SGD with EAMSGD's Nesterov step (the baseline the issue compares
    # with); DiLoCo with plain SGD inside (the inner and the outer momentum compound) and its
    # paper's outer 0.7 / 0.9.
    "mdownpour": {"momentum": "0.5", "lr": "0.005"},
    "adownpour": {"outer_lr": "0.001"},
    "mvadownpour": {"lr": "0.0125", "moving_rate": "0.05"},
    "localsgd": {"momentum": "0.99", "lr": "0.002"},
    "diloco": {},
    "async-diloco": {},
}
#: On the synthetic set (2 cores, a sweep of 20 runs in ~15 minutes): minibatch 8, 16×16
#: random crops (a third of the paper's 28×28 compute; the network is the same, its first fully
#: connected layer takes 64×2×2 inputs), an evaluation of the 500 held-out images every 1.5 s.
SYNTHETIC_RUN = {"batch_size": "8", "data.crop": "16", "eval_interval": "1.5"}
#: On the real CIFAR-10 (a cluster): the paper's minibatch 128 and 28×28 crops (data.crop = 0).
CIFAR10_RUN = {"batch_size": "128", "eval_interval": "30"}
#: EAMSGD η with the paper's minibatch 128 (as configs/cifar10-eamsgd.toml).
CIFAR10_DEFAULTS = {"eamsgd": {"lr": "0.005"}}
#: Held-out errors whose first crossing each run reports (``--targets``).
CONVNET_TARGETS = "0.5,0.3,0.2,0.1"
SYNTHETIC_FOLDER = REPO / "bench" / "data" / "synthetic-cifar"
#: ``--compress`` variants: the config keys each sets (docs/ARCHITECTURE.md §2.16).
COMPRESS_VARIANTS = {
    "none": {},
    "int8": {"compress": "int8"},
    "fp8": {"compress": "fp8"},
    "int8-nofeedback": {"compress": "int8", "error_feedback": "false"},
    "fp8-nofeedback": {"compress": "fp8", "error_feedback": "false"},
}
#: Parameters of the synthetic set; changing one rebuilds the cache.
SYNTHETIC = {
    "version": 1,
    "train": 10000,
    "test": 500,
    "seed": 0,
    "amplitude": 4.0,
    "noise": 1.0,
    "bandwidth": 0.06,
    "orientations": 5,
    "frequencies": [0.12, 0.25],
    "window": [20, 32],
    "label_noise": 0.1,
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--model",
        choices=MODELS,
        default="mlp",
        help="mlp: the digits MLP (default); cifar-convnet: the paper's CIFAR convnet",
    )
    ap.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="cifar-convnet: the real CIFAR-10 (cifar-10-batches-py folder or tar.gz); "
        "default: the synthetic set in --data-cache",
    )
    ap.add_argument(
        "--data-cache",
        default=str(SYNTHETIC_FOLDER),
        help="cifar-convnet without --data: folder of the synthetic CIFAR-format set "
        "(built when missing or stale)",
    )
    ap.add_argument(
        "--synthetic-size",
        default=None,
        metavar="TRAIN,TEST",
        help=f"images in the synthetic set (default {SYNTHETIC['train']},{SYNTHETIC['test']})",
    )
    ap.add_argument(
        "--targets",
        default=None,
        help="comma-separated held-out errors (fractions) to report steps and time to "
        f"(default: {CONVNET_TARGETS} for cifar-convnet, none for mlp)",
    )
    ap.add_argument("--workers", "-p", type=int, default=4)
    ap.add_argument("--taus", default="1,4,16,64", help="comma-separated τ values")
    ap.add_argument("--algorithms", default=",".join(ALGORITHMS))
    ap.add_argument(
        "--compress",
        default="none",
        help="comma-separated codings of the pushes to compare: "
        + ", ".join(COMPRESS_VARIANTS)
        + " (default none)",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="seeds per configuration (0, 1, ...); default 2 (mlp), 1 (cifar-convnet)",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="local steps per worker; default 3000 (mlp), 450 (cifar-convnet, synthetic), "
        "20000 (cifar-convnet, --data)",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="[ALGORITHM:]KEY=VALUE",
        help="passed to the runs; repeatable",
    )
    ap.add_argument(
        "--out",
        default=None,
        help="JSON report (default bench/results/convergence.json, convergence-cifar.json "
        "for cifar-convnet, convergence-cifar10.json with --data)",
    )
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
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per run (default 300; 180 for cifar-convnet on the synthetic set; "
        "none with --data)",
    )
    ap.add_argument(
        "--retries",
        type=int,
        default=1,
        help="launch a run again (from scratch) when it ends with an exit status other than "
        "0, 2 (bad config or data) or 124 (--timeout), e.g. a rank killed from outside",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="with --runs-dir: take runs that already completed there with the same "
        "configuration instead of launching them again (finishing an interrupted sweep)",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke configuration: p = 2, τ ∈ {1, 8}, 1 seed, 150 steps",
    )
    args = ap.parse_args(argv)
    convnet = args.model == "cifar-convnet"
    if args.data is not None and not convnet:
        ap.error("--data is for --model cifar-convnet (the MLP takes --set data.name=...)")
    real = convnet and args.data is not None
    if args.seeds is None:
        args.seeds = 1 if convnet else 2
    if args.steps is None:
        args.steps = (20000 if real else 450) if convnet else 3000
    if args.timeout is None:
        args.timeout = (None if real else 180.0) if convnet else 300.0
    if args.out is None:
        name = (
            ("convergence-cifar10" if real else "convergence-cifar") if convnet else "convergence"
        )
        args.out = str(REPO / "bench" / "results" / f"{name}.json")
    if args.quick:
        args.workers, args.taus, args.seeds, args.steps = 2, "1,8", 1, 150
    args.taus = [int(t) for t in str(args.taus).split(",") if t.strip()]
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    args.compress = [c.strip() for c in args.compress.split(",") if c.strip()] or ["none"]
    bad = [c for c in args.compress if c not in COMPRESS_VARIANTS]
    if bad:
        ap.error(f"--compress: unknown {bad} (known: {', '.join(COMPRESS_VARIANTS)})")
    unknown = [a for a in args.algorithms if a not in KNOWN]
    if args.reuse and not args.runs_dir:
        ap.error("--reuse needs --runs-dir (the folder of the earlier runs)")
    if args.retries < 0:
        ap.error("--retries must be >= 0")
    if unknown or args.workers < 1 or args.seeds < 1 or args.steps < 1 or not args.taus:
        ap.error(f"bad --algorithms/--workers/--seeds/--steps/--taus ({unknown or 'range'})")
    targets = args.targets if args.targets is not None else (CONVNET_TARGETS if convnet else "")
    try:
        args.targets = sorted({float(t) for t in targets.split(",") if t.strip()}, reverse=True)
    except ValueError:
        ap.error(f"--targets expects comma-separated fractions, got {targets!r}")
    if any(not 0.0 <= t <= 1.0 for t in args.targets):
        ap.error("--targets are error rates in [0, 1] (0.3 is 30 %)")
    args.synthetic = dict(SYNTHETIC)
    if args.synthetic_size:
        try:
            train, test = (int(v) for v in args.synthetic_size.split(","))
        except ValueError:
            ap.error(f"--synthetic-size expects TRAIN,TEST, got {args.synthetic_size!r}")
        if train < 10 or test < 10:
            ap.error("--synthetic-size: at least 10 training and 10 held-out images")
        args.synthetic.update(train=train, test=test)
    return args


def model_settings(args) -> tuple[dict, dict, dict]:
    """Shared settings, per-algorithm settings and a description of the data, before --set."""
    if args.model == "mlp":
        return dict(SHARED), {a: dict(DEFAULTS[a]) for a in KNOWN}, {"name": "digits"}
    per = {a: dict(CONVNET_DEFAULTS[a]) for a in KNOWN}
    if args.data is not None:
        path = Path(args.data).expanduser().resolve()
        if not path.exists():
            raise SystemExit(
                f"--data {args.data}: not found (a cifar-10-batches-py folder or tar.gz)"
            )
        for algorithm, values in CIFAR10_DEFAULTS.items():
            per[algorithm].update(values)
        shared = {**CONVNET_SHARED, **CIFAR10_RUN, "data.path": json.dumps(str(path))}
        about = {
            "name": "cifar10",
            "path": str(path),
            "why": "the real CIFAR-10, the paper's data set (Section 5.1)",
        }
        return shared, per, about
    folder = ensure_synthetic_cifar(Path(args.data_cache), args.synthetic)
    shared = {**CONVNET_SHARED, **SYNTHETIC_RUN, "data.path": json.dumps(str(folder))}
    about = {
        "name": "synthetic-cifar",
        "path": str(folder),
        "parameters": args.synthetic,
        "why": "no CIFAR-10 download on this machine, and the tests' CIFAR files are "
        "separable in a few steps; this set has overlapping texture classes that take the "
        "convnet hundreds of steps, so the methods separate",
    }
    return shared, per, about


# ---- the synthetic CIFAR-format data set --------------------------------------------------

_CIFAR_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")


def synthetic_textures(n: int, params: dict, seed: int, label_noise: float):
    """``(uint8 images (n, 3, 32, 32), int64 labels (n,))``: oriented textures under noise.

    Class c is a band-pass Gaussian texture: spectral bumps of width ``bandwidth`` around
    ±f·(cos θ, sin θ), θ = π (c mod K)/K for K = ``orientations``, f = ``frequencies``[c // K]
    (10 classes: 5 orientations 36° apart × 2 spatial frequencies; neighbouring orientations'
    spectra overlap, so some classes are confusable). The texture fills a random window of
    ``window`` pixels a side at a random position, in a random colour (a nuisance: the class is
    in the spatial structure only, so a linear model on colours or positions cannot find it),
    over white noise and a random colour cast. ``label_noise`` of the labels are redrawn
    uniformly (training only: the held-out labels are clean and balanced)."""
    rng = np.random.default_rng(seed)
    k = int(params["orientations"])
    freqs = list(params["frequencies"])
    classes = k * len(freqs)
    if classes != 10:
        raise SystemExit("the synthetic CIFAR set needs orientations × frequencies = 10 classes")
    if label_noise:
        labels = rng.integers(0, classes, n)
    else:
        labels = np.arange(n) % classes
    fy = np.fft.fftfreq(32)[:, None]
    fx = np.fft.fftfreq(32)[None, :]
    bw2 = 2.0 * float(params["bandwidth"]) ** 2
    spectra = np.empty((classes, 32, 32))
    for c in range(classes):
        theta = math.pi * (c % k) / k
        f = freqs[c // k]
        u, v = f * math.cos(theta), f * math.sin(theta)
        spectra[c] = np.exp(-((fx - u) ** 2 + (fy - v) ** 2) / bw2) + np.exp(
            -((fx + u) ** 2 + (fy + v) ** 2) / bw2
        )
    x = np.empty((n, 3, 32, 32), dtype=np.float32)
    low, high = (int(w) for w in params["window"])
    for lo in range(0, n, 1000):  # in slices: bounded memory for large sets
        m = min(1000, n - lo)
        y = labels[lo : lo + m]
        white = rng.normal(0.0, 1.0, (m, 32, 32))
        texture = np.real(np.fft.ifft2(np.fft.fft2(white) * spectra[y]))
        texture /= texture.std(axis=(1, 2), keepdims=True)
        colour = rng.normal(0.0, 1.0, (m, 3))
        colour *= math.sqrt(3.0) / np.linalg.norm(colour, axis=1, keepdims=True)
        side = rng.integers(low, high + 1, (m, 2))
        top = rng.integers(0, 33 - side[:, 0])
        left = rng.integers(0, 33 - side[:, 1])
        grid = np.arange(32)
        in_rows = (grid >= top[:, None]) & (grid < (top + side[:, 0])[:, None])
        in_cols = (grid >= left[:, None]) & (grid < (left + side[:, 1])[:, None])
        mask = in_rows[:, :, None] & in_cols[:, None, :]
        part = rng.normal(0.0, float(params["noise"]), (m, 3, 32, 32))
        part += rng.normal(0.0, 0.5, (m, 3, 1, 1))
        part += float(params["amplitude"]) * colour[:, :, None, None] * (mask * texture)[:, None]
        x[lo : lo + m] = part
    if label_noise:
        flip = rng.random(n) < label_noise
        labels = np.where(flip, rng.integers(0, classes, n), labels)
    images = np.clip(np.round(128.0 + 40.0 * x), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def _cifar_batch_bytes(images, labels, batch_label: bytes) -> bytes:
    """One batch in the CIFAR-10 python format (what ``cifar-10-batches-py`` holds)."""
    import pickle  # noqa: PLC0415

    n = images.shape[0]
    batch = {
        b"batch_label": batch_label,
        b"labels": [int(label) for label in labels],
        b"data": np.ascontiguousarray(images.reshape(n, -1)),
        b"filenames": [f"texture_{i:05d}.png".encode() for i in range(n)],
    }
    return pickle.dumps(batch, protocol=2)


def write_synthetic_cifar(folder: Path, params: dict) -> Path:
    """Write the synthetic set as ``folder/cifar-10-batches-py`` (data_batch_1..5,
    test_batch, batches.meta) and ``folder/params.json``; returns the batch folder."""
    import pickle  # noqa: PLC0415

    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    seed = int(params["seed"])
    x_train, y_train = synthetic_textures(
        int(params["train"]), params, seed * 2 + 1, float(params["label_noise"])
    )
    x_test, y_test = synthetic_textures(int(params["test"]), params, seed * 2 + 2, 0.0)
    bounds = np.linspace(0, x_train.shape[0], 6).astype(int)
    for i in range(5):
        part = slice(bounds[i], bounds[i + 1])
        label = f"training batch {i + 1} of 5".encode()
        data = _cifar_batch_bytes(x_train[part], y_train[part], label)
        (batches / f"data_batch_{i + 1}").write_bytes(data)
    data = _cifar_batch_bytes(x_test, y_test, b"testing batch 1 of 1")
    (batches / "test_batch").write_bytes(data)
    names = [f"texture-{c}".encode() for c in range(10)]
    meta = {b"label_names": names, b"num_cases_per_batch": int(bounds[1]), b"num_vis": 3072}
    (batches / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    (folder / "params.json").write_text(json.dumps(params, indent=1) + "\n", encoding="utf-8")
    return batches


def ensure_synthetic_cifar(folder: Path, params: dict) -> Path:
    """The batch folder of the synthetic set with ``params``, built when missing or stale."""
    batches = folder / "cifar-10-batches-py"
    stamp = folder / "params.json"
    try:
        current = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        current = None
    if current == params and all((batches / name).is_file() for name in _CIFAR_BATCHES):
        return batches
    started = time.monotonic()
    write_synthetic_cifar(folder, params)
    digest = hashlib.sha256((batches / "test_batch").read_bytes()).hexdigest()[:12]
    print(
        f"built the synthetic CIFAR-format set in {folder} ({params['train']} training, "
        f"{params['test']} held-out images, test_batch sha256 {digest}) in "
        f"{time.monotonic() - started:.1f}s",
        flush=True,
    )
    return batches


def split_overrides(pairs):
    """Shared and per-algorithm ``--set`` values."""
    shared, per = {}, {a: {} for a in KNOWN}
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


def run_one(args, algorithm, tau, seed, settings, runs_dir, compress="none") -> dict:
    """Launch one training run (or, with --reuse, take a finished one with the same
    configuration from --runs-dir) and read its metrics back."""
    coded = "" if compress == "none" else f"-{compress}"
    run_dir = runs_dir / f"{algorithm}{coded}-tau{tau}-seed{seed}"
    values = {
        **settings["base"],
        **settings["base_per"][algorithm],
        **settings["shared"],
        **settings[algorithm],
        **COMPRESS_VARIANTS[compress],
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
    attempts, first_error = 0, None
    reused = args.reuse and _finished_run(run_dir, values, args.steps * args.workers)
    if reused:
        code, stderr, launch_time = 0, "", reused.get("launch_time")
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    while not reused:
        attempts += 1
        code, stderr, launch_time = _launch(cmd, env, args.timeout)
        # 2: a config or data error, 124: our time limit; anything else (a rank killed by a
        # signal from outside, say) is worth another launch from scratch.
        if code in (0, 2, 124) or attempts > args.retries:
            break
        first_error = first_error or f"exit {code}: {_last_line(stderr)}"
        print(f"      {algorithm} τ={tau} seed {seed}: {first_error}; launching again", flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    if not reused and code == 0:
        stamp = {"launch_time": round(launch_time, 2), "attempts": attempts}
        (run_dir / "bench-launch.json").write_text(json.dumps(stamp) + "\n", encoding="utf-8")
    records = read_records(run_dir / "metrics.jsonl")
    result = {
        "algorithm": algorithm,
        "tau": tau,
        "compress": compress,
        "seed": seed,
        "returncode": code,
        "launch_time": None if launch_time is None else round(launch_time, 2),
        "run_dir": str(run_dir),
        "settings": {k: v for k, v in values.items() if k != "run_dir"},
        "curve": [
            [r.get("time"), r.get("steps"), r.get("center_error"), r.get("center_loss")]
            for r in records
        ],
    }
    # The center's error against the bytes moved and the bytes of the pushes as coded.
    result["bytes_curve"] = [
        [r.get("bytes"), r.get("push_bytes"), r.get("center_error")] for r in records
    ]
    if reused:
        result["reused"] = True
    if attempts > 1:
        result["attempts"] = attempts
        result["first_attempt_error"] = first_error
    result.update(summarize(records, args.steps * args.workers))
    if args.targets:
        result["to_target"] = steps_to_targets(records, args.targets)
        # The bytes the workers had moved at each first crossing (None: never reached).
        result["bytes_to_target"] = [
            _first_record(records, t).get("bytes") if _first_record(records, t) else None
            for t in args.targets
        ]
    if code != 0:
        result["error"] = _last_line(stderr)
    return result


def _finished_run(run_dir: Path, values: dict, budget: int) -> dict | None:
    """With --reuse: a run folder that completed its budget with exactly this configuration
    (its config.toml against the one these settings give) -> {"launch_time": s or None}."""
    if not (run_dir / "COMPLETED").is_file() or not (run_dir / "config.toml").is_file():
        return None
    records = read_records(run_dir / "metrics.jsonl")
    if not records or records[-1].get("steps") != budget:
        return None
    try:
        from easgd_mpi.config import Config  # noqa: PLC0415

        wanted = Config.from_toml(None, overrides=values, environ={}).to_dict()
        found = Config.from_toml(run_dir / "config.toml", environ={}).to_dict()
    except Exception:  # noqa: BLE001  (an unreadable or foreign config: launch again)
        return None
    for cfg in (wanted, found):
        cfg.pop("output", None)
    if wanted != found:
        return None
    try:
        stamp = json.loads((run_dir / "bench-launch.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamp = {}
    return {"launch_time": stamp.get("launch_time")}


def _launch(cmd, env, timeout) -> tuple[int, str, float]:
    """Run one launch: exit status, its error text (stderr, else stdout), seconds."""
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        code, stderr = proc.returncode, proc.stderr
        if code != 0 and not stderr.strip():  # e.g. mpiexec's "KILLED BY SIGNAL" report
            stderr = proc.stdout
    except subprocess.TimeoutExpired:
        code, stderr = 124, f"timed out after {timeout:.0f}s"
    return code, stderr, time.monotonic() - start


def _last_line(text: str) -> str:
    """The line of a failed launch's output that says what happened."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in lines:
        if "KILLED BY SIGNAL" in line or "EXIT CODE" in line:
            return line.strip("= ")[:300]
    return (lines or ["?"])[-1][:300]


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
            "push_bytes": None,
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
        "push_bytes": last.get("push_bytes"),
        "steps": last.get("steps"),
        "complete": last.get("steps") == budget,
        "diverged": diverged,
    }


def _first_record(records: list[dict], target: float) -> dict | None:
    """The first evaluation of the center at or below ``target``."""
    return next(
        (
            r
            for r in records
            if _finite(r.get("center_error")) and r["center_error"] <= target + 1e-12
        ),
        None,
    )


def steps_to_targets(records: list[dict], targets: list[float]) -> list[dict]:
    """For each target error: the first evaluation of the center at or below it (total worker
    steps, wall time, exchanges, bytes moved and bytes of the pushes as coded), or None where
    the run never got there."""
    out = []
    for target in targets:
        hit = _first_record(records, target)
        out.append(
            {
                "target": target,
                "reached": hit is not None,
                "steps": hit.get("steps") if hit else None,
                "time": hit.get("time") if hit else None,
                "exchanges": hit.get("exchanges") if hit else None,
                "bytes": hit.get("bytes") if hit else None,
                "push_bytes": hit.get("push_bytes") if hit else None,
            }
        )
    return out


def _variant(r: dict) -> str:
    return r.get("compress", "none")


def _key(r: dict) -> tuple:
    """(algorithm, τ, compress): one row of the tables."""
    return r["algorithm"], r["tau"], _variant(r)


def aggregate(results: list[dict]) -> list[dict]:
    """Mean ± sd over seeds per (algorithm, τ, compress); diverged runs count as error 1 in the
    mean."""
    rows = []
    variants = list(COMPRESS_VARIANTS)
    keys = sorted(
        {_key(r) for r in results},
        key=lambda k: (KNOWN.index(k[0]), k[1], variants.index(k[2])),
    )
    for algorithm, tau, compress in keys:
        group = [r for r in results if _key(r) == (algorithm, tau, compress)]
        row = {
            "algorithm": algorithm,
            "tau": tau,
            "compress": compress,
            "runs": len(group),
            "diverged": sum(1 for r in group if r["diverged"] or r["returncode"] != 0),
        }
        for key, missing in (
            ("final_error", 1.0),
            ("best_error", 1.0),
            ("time", None),
            ("bytes", None),
            ("push_bytes", None),
        ):
            values = [r[key] if _finite(r.get(key)) else missing for r in group]
            values = [v for v in values if v is not None]
            row[key] = statistics.fmean(values) if values else None
            row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        if all("to_target" in r for r in group):
            row["to_target"] = _aggregate_targets(group)
        rows.append(row)
    return rows


def _aggregate_targets(group: list[dict]) -> list[dict]:
    """Per target: how many seeds reached it, and the mean steps and time of those that did."""
    out = []
    for i, first in enumerate(group[0]["to_target"]):
        hits = [r["to_target"][i] for r in group if r["to_target"][i]["reached"]]
        moved = [
            r["bytes_to_target"][i]
            for r in group
            if r.get("bytes_to_target") and r["bytes_to_target"][i] is not None
        ]
        out.append(
            {
                "target": first["target"],
                "reached": len(hits),
                "runs": len(group),
                "steps": statistics.fmean(h["steps"] for h in hits) if hits else None,
                "time": statistics.fmean(h["time"] for h in hits) if hits else None,
                # What the links moved to the target (the run's byte counts), and the pushes
                # in coded form where the target records them (--compress).
                "bytes": statistics.fmean(moved) if moved else None,
                "push_bytes": statistics.fmean(h["push_bytes"] for h in hits)
                if hits and all(_finite(h.get("push_bytes")) for h in hits)
                else None,
            }
        )
    return out


def _pm(mean, sd, fmt) -> str:
    return "—" if mean is None else f"{fmt(mean)} ± {fmt(sd)}"


def _compressing(rows: list[dict]) -> bool:
    return any(_variant(r) != "none" for r in rows)


def format_table(rows: list[dict]) -> str:
    pct = lambda v: f"{100 * v:5.2f}%"  # noqa: E731
    sec = lambda v: f"{v:5.1f}s"  # noqa: E731
    mb = lambda v: f"{v / 1e6:7.1f}"  # noqa: E731
    coded = _compressing(rows)  # the compress column and the pushes' bytes as coded
    header = (
        f"| {'algorithm':<13} | {'τ':>3} | "
        + (f"{'compress':<15} | " if coded else "")
        + f"{'final error':>17} | {'best error':>17} | "
        f"{'time':>15} | {'MB sent+received':>18} | "
        + (f"{'push MB (coded)':>18} | " if coded else "")
        + "diverged |"
    )
    lines = [header, "|" + "|".join("-" * (len(c) + 0) for c in header.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(
            f"| {r['algorithm']:<13} | {r['tau']:>3} | "
            + (f"{_variant(r):<15} | " if coded else "")
            + f"{_pm(r['final_error'], r['final_error_sd'], pct):>17} | "
            f"{_pm(r['best_error'], r['best_error_sd'], pct):>17} | "
            f"{_pm(r['time'], r['time_sd'], sec):>15} | "
            f"{_pm(r['bytes'], r['bytes_sd'], mb):>18} | "
            + (f"{_pm(r['push_bytes'], r['push_bytes_sd'], mb):>18} | " if coded else "")
            + f"{r['diverged']}/{r['runs']:<6} |"
        )
    return "\n".join(lines)


def format_target_table(rows: list[dict], results: list[dict]) -> str:
    """Final error, wall time and, per target error, the total worker steps (all p workers)
    and the wall time of the center's first evaluation at or below it ("—": never). A run
    that did not exit cleanly is marked "exit N" (what it reached before counts)."""
    targets = [t["target"] for t in rows[0]["to_target"]]
    coded = _compressing(rows)
    failed = {}
    for r in results:
        if r["returncode"] != 0:
            failed.setdefault(_key(r), []).append(r["returncode"])
    cols = [
        f"≤{100 * t:g}%: steps / time / bytes" + (" / push MB" if coded else "") for t in targets
    ]

    def cell(t) -> str:
        if not t["reached"]:
            return "—"
        text = f"{t['steps']:.0f} / {t['time']:.1f}s"
        if t.get("bytes") is not None:
            text += f" / {t['bytes'] / 1e6:.0f} MB"
        if coded:
            text += " / —" if t.get("push_bytes") is None else f" / {t['push_bytes'] / 1e6:.1f}"
        return text if t["reached"] == t["runs"] else f"{text} ({t['reached']}/{t['runs']})"

    head = ["algorithm", "τ", *(["compress"] if coded else []), "final error", "best error"]
    head += ["time", *cols]
    body = []
    for r in rows:
        codes = failed.get(_key(r), [])
        group = [x for x in results if _key(x) == _key(r)]
        if codes and len(codes) == r["runs"]:
            last = [x["final_error"] for x in group if _finite(x.get("final_error"))]
            final = f"exit {codes[0]}" + (f" at {100 * last[0]:.1f}%" if last else "")
        elif r["diverged"] == r["runs"]:
            final = "diverged"
        else:
            final = f"{100 * r['final_error']:.1f}%" + (f" ({len(codes)} failed)" if codes else "")
        body.append(
            [
                r["algorithm"],
                str(r["tau"]),
                *([_variant(r)] if coded else []),
                final,
                f"{100 * r['best_error']:.1f}%",
                "—" if r["time"] is None else f"{r['time']:.1f}s",
                *(cell(t) for t in r["to_target"]),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    right = [False] + [True] * (len(head) - 1)
    if coded:
        right[2] = False

    def line(cells):
        return (
            "| "
            + " | ".join(
                c.rjust(w) if r else c.ljust(w)
                for c, w, r in zip(cells, widths, right, strict=True)
            )
            + " |"
        )

    sep = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if r else "-" * (w + 2)
            for w, r in zip(widths, right, strict=True)
        )
        + "|"
    )
    return "\n".join([line(head), sep, *(line(b) for b in body)])


def format_compression_table(rows: list[dict]) -> str:
    """Each coded variant against ``none`` of the same algorithm and τ: the final error's
    difference, and per target how many times fewer bytes it took to get there, counting the
    pushes alone (as coded) and the read of the center plus the pushes (what a center that
    decodes would move; the passive window moves float32: the "MB sent+received" column)."""
    base = {(r["algorithm"], r["tau"]): r for r in rows if _variant(r) == "none"}
    targets = [t["target"] for t in rows[0].get("to_target", [])]
    head = ["algorithm", "τ", "compress", "final error − none's"]
    head += [f"≤{100 * t:g}%: push × / read+push ×" for t in targets]
    body = []

    def ratio(a, b):
        return f"{a / b:.2f}" if _finite(a) and _finite(b) and b > 0 else "—"

    for r in rows:
        ref = base.get((r["algorithm"], r["tau"]))
        if _variant(r) == "none" or ref is None:
            continue
        diff = (
            f"{100 * (r['final_error'] - ref['final_error']):+.2f} points"
            if _finite(r["final_error"]) and _finite(ref["final_error"])
            else "—"
        )
        cells = []
        for mine, theirs in zip(r.get("to_target", []), ref.get("to_target", []), strict=True):
            both = mine["reached"] and theirs["reached"]
            push = ratio(theirs["push_bytes"], mine["push_bytes"]) if both else "—"
            total = "—"
            if both and _finite(theirs["bytes"]) and _finite(mine["bytes"]):
                # the async rules read 4 bytes per element for each 4 they push in float32
                total = ratio(
                    theirs["bytes"] / 2 + theirs["push_bytes"],
                    mine["bytes"] / 2 + mine["push_bytes"],
                )
            cells.append(f"{push} / {total}")
        body.append([r["algorithm"], str(r["tau"]), _variant(r), diff, *cells])
    if not body:
        return ""
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) + " |" for b in body
    ]
    return "\n".join(lines)


def _error_vs_push_bytes(results, path: Path) -> list[str]:
    """One panel per τ: the center's held-out error against the MB of the pushes as coded, per
    algorithm and coding (first seed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    taus = sorted({r["tau"] for r in results})
    first_seed = min(r["seed"] for r in results)
    fig, axes = plt.subplots(1, len(taus), figsize=(5 * len(taus), 4), squeeze=False)
    dashes = ("-", "--", "-.", ":", (0, (1, 3)))
    styles = dict(zip(COMPRESS_VARIANTS, dashes, strict=True))
    for ax, tau in zip(axes[0], taus, strict=True):
        for r in results:
            if r["tau"] != tau or r["seed"] != first_seed:
                continue
            points = [(b[1], b[2]) for b in r.get("bytes_curve", []) if _finite(b[1])]
            points = [(x / 1e6, y) for x, y in points if _finite(y)]
            if points:
                ax.plot(
                    *zip(*points, strict=True),
                    linestyle=styles[_variant(r)],
                    color=f"C{ALGORITHMS.index(r['algorithm'])}",
                    label=f"{r['algorithm']} {_variant(r)}",
                )
        ax.set_xscale("log")
        ax.set_xlabel("MB pushed by the workers (as coded)")
        ax.set_title(f"τ = {tau}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("center held-out error")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [str(path)]


def make_figures(results, folder: Path, stem: str) -> list[str]:
    """One figure per τ (every algorithm, first seed) and the final error against τ; with
    ``--compress``, those of the uncoded runs and the error against the bytes pushed."""
    try:
        from easgd_mpi.plot import PlotError, load_run, plot_runs
    except ImportError:
        return []
    written = []
    if any(_variant(r) != "none" for r in results):
        written.extend(_error_vs_push_bytes(results, folder / f"{stem}-push-bytes.png"))
        results = [r for r in results if _variant(r) == "none"]
        if not results:
            return written
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
    if all("to_target" in r for r in results):
        written.extend(_steps_to_target(results, folder / f"{stem}-to-target.png"))
    return written


def _steps_to_target(results, path: Path) -> list[str]:
    """One panel per target: total worker steps to reach it against τ, per algorithm (mean
    over the seeds that reached it; τ where no seed did is left out)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = aggregate(results)
    targets = [t["target"] for t in rows[0]["to_target"]]
    fig, axes = plt.subplots(1, len(targets), figsize=(3.6 * len(targets), 3.8), squeeze=False)
    taus = sorted({r["tau"] for r in rows})
    for ax, (i, target) in zip(axes[0], enumerate(targets), strict=True):
        for algorithm in KNOWN:
            mine = [r for r in rows if r["algorithm"] == algorithm and r["to_target"][i]["reached"]]
            if mine:
                ax.plot(
                    [r["tau"] for r in mine],
                    [r["to_target"][i]["steps"] for r in mine],
                    marker="o",
                    color=f"C{KNOWN.index(algorithm) % 10}",  # the same in every panel
                    label=algorithm,
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(taus, [str(t) for t in taus])
        ax.set_xlabel("communication period τ")
        ax.set_title(f"held-out error ≤ {100 * target:g}%")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("worker steps (all workers) to reach it")
    handles, labels = [], []
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return [str(path)]


def _error_vs_tau(results, path: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = aggregate(results)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algorithm in KNOWN:
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
    base, base_per, about = model_settings(args)
    shared, per = split_overrides(args.overrides)
    settings = {"base": base, "base_per": base_per, "shared": shared, **per}
    out = Path(args.out)
    temporary = args.runs_dir is None
    runs_dir = Path(tempfile.mkdtemp(prefix="easgd-conv-")) if temporary else Path(args.runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = []
    total = len(args.algorithms) * len(args.taus) * len(args.compress) * args.seeds
    try:
        for tau in args.taus:
            for algorithm in args.algorithms:
                for seed in range(args.seeds):
                    for compress in args.compress:  # interleaved: the machine's load is shared
                        r = run_one(args, algorithm, tau, seed, settings, runs_dir, compress)
                        results.append(r)
                        status = "diverged" if r["diverged"] else f"{100 * r['final_error']:.2f}%"
                        if r["returncode"] != 0:
                            status += f" (exit {r['returncode']}: {r.get('error', '')})"
                        coded = "" if compress == "none" else f" {compress}"
                        print(
                            f"[{len(results):>3}/{total}] {algorithm:<13}{coded} τ={tau:<3} "
                            f"seed {seed}: {status}, {r['time'] or 0:.1f}s",
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
    if args.model != "mlp":
        print(describe(args, about))
    print(
        f"p = {args.workers} workers, {args.steps} steps per worker, {args.seeds} seed(s); "
        f"mean ± sd over seeds (a diverged run counts as error 100%)"
    )
    print(table)
    target_table = None
    if args.targets:
        target_table = format_target_table(rows, results)
        print()
        print(
            "Steps to target: total worker steps (all p workers) and wall time of the first "
            "evaluation of the center at or below each held-out error (— = not reached)"
        )
        print(target_table)
    compression_table = format_compression_table(rows) if _compressing(rows) else ""
    if compression_table:
        print()
        print(
            "Compressed pushes against none (same algorithm and τ): final error difference; "
            "per target, how many times fewer bytes the pushes (as coded) and the read of "
            "the center plus the pushes took to reach it (— = not reached by both)"
        )
        print(compression_table)
    report = {
        "benchmark": "convergence",
        "model": args.model,
        "data": about,
        "workers": args.workers,
        "taus": args.taus,
        "algorithms": args.algorithms,
        "compress": args.compress,
        "seeds": args.seeds,
        "steps_per_worker": args.steps,
        "budget": f"{args.steps} local steps per worker (a step budget, not a time budget)",
        "targets": args.targets,
        "shared_settings": {**base, **shared},
        "algorithm_settings": {a: {**base_per[a], **per[a]} for a in args.algorithms},
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
    if target_table is not None:
        report["target_table"] = target_table
    if compression_table:
        report["compression_table"] = compression_table
    reused = [r for r in results if r.get("reused")]
    if reused:
        report["reused_runs"] = len(reused)  # total_time covers only the runs launched now
        print(f"{len(reused)} of {len(results)} run(s) reused from {runs_dir} (--reuse)")
    relaunched = [r for r in results if r.get("attempts", 1) > 1]
    if relaunched:
        report["relaunched"] = [
            f"{r['algorithm']} τ={r['tau']} seed {r['seed']}: {r['first_attempt_error']}"
            for r in relaunched
        ]
        print(f"{len(relaunched)} run(s) launched again: " + "; ".join(report["relaunched"]))
    if args.model == "mlp":  # the report as it always was
        for key in ("model", "data", "budget", "targets"):
            report.pop(key)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {out}" + (f" and {len(figures)} figure(s)" if figures else ""))
    return 0


def describe(args, about: dict) -> str:
    """The header of a convnet sweep: which data set, why, and the budget."""
    if about["name"] == "cifar10":
        data = f"data: CIFAR-10 from {about['path']} ({about['why']})"
    else:
        q = about["parameters"]
        data = (
            f"data: synthetic CIFAR-format textures in {about['path']} ({q['train']} training "
            f"images with {100 * q['label_noise']:g}% label noise, {q['test']} clean held-out "
            f"images; 10 classes = 5 orientations × 2 frequencies, texture in a random window "
            f"at a random position, random colour, white noise). Why: {about['why']}"
        )
    return (
        f"model: the paper's CIFAR convnet (cifar-convnet); {data}\n"
        f"budget: {args.steps} local steps per worker for every run (a step budget; wall "
        f"times are what those steps took)"
    )


if __name__ == "__main__":
    sys.exit(main())
