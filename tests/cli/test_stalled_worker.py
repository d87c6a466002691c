"""A stalled worker never blocks the master: checkpoints go on, and a stop ends in bounded time.

Real launches; one worker process is frozen with SIGSTOP (what a hung GPU or a frozen node
looks like to the master) while the master checkpoints, and while SIGTERM arrives.
"""

import glob
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.comm import EXIT_STALLED
from easgd_mpi.rundir import list_checkpoints
from launching import run, start, train_command

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
WAIT = 1.5  # checkpoint.state_wait of these runs (s)

# Bounds of seconds on a stop, with a rank frozen on a schedule: run alone (`make test-unit`
# runs the `serial` tests after the parallel pass), not beside other tests' launches.
pytestmark = pytest.mark.serial


def _rank_pid(rank: int, run_dir: Path, timeout: float = 30) -> int:
    """The pid of the easgd process of MPI rank ``rank`` of the job that writes ``run_dir``
    (the launcher's environment says the rank; the run folder on the command line says the
    job: never another job's rank, as when tests run in parallel)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in glob.glob("/proc/[0-9]*"):
            try:
                env = Path(proc, "environ").read_bytes().split(b"\0")
                cmdline = Path(proc, "cmdline").read_bytes()
            except OSError:
                continue
            mine = f"run_dir={run_dir}\0".encode() in cmdline
            if f"PMI_RANK={rank}".encode() in env and b"easgd_mpi" in cmdline and mine:
                if b"mpiexec" not in cmdline.split(b"\0")[0]:
                    return int(Path(proc).name)
        time.sleep(0.1)
    pytest.fail(f"no process of rank {rank} found")


def _start(mpiexec, env, run_dir, *sets):
    cmd = train_command(
        mpiexec,
        4,
        run_dir,
        "steps=100000000",
        "eval_interval=0.25",
        "checkpoint.interval=0.4",
        "checkpoint.keep=50",
        f"checkpoint.state_wait={WAIT}",
        *sets,
    )
    return start(
        cmd,
        env,
    )


def _wait_for(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def _newest(run_dir):
    found = list_checkpoints(run_dir)
    return load_checkpoint(found[-1]) if found else None


@pytest.fixture
def frozen():
    """``frozen(pid)`` stops a process; every stopped one is continued at the end."""
    pids = []

    def stop(pid):
        os.kill(pid, signal.SIGSTOP)
        pids.append(pid)

    yield stop
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_checkpoints_go_on_while_a_worker_is_stopped(mpiexec, clean_env, tmp_path, frozen):
    run_dir = tmp_path / "run"
    job = _start(mpiexec, clean_env, run_dir)
    try:
        _wait_for(lambda: len(list_checkpoints(run_dir)) >= 1, "a first checkpoint")
        frozen(_rank_pid(2, run_dir))  # worker slot 1
        stopped_at = time.monotonic()
        # New checkpoints keep coming, with the stopped worker's saved state growing old.
        _wait_for(
            lambda: (
                (c := _newest(run_dir)) is not None
                and c.states.age[1] > WAIT + 1.0
                and time.monotonic() - stopped_at > WAIT + 1.5
            ),
            "checkpoints that keep the stopped worker's old state",
        )
        ckpt = _newest(run_dir)
        live = [0, 2]
        assert np.all(ckpt.states.age[live] < ckpt.states.age[1])
        assert np.all(np.isfinite(ckpt.states.row("x")))
        frozen_steps = int(ckpt.states.counters["steps"][1])
        _wait_for(
            lambda: _newest(run_dir).states.counters["steps"][0] > ckpt.states.counters["steps"][0],
            "the live workers' states to move on",
        )
        assert int(_newest(run_dir).states.counters["steps"][1]) == frozen_steps
    finally:
        job.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=60)
    # One warning, naming the rank, however many checkpoints went by.
    warnings = [ln for ln in err.splitlines() if "has not answered" in ln]
    assert len(warnings) == 1, err
    assert "worker rank 2 " in warnings[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("algorithm", ["easgd", "sync-easgd"])
def test_sigterm_with_a_stopped_worker_ends_within_the_bound(
    algorithm, mpiexec, clean_env, tmp_path, frozen
):
    run_dir = tmp_path / "run"
    job = _start(mpiexec, clean_env, run_dir, f"algorithm={algorithm}")
    _wait_for(lambda: len(list_checkpoints(run_dir)) >= 1, "a first checkpoint")
    frozen(_rank_pid(3, run_dir))  # worker slot 2
    time.sleep(0.5)
    sent = time.monotonic()
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=60)
    took = time.monotonic() - sent
    assert job.returncode == EXIT_STALLED, out + err
    assert took < WAIT + 10, f"the stop took {took:.1f}s"
    assert "Traceback" not in err
    assert "did not answer the stop" in out
    assert (run_dir / "PREEMPTED").exists() and not (run_dir / "COMPLETED").exists()
    final = _newest(run_dir)
    assert final.states.age[2] >= 0.5
    if algorithm == "sync-easgd":  # the others wait for it in the all-reduce: one common round
        assert len(set(final.states.counters["steps"].tolist())) == 1
    else:
        assert final.states.age[0] < final.states.age[2]

    # The folder is free again and the run continues from that checkpoint, every worker from
    # its own saved state.
    target = int(final.states.counters["steps"].max()) + 30
    resumed = run(
        train_command(mpiexec, 4, run_dir, f"algorithm={algorithm}", f"steps={target}")
        + ["--resume", "auto"],
        clean_env,
    )
    assert resumed.returncode == 0, resumed.stderr
    done = _newest(run_dir)
    assert set(done.states.counters["steps"].tolist()) == {target}
    assert (run_dir / "COMPLETED").exists() and not (run_dir / "PREEMPTED").exists()
