#!/usr/bin/env bash
# Download, here, the wheels that tools/device-check.sh installs on a GPU machine that has no
# network: the MPICH library (PyPI's `mpich` wheel; the GPU image's mpi4py may find no MPI
# library), pytest-mpi, mpi4py (used only if the image's own mpi4py cannot load MPICH) and
# pytest with its dependencies (only installed where pytest is missing). All for CPython 3.12
# on manylinux x86_64, whatever this machine runs.
#
#   tools/fetch-device-wheels.sh [FOLDER]      # default: wheels/ in the repository root
#
# The folder is added to .git/info/exclude (so it is never committed) and travels to the GPU
# machine through the device tool's `carry` (docs/PERFORMANCE.md, "GPU verification").
# Versions: the ones the project is tested with; override with e.g. MPICH_SPEC='mpich==5.0.2'.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
DEST=${1:-wheels}
MPICH_SPEC=${MPICH_SPEC:-mpich==5.0.2}
MPI4PY_SPEC=${MPI4PY_SPEC:-mpi4py==4.1.2}
PYTEST_MPI_SPEC=${PYTEST_MPI_SPEC:-pytest-mpi==0.6}

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$REPO/.venv/bin/python" ]; then
  PY=$REPO/.venv/bin/python
else
  PY=python3
fi
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  echo "fetch-device-wheels: '$PY -m pip' does not work: set PYTHON to a Python with pip" >&2
  exit 1
fi

mkdir -p "$DEST"
# One version of each package in the folder: start from an empty one.
find "$DEST" -maxdepth 1 -name '*.whl' -delete

# The target machine: CPython 3.12, glibc-based x86_64 (the mpich wheel is manylinux_2_28,
# mpi4py's manylinux_2_5; pip matches each platform tag exactly, so name all of them).
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3
        --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download --quiet "${TARGET[@]}" -d "$DEST" \
  "$MPICH_SPEC" "$MPI4PY_SPEC" "$PYTEST_MPI_SPEC"

# Never committed: ignored through this clone's own exclude file (not .gitignore).
if git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1; then
  rel=$(realpath --relative-to="$REPO" "$DEST" 2>/dev/null || echo "$DEST")
  case "$rel" in
    ../*|/*) ;;  # outside the repository: nothing to ignore
    *)
      if ! git -C "$REPO" check-ignore -q "$rel/x.whl"; then
        exclude=$(git -C "$REPO" rev-parse --git-path info/exclude)
        mkdir -p "$(dirname "$exclude")"
        echo "/$rel/" >>"$exclude"
        echo "added /$rel/ to $exclude"
      fi
      ;;
  esac
fi

echo "wheels in $DEST ($(du -sh "$DEST" | cut -f1); the device tool carries at most 64 MiB):"
ls -1 "$DEST"
for needed in mpich pytest_mpi mpi4py; do
  if ! ls "$DEST"/${needed}-*.whl >/dev/null 2>&1; then
    echo "fetch-device-wheels: no $needed wheel in $DEST" >&2
    exit 1
  fi
done
