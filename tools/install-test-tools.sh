#!/usr/bin/env bash
# Debian packages the tests use, installed only when missing: h5dump (hdf5-tools) reads every
# checkpoint the tests write, as a user's HDF5 tools would.
set -euo pipefail
if command -v h5dump >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-tools: h5dump is missing and cannot be installed here (needs root and" \
       "apt-get): install Debian's hdf5-tools" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends hdf5-tools >/dev/null
command -v h5dump
