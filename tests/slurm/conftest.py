"""A private Slurm cluster for the jobs/ templates (tests/slurm/cluster.sh), as a pytest fixture.

The cluster (munged, slurmctld, two slurmds emulating nodes n1 and n2 with 2 fake GPUs each) runs
in the foreground of ``cluster.sh serve`` under ``unshare -fp --mount-proc --kill-child``: a new
PID namespace whose init is that script, so every process it or the jobs start dies with it,
however this test process ends. Its stdin is a pipe from here; EOF (our exit, even by SIGKILL)
makes it tear down. Without unshare (not root, no CAP_SYS_ADMIN) the same script still tracks and
kills what it started.

If the cluster cannot be installed or started, the tests are skipped with the reason, except in
CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
JOBS = REPO / "jobs"
CLUSTER_SH = HERE / "cluster.sh"
VENV = Path(sys.executable).parent.parent

FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "SPECIAL_EXIT",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(reason: str):
    if in_ci():
        pytest.fail(f"Slurm test cluster unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"Slurm test cluster unavailable: {reason}")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-fp", "--mount-proc", "--kill-child", "true"], capture_output=True, timeout=20
    )
    return probe.returncode == 0


class Cluster:
    """Submit, watch and inspect jobs on the private cluster."""

    FINAL_STATES = FINAL_STATES

    def __init__(self, proc: subprocess.Popen, workdir: Path, env: dict):
        self.proc = proc
        self.workdir = workdir
        self.env = env  # the submitting environment: SLURM_CONF, PATH, TMPDIR, ...

    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, timeout=60, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
            )
        return proc

    def job_env(self, submit_dir: Path, **variables: str) -> dict:
        """The environment sbatch passes into a job: ours, cleaned, plus template variables."""
        env = {
            k: v
            for k, v in self.env.items()
            if not k.startswith(("EASGD_", "SLURM_", "MPI_FLAVOUR", "WORKERS_PER_NODE"))
        }
        env["SLURM_CONF"] = self.env["SLURM_CONF"]
        env["PYTHONUNBUFFERED"] = "1"
        env["EASGD_VENV"] = str(VENV)
        env["EASGD_OUTPUT"] = str(submit_dir / "runs")
        env.update(variables)
        return env

    def submit(self, template: str, *sbatch_opts: str, submit_dir: Path, **variables) -> str:
        submit_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            ["sbatch", "--parsable", *sbatch_opts, str(JOBS / template)],
            env=self.job_env(submit_dir, **variables),
            cwd=submit_dir,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, f"sbatch {template} failed: {proc.stderr}"
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 120.0, until=None) -> dict:
        """Poll until the job is in a final state (or ``until(info)`` is true)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info) if until else info.get("JobState") in FINAL_STATES:
                return info
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {info.get('JobState')} "
                    f"({info.get('Reason')}) after {timeout:.0f}s"
                )
            time.sleep(0.25)

    def logs(self, tail: int = 30) -> str:
        """The tails of the daemons' logs, for failure messages."""
        parts = []
        for path in sorted((self.workdir / "slurm" / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-tail:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    if os.environ.get("EASGD_SKIP_SLURM") == "1" and not in_ci():
        pytest.skip("EASGD_SKIP_SLURM=1")
    if not all(
        shutil.which(c) or Path("/usr/sbin", c).exists()
        for c in ("slurmctld", "slurmd", "sbatch", "munged")
    ):
        try:
            inst = subprocess.run(
                ["bash", str(CLUSTER_SH), "install"], capture_output=True, text=True, timeout=600
            )
        except subprocess.TimeoutExpired:
            _unavailable("installing slurm/munge took over 600 s")
        if inst.returncode != 0:
            _unavailable(f"cannot install slurm/munge: {inst.stderr.strip()[-500:]}")

    workdir = tmp_path_factory.mktemp("slurm-cluster")
    ctld, p1, p2 = _free_ports(3)
    env = {**os.environ, "CTLD_PORT": str(ctld), "SLURMD_PORT1": str(p1), "SLURMD_PORT2": str(p2)}
    cmd = ["bash", str(CLUSTER_SH), "serve", str(workdir)]
    if _can_unshare():
        cmd = ["unshare", "-fp", "--mount-proc", "--kill-child", *cmd]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    ready = threading.Event()
    env_file: list[str] = []

    def reader():  # keeps draining the pipe so the server never blocks on its stdout
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("READY "):
                env_file.append(line.split(None, 1)[1].strip())
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    ready.wait(timeout=90)
    if not env_file:
        _stop(proc)
        _unavailable("cluster.sh serve did not get ready:\n" + "\n".join(lines[-40:]))

    sourced = subprocess.run(
        ["bash", "-c", f"source {env_file[0]} && env -0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    cluster_env = dict(item.split("=", 1) for item in sourced.stdout.split("\0") if "=" in item)
    for k in ("CTLD_PORT", "SLURMD_PORT1", "SLURMD_PORT2"):
        cluster_env.pop(k, None)
    try:
        yield Cluster(proc, workdir, cluster_env)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()  # EOF: cluster.sh cancels jobs and stops the daemons
    except OSError:
        pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()  # unshare dies; --kill-child takes the whole namespace with it
        proc.wait(timeout=10)
