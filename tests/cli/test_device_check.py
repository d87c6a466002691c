"""tools/device-check.sh keeps its budget and always leaves its evidence behind.

On this CPU machine, with a stand-in ``nvidia-smi`` on PATH (so the check believes a GPU is
there until its probe finds CuPy missing) and one step replaced by a command that never ends:
while that step runs, the summary on disk already holds every earlier step's result (a call cut
short brings that back); the hanging step is killed at its limit and reported TIMEOUT, the
later steps still get their turn, and the whole run, summary included, ends inside the budget
the script was given.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "device-check.sh"
BUDGET = 60
STEPS = ["env", "gpu-probe", "mpi", "tests-gpu", "train-digits", "easgd-check"]
FINAL = {"PASS", "FAIL", "SKIP", "TIMEOUT", "NOT RUN"}

FAKE_NVIDIA_SMI = """#!/bin/sh
if [ "$1" = "-L" ]; then
  echo "GPU 0: NVIDIA H200 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
else
  echo "stand-in nvidia-smi: one GPU"
fi
"""


def _summary(out: Path):
    try:
        return json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):  # not written yet, or being replaced
        return None


@pytest.mark.slow
def test_a_hanging_step_is_killed_and_the_summary_is_always_there(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (fake_bin / "nvidia-smi").chmod(0o755)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASGD_", "DEVICE_CHECK_"))}
    env.update(
        PATH=f"{fake_bin}{os.pathsep}{env['PATH']}",
        PYTHON=sys.executable,
        DEVICE_CHECK_REPLACE="tests-gpu=sleep 1000",
    )
    cmd = ["bash", str(SCRIPT), "--budget", str(BUDGET), "--steps", ",".join(STEPS), str(out)]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        during = None
        while proc.poll() is None and time.monotonic() - start < BUDGET:
            seen = _summary(out)
            if seen and {s["step"]: s["result"] for s in seen["steps"]}["tests-gpu"] == "RUNNING":
                during = seen
                break
            time.sleep(0.2)
        stdout, _ = proc.communicate(timeout=2 * BUDGET)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    wall = time.monotonic() - start

    # While the hanging step ran, the summary held everything learned before it.
    assert during is not None, stdout.decode()
    results = {s["step"]: s["result"] for s in during["steps"]}
    assert all(results[s] in FINAL for s in ("env", "gpu-probe", "mpi")), results
    assert results["train-digits"] == results["easgd-check"] == "PENDING"
    assert during["finished"] is False

    # At the end: every step has its result, the hanging one TIMEOUT at its limit.
    final = _summary(out)
    steps = {s["step"]: s for s in final["steps"]}
    assert list(steps) == STEPS and final["finished"] is True
    assert all(s["result"] in FINAL for s in steps.values()), steps
    hang = steps["tests-gpu"]
    assert hang["result"] == "TIMEOUT" and hang["note"].startswith("killed at its limit")
    assert hang["seconds"] >= hang["limit_seconds"] >= hang["share_seconds"] > 0
    assert steps["gpu-probe"]["result"] == "FAIL" and "CuPy" in final["gpu_why"]
    assert steps["train-digits"]["result"] == "FAIL"
    assert steps["train-digits"]["note"].startswith("no GPU")
    assert steps["easgd-check"]["result"] != "PENDING"  # the check went on after the hang
    assert proc.returncode == 1  # some steps did not pass

    # Inside the budget it was given: the steps' shares with what each may take beyond its
    # limit (its kill and its summary) and what is kept for the end, and the whole run.
    planned = sum(s["share_seconds"] for s in steps.values())
    beyond = len(steps) * final["seconds_per_step_beyond_its_limit"]
    assert planned + beyond + final["seconds_kept_for_the_end"] <= BUDGET
    assert final["used_seconds"] <= BUDGET
    assert wall <= BUDGET, wall
    for name in ("summary.txt", "device-check.log", "details.tar.gz", "gpu-costs.json"):
        assert (out / name).is_file(), name
    assert "TIMEOUT" in (out / "summary.txt").read_text()


def test_the_check_never_pipes_through_tee():
    # A pipe into tee keeps a step open as long as anything it started holds the pipe.
    code = [ln for ln in SCRIPT.read_text().splitlines() if not ln.lstrip().startswith("#")]
    assert not [ln for ln in code if "| tee" in ln or "|tee" in ln]


def test_a_budget_that_is_not_a_number_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--budget", "8min", "--dry-run", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "device-check: the budget must be a whole number of seconds, got '8min'"
    )
