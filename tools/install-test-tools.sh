#!/usr/bin/env bash
# Debian packages the tests use, installed only when missing (needs root and apt-get):
# - h5dump (hdf5-tools) reads every checkpoint the tests write, as a user's HDF5 tools would;
# - g++ builds kernels/easgd.cuh for the host (tests/unit/test_kernels_host.py), which fails,
#   not skips, without a C++ compiler. $CXX, when set to a compiler that exists, is used instead.
set -euo pipefail
missing=()
command -v h5dump >/dev/null 2>&1 || missing+=(hdf5-tools)
if [ -n "${CXX:-}" ] && command -v "$CXX" >/dev/null 2>&1; then
  :  # the host-kernel tests build with $CXX
elif ! command -v g++ >/dev/null 2>&1; then
  missing+=(g++)
fi
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-tools: missing Debian package(s) ${missing[*]}, which cannot be installed" \
       "here (needs root and apt-get): install them, e.g. sudo apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
command -v h5dump
if [ -n "${CXX:-}" ] && command -v "$CXX" >/dev/null 2>&1; then command -v "$CXX"; else command -v g++; fi
