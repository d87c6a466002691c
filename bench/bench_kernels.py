"""Effective bandwidth of the fused update kernels (docs/ARCHITECTURE.md §6.2).

For each fused method and size n, the table shows the bytes one pass moves (every array read or
written once, float32) divided by its time, next to two baselines measured in the same run:

* copy: a plain copy moving the same number of bytes (device-to-device memcpy on the GPU,
  ``np.copyto`` on the CPU), the ceiling for a memory-bound elementwise pass;
* unfused: the same formula written as ordinary array expressions (one kernel and one
  temporary per operator), what the code would cost without the fused kernels.

fused/copy is the fraction of the copy bandwidth reached (goal on a GPU: >= 0.9); speed-up is
t(unfused) / t(fused).

Every measurement times K back-to-back calls (``--launches``, default 100 on a GPU) between one
pair of CUDA events (perf_counter on the CPU) and divides by K: a single launch would put the
20-30 us of Python and launch overhead of each call inside the events and understate the kernels
at 1e6-1e7 elements. The copy is timed the same way (K back-to-back copies). Times are medians
over --repeats such measurements after --warmup untimed ones. The per-launch overhead is reported
on its own (second table): the host time to enqueue one call, and the device time per call of K
back-to-back calls on a tiny vector (where the GPU waits for the host), for every kernel and the
copy.

``--misaligned`` adds two rows for sgd_step at the largest size: "shifted" (x and g both views
offset by one float: the pointers agree modulo 16, so the float4 path runs after a 3-element
scalar head) and "misaligned" (x offset by one float, g not: the pointers disagree modulo 16 and
the kernel takes its scalar path for the whole vector, as for a chunk of a flat buffer against a
staging buffer that starts at 0).

    python bench/bench_kernels.py                      # GPU when usable, else NumPy
    python bench/bench_kernels.py --backend numpy --sizes 1e5 1e6 --repeats 5
    python bench/bench_kernels.py --backend cupy --kernels sgd_step --sizes 1e8 --misaligned
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

from benchlib import cpu_name
from easgd_mpi.backend.cupy_backend import KERNELS, gpu_available  # noqa: E402
from easgd_mpi.backend.numpy_backend import NumpyBackend  # noqa: E402

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "kernels.json"
DEFAULT_SIZES = {"cupy": [10**6, 10**7, 10**8], "numpy": [10**5, 10**6]}
DEFAULT_REPEATS = {"cupy": 10, "numpy": 5}
# K back-to-back calls per measurement: enough on a GPU to hide the per-call Python and launch
# overhead behind the kernels; on the CPU each call is already long against that overhead.
DEFAULT_LAUNCHES = {"cupy": 100, "numpy": 10}
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
# A timer(fn, repeats, warmup, launches) returns (seconds per call, host seconds per call): the
# median over `repeats` measurements of `launches` back-to-back calls, divided by `launches`.
# The host time is what the Python loop took to issue the calls (on a GPU: to enqueue them, as
# long as the launch queue does not fill up; on the CPU it is the time itself).
def _time_cpu(fn, repeats: int, warmup: int, launches: int) -> tuple[float, float]:
    for _ in range(warmup):
        for _ in range(launches):
            fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(launches):
            fn()
        times.append((time.perf_counter() - t0) / launches)
    t = statistics.median(times)
    return t, t


def _time_gpu(cupy, fn, repeats: int, warmup: int, launches: int) -> tuple[float, float]:
    for _ in range(warmup):
        for _ in range(launches):
            fn()
    cupy.cuda.get_current_stream().synchronize()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times, host = [], []
    for _ in range(repeats):
        start.record()
        t0 = time.perf_counter()
        for _ in range(launches):
            fn()
        host.append((time.perf_counter() - t0) / launches)
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3 / launches)
    return statistics.median(times), statistics.median(host)


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

        def timer(fn, r, w, k):
            return _time_gpu(cupy, fn, r, w, k)

        return be, cupy, timer, copy, device
    device = {"kind": "cpu", "name": cpu_name(), "cores": os.cpu_count()}
    return NumpyBackend(), np, _time_cpu, np.copyto, device


#: Row variants: (name, offset of x in floats, offset of every other array in floats).
VARIANTS = {"aligned": (0, 0), "shifted": (1, 1), "misaligned": (1, 0)}
#: The sizes of the launch-overhead measurement: small enough that the kernel itself is
#: negligible, so K back-to-back calls show what one call costs.
TINY_N = 1024


def _buffers(xp, rng, n: int, pad: int = 0) -> dict:
    return {
        p: xp.asarray(rng.standard_normal(n + pad, dtype=np.float32) * np.float32(0.1))
        for p in ("a", "x", "c", "g", "e", "v", "y", "acc", "xmean")
    }


def _args(spec, pool: dict, n: int, variant: str = "aligned") -> list:
    x_off, other_off = VARIANTS[variant]
    args = []
    for p in spec.params:
        if p not in spec.arrays:
            args.append(SCALARS[p])
            continue
        off = x_off if p == "x" else other_off
        args.append(pool[p][off : off + n])
    return args


def _row(name, variant, n, spec, launches, fused, unfused, copy, m) -> dict:
    (t_fused, h_fused), (t_unfused, _), (t_copy, _) = fused, unfused, copy
    nbytes = spec.bytes_per_element * n
    return {
        "kernel": name,
        "variant": variant,
        "offsets": dict(zip(("x", "others"), VARIANTS[variant], strict=True)),
        "n": int(n),
        "launches": launches,
        "bytes_per_element": spec.bytes_per_element,
        "bytes": int(nbytes),
        "fused_s": t_fused,
        "fused_host_s": h_fused,
        "unfused_s": t_unfused,
        "copy_s": t_copy,
        "fused_gbps": nbytes / t_fused / 1e9,
        "unfused_gbps": nbytes / t_unfused / 1e9,
        "copy_gbps": 8 * m / t_copy / 1e9,
        "fused_over_copy": (nbytes / t_fused) / (8 * m / t_copy),
        "speedup_vs_unfused": t_unfused / t_fused,
    }


def run(
    backend_name: str,
    sizes,
    repeats: int,
    warmup: int,
    names,
    launches: int = 100,
    misaligned: bool = False,
) -> dict:
    be, xp, timer, copy, device = _setup(backend_name)
    unfused = Unfused(xp)
    rng = np.random.default_rng(0)
    results = []

    def measure(name, variant, n, pool, src, dst):
        spec = KERNELS[name]
        args = _args(spec, pool, n, variant)
        m = spec.bytes_per_element * n // 8  # floats a copy reads and writes to move the bytes
        fused = timer(partial(getattr(be, name), *args), repeats, warmup, launches)
        slow = timer(partial(getattr(unfused, name), *args), repeats, warmup, launches)
        base = timer(partial(copy, dst[:m], src[:m]), repeats, warmup, launches)
        return _row(name, variant, n, spec, launches, fused, slow, base, m)

    largest = max(sizes)
    for n in sizes:
        extra = misaligned and n == largest
        # one set of buffers per size, shared by all kernels (each updates its own in place);
        # one float more where the shifted views need it
        pool = _buffers(xp, rng, n, pad=1 if extra else 0)
        widest = max(KERNELS[k].bytes_per_element for k in [*names, *(["sgd_step"] * extra)])
        n_copy = max(1, widest * n // 8)
        src = xp.ones(n_copy, dtype=np.float32)
        dst = xp.empty(n_copy, dtype=np.float32)
        for name in names:
            results.append(measure(name, "aligned", n, pool, src, dst))
        if extra:
            for variant in ("shifted", "misaligned"):
                results.append(measure("sgd_step", variant, n, pool, src, dst))
        del pool, src, dst

    # Launch overhead: K back-to-back calls on a tiny vector, host (enqueue) and device time.
    overhead = []
    pool = _buffers(xp, rng, TINY_N)
    src, dst = xp.ones(TINY_N, dtype=np.float32), xp.empty(TINY_N, dtype=np.float32)
    calls = [(k, partial(getattr(be, k), *_args(KERNELS[k], pool, TINY_N))) for k in names]
    calls.append(("copy", partial(copy, dst, src)))
    for name, fn in calls:
        t_dev, t_host = timer(fn, repeats, warmup, launches)
        overhead.append(
            {
                "kernel": name,
                "n": TINY_N,
                "launches": launches,
                "host_us": t_host * 1e6,
                # On the CPU there is no separate device: the host time is all there is.
                "device_us": t_dev * 1e6 if device["kind"] == "gpu" else None,
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
        "launches": launches,
        "misaligned": bool(misaligned),
        "results": results,
        "launch_overhead": overhead,
    }


def format_table(report: dict) -> str:
    k = report.get("launches", 1)
    head = (
        f"{'kernel':<30}{'n':>11}{'B/el':>6}{'us/call':>10}{'fused GB/s':>12}{'copy GB/s':>11}"
        f"{'unfused GB/s':>14}{'fused/copy':>12}{'speed-up':>10}"
    )
    lines = [
        f"backend {report['backend']} on {report['device']['name']}: {k} back-to-back calls "
        f"per measurement, median of {report['repeats']}",
        head,
        "-" * len(head),
    ]
    for r in report["results"]:
        label = (
            r["kernel"]
            if r.get("variant", "aligned") == "aligned"
            else (f"{r['kernel']} [{r['variant']}]")
        )
        lines.append(
            f"{label:<30}{r['n']:>11}{r['bytes_per_element']:>6}{r['fused_s'] * 1e6:>10.1f}"
            f"{r['fused_gbps']:>12.2f}{r['copy_gbps']:>11.2f}{r['unfused_gbps']:>14.2f}"
            f"{r['fused_over_copy']:>12.2f}{r['speedup_vs_unfused']:>9.2f}x"
        )
    over = report.get("launch_overhead") or []
    if over:
        lines.append("")
        lines.append(
            f"launch overhead per call ({k} back-to-back calls, n = {over[0]['n']}): host = time "
            "to issue one call, device = time per call between the events"
        )
        head = f"{'kernel':<30}{'host us':>10}{'device us':>11}"
        lines += [head, "-" * len(head)]
        for o in over:
            dev = "-" if o["device_us"] is None else f"{o['device_us']:.2f}"
            lines.append(f"{o['kernel']:<30}{o['host_us']:>10.2f}{dev:>11}")
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
    ap.add_argument("--repeats", type=int, help="timed measurements per row (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed measurements first (default 2)")
    ap.add_argument(
        "--launches", "-K", type=int,
        help="back-to-back calls per measurement (default 100 on a GPU, 10 on the CPU)",
    )  # fmt: skip
    ap.add_argument(
        "--misaligned", action="store_true",
        help="add sgd_step rows at the largest size on shifted and misaligned views",
    )  # fmt: skip
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
    launches = args.launches or DEFAULT_LAUNCHES[backend]
    if repeats < 1 or args.warmup < 0 or launches < 1:
        ap.error("--repeats and --launches must be >= 1 and --warmup >= 0")

    report = run(
        backend, sizes, repeats, args.warmup, args.kernels, launches=launches,
        misaligned=args.misaligned,
    )  # fmt: skip
    print(format_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.json)  # never leave a half-written result
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
