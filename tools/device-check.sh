#!/usr/bin/env bash
# The whole GPU verification of easgd-mpi as one command, sized for one call of at most 8
# minutes on a lent GPU machine (Python 3.12 with torch, cupy, h5py and mpi4py, no network).
#
#   tools/device-check.sh [--dry-run] [--wheels DIR] [--budget SECONDS] [OUTDIR]
#
# OUTDIR: the argument, else $OUT (the device tool's folder that comes back), else
# ./device-check-out. It receives at most 6 files (the device tool brings back 8): the whole
# log (device-check.log), summary.txt and summary.json (PASS/FAIL per step), the benchmarks'
# JSON (kernels-cupy.json, torch-cuda.json) and details.tar.gz (every step's own log, the
# pytest report, the training runs' stdout and metrics.jsonl; no checkpoints).
#
# Steps, each under its own `timeout`, all within --budget seconds (default 420):
#   env          nvidia-smi; Python, torch, CuPy, h5py versions; whether a GPU is usable
#   mpi          mpi4py's MPI library and a 2-rank launch; if either fails, installs the
#                carried wheels from --wheels (default: wheels/, made here by
#                tools/fetch-device-wheels.sh) offline: mpich and pytest-mpi (then, if still
#                needed, mpi4py) into this Python's environment, or with pip --prefix under a
#                scratch folder where that environment is read-only
#   easgd-check  mpiexec -n 2 python -m easgd_mpi check (MPI, GPU, CuPy, kernels per rank)
#   tests-gpu    EASGD_TEST_GPU=1 python -m pytest -q tests/gpu
#   bench-kernels  bench/bench_kernels.py --backend cupy
#   train-digits   2 GPU workers (+ master) train the digits MLP; center error <= 0.06
#   train-cifar    2 GPU workers train the CIFAR convnet on synthetic CIFAR-10 files written
#                  by tests/image_files.py; center error < 0.5 (chance: 0.9)
#   bench-torch    bench/bench_torch.py --device cuda
# A failing step does not stop the others; the GPU steps fail at once where no GPU is usable,
# and the MPI ones where MPI is unusable. Exit status: 0 if every step passed, else 1.
# --dry-run prints what would run and runs nothing.
#
# The package is used from the source tree (PYTHONPATH=src): nothing is built, no network.
# Environment: PYTHON (default python3); DEVICE_CHECK_INSTALL=prefix installs the wheels under a
# scratch prefix even where this Python's environment is writable; DEVICE_CHECK_FORCE=1 runs
# the GPU steps even where no GPU is found (to test this script on a CPU machine: they fail).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

DRY=0
WHEELS=$REPO/wheels
BUDGET=420
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --wheels=*) WHEELS=${1#*=} ;;
    --budget) BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
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
  if [ "$rc" = 0 ]; then
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

step_bench_kernels() {
  "$PY" bench/bench_kernels.py --backend cupy --json "$OUTDIR/kernels-cupy.json"
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
export -f step_env step_mpi step_easgd_check step_tests_gpu step_bench_kernels \
  step_train_digits step_train_cifar step_bench_torch

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
  run_step bench-kernels 60 gpu step_bench_kernels
  run_step train-digits 60 gpu+mpi step_train_digits
  run_step train-cifar 90 gpu+mpi step_train_cifar
  run_step bench-torch 60 gpu+mpi step_bench_torch

  # ---- summary ----
  local failed=0 name line
  {
    printf '%-14s %-6s %6s  %s\n' step result secs note
    printf '%-14s %-6s %6s  %s\n' -------------- ------ ------ ----
    for name in "${STEPS[@]}"; do
      printf '%-14s %-6s %6s  %s\n' "$name" "${RESULT[$name]}" "${SECONDS_TAKEN[$name]}" \
        "${NOTE[$name]}"
    done
  } >"$OUTDIR/summary.txt"
  for name in "${STEPS[@]}"; do
    case "${RESULT[$name]}" in PASS|DRY) ;; *) failed=$((failed + 1)) ;; esac
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
