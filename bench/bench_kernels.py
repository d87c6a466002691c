"""Effective bandwidth of the fused update kernels (DESIGN.md §5).

For each fused method and size n, the table shows the bytes one pass moves (every array read or
written once, float32) divided by its time, next to two baselines measured in the same run:

* copy: a plain copy moving the same number of bytes (device-to-device memcpy on the GPU,
  ``np.copyto`` on the CPU), the ceiling for a memory-bound elementwise pass;
* unfused: the same formula written as ordinary array expressions (one kernel and one
  temporary per operator), what the code would cost without the fused kernels.

fused/copy is the fraction of the copy bandwidth reached (goal on a GPU: >= 0.9); speed-up is
t(unfused) / t(fused). Times are medians over --repeats runs after --warmup runs, taken with CUDA
events on the GPU and perf_counter on the CPU.

    python bench/bench_kernels.py                      # GPU when usable, else NumPy
    python bench/bench_kernels.py --backend numpy --sizes 1e5 1e6 --repeats 5
    python bench/bench_kernels.py --json bench/results/kernels_h100.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

try:
    import easgd_mpi  # noqa: F401
except ImportError:  # run from a checkout without installing: use the repository's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from easgd_mpi.backend.cupy_backend import KERNELS, gpu_available  # noqa: E402
from easgd_mpi.backend.numpy_backend import NumpyBackend  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "kernels.json"
DEFAULT_SIZES = {"cupy": [10**6, 10**7, 10**8], "numpy": [10**5, 10**6]}
DEFAULT_REPEATS = {"cupy": 20, "numpy": 5}
# Realistic values (paper defaults, p = 4); s = 1 keeps repeated scaling from overflowing.
SCALARS = {"s": 1.0, "lr": 1e-3, "wd": 1e-4, "alpha": 0.225, "beta": 0.9, "delta": 0.99}


class Unfused:
    """The fused formulas as plain array expressions: one pass and one temporary per operator."""

    def __init__(self, xp):
        self.xp = xp

    @staticmethod
    def _f(v):
        return np.float32(v)

    def scale(self, a, s):
        a *= self._f(s)

    def sgd_step(self, x, g, lr, wd):
        x -= self._f(lr) * (g + self._f(wd) * x)

    def exchange(self, x, c, e, alpha):
        e[...] = self._f(alpha) * (x - c)
        x -= e

    def exchange_sgd_step(self, x, c, g, e, alpha, lr, wd):
        t = self._f(lr) * (g + self._f(wd) * x)
        e[...] = self._f(alpha) * (x - c)
        x -= e
        x -= t

    def nesterov_lookahead(self, x, v, delta, y):
        y[...] = x + self._f(delta) * v

    def nesterov_step(self, x, v, g, lr, delta, wd):
        dv = self._f(delta) * v
        t = self._f(lr) * (g + self._f(wd) * (x + dv))
        v[...] = dv - t
        x += v

    def exchange_nesterov_step(self, x, v, c, g, e, alpha, lr, delta, wd):
        dv = self._f(delta) * v
        t = self._f(lr) * (g + self._f(wd) * (x + dv))
        e[...] = self._f(alpha) * (x - c)
        v[...] = dv - t
        x -= e
        x += v

    def downpour_step(self, x, acc, g, lr, wd):
        d = self._f(-lr) * (g + self._f(wd) * x)
        x += d
        acc += d

    def sync_easgd_update(self, x, c, xmean, alpha, beta):
        diff = self._f(alpha) * (x - c)
        c *= self._f(1.0 - beta)
        c += self._f(beta) * xmean
        x -= diff


# ---- timers -----------------------------------------------------------------------------------
def _time_cpu(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_gpu(cupy, fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return statistics.median(times)


# ---- the run ----------------------------------------------------------------------------------
def _setup(backend_name: str):
    """(backend, xp, timer, copy(dst, src), device description)."""
    if backend_name == "cupy":
        import cupy  # noqa: PLC0415

        from easgd_mpi.backend.cupy_backend import CupyBackend  # noqa: PLC0415

        be = CupyBackend()
        props = cupy.cuda.runtime.getDeviceProperties(be.device_id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        device = {
            "kind": "gpu",
            "name": name,
            "memory_bytes": int(props["totalGlobalMem"]),
            "cupy_version": cupy.__version__,
            "cuda_runtime_version": cupy.cuda.runtime.runtimeGetVersion(),
        }

        def copy(dst, src):  # a plain cudaMemcpyAsync, device to device
            dst.data.copy_from_device_async(src.data, src.nbytes)

        def timer(fn, r, w):
            return _time_gpu(cupy, fn, r, w)

        return be, cupy, timer, copy, device
    device = {"kind": "cpu", "name": _cpu_name(), "cores": os.cpu_count()}
    return NumpyBackend(), np, _time_cpu, np.copyto, device


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(backend_name: str, sizes, repeats: int, warmup: int, names) -> dict:
    be, xp, timer, copy, device = _setup(backend_name)
    unfused = Unfused(xp)
    rng = np.random.default_rng(0)
    results = []
    for n in sizes:
        # one set of buffers per size, shared by all kernels (each updates its own in place)
        pool = {
            p: xp.asarray(rng.standard_normal(n, dtype=np.float32) * np.float32(0.1))
            for p in ("a", "x", "c", "g", "e", "v", "y", "acc", "xmean")
        }
        n_copy = max(1, max(KERNELS[k].bytes_per_element for k in names) * n // 8)
        src = xp.ones(n_copy, dtype=np.float32)
        dst = xp.empty(n_copy, dtype=np.float32)
        for name in names:
            spec = KERNELS[name]
            args = [pool[p] if p in spec.arrays else SCALARS[p] for p in spec.params]
            nbytes = spec.bytes_per_element * n
            m = nbytes // 8  # floats a copy reads and writes to move the same bytes
            t_fused = timer(partial(getattr(be, name), *args), repeats, warmup)
            t_unfused = timer(partial(getattr(unfused, name), *args), repeats, warmup)
            t_copy = timer(partial(copy, dst[:m], src[:m]), repeats, warmup)
            results.append(
                {
                    "kernel": name,
                    "n": int(n),
                    "bytes_per_element": spec.bytes_per_element,
                    "bytes": int(nbytes),
                    "fused_s": t_fused,
                    "unfused_s": t_unfused,
                    "copy_s": t_copy,
                    "fused_gbps": nbytes / t_fused / 1e9,
                    "unfused_gbps": nbytes / t_unfused / 1e9,
                    "copy_gbps": 8 * m / t_copy / 1e9,
                    "fused_over_copy": (nbytes / t_fused) / (8 * m / t_copy),
                    "speedup_vs_unfused": t_unfused / t_fused,
                }
            )
    return {
        "benchmark": "bench_kernels",
        "backend": backend_name,
        "device": device,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "numpy_version": np.__version__,
        "sizes": [int(n) for n in sizes],
        "repeats": repeats,
        "warmup": warmup,
        "results": results,
    }


def format_table(report: dict) -> str:
    head = (
        f"{'kernel':<24}{'n':>11}{'B/el':>6}{'fused GB/s':>12}{'copy GB/s':>11}"
        f"{'unfused GB/s':>14}{'fused/copy':>12}{'speed-up':>10}"
    )
    lines = [f"backend {report['backend']} on {report['device']['name']}", head, "-" * len(head)]
    for r in report["results"]:
        lines.append(
            f"{r['kernel']:<24}{r['n']:>11}{r['bytes_per_element']:>6}{r['fused_gbps']:>12.2f}"
            f"{r['copy_gbps']:>11.2f}{r['unfused_gbps']:>14.2f}{r['fused_over_copy']:>12.2f}"
            f"{r['speedup_vs_unfused']:>9.2f}x"
        )
    return "\n".join(lines)


def _size(text: str) -> int:
    value = float(text)  # accepts 1e6 as well as 1000000
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"size must be a positive integer, got {text}")
    return int(value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--backend", choices=["auto", "cupy", "numpy"], default="auto",
        help="auto: cupy when a GPU is usable, else numpy",
    )  # fmt: skip
    ap.add_argument("--sizes", type=_size, nargs="+", help="vector lengths (default per backend)")
    ap.add_argument("--repeats", type=int, help="timed runs per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    ap.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=list(KERNELS))
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = ap.parse_args(argv)

    backend = args.backend
    if backend == "auto":
        ok, why = gpu_available()
        backend = "cupy" if ok else "numpy"
        if not ok:
            print(f"no GPU ({why}); benchmarking the NumPy backend", file=sys.stderr)
    sizes = args.sizes or DEFAULT_SIZES[backend]
    repeats = args.repeats or DEFAULT_REPEATS[backend]
    if repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")

    report = run(backend, sizes, repeats, args.warmup, args.kernels)
    print(format_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.json)  # never leave a half-written result
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
