"""Building and running `easgd train` launches under the venv's mpiexec (the CLI-level tests)."""

import subprocess
import sys


def train_command(mpiexec, n, run_dir, *sets, resume=None) -> list[str]:
    """``mpiexec -n N python -m easgd_mpi train --set run_dir=... [--set KEY=VALUE ...]``."""
    cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "easgd_mpi", "train"]
    for s in (f"run_dir={run_dir}", *sets):
        cmd += ["--set", s]
    if resume:
        cmd += ["--resume", resume]
    return cmd


def run(cmd, env, timeout=120) -> subprocess.CompletedProcess:
    """Run to completion (a hang fails the test at ``timeout``), output captured."""
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=timeout, stdin=subprocess.DEVNULL
    )
