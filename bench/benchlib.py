"""Small pieces every benchmark script needs (the scripts run as ``python bench/NAME.py``, so
this folder is on their import path)."""

from __future__ import annotations

import platform
import shutil
import sys
from pathlib import Path

__all__ = ["launcher", "cpu_name"]


def launcher() -> str:
    """The mpiexec next to this Python (the venv's, matching its mpi4py), else the PATH's."""
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        raise SystemExit("no mpiexec next to this Python or on PATH")
    return found


def cpu_name() -> str:
    """The CPU's model name, for the machine line of a report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
