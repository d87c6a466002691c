#!/usr/bin/env bash
# The whole GPU verification of easgd-mpi as one command that always brings back what it
# learned, sized for one call of the device tool (Python 3.12 with torch, cupy, h5py and
# mpi4py, no network).
#
#   tools/device-check.sh [--dry-run] [--wheels DIR] [--budget SECONDS] [--steps A,B,...] [OUTDIR]
#
# One budget: --budget SECONDS, else $DEVICE_CHECK_BUDGET, else 450 (fits a call of
# `run(..., timeout_s=480)` with this script's own start and end). Every step has its share of
# the budget, and the shares, with 2 s per step for killing it and 1 s for writing the summary
# after it, add up to at most the budget less 5 s for the end. A step runs under a limit of its
# share plus what earlier steps left unused, never more than the budget leaves once the later
# steps have their shares: the whole check ends inside the budget even when every step hangs.
# The shares below are those of the default budget; another budget scales them. A step killed
# at its limit is TIMEOUT, and the check goes on with the next.
#
# OUTDIR: the argument, else $OUT (the device tool's folder that comes back), else
# ./device-check-out. It receives at most 7 files (the device tool brings back 8), and the
# summary in it is rewritten after EVERY step, so a call cut short still returns what was learned:
#   device-check.log   everything, step by step (each step's output after it ends)
#   summary.txt/.json  every step: PASS, FAIL, SKIP, TIMEOUT, NOT RUN, RUNNING or PENDING, its
#                      seconds, its share of the budget, the limit it ran under (its share and
#                      what earlier steps left unused) and a one-line note; the budget and the
#                      seconds used
#   gpu-costs.json     the measurements of kernel-resources, loss-sync and exchange-staged
#   kernels-cupy.json, torch-cuda.json   the benchmarks' own JSON
#   details.tar.gz     every step's log, the pytest reports, the training runs' stdout and
#                      metrics.jsonl (no checkpoints)
#
# Steps, in the order of what they prove (limit at the default budget; needs):
#   env           12 s  nvidia-smi; Python and the version of every package used (numpy, torch,
#                       CuPy, h5py, mpi4py, mpich, pytest, pytest-mpi, pytest-xdist,
#                       scikit-learn); CUDA runtime, driver and NVRTC; whether mpi4py finds an
#                       MPI library, and which
#   gpu-probe     30 s  whether a GPU is usable: CuPy sees it, and on every visible GPU the
#                       kernels compile and one of them runs and matches NumPy; torch's CUDA
#   mpi           35 s  mpi4py loads an MPI library and a 2-rank launch works; else the carried
#                       wheels from --wheels (default wheels/, made by
#                       tools/fetch-device-wheels.sh) are installed offline (mpich and
#                       pytest-mpi, then if still needed mpi4py) into this Python's
#                       environment, or with pip --prefix under a scratch folder where it is
#                       read-only
#   tests-gpu     70 s  (gpu) EASGD_TEST_GPU=1 pytest -v tests/gpu/test_cupy_backend.py
#   train-digits  35 s  (gpu, mpi) 2 GPU workers (+ master) train the digits MLP; every worker
#                       on a GPU and center error <= 0.06
#   tests-gpu-torch 60 s (gpu, mpi) the rest of tests/gpu: PyTorch on the GPU (one stream,
#                       no synchronisation in a step), GPU training runs
#   easgd-check   18 s  (mpi) mpiexec -n 2 python -m easgd_mpi check
#   kernel-resources 10 s (gpu) registers, local memory (spills), shared and constant memory
#                       of every kernel as NVRTC built it, and nvcc's --resource-usage where
#                       nvcc is on PATH
#   bench-kernels 30 s  (gpu) bench/bench_kernels.py --backend cupy --misaligned
#   exchange-staged 22 s (gpu, mpi) one exchange of 1e7 floats through the center window,
#                       staged with 262144- and 4194304-float chunks, serial and overlapped,
#                       and a host worker
#   loss-sync     18 s  (gpu) per-step cost of reading the loss every step against never
#   train-cifar   30 s  (gpu, mpi) 2 GPU workers, the CIFAR convnet on synthetic CIFAR-10 files;
#                       center error < 0.5 (chance: 0.9)
#   cuda-aware    15 s  (gpu, mpi) only where MPIX_Query_cuda_support() says 1 (else SKIP)
#   bench-torch   18 s  (gpu, mpi) bench/bench_torch.py --device cuda
# A failing step does not stop the others; a step that needs a GPU (or MPI) fails at once where
# gpu-probe (or mpi) found none. A step that prints "SKIP: why" and exits 0 is SKIP. Exit
# status: 0 if every step passed or was skipped, else 1; 2 for a bad option.
# --steps (or $DEVICE_CHECK_STEPS) runs only the named steps, in the order above (e.g. to run
# again what failed); without gpu-probe or mpi among them a GPU and MPI are taken to work.
# --dry-run prints what would run and runs nothing.
#
# The package is used from the source tree (PYTHONPATH=src): nothing is built, no network.
# Environment: PYTHON (default python3); DEVICE_CHECK_INSTALL=prefix installs the wheels under a
# scratch prefix even where this Python's environment is writable; DEVICE_CHECK_FORCE=1 runs
# the GPU steps even where no GPU is found (to try this script on a CPU machine: they fail;
# DEVICE_CHECK_XP=numpy, BENCH_BACKEND=numpy and BENCH_SIZES="1e4 1e5" make loss-sync,
# exchange-staged and bench-kernels measure the NumPy backend instead, EXCHANGE_N and
# LOSS_SYNC_STEPS shrink them); DEVICE_CHECK_REPLACE="NAME=COMMAND" (one per line) runs COMMAND
# (bash) as step NAME, whatever it needs, under NAME's limit (for the tests of this script).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

DRY=0
WHEELS=$REPO/wheels
BUDGET=${DEVICE_CHECK_BUDGET:-450}
ONLY=${DEVICE_CHECK_STEPS:-}
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --wheels=*) WHEELS=${1#*=} ;;
    --budget) BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    --steps) ONLY=$2; shift ;;
    --steps=*) ONLY=${1#*=} ;;
    -h|--help) sed -n '2,/^set -uo pipefail/p' "$0" | sed '$d'; exit 0 ;;
    -*) echo "device-check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUTDIR=$1 ;;
  esac
  shift
done
if ! [[ $BUDGET =~ ^[0-9]+$ ]] || [ "$BUDGET" -lt 1 ]; then
  echo "device-check: the budget must be a whole number of seconds, got '$BUDGET'" >&2
  exit 2
fi
OUTDIR=${OUTDIR:-${OUT:-$REPO/device-check-out}}
mkdir -p "$OUTDIR" || exit 2
OUTDIR=$(cd "$OUTDIR" && pwd)
WHEELS=$(cd "$WHEELS" 2>/dev/null && pwd || echo "$WHEELS")
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX") || exit 2
mkdir -p "$WORK/logs" "$WORK/runs"
trap 'rm -rf "$WORK"' EXIT

export PY=${PYTHON:-python3}
export REPO OUTDIR WORK WHEELS
export PYTHONPATH=$REPO/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Harmless for MPICH; lets an Open MPI found on the image run as root and oversubscribe.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1

# ---- the steps: name, limit at the default budget, needs, function -------------------------
STEP_TABLE=(
  "env 12 - step_env"
  "gpu-probe 30 - step_gpu_probe"
  "mpi 35 - step_mpi"
  "tests-gpu 70 gpu step_tests_gpu"
  "train-digits 35 gpu+mpi step_train_digits"
  "tests-gpu-torch 60 gpu+mpi step_tests_gpu_torch"
  "easgd-check 18 mpi step_easgd_check"
  "kernel-resources 10 gpu step_kernel_resources"
  "bench-kernels 30 gpu step_bench_kernels"
  "exchange-staged 22 gpu+mpi step_exchange_staged"
  "loss-sync 18 gpu step_loss_sync"
  "train-cifar 30 gpu+mpi step_train_cifar"
  "cuda-aware 15 gpu+mpi step_cuda_aware"
  "bench-torch 18 gpu+mpi step_bench_torch"
)
DEFAULT_BUDGET=450
END_RESERVE=5  # seconds kept for the end: the last summary, the archive, clean-up
KILL_GRACE=2   # a step still running KILL_GRACE s after its TERM is killed
PUBLISH=1      # writing the summary after a step
PER_STEP=$((KILL_GRACE + PUBLISH))

STEPS=() BASE=() NEEDS=() FN=()
declare -A RESULT SECS SHARE LIMIT NOTE REPLACE
for row in "${STEP_TABLE[@]}"; do
  read -r name base needs fn <<<"$row"
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  STEPS+=("$name") BASE+=("$base") NEEDS+=("$needs") FN+=("$fn")
  RESULT[$name]=PENDING SECS[$name]=0 LIMIT[$name]=0 NOTE[$name]=""
done
if [ -n "$ONLY" ]; then
  IFS=, read -r -a wanted <<<"$ONLY"
  for name in "${wanted[@]}"; do
    [ -n "${RESULT[$name]+x}" ] \
      || { echo "device-check: no step named '$name' (see --help)" >&2; exit 2; }
  done
fi
while IFS= read -r line; do  # DEVICE_CHECK_REPLACE: NAME=COMMAND lines
  [ -n "$line" ] || continue
  REPLACE[${line%%=*}]=${line#*=}
done <<<"${DEVICE_CHECK_REPLACE:-}"

# Each step's share of the budget: its default limit, scaled to what this budget leaves.
SCALED=()
total_base=0
for b in "${BASE[@]}"; do total_base=$((total_base + b)); done
avail=$((BUDGET - END_RESERVE - ${#STEPS[@]} * PER_STEP))
[ "$avail" -lt 0 ] && avail=0
for b in "${BASE[@]}"; do
  if [ "$BUDGET" = "$DEFAULT_BUDGET" ] || [ "$total_base" = 0 ]; then
    SCALED+=("$((b < avail ? b : avail))")
  else
    SCALED+=("$((b * avail / total_base))")
  fi
done

for i in "${!STEPS[@]}"; do SHARE[${STEPS[$i]}]=${SCALED[$i]}; done

HAVE_GPU=1 GPU_KNOWN=0 GPU_WHY=""
MPI_OK=1
START_MS=$(($(date +%s%N) / 1000000))

# ---- helpers ---------------------------------------------------------------------------------
LOG=$OUTDIR/device-check.log
: >"$LOG"
say() { printf '%s\n' "$*"; printf '%s\n' "$*" >>"$LOG"; }
elapsed_ms() { echo $(($(date +%s%N) / 1000000 - START_MS)); }

json_string() {  # a JSON string literal of $1
  local s=$1
  s=${s//\\/\\\\} s=${s//\"/\\\"} s=${s//$'\t'/ } s=${s//$'\r'/ } s=${s//$'\n'/ }
  printf '"%s"' "$s"
}

# Whether step i can run as far as is known now (a GPU step after gpu-probe found none cannot:
# it is recorded at once and needs no time).
runnable() {
  local i=$1 name=${STEPS[$1]} needs=${NEEDS[$1]}
  [ -n "${REPLACE[$name]+x}" ] && return 0
  if [[ $needs == *gpu* ]] && [ "$HAVE_GPU" != 1 ] && [ "${DEVICE_CHECK_FORCE:-}" != 1 ]; then
    return 1
  fi
  if [[ $needs == *mpi* ]] && [ "$MPI_OK" != 1 ]; then return 1; fi
  return 0
}

# The summary, rewritten whole (through a temporary file) after every step.
publish() {
  local name failed=0 used=$(($(elapsed_ms) / 1000)) sep="" tmp
  for name in "${STEPS[@]}"; do
    case "${RESULT[$name]}" in FAIL|TIMEOUT|"NOT RUN") failed=$((failed + 1)) ;; esac
  done
  tmp=$OUTDIR/.summary.tmp
  {
    printf 'budget %ss, used %ss%s\n' "$BUDGET" "$used" "${1:+ ($1)}"
    printf '%-17s %-8s %5s %5s %5s  %s\n' step result secs share limit note
    printf '%-17s %-8s %5s %5s %5s  %s\n' ----------------- -------- ----- ----- ----- ----
    for name in "${STEPS[@]}"; do
      printf '%-17s %-8s %5s %5s %5s  %s\n' "$name" "${RESULT[$name]}" "${SECS[$name]}" \
        "${SHARE[$name]}" "${LIMIT[$name]}" "${NOTE[$name]}"
    done
  } >"$tmp" && mv -f "$tmp" "$OUTDIR/summary.txt"
  {
    printf '{"budget_seconds": %d, "used_seconds": %d, "finished": %s, "failed": %d, ' \
      "$BUDGET" "$used" "$([ "${1:-}" = finished ] && echo true || echo false)" "$failed"
    printf '"seconds_per_step_beyond_its_limit": %d, "seconds_kept_for_the_end": %d, ' \
      "$PER_STEP" "$END_RESERVE"
    printf '"gpu": %s, "gpu_why": %s, "steps": [' \
      "$([ "$GPU_KNOWN" = 1 ] && { [ "$HAVE_GPU" = 1 ] && echo true || echo false; } || echo null)" \
      "$(json_string "$GPU_WHY")"
    for name in "${STEPS[@]}"; do
      printf '%s{"step": "%s", "result": "%s", "seconds": %s, "share_seconds": %s, ' \
        "$sep" "$name" "${RESULT[$name]}" "${SECS[$name]}" "${SHARE[$name]}"
      printf '"limit_seconds": %s, "note": %s}' "${LIMIT[$name]}" "$(json_string "${NOTE[$name]}")"
      sep=", "
    done
    printf ']}\n'
  } >"$tmp" && mv -f "$tmp" "$OUTDIR/summary.json"
  [ "$DRY" = 1 ] && return
  # The cost measurements in one file: {step: its JSON} for the steps that wrote one.
  sep=""
  {
    printf '{'
    for name in kernel-resources loss-sync exchange-staged; do
      if [ -s "$WORK/logs/$name.json" ]; then
        printf '%s"%s": ' "$sep" "$name"
        cat "$WORK/logs/$name.json"
        sep=", "
      fi
    done
    printf '}\n'
  } >"$tmp" && mv -f "$tmp" "$OUTDIR/gpu-costs.json"
  tar -czf "$tmp" -C "$WORK" --exclude='*.h5' --exclude='cifar-10-batches-py' \
    --exclude='prefix' logs runs 2>/dev/null && mv -f "$tmp" "$OUTDIR/details.tar.gz"
}

# run_step I: step I under its limit, its output in its own log (no pipe: nothing a step leaves
# running can hold the check), then appended to device-check.log and its end shown.
run_step() {
  local i=$1 name=${STEPS[$1]} needs=${NEEDS[$1]} fn=${FN[$1]}
  local log=$WORK/logs/$name.log
  local cmd=$fn
  if [ -n "${REPLACE[$name]+x}" ]; then cmd=${REPLACE[$name]} needs="-"; fi
  say ""
  say "=== $name ==="
  if [ "$DRY" = 1 ]; then
    say "[dry-run] would run (limit ${SCALED[$i]}s at budget ${BUDGET}s, needs: $needs):"
    if declare -F "$cmd" >/dev/null; then declare -f "$cmd" | sed '1,2d;$d'; else say "$cmd"; fi
    RESULT[$name]=DRY
    return
  fi
  if [[ $needs == *gpu* ]] && [ "$HAVE_GPU" != 1 ] && [ "${DEVICE_CHECK_FORCE:-}" != 1 ]; then
    RESULT[$name]=FAIL NOTE[$name]="no GPU: $GPU_WHY"
    say "--- $name: FAIL (${NOTE[$name]})"
    return
  fi
  if [[ $needs == *mpi* ]] && [ "$MPI_OK" != 1 ]; then
    RESULT[$name]=FAIL NOTE[$name]="MPI unusable (see step mpi)"
    say "--- $name: FAIL (${NOTE[$name]})"
    return
  fi
  # This step's limit: what the budget leaves once the later steps that can still run have
  # their own shares (and every step its kill grace and summary).
  local later=0 j
  for ((j = i + 1; j < ${#STEPS[@]}; j++)); do
    runnable "$j" && later=$((later + SCALED[j] + PER_STEP))
  done
  local limit=$(((BUDGET - END_RESERVE) - later - PER_STEP - ($(elapsed_ms) + 999) / 1000))
  if [ "$limit" -lt 1 ]; then
    RESULT[$name]="NOT RUN" NOTE[$name]="no time left in the ${BUDGET}s budget"
    say "--- $name: NOT RUN (${NOTE[$name]})"
    return
  fi
  LIMIT[$name]=$limit RESULT[$name]=RUNNING
  publish "running $name"
  say "limit ${limit}s"
  local t0 rc secs note
  t0=$(elapsed_ms)
  timeout -k "$KILL_GRACE" "$limit" bash -c "$cmd" >"$log" 2>&1 </dev/null
  rc=$?
  secs=$((($(elapsed_ms) - t0 + 500) / 1000))
  {
    printf '%s\n' "--- output of $name ---"
    cat "$log"
  } >>"$LOG"
  tail -n 15 "$log"
  note=$(grep '^NOTE: ' "$log" | tail -n 1 | cut -c7-)
  if [ -z "$note" ] && [ "$rc" != 0 ]; then  # a failure without a NOTE: its last line says why
    note=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-160)
  fi
  note=$(printf '%s' "$note" | tr -s ' \t' ' ')
  SECS[$name]=$secs
  if [ "$rc" = 0 ] && grep -q '^SKIP: ' "$log"; then  # ran, and found nothing to do here
    RESULT[$name]=SKIP NOTE[$name]=$(grep '^SKIP: ' "$log" | tail -n 1 | cut -c7-)
  elif [ "$rc" = 0 ]; then
    RESULT[$name]=PASS NOTE[$name]=$note
  elif { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && [ $(($(elapsed_ms) - t0)) -ge $((limit * 1000)) ]; then
    RESULT[$name]=TIMEOUT
    NOTE[$name]="killed at its limit of ${limit}s (share ${SCALED[$i]}s)${note:+; last: $note}"
  else
    RESULT[$name]=FAIL NOTE[$name]="exit $rc${note:+; $note}"
  fi
  say "--- $name: ${RESULT[$name]} (${secs}s)${NOTE[$name]:+ - ${NOTE[$name]}}"
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
  mpiexec=$(mpiexec_path) || { echo "no mpiexec next to $PY nor on PATH"; return 1; }
  echo "launcher: $mpiexec"
  timeout 25 "$mpiexec" -n 2 "$PY" -c 'import sys
from mpi4py import MPI
c = MPI.COMM_WORLD
print(f"rank {c.Get_rank()} of {c.Get_size()}")
sys.exit(0 if c.Get_size() == 2 else 3)' || { echo "a 2-rank launch failed"; return 1; }
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
  echo "installing under $prefix (pip --prefix)"
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
export -f mpiexec_path mpi_works pip_offline

# ---- the steps (each runs in its own bash under timeout) --------------------------------------
step_env() {
  if command -v nvidia-smi >/dev/null; then
    timeout 10 nvidia-smi || echo "nvidia-smi failed"
  else
    echo "nvidia-smi: not found"
  fi
  echo "cores: $(nproc), memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
  # mpi4py in a child of its own: importing mpi4py.MPI can fail, or hang, without a library.
  timeout 15 "$PY" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0].strip())' \
    >"$WORK/logs/mpi-library.txt" 2>&1 || echo "no MPI library ($(tail -n 1 "$WORK/logs/mpi-library.txt"))" >"$WORK/logs/mpi-library.txt"
  "$PY" - "$WORK/logs/env.json" "$WORK/logs/mpi-library.txt" <<'EOF'
import importlib, importlib.metadata as md, json, platform, sys
versions = {"python": platform.python_version()}
for dist in ("numpy", "torch", "h5py", "mpi4py", "mpich", "pytest", "pytest-mpi",
             "pytest-xdist", "scikit-learn"):
    try:
        versions[dist] = md.version(dist)
    except md.PackageNotFoundError:
        versions[dist] = None
cupy = [d.metadata["Name"] for d in md.distributions()
        if (d.metadata["Name"] or "").lower().startswith("cupy")]
for name in cupy or ["cupy"]:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
versions["MPI library (mpi4py)"] = open(sys.argv[2]).read().strip() or None
try:
    import torch
    versions["torch CUDA"] = torch.version.cuda
except Exception as exc:  # report, never fail here
    versions["torch CUDA"] = f"{exc.__class__.__name__}"
try:
    from easgd_mpi.backend import cupy_backend
    info = cupy_backend.describe()
    for key in ("cuda_runtime_version", "cuda_driver_version", "nvrtc_version"):
        versions[key] = info[key]
except Exception as exc:
    versions["cuda_runtime_version"] = f"unknown: {exc.__class__.__name__}"
for name, v in versions.items():
    print(f"{name:24s} {v if v is not None else 'not installed'}")
json.dump(versions, open(sys.argv[1], "w"), indent=1)
v = {k: ("not installed" if x is None else x) for k, x in versions.items()}
cupy_v = "; ".join(f"{n} {v[n]}" for n in (cupy or ["cupy"]))
print(f"NOTE: Python {v['python']}; numpy {v['numpy']}; torch {v['torch']} (CUDA "
      f"{v['torch CUDA']}); {cupy_v} (CUDA runtime {v.get('cuda_runtime_version')}, driver "
      f"{v.get('cuda_driver_version')}); h5py {v['h5py']}; mpi4py {v['mpi4py']}: "
      f"{v['MPI library (mpi4py)']}; pytest {v['pytest']}, pytest-mpi {v['pytest-mpi']}, "
      f"pytest-xdist {v['pytest-xdist']}; scikit-learn {v['scikit-learn']}")
EOF
}

step_gpu_probe() {
  local verdict=$WORK/gpu-probe.txt
  echo "not found" >"$verdict"
  if ! command -v nvidia-smi >/dev/null || ! timeout 10 nvidia-smi -L; then
    echo "nvidia-smi finds no GPU" >"$verdict"
    echo "NOTE: nvidia-smi finds no GPU"
    return 1
  fi
  "$PY" - "$verdict" <<'EOF'
# A GPU is usable when CuPy sees it and, on every visible GPU, the kernels compile and one of
# them runs and matches NumPy (CupyBackend's start-up self-test).
import sys

def verdict(text, code):
    open(sys.argv[1], "w").write(text)
    print(f"NOTE: {text}")
    sys.exit(code)

try:
    from easgd_mpi.backend.cupy_backend import CupyBackend, gpu_available
    ok, why = gpu_available()
    if not ok:
        verdict(why, 1)
    import cupy
    n = cupy.cuda.runtime.getDeviceCount()
    names = []
    for d in range(n):
        backend = CupyBackend(device_id=d)
        props = cupy.cuda.runtime.getDeviceProperties(backend.device_id)
        names.append(props["name"].decode() if isinstance(props["name"], bytes) else props["name"])
    try:
        import torch
        t = f"torch {torch.__version__} CUDA {torch.version.cuda}: " + (
            "available" if torch.cuda.is_available() else "NOT available")
    except ImportError:
        t = "torch not installed"
    print(f"kernels compile and run on {n} GPU(s): {', '.join(names)}; {t}")
    open(sys.argv[1], "w").write("OK")
    print(f"NOTE: {n} GPU(s) ({', '.join(sorted(set(names)))}): kernels compile and run; {t}")
except SystemExit:
    raise
except Exception as exc:
    text = str(exc).strip().splitlines()
    verdict(f"{exc.__class__.__name__}: {text[0] if text else ''}", 1)
EOF
}

step_mpi() {
  if mpi_works; then
    echo "NOTE: $("$PY" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0].strip())')"
  else
    if ! ls "$WHEELS"/mpich-*.whl >/dev/null 2>&1; then
      echo "NOTE: no usable MPI and no mpich wheel in $WHEELS: run tools/fetch-device-wheels.sh" \
        "here and carry the folder (docs/PERFORMANCE.md, GPU verification)"
      return 1
    fi
    echo "installing the carried wheels from $WHEELS (offline)"
    pip_offline mpich pytest-mpi || { echo "NOTE: pip install of mpich failed"; return 1; }
    if ! mpi_works; then
      echo "mpi4py still finds no usable MPI: installing the carried mpi4py wheel"
      pip_offline --upgrade --force-reinstall --no-deps mpi4py \
        && mpi_works || { echo "NOTE: MPI unusable even after installing the wheels"; return 1; }
    fi
    echo "NOTE: installed from wheels: $("$PY" -c 'from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0].strip())')"
  fi
  if ! "$PY" -c 'import pytest' 2>/dev/null; then
    pip_offline pytest || { echo "NOTE: pytest missing and not installable"; return 1; }
  fi
}

step_easgd_check() {
  "$(mpiexec_path)" -n 2 "$PY" -m easgd_mpi check
}

# pytest -v: each test's result is in the log as it ends, so a step killed at its limit still
# says which tests passed.
step_tests_gpu() {
  EASGD_TEST_GPU=1 "$PY" -m pytest -v -p no:cacheprovider tests/gpu/test_cupy_backend.py \
    --junitxml="$WORK/logs/pytest-gpu.xml"
}

step_tests_gpu_torch() {
  EASGD_TEST_GPU=1 "$PY" -m pytest -v -p no:cacheprovider tests/gpu/test_torch_gpu.py \
    tests/gpu/test_gpu_training.py --junitxml="$WORK/logs/pytest-gpu-torch.xml"
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
    echo "nvcc $(nvcc --version | tail -n 1) --resource-usage -arch=sm_$cc (nvcc's defaults):"
    nvcc --resource-usage -arch="sm_$cc" -cubin -o "$WORK/easgd.cubin" -I kernels \
      kernels/easgd.cu 2>&1 | grep -E "entry function|registers|stack frame" \
      || echo "nvcc failed (not fatal: the NVRTC figures above are what runs)"
  else
    echo "nvcc: not on PATH (the NVRTC figures above are what runs)"
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
            started = staging.start(
                c, e, lambda cd, ed: be.exchange(x[lo:hi], cd, ed, 0.01), lambda sq: None
            )
            if staging.overlap:
                return started
            started()
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
    echo "SKIP: MPIX_Query_cuda_support() = ${support:-?}: this MPI is not CUDA-aware, so the" \
      "CUDA-aware path (EASGD_CUDA_MPI=1) is not run"
    return 0
  fi
  export EASGD_CUDA_MPI=1
  "$(mpiexec_path)" -n 2 "$PY" -m easgd_mpi check >"$WORK/logs/cuda-aware-check.txt" 2>&1
  cat "$WORK/logs/cuda-aware-check.txt"
  grep -q "allreduce device" "$WORK/logs/cuda-aware-check.txt" \
    || { echo "NOTE: easgd check does not plan device buffers for the Allreduce"; return 1; }
  train_and_check cuda-aware 0.06 algorithm=sync-easgd steps=1500 lr=0.1 eval_interval=0.5 \
    checkpoint.interval=0
}

# train RUN_NAME MAX_ERROR --set ... : 2 workers + master, then checks the announce line
# (every worker on a GPU, whichever GPUs they are) and the final center error in metrics.jsonl.
train_and_check() {
  local name=$1 max_error=$2; shift 2
  local run=$WORK/runs/$name args=() s rc
  for s in "$@" "run_dir=$run"; do args+=(--set "$s"); done
  "$(mpiexec_path)" -n 3 "$PY" -m easgd_mpi train "${args[@]}" >"$WORK/runs/$name.stdout" 2>&1
  rc=$?
  cat "$WORK/runs/$name.stdout"
  [ "$rc" = 0 ] || { echo "NOTE: training exited with $rc"; return 1; }
  "$PY" - "$run/metrics.jsonl" "$WORK/runs/$name.stdout" "$max_error" <<'EOF'
import json, re, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
head = open(sys.argv[2]).readline()
final, limit = records[-1], float(sys.argv[3])
# "2 workers (1 on GPU 0; 1 on GPU 1), ..." or "2 workers (2 on GPU 0), ...": count them all.
m = re.search(r"(\d+) workers \(([^)]*)\)", head)
workers = int(m.group(1)) if m else -1
on_gpu = sum(int(k) for k in re.findall(r"(\d+) on GPU", m.group(2))) if m else 0
err = final.get("center_error")
print(f"NOTE: {on_gpu} of {workers} workers on a GPU; {final.get('steps')} steps; final center "
      f"error {err:.4f} (limit {limit}); {final.get('time', float('nan')):.1f}s")
sys.exit(0 if workers > 0 and on_gpu == workers and err is not None and err <= limit else 1)
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
export -f step_env step_gpu_probe step_mpi step_easgd_check step_tests_gpu \
  step_tests_gpu_torch step_kernel_resources step_bench_kernels step_loss_sync \
  step_exchange_staged step_cuda_aware step_train_digits step_train_cifar step_bench_torch

# ---- main ------------------------------------------------------------------------------------
say "easgd-mpi device check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
say "repository $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
say "output $OUTDIR; scratch $WORK; budget ${BUDGET}s; steps: ${STEPS[*]}"
say "wheels $WHEELS: $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) file(s)"
[ "$DRY" = 1 ] && say "DRY RUN: nothing is executed"
publish "starting"

for i in "${!STEPS[@]}"; do
  name=${STEPS[$i]}
  run_step "$i"
  case "$name" in
    gpu-probe)  # what the later steps may count on
      GPU_KNOWN=1
      if [ "${RESULT[$name]}" = PASS ] || [ "$DRY" = 1 ]; then
        HAVE_GPU=1 GPU_WHY=""
      else
        HAVE_GPU=0
        GPU_WHY=$(cat "$WORK/gpu-probe.txt" 2>/dev/null)
        GPU_WHY=${GPU_WHY:-"the GPU probe ${RESULT[$name]}: ${NOTE[$name]}"}
      fi
      ;;
    mpi)
      if [ "${RESULT[$name]}" = PASS ] || [ "$DRY" = 1 ]; then
        MPI_OK=1
        # pip --prefix fallback: the later steps need its paths too.
        # shellcheck disable=SC1091
        [ -f "$WORK/mpi.env" ] && source "$WORK/mpi.env"
      else
        MPI_OK=0
      fi
      ;;
  esac
  publish "after $name"
done

failed=0
for name in "${STEPS[@]}"; do
  case "${RESULT[$name]}" in PASS|DRY|SKIP) ;; *) failed=$((failed + 1)) ;; esac
done
publish finished
say ""
say "=== summary ($(($(elapsed_ms) / 1000))s of ${BUDGET}s; files in $OUTDIR) ==="
cat "$OUTDIR/summary.txt"
cat "$OUTDIR/summary.txt" >>"$LOG"
if [ "$failed" -gt 0 ]; then
  say "device-check: $failed step(s) did not pass"
  exit 1
fi
if [ "$DRY" = 1 ]; then
  say "device-check: dry run, nothing was executed"
else
  say "device-check: all steps passed"
fi
exit 0
