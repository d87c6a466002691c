#!/usr/bin/env bash
# The whole GPU verification of easgd-mpi as one command, sized for one call of at most 8
# minutes on a lent GPU machine (Python 3.12 with torch, cupy, h5py and mpi4py, no network).
#
#   tools/device-check.sh [--dry-run] [--wheels DIR] [--budget SECONDS] [OUTDIR]
#
# OUTDIR: the argument, else $OUT (the device tool's folder that comes back), else
# ./device-check-out. It receives at most 7 files (the device tool brings back 8): the whole
# log (device-check.log), summary.txt and summary.json (PASS/FAIL/SKIP per step), the
# benchmarks' JSON (kernels-cupy.json, torch-cuda.json), gpu-costs.json (the measurements of
# kernel-resources, loss-sync and exchange-staged) and details.tar.gz (every step's own log, the
# pytest report, the training runs' stdout and metrics.jsonl; no checkpoints).
#
# Steps, each under its own `timeout`, all within --budget seconds (default 480):
#   env          nvidia-smi; Python, torch, CuPy, h5py versions; whether a GPU is usable
#   mpi          mpi4py's MPI library and a 2-rank launch; if either fails, installs the
#                carried wheels from --wheels (default: wheels/, made here by
#                tools/fetch-device-wheels.sh) offline: mpich and pytest-mpi (then, if still
#                needed, mpi4py) into this Python's environment, or with pip --prefix under a
#                scratch folder where that environment is read-only
#   easgd-check  mpiexec -n 2 python -m easgd_mpi check (MPI, GPU, CuPy, kernels per rank)
#   tests-gpu    EASGD_TEST_GPU=1 python -m pytest -q tests/gpu
#   kernel-resources  registers, local memory (spills), shared and constant memory of every
#                  kernel as NVRTC built it (CuPy's function attributes), and nvcc's
#                  --resource-usage for the same architecture where nvcc is on PATH
#   bench-kernels  bench/bench_kernels.py --backend cupy --misaligned: every kernel at 1e6, 1e7,
#                  1e8 as 100 back-to-back launches against 100 device copies, the per-launch
#                  overhead, and sgd_step at 1e8 on aligned, shifted and misaligned views
#   loss-sync      per-step cost of reading the loss every step (float(loss) / loss.item(), a
#                  host synchronisation) against never: the package's CuPy MLP (digits-sized
#                  and 784-1024-1024-10) and a plain PyTorch MLP of the same sizes
#   exchange-staged  mpiexec -n 2 (master + 1 GPU worker): one exchange of 1e7 floats through
#                  the center window, staged through pinned buffers, with 262144- and
#                  4194304-float chunks, each serial (one chunk after the other) and
#                  overlapped (copies on their own streams, issue 11), and a host worker
#   cuda-aware     only where MPIX_Query_cuda_support() says 1 (else SKIP): easgd check and
#                  sync EASGD training with EASGD_CUDA_MPI=1 (device buffers to Allreduce)
#   train-digits   2 GPU workers (+ master) train the digits MLP; center error <= 0.06
#   train-cifar    2 GPU workers train the CIFAR convnet on synthetic CIFAR-10 files written
#                  by tests/image_files.py; center error < 0.5 (chance: 0.9)
#   bench-torch    bench/bench_torch.py --device cuda
# A failing step does not stop the others; the GPU steps fail at once where no GPU is usable,
# and the MPI ones where MPI is unusable. A step that prints "SKIP: why" and exits 0 is SKIP
# (not a failure). Exit status: 0 if every step passed or was skipped, else 1.
# --dry-run prints what would run and runs nothing.
#
# The package is used from the source tree (PYTHONPATH=src): nothing is built, no network.
# Environment: PYTHON (default python3); DEVICE_CHECK_INSTALL=prefix installs the wheels under a
# scratch prefix even where this Python's environment is writable; DEVICE_CHECK_FORCE=1 runs
# the GPU steps even where no GPU is found (to test this script on a CPU machine: they fail;
# DEVICE_CHECK_XP=numpy, BENCH_BACKEND=numpy and BENCH_SIZES="1e4 1e5" make loss-sync,
# exchange-staged and bench-kernels measure the NumPy backend instead, EXCHANGE_N and
# LOSS_SYNC_STEPS shrink them).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

DRY=0
WHEELS=$REPO/wheels
BUDGET=480
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --wheels=*) WHEELS=${1#*=} ;;
    --budget) BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    -h|--help) sed -n '2,52p' "$0"; exit 0 ;;
    -*) echo "device-check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUTDIR=$1 ;;
  esac
  shift
done
OUTDIR=${OUTDIR:-${OUT:-$REPO/device-check-out}}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd || echo "$WHEELS")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX") || exit 2
mkdir -p "$WORK/logs" "$WORK/runs"

export PY=${PYTHON:-python3}
export REPO OUTDIR WORK WHEELS
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Harmless for MPICH; lets an Open MPI found on the image run as root and oversubscribe.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1
START=$(date +%s)
STEPS=()
declare -A RESULT SECONDS_TAKEN NOTE
HAVE_GPU=0
GPU_WHY="not checked"
MPI_OK=0

# ---- helpers ---------------------------------------------------------------------------------
say() { printf '%s\n' "$*"; }

record() {  # name result seconds note
  STEPS+=("$1")
  RESULT[$1]=$2
  SECONDS_TAKEN[$1]=$3
  NOTE[$1]=$4
  say "--- $1: $2 (${3}s)${4:+ - $4}"
}

# run_step NAME TIMEOUT NEEDS(gpu|mpi|gpu+mpi|-) FUNCTION: FUNCTION runs under `timeout` in a
# fresh bash (exported functions and variables), its output teed to the step's own log. A
# function may print "NOTE: ..." lines; the last one goes into the summary.
run_step() {
  local name=$1 limit=$2 needs=$3 fn=$4
  local log=$WORK/logs/$name.log
  say ""
  say "=== $name ==="
  if [ "$DRY" = 1 ]; then
    say "[dry-run] would run (timeout ${limit}s, needs: $needs):"
    declare -f "$fn" | sed '1,2d;$d'
    record "$name" DRY 0 ""
    return
  fi
  if [[ $needs == *gpu* ]] && [ "$HAVE_GPU" != 1 ] && [ "${DEVICE_CHECK_FORCE:-}" != 1 ]; then
    record "$name" FAIL 0 "no GPU: $GPU_WHY"
    return
  fi
  if [[ $needs == *mpi* ]] && [ "$MPI_OK" != 1 ]; then
    record "$name" FAIL 0 "MPI unusable (see step mpi)"
    return
  fi
  local left=$((BUDGET - ($(date +%s) - START)))
  if [ "$left" -lt 15 ]; then
    record "$name" FAIL 0 "not run: the ${BUDGET}s budget is spent"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "timeout ${limit}s"
  local t0 rc note
  t0=$(date +%s)
  timeout -k 10 "$limit" bash -c "$fn" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  note=$(grep '^NOTE: ' "$log" | tail -n 1 | cut -c7-)
  if [ -z "$note" ] && [ "$rc" != 0 ]; then  # a failure without a NOTE: its last line says why
    note=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-160)
  fi
  note=$(printf '%s' "$note" | tr -s ' \t' ' ')
  if [ "$rc" = 0 ] && grep -q '^SKIP: ' "$log"; then  # ran, and found nothing to do here
    record "$name" SKIP $(($(date +%s) - t0)) "$(grep '^SKIP: ' "$log" | tail -n 1 | cut -c7-)"
  elif [ "$rc" = 0 ]; then
    record "$name" PASS $(($(date +%s) - t0)) "$note"
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    record "$name" FAIL $(($(date +%s) - t0)) "timed out after ${limit}s${note:+; $note}"
  else
    record "$name" FAIL $(($(date +%s) - t0)) "exit $rc${note:+; $note}"
  fi
}

mpiexec_path() {  # the launcher next to this Python (what the tests use), else on PATH
  local bin
  bin=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))' 2>/dev/null)
  if [ -n "$bin" ] && [ -x "$bin/mpiexec" ]; then
    echo "$bin/mpiexec"
  else
    command -v mpiexec
  fi
}

mpi_works() {  # mpi4py loads an MPI library and a 2-rank launch sees a world of 2
  local mpiexec
  "$PY" -c 'from mpi4py import MPI; print("MPI library:", MPI.Get_library_version().strip())' \
    || return 1
  mpiexec=$(mpiexec_path) || { say "no mpiexec next to $PY nor on PATH"; return 1; }
  say "launcher: $mpiexec"
  timeout 60 "$mpiexec" -n 2 "$PY" -c 'import sys
from mpi4py import MPI
c = MPI.COMM_WORLD
print(f"rank {c.Get_rank()} of {c.Get_size()}")
sys.exit(0 if c.Get_size() == 2 else 3)' || { say "a 2-rank launch failed"; return 1; }
}

pip_offline() {  # pip install from the carried wheels only; into this Python's environment,
  # else (read-only, or DEVICE_CHECK_INSTALL=prefix) under the prefix $WORK/prefix, whose
  # paths go to $WORK/mpi.env for the later steps. (Not pip --target: it drops the wheel's
  # lib/ folder, where libmpi is.)
  local args=(install --no-index --find-links "$WHEELS" --no-cache-dir --disable-pip-version-check)
  if [ "${DEVICE_CHECK_INSTALL:-}" != prefix ] && "$PY" -m pip "${args[@]}" "$@"; then
    return 0
  fi
  local prefix=$WORK/prefix site
  say "installing under $prefix (pip --prefix)"
  "$PY" -m pip "${args[@]}" --prefix "$prefix" "$@" || return 1
  site=$("$PY" -c 'import sys, sysconfig
print(sysconfig.get_path("purelib", vars={"base": sys.argv[1], "platbase": sys.argv[1]}))' \
    "$prefix") || return 1
  cat >"$WORK/mpi.env" <<ENV
export PYTHONPATH=$REPO/src:$site\${PYTHONPATH:+:\$PYTHONPATH}
export PATH=$prefix/bin:\$PATH
export LD_LIBRARY_PATH=$prefix/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
ENV
  # shellcheck disable=SC1091
  source "$WORK/mpi.env"
}
export -f say mpiexec_path mpi_works pip_offline

# ---- the steps (each runs in its own bash under timeout) --------------------------------------
step_env() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi || true
  else
    say "nvidia-smi: not found"
  fi
  say "python: $(command -v "$PY") $("$PY" -c 'import sys; print(sys.version.split()[0])')"
  "$PY" - <<'EOF'
import importlib
for name in ("numpy", "torch", "cupy", "h5py", "mpi4py", "pytest"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:8s} {getattr(mod, '__version__', '?')}")
    except Exception as exc:  # report, never fail here
        print(f"{name:8s} not importable: {exc.__class__.__name__}: {exc}")
try:
    import torch
    ok = torch.cuda.is_available()
    print("torch CUDA:", torch.version.cuda, "available:", ok,
          torch.cuda.get_device_name(0) if ok else "")
except Exception as exc:
    print("torch CUDA: unknown:", exc)
try:
    from easgd_mpi.backend.cupy_backend import gpu_available
    print("CuPy GPU usable:", gpu_available())
except Exception as exc:
    print("CuPy GPU usable: unknown:", exc)
EOF
  "$PY" -c 'from mpi4py import MPI; print(MPI.Get_library_version())' \
    || say "mpi4py finds no MPI library (step mpi installs the carried wheels)"
  say "cores: $(nproc), memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
  true
}

step_mpi() {
  if mpi_works; then
    say "NOTE: $("$PY" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0].strip())')"
  else
    if ! ls "$WHEELS"/mpich-*.whl >/dev/null 2>&1; then
      say "NOTE: no usable MPI and no mpich wheel in $WHEELS: run tools/fetch-device-wheels.sh" \
        "here and carry the folder (docs/PERFORMANCE.md, GPU verification)"
      return 1
    fi
    say "installing the carried wheels from $WHEELS (offline)"
    pip_offline mpich pytest-mpi || { say "NOTE: pip install of mpich failed"; return 1; }
    if ! mpi_works; then
      say "mpi4py still finds no usable MPI: installing the carried mpi4py wheel"
      pip_offline --upgrade --force-reinstall --no-deps mpi4py \
        && mpi_works || { say "NOTE: MPI unusable even after installing the wheels"; return 1; }
    fi
    say "NOTE: installed from wheels: $("$PY" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0].strip())')"
  fi
  if ! "$PY" -c 'import pytest' 2>/dev/null; then
    pip_offline pytest || { say "NOTE: pytest missing and not installable"; return 1; }
  fi
}

step_easgd_check() {
  "$(mpiexec_path)" -n 2 "$PY" -m easgd_mpi check
}

step_tests_gpu() {
  EASGD_TEST_GPU=1 "$PY" -m pytest -q -p no:cacheprovider tests/gpu \
    --junitxml="$WORK/logs/pytest-gpu.xml"
}

step_kernel_resources() {
  local cc
  "$PY" - "$WORK/logs/kernel-resources.json" <<'EOF' || return 1
import json, sys
import cupy
from easgd_mpi.backend.cupy_backend import KERNELS, _kernels_for_device
ATTRS = ("num_regs", "local_size_bytes", "shared_size_bytes", "const_size_bytes",
         "max_threads_per_block")
cupy.cuda.Device(0).use()
cc = cupy.cuda.Device(0).compute_capability
fns = _kernels_for_device(0)  # what the backend launches: NVRTC, as CuPy compiles it
rows = {}
for name in KERNELS:
    fn = fns[name]
    try:
        attrs = dict(fn.attributes)
    except Exception:  # an older CuPy: the single properties
        attrs = {}
    rows[name] = r = {a: attrs.get(a, getattr(fn, a, None)) for a in ATTRS}
    print(f"{name:<24} registers {r['num_regs']!s:>4}  local {r['local_size_bytes']!s:>5} B  "
          f"shared {r['shared_size_bytes']!s:>5} B  const {r['const_size_bytes']!s:>5} B  "
          f"max threads/block {r['max_threads_per_block']}")
with open(sys.argv[1], "w") as f:
    json.dump({"compute_capability": cc, "compiler": "nvrtc", "kernels": rows}, f, indent=1)
with open(sys.argv[1] + ".cc", "w") as f:
    f.write(cc)
regs = [r["num_regs"] for r in rows.values() if r["num_regs"] is not None]
local = [n for n, r in rows.items() if (r["local_size_bytes"] or 0) > 0]
print(f"NOTE: NVRTC sm_{cc}: {min(regs, default='?')}-{max(regs, default='?')} registers; "
      f"local memory (spills) {'in ' + ', '.join(local) if local else 'none'}")
EOF
  cc=$(cat "$WORK/logs/kernel-resources.json.cc")
  if command -v nvcc >/dev/null; then
    say "nvcc $(nvcc --version | tail -n 1) --resource-usage -arch=sm_$cc (nvcc's defaults):"
    nvcc --resource-usage -arch="sm_$cc" -cubin -o "$WORK/easgd.cubin" -I kernels \
      kernels/easgd.cu 2>&1 | grep -E "entry function|registers|stack frame" \
      || say "nvcc failed (not fatal: the NVRTC figures above are what runs)"
  else
    say "nvcc: not on PATH (the NVRTC figures above are what runs)"
  fi
}

step_bench_kernels() {
  # 100 back-to-back launches per measurement against 100 device copies; --misaligned adds
  # sgd_step at the largest size (1e8) on shifted and misaligned views.
  "$PY" bench/bench_kernels.py --backend "${BENCH_BACKEND:-cupy}" --launches 100 --repeats 5 \
    --misaligned ${BENCH_SIZES:+--sizes $BENCH_SIZES} --json "$OUTDIR/kernels-cupy.json" \
    || return 1
  "$PY" - "$OUTDIR/kernels-cupy.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
big = max(r["sizes"])
sgd = {x["variant"]: x for x in r["results"] if x["kernel"] == "sgd_step" and x["n"] == big}
over = {o["kernel"]: o for o in r["launch_overhead"]}
ratios = ", ".join(f"{v} {x['fused_over_copy']:.2f}" for v, x in sgd.items())
worst = min((x for x in r["results"] if x["n"] == big), key=lambda x: x["fused_over_copy"])
dev = over["sgd_step"]["device_us"]
print(f"NOTE: sgd_step n={big:.0e} fused/copy: {ratios}; copy {sgd['aligned']['copy_gbps']:.0f} "
      f"GB/s; lowest at {big:.0e}: {worst['kernel']} {worst['fused_over_copy']:.2f}; launch "
      f"{over['sgd_step']['host_us']:.1f} us host, "
      f"{'-' if dev is None else f'{dev:.1f}'} us device")
EOF
}

step_loss_sync() {
  "$PY" - "$WORK/logs/loss-sync.json" <<'EOF'
# Per-step cost of a host synchronisation on the loss (float(loss) / loss.item() every step),
# against a loop that never reads it (what the workers do since issue 13, item 3).
import json, os, statistics, sys, time
import numpy as np
from easgd_mpi.config import Config
from easgd_mpi.models import make_problem
STEPS, REPEATS = int(os.environ.get("LOSS_SYNC_STEPS", "300")), 3
cpu = os.environ.get("DEVICE_CHECK_XP") == "numpy"  # to try this script on a CPU machine
results = []

def timed(run):
    run(20, False)  # warm-up: compilation, caches, the allocator
    run(20, True)
    out = {False: [], True: []}
    for sync in (False, True, False, True):  # interleaved: drifts hit both alike
        each = []
        for _ in range(REPEATS):
            t0 = time.perf_counter()
            run(STEPS, sync)
            each.append((time.perf_counter() - t0) / STEPS)
        out[sync].append(statistics.median(each))
    return min(out[False]), min(out[True])

def record(model, params, free, synced):
    results.append({"model": model, "params": int(params), "step_us": free * 1e6,
                    "step_synced_us": synced * 1e6, "sync_cost_us": (synced - free) * 1e6})

if cpu:
    from easgd_mpi.backend import NumpyBackend
    be, xp = NumpyBackend(), np
else:
    import cupy
    from easgd_mpi.backend.cupy_backend import CupyBackend
    be, xp = CupyBackend(0), cupy
sizes = {
    "64-64-10 (digits)": {},
    "784-1024-1024-10": {"data.name": "synthetic", "data.features": "784", "data.classes": "10",
                         "data.samples": "4096", "model.hidden": "[1024, 1024]"},
}
for label, overrides in sizes.items():
    prob = make_problem(Config.from_toml(None, overrides=overrides), xp=xp)
    n = prob.layout.size
    host = np.zeros(n, np.float32)
    prob.init_params(host, 0)
    x, g = be.asarray(host), be.zeros(n)
    rng = np.random.default_rng(0)
    batches = [prob.sample_batch(rng) for _ in range(64)]

    def run(steps, sync, prob=prob, x=x, g=g, batches=batches):
        for t in range(steps):
            loss = prob.loss_and_grad(x, batches[t % 64], g)
            be.sgd_step(x, g, 1e-3, 0.0)
            if sync:
                float(loss)
        be.synchronize()

    record(f"easgd MLP {label}", n, *timed(run))
try:
    import torch
    dev = "cpu" if cpu else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    for label, widths in (("64-64-10", [64, 64, 10]), ("784-1024-1024-10", [784, 1024, 1024, 10])):
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers[:-1]).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        xb = torch.randn(128, widths[0], device=dev)
        yb = torch.randint(0, widths[-1], (128,), device=dev)

        def run(steps, sync, model=model, opt=opt, xb=xb, yb=yb):
            for _ in range(steps):
                opt.zero_grad(set_to_none=False)
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
                if sync:
                    loss.item()
            if dev == "cuda":
                torch.cuda.synchronize()

        record(f"torch MLP {label}", sum(p.numel() for p in model.parameters()), *timed(run))
except Exception as exc:  # the CuPy figures stand on their own
    print(f"torch part not run: {exc.__class__.__name__}: {exc}")
print(f"{'model':<34}{'params':>10}{'step us':>10}{'+sync us':>10}{'cost us':>9}")
for r in results:
    print(f"{r['model']:<34}{r['params']:>10}{r['step_us']:>10.1f}{r['step_synced_us']:>10.1f}"
          f"{r['sync_cost_us']:>9.1f}")
with open(sys.argv[1], "w") as f:
    json.dump({"backend": be.name, "steps": STEPS, "results": results}, f, indent=1)
print("NOTE: per-step cost of reading the loss: " + "; ".join(
    f"{r['model']} {r['sync_cost_us']:+.0f} us ({r['step_synced_us'] / r['step_us']:.2f}x)"
    for r in results))
EOF
}

step_exchange_staged() {
  cat >"$WORK/exchange_staged.py" <<'EOF'
# One elastic exchange of N floats with the center (master + 1 worker): staged through pinned
# host buffers with small and large chunks, serial and overlapped, and a host (NumPy) worker.
import json, os, sys, time
from easgd_mpi.gpu_binding import bind_gpu
bind_gpu()  # as `easgd train` does, before MPI starts
import numpy as np
from mpi4py import MPI
from easgd_mpi.algorithms import _ChunkStaging
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.center import CenterWindow
comm = MPI.COMM_WORLD
rank = comm.Get_rank()
n = int(float(os.environ.get("EXCHANGE_N", "1e7")))
reps = int(os.environ.get("EXCHANGE_REPS", "10"))
host = NumpyBackend()
gpu = None
if rank == 1 and os.environ.get("DEVICE_CHECK_XP") != "numpy":
    from easgd_mpi.backend.cupy_backend import CupyBackend
    gpu = CupyBackend(0)
results = []
# Serial staging (each chunk copied in, computed, copied out and waited for before the next)
# against the overlapped pipeline (copies on their own streams, finished one chunk later), at
# both chunk sizes, and a host worker: ratios within this one run.
for kind, chunk, overlap in (
    ("staged-serial", 262144, False), ("staged-overlap", 262144, True),
    ("staged-serial", 4194304, False), ("staged-overlap", 4194304, True),
    ("host", 4194304, False),
):
    be = (gpu or host) if kind.startswith("staged") else host
    win = CenterWindow(comm, n, 1, initial=np.zeros(n, np.float32) if rank == 0 else None,
                       chunk=chunk, alloc_chunk=be.host_empty if rank == 1 else None)
    if rank == 0:  # the master only keeps MPI progressing, as in training
        req = comm.Ibarrier()
        while not req.Test():
            time.sleep(0.001)
    else:
        x = be.asarray(np.random.default_rng(1).standard_normal(n).astype(np.float32))
        staging = _ChunkStaging(be, win.chunk, overlap=overlap)

        def compute(lo, hi, c, e, x=x, staging=staging, be=be):
            finish = staging.start(c, e, lambda cd, ed: be.exchange(x[lo:hi], cd, ed, 0.01))
            if staging.overlap:
                return finish
            finish()
            return None

        win.exchange(compute)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            win.exchange(compute)
            be.synchronize()
            times.append(time.perf_counter() - t0)
        t = float(np.median(times))
        r = {"path": kind, "backend": be.name, "staged": bool(staging.staged),
             "overlap": bool(staging.overlap), "n": n, "chunk": win.chunk,
             "exchange_ms": t * 1e3, "gbps": 8 * n / t / 1e9}
        results.append(r)
        print(f"{kind:<14} {be.name:<6} chunk {r['chunk']:>8}: {r['exchange_ms']:8.2f} ms per "
              f"exchange, {r['gbps']:6.2f} GB/s (8n bytes)", flush=True)
        comm.Ibarrier().Wait()
    win.close()
if rank == 1:
    with open(sys.argv[1], "w") as f:
        json.dump({"n": n, "repeats": reps, "results": results}, f, indent=1)
    print(f"NOTE: one exchange of {n:.0e} floats: " + "; ".join(
        f"{r['path']} chunk {r['chunk']} {r['exchange_ms']:.1f} ms ({r['gbps']:.1f} GB/s)"
        for r in results), flush=True)
EOF
  "$(mpiexec_path)" -n 2 "$PY" "$WORK/exchange_staged.py" "$WORK/logs/exchange-staged.json"
}

step_cuda_aware() {
  local support
  support=$("$PY" -c 'from easgd_mpi.comm import cuda_aware_mpi
print({True: 1, False: 0, None: "unknown"}[cuda_aware_mpi()])' 2>/dev/null | tail -n 1)
  if [ "$support" != 1 ]; then
    say "SKIP: MPIX_Query_cuda_support() = ${support:-?}: this MPI is not CUDA-aware, so the" \
      "CUDA-aware path (EASGD_CUDA_MPI=1) is not run"
    return 0
  fi
  export EASGD_CUDA_MPI=1
  "$(mpiexec_path)" -n 2 "$PY" -m easgd_mpi check | tee "$WORK/logs/cuda-aware-check.txt"
  grep -q "allreduce device" "$WORK/logs/cuda-aware-check.txt" \
    || { say "NOTE: easgd check does not plan device buffers for the Allreduce"; return 1; }
  train_and_check cuda-aware 0.06 algorithm=sync-easgd steps=1500 lr=0.1 eval_interval=0.5 \
    checkpoint.interval=0
}

# train RUN_NAME MIN_ERROR_CHECK --set ... : 2 workers + master, then checks the announce line
# (both workers on a GPU) and the final center error in metrics.jsonl.
train_and_check() {
  local name=$1 max_error=$2; shift 2
  local run=$WORK/runs/$name args=() s
  for s in "$@" "run_dir=$run"; do args+=(--set "$s"); done
  "$(mpiexec_path)" -n 3 "$PY" -m easgd_mpi train "${args[@]}" | tee "$WORK/runs/$name.stdout"
  [ "${PIPESTATUS[0]}" = 0 ] || { say "NOTE: training exited non-zero"; return 1; }
  "$PY" - "$run/metrics.jsonl" "$WORK/runs/$name.stdout" "$max_error" <<'EOF'
import json, re, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
head = open(sys.argv[2]).readline()
final, limit = records[-1], float(sys.argv[3])
on_gpu = re.search(r"2 workers \(2 on GPU", head) is not None
err = final.get("center_error")
print(f"NOTE: workers on GPU: {on_gpu}; {final.get('steps')} steps; final center error "
      f"{err:.4f} (limit {limit}); {final.get('time', float('nan')):.1f}s")
sys.exit(0 if on_gpu and err is not None and err <= limit else 1)
EOF
}
export -f train_and_check

step_train_digits() {
  train_and_check digits 0.06 steps=1500 lr=0.1 eval_interval=0.5 checkpoint.interval=0
}

step_train_cifar() {
  local data=$WORK/cifar-10-batches-py
  "$PY" -c "import sys; sys.path.insert(0, 'tests')
from image_files import write_cifar_folder
write_cifar_folder(sys.argv[1], per_batch=200, test=200, seed=1)" "$data" || return 1
  train_and_check cifar 0.5 model.name=cifar-convnet data.name=cifar10 "data.path=$data" \
    steps=300 batch_size=128 lr=0.02 eval_interval=1 checkpoint.interval=0
}

step_bench_torch() {
  "$PY" bench/bench_torch.py --device cuda --steps 40 --repeats 5 --warmup 10 \
    --out "$OUTDIR/torch-cuda.json"
}
export -f step_env step_mpi step_easgd_check step_tests_gpu step_kernel_resources \
  step_bench_kernels step_loss_sync step_exchange_staged step_cuda_aware step_train_digits \
  step_train_cifar step_bench_torch

# ---- main ------------------------------------------------------------------------------------
main() {
  say "easgd-mpi device check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  say "repository $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
  say "output $OUTDIR; scratch $WORK; budget ${BUDGET}s"
  say "wheels $WHEELS: $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) file(s)"
  [ "$DRY" = 1 ] && say "DRY RUN: nothing is executed"

  if [ "$DRY" != 1 ]; then
    # Is a GPU usable? nvidia-smi, then torch and CuPy (both are needed by the GPU steps).
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
      GPU_WHY="nvidia-smi finds no GPU"
    else
      GPU_WHY=$(timeout 120 "$PY" -c '
try:
    import torch
    from easgd_mpi.backend.cupy_backend import gpu_available
    ok, why = gpu_available()
    if not torch.cuda.is_available():
        print("torch sees no CUDA device")
    else:
        print("OK" if ok else why)
except Exception as exc:
    print(f"{exc.__class__.__name__}: {exc}")' 2>/dev/null | tail -n 1)
      if [ "$GPU_WHY" = OK ]; then HAVE_GPU=1; else GPU_WHY=${GPU_WHY:-"the GPU probe failed"}; fi
    fi
    if [ "$HAVE_GPU" = 1 ]; then say "GPU: usable"; else say "no GPU: $GPU_WHY"; fi
  fi

  run_step env 60 - step_env
  run_step mpi 90 - step_mpi
  if [ "${RESULT[mpi]}" = PASS ]; then
    MPI_OK=1
    # pip --target fallback: the later steps need its paths too.
    # shellcheck disable=SC1091
    [ -f "$WORK/mpi.env" ] && source "$WORK/mpi.env"
  fi
  run_step easgd-check 45 mpi step_easgd_check
  run_step tests-gpu 150 gpu+mpi step_tests_gpu
  run_step kernel-resources 45 gpu step_kernel_resources
  run_step bench-kernels 90 gpu step_bench_kernels
  run_step loss-sync 60 gpu step_loss_sync
  run_step exchange-staged 60 gpu+mpi step_exchange_staged
  run_step cuda-aware 75 gpu+mpi step_cuda_aware
  run_step train-digits 60 gpu+mpi step_train_digits
  run_step train-cifar 90 gpu+mpi step_train_cifar
  run_step bench-torch 60 gpu+mpi step_bench_torch

  # ---- summary ----
  local failed=0 name line
  {
    printf '%-16s %-6s %6s  %s\n' step result secs note
    printf '%-16s %-6s %6s  %s\n' ---------------- ------ ------ ----
    for name in "${STEPS[@]}"; do
      printf '%-16s %-6s %6s  %s\n' "$name" "${RESULT[$name]}" "${SECONDS_TAKEN[$name]}" \
        "${NOTE[$name]}"
    done
  } >"$OUTDIR/summary.txt"
  for name in "${STEPS[@]}"; do
    case "${RESULT[$name]}" in PASS|DRY|SKIP) ;; *) failed=$((failed + 1)) ;; esac
  done
  {
    printf '{"total_seconds": %d, "failed": %d, "gpu": %s, "steps": [' \
      $(($(date +%s) - START)) "$failed" "$([ "$HAVE_GPU" = 1 ] && echo true || echo false)"
    local sep=""
    for name in "${STEPS[@]}"; do
      line=$(printf '%s' "${NOTE[$name]}" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\n\r\t')
      printf '%s{"step": "%s", "result": "%s", "seconds": %s, "note": "%s"}' "$sep" "$name" \
        "${RESULT[$name]}" "${SECONDS_TAKEN[$name]}" "$line"
      sep=", "
    done
    printf ']}\n'
  } >"$OUTDIR/summary.json"
  if [ "$DRY" != 1 ]; then
    # The cost measurements in one file: {step: its JSON} for the steps that wrote one.
    "$PY" - "$WORK/logs" "$OUTDIR/gpu-costs.json" <<'EOF' || say "could not write gpu-costs.json"
import json, sys
from pathlib import Path
found = {}
for step in ("kernel-resources", "loss-sync", "exchange-staged"):
    path = Path(sys.argv[1]) / f"{step}.json"
    if path.exists():
        found[step] = json.loads(path.read_text())
if found:
    Path(sys.argv[2]).write_text(json.dumps(found, indent=1) + "\n")
EOF
    tar -czf "$OUTDIR/details.tar.gz" -C "$WORK" --exclude='*.h5' --exclude='cifar-10-batches-py' \
      --exclude='site' logs runs 2>/dev/null || say "could not write details.tar.gz"
  fi
  say ""
  say "=== summary ($(($(date +%s) - START))s; files in $OUTDIR) ==="
  cat "$OUTDIR/summary.txt"
  rm -rf "$WORK"
  if [ "$failed" -gt 0 ]; then
    say "device-check: $failed step(s) failed"
    return 1
  fi
  if [ "$DRY" = 1 ]; then
    say "device-check: dry run, nothing was executed"
  else
    say "device-check: all steps passed"
  fi
}

main 2>&1 | tee "$OUTDIR/device-check.log"
exit "${PIPESTATUS[0]}"
