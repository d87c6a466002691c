"""Building and running `easgd train` launches under the venv's mpiexec (the CLI-level tests)."""

import os
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


def with_path(env, *folders) -> dict:
    """``env`` with ``folders`` in front of its PYTHONPATH, which is kept: it may name the code
    under test (a worktree's src/ ahead of an editable install)."""
    parts = [str(f) for f in folders] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    return {**env, "PYTHONPATH": os.pathsep.join(parts)}


def run(cmd, env, timeout=120, cwd=None) -> subprocess.CompletedProcess:
    """Run to completion (a hang fails the test at ``timeout``), output captured."""
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_per_rank(proc, ranks, fragment):
    """Bad input: exit 2, exactly one error line per rank naming ``fragment``, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == ranks, proc.stderr
    assert all(ln.startswith("easgd: error: [rank ") for ln in lines), proc.stderr
    assert all(fragment in ln for ln in lines), proc.stderr
    assert "Traceback" not in proc.stderr


def start(cmd, env) -> subprocess.Popen:
    """Start a launch in the background, output captured (``communicate`` collects it)."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
    )
