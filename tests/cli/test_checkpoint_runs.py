"""Checkpoints in real runs under mpiexec: resume, crash recovery, preemption, NaN workers."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.metrics import read_metrics
from easgd_mpi.rundir import list_checkpoints
from launching import run, start, train_command

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_resume_continues_counters_and_learns_like_an_uninterrupted_run(
    mpiexec, clean_env, tmp_path
):
    common = ["lr=0.1", "eval_interval=0.3", "checkpoint.interval=0"]
    whole = run(train_command(mpiexec, 3, tmp_path / "whole", "steps=2000", *common), clean_env)
    assert whole.returncode == 0, whole.stderr
    part = run(train_command(mpiexec, 3, tmp_path / "split", "steps=1000", *common), clean_env)
    assert part.returncode == 0, part.stderr
    first = load_checkpoint(list_checkpoints(tmp_path / "split")[-1])
    assert first.total_steps == 2000 and list(first.states.counters["steps"]) == [1000, 1000]
    rest = run(
        train_command(mpiexec, 3, tmp_path / "split", "steps=2000", *common, resume="auto"),
        clean_env,
    )
    assert rest.returncode == 0, rest.stderr
    assert "resuming from checkpoint #1: 2,000 worker steps" in rest.stdout

    final = load_checkpoint(list_checkpoints(tmp_path / "split")[-1])
    assert final.sequence == 2 and list(final.states.counters["steps"]) == [2000, 2000]
    assert final.total_exchanges == 2 * 2000 // 4
    records = read_metrics(tmp_path / "split" / "metrics.jsonl")
    times = [r["time"] for r in records]
    assert times == sorted(times) and records[-1]["steps"] == 4000
    assert records[: len(first.metrics)] == first.metrics  # history kept as it was
    # ...and the resumed part continues from the checkpoint's counters, never from zero
    assert all(r["steps"] >= first.total_steps for r in records[len(first.metrics) :])
    reference = read_metrics(tmp_path / "whole" / "metrics.jsonl")[-1]["center_error"]
    assert abs(records[-1]["center_error"] - reference) <= 0.03
    assert records[-1]["center_error"] <= 0.06


def _rank_pids(rank: int, run_dir) -> list[int]:
    """Processes of *this* MPICH job (its run folder on the command line) with PMI_RANK ==
    rank (from /proc): never another job's ranks on a shared machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        mine = str(run_dir).encode() in cmdline
        if b"easgd_mpi" in cmdline and mine and f"PMI_RANK={rank}".encode() in env:
            pids.append(int(entry.name))
    return pids


@pytest.mark.serial  # loses at most interval + 0.5 s: a bound that a busy machine would break
def test_sigkill_of_a_worker_then_resume_auto_loses_at_most_one_interval(
    mpiexec, clean_env, tmp_path
):
    run_dir = tmp_path / "run"
    interval = 1.0
    cmd = train_command(
        mpiexec,
        3,
        run_dir,
        "steps=1000000",
        "eval_interval=0.25",
        f"checkpoint.interval={interval}",
        "checkpoint.keep=5",
    )
    proc = start(
        cmd,
        clean_env,
    )
    try:
        deadline = time.monotonic() + 60
        while len(list_checkpoints(run_dir)) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(list_checkpoints(run_dir)) >= 3, "no periodic checkpoints appeared"
        victims = _rank_pids(2, run_dir)
        assert victims, "could not find rank 2"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        proc.communicate(timeout=60)  # the job must end, not hang
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    last_seen = read_metrics(run_dir / "metrics.jsonl")[-1]["time"]
    newest = load_checkpoint(list_checkpoints(run_dir)[-1])
    # What is lost: the training time after the newest checkpoint (plus the polling slack).
    assert last_seen - newest.wall_time <= interval + 0.5, (last_seen, newest.wall_time)

    # Damage the newest: auto-resume must say so and take the one before.
    newest_path = list_checkpoints(run_dir)[-1]
    raw = bytearray(newest_path.read_bytes())
    at = raw.find(newest.center.tobytes()[:16])
    raw[at + 3] ^= 0x10
    newest_path.write_bytes(bytes(raw))
    before = load_checkpoint(list_checkpoints(run_dir)[-2])
    target = int(before.states.counters["steps"].max()) + 300
    resumed = run(
        train_command(
            mpiexec, 3, run_dir, f"steps={target}", "checkpoint.interval=0", resume="auto"
        ),
        clean_env,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping bad checkpoint: checkpoint {newest_path} failed its checksum" in (
        resumed.stdout
    )
    assert f"resuming from checkpoint #{before.sequence}" in resumed.stdout
    final = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert list(final.states.counters["steps"]) == [target, target]
    assert final.sequence > newest.sequence  # numbered past the damaged file, never under it
    assert (run_dir / "COMPLETED").exists()
    for path in list_checkpoints(run_dir):  # what the run wrote, HDF5 tools read
        if path != newest_path:
            header = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True)
            assert header.returncode == 0 and 'DATASET "center"' in header.stdout, path


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("easgd", []),
        ("eamsgd", ["momentum=0.5"]),
        # The collective rules must stop on the same step everywhere, or an all-reduce hangs.
        ("sync-easgd", ["momentum=0.5"]),
        ("allreduce-sgd", []),
        ("downpour", []),
    ],
)
def test_sigterm_writes_a_final_checkpoint_and_exits_0(
    algorithm, extra, mpiexec, clean_env, tmp_path
):
    run_dir = tmp_path / "run"
    proc = start(
        train_command(
            mpiexec,
            3,
            run_dir,
            f"algorithm={algorithm}",
            *extra,
            "steps=1000000",
            "eval_interval=0.25",
            "checkpoint.interval=0.5",
        ),
        clean_env,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and len(read_metrics(path)) >= 4:
            break
        time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # mpiexec forwards it to every rank
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert time.monotonic() - sent < 15
    assert "stop requested (signal)" in out and "stopped early" in out
    assert (run_dir / "PREEMPTED").exists() and not (run_dir / "COMPLETED").exists()
    ckpt = load_checkpoint(list_checkpoints(run_dir)[-1])
    last = read_metrics(run_dir / "metrics.jsonl")[-1]
    assert ckpt.total_steps == last["steps"] > 0
    assert ckpt.states.row("x") is not None and np.all(np.isfinite(ckpt.states.row("x")))
    assert (ckpt.states.row("v") is not None) == bool(extra)
    if algorithm in ("sync-easgd", "allreduce-sgd"):  # states copied on one common step
        assert len(set(ckpt.states.counters["steps"])) == 1
        target = int(ckpt.states.counters["steps"][0]) + 40
        resumed = run(
            train_command(mpiexec, 3, run_dir, f"steps={target}", resume="auto"), clean_env
        )
        assert resumed.returncode == 0, resumed.stderr
        again = load_checkpoint(list_checkpoints(run_dir)[-1])
        assert set(again.states.counters["steps"]) == {target}


@pytest.mark.parametrize("algorithm", ["easgd", "sync-easgd", "allreduce-sgd", "downpour"])
def test_nan_on_one_worker_never_reaches_the_center(algorithm, mpiexec, clean_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(
        [
            mpiexec,
            "-n",
            "3",
            sys.executable,
            str(SCRIPTS / "nan_on_one_rank.py"),
            "1",
            "101,402",
            str(run_dir),
            f"algorithm={algorithm}",
        ],
        clean_env,
    )
    assert proc.returncode == 0, proc.stderr
    ckpt = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert np.all(np.isfinite(ckpt.center))
    assert list(ckpt.states.counters["resets"]) == [2, 0]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[-1]["resets"] == 2
    assert all(r["center_loss"] is not None and np.isfinite(r["center_loss"]) for r in records)
    assert records[-1]["center_error"] <= 0.08
    summary = json.loads(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "easgd_mpi",
                "inspect",
                "--json",
                str(list_checkpoints(run_dir)[-1]),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert summary["counters"]["resets"] == 2


def test_resume_refuses_a_checkpoint_that_does_not_fit(mpiexec, clean_env, tmp_path):
    run_dir = tmp_path / "run"
    # Sync EASGD resumes exactly, so it keeps its number of workers (async EASGD may change it:
    # tests/cli/test_servers.py).
    sets = ("algorithm=sync-easgd", "steps=200", "checkpoint.interval=0")
    first = run(train_command(mpiexec, 3, run_dir, *sets), clean_env)
    assert first.returncode == 0, first.stderr
    cases = [
        (
            4,
            ["steps=400"],
            "written by 2 workers, this launch has 3: launch with 3 ranks to resume it with "
            "servers = 1 (ranks = 2 workers + servers); algorithm 'sync-easgd' resumes exactly",
        ),
        (3, ["model.hidden=[32]"], "tensor 'w0' has shape [64, 64], the model needs [64, 32]"),
    ]
    for ranks, sets, fragment in cases:
        proc = run(train_command(mpiexec, ranks, run_dir, *sets, resume="auto"), clean_env)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == ranks and all(fragment in ln for ln in lines), proc.stderr
        assert "Traceback" not in proc.stderr
    # Nothing was overwritten: the run folder still resumes with the right launch.
    again = run(train_command(mpiexec, 3, run_dir, "steps=300", resume="auto"), clean_env)
    assert again.returncode == 0, again.stderr
    assert load_checkpoint(list_checkpoints(run_dir)[-1]).total_steps == 600
