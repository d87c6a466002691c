"""A run folder belongs to one run, and every write the run makes can fail cleanly.

Real launches under mpiexec, real files: a second run on a busy folder, a SIGKILLed run's lock,
a file system that fills up (a small tmpfs, mounted here: root is available in CI), and a
file-size limit (RLIMIT_FSIZE).
"""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.metrics import read_metrics
from easgd_mpi.rundir import checkpoint_sequence, list_checkpoints
from easgd_mpi.runlock import LOCK_NAME, holder_of
from launching import assert_one_line_per_rank, run, train_command

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


class _Job:
    """A launch running in the background, its output in files (read while it runs)."""

    def __init__(self, cmd, env, where: Path):
        self.out, self.err = where.with_suffix(".out"), where.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL
            )

    def stderr(self) -> str:
        return self.err.read_text()

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wait(condition, what: str, timeout: float = 60, between=None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        if between is not None:
            between()
        time.sleep(0.05)


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _is_rank0_of_a_run(pid: int) -> bool:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return b"PMI_RANK=0" in env and b"easgd_mpi" in Path(f"/proc/{pid}/cmdline").read_bytes()


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs(size)``: a fresh tmpfs of that size (e.g. "40k"), unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"small{len(mounted)}"
        where.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command: the small-file-system tests need it (and root)")
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_second_run_on_a_busy_folder_is_refused_and_the_first_is_unharmed(
    mpiexec, clean_env, tmp_path
):
    run_dir = tmp_path / "run"
    first = _Job(
        train_command(
            mpiexec,
            3,
            run_dir,
            "steps=1000000",
            "eval_interval=0.2",
            "checkpoint.interval=0.4",
            "checkpoint.keep=100",
        ),
        clean_env,
        tmp_path / "first",
    )
    try:
        _wait(lambda: len(list_checkpoints(run_dir)) >= 1, "the first run's first checkpoint")
        config = (run_dir / "config.toml").read_text()
        holder = holder_of(run_dir)
        assert holder["host"] == socket.gethostname() and _is_rank0_of_a_run(holder["pid"])

        second = run(train_command(mpiexec, 3, run_dir, "steps=50", "lr=0.3"), clean_env)
        assert second.returncode == 2, second.stderr
        lines = _lines(second.stderr)
        assert len(lines) == 3, second.stderr  # one per rank, the same words
        for line in lines:
            assert line.startswith("easgd: error: [rank ")
            assert f"run folder {run_dir} is in use by another run" in line
            assert f"host {holder['host']}, pid {holder['pid']}" in line
        assert second.stdout == ""

        assert first.proc.poll() is None  # the first run goes on...
        assert (run_dir / "config.toml").read_text() == config  # ...with its files untouched
        seen = len(read_metrics(run_dir / "metrics.jsonl"))
        _wait(lambda: len(read_metrics(run_dir / "metrics.jsonl")) > seen, "more metrics")
        assert first.stop() == 0, first.stderr()
    finally:
        first.kill()
    assert first.stderr() == ""
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)
    paths = list_checkpoints(run_dir)
    # The file still starts with the first run's first record (the one its first checkpoint
    # holds): the refused run neither restarted nor truncated it. (Its step count need not be
    # 0: on a busy machine the workers report steps before the master's first evaluation.)
    first_record = load_checkpoint(paths[0]).metrics[0]
    assert (records[0]["time"], records[0]["steps"]) == (
        first_record["time"],
        first_record["steps"],
    )
    assert [checkpoint_sequence(p) for p in paths] == list(range(1, len(paths) + 1))
    final = load_checkpoint(paths[-1])
    assert all(load_checkpoint(p).config_toml == final.config_toml for p in paths)
    assert records == final.metrics  # the file holds every record, none from the second run
    assert (run_dir / "PREEMPTED").exists() and not (run_dir / LOCK_NAME).exists()


def test_the_lock_of_a_killed_run_never_blocks_resume_auto(mpiexec, clean_env, tmp_path):
    run_dir = tmp_path / "run"
    first = _Job(
        train_command(
            mpiexec, 3, run_dir, "steps=1000000", "eval_interval=0.2", "checkpoint.interval=0.4"
        ),
        clean_env,
        tmp_path / "first",
    )
    try:
        _wait(lambda: len(list_checkpoints(run_dir)) >= 1, "a checkpoint")
        holder = holder_of(run_dir)
        os.kill(holder["pid"], signal.SIGKILL)  # the master, which holds the lock
        assert first.proc.wait(timeout=60) != 0
    finally:
        first.kill()
    assert holder_of(run_dir) == holder  # left behind

    target = int(load_checkpoint(list_checkpoints(run_dir)[-1]).states.counters["steps"].max())
    resumed = run(
        train_command(
            mpiexec, 3, run_dir, f"steps={target + 40}", "checkpoint.interval=0", resume="auto"
        ),
        clean_env,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from checkpoint #" in resumed.stdout
    assert _lines(resumed.stderr) == [
        f"easgd: note: run folder {run_dir} was locked by a run that is gone (host "
        f"{holder['host']}, pid {holder['pid']}, since {holder['since']}): lock taken over"
    ]
    assert (run_dir / "COMPLETED").exists() and not (run_dir / LOCK_NAME).exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_finished_run_is_never_overwritten_only_resumed(mpiexec, clean_env, tmp_path):
    run_dir = tmp_path / "run"
    finished = run(train_command(mpiexec, 3, run_dir, "steps=100"), clean_env)
    assert finished.returncode == 0, finished.stderr
    before = _files(run_dir)
    assert {"config.toml", "metrics.jsonl", "COMPLETED", "checkpoint-000001.h5"} <= set(before)
    refusal = (
        f"run folder {run_dir} holds another run's files (1 checkpoint file(s), COMPLETED, "
        f"metrics.jsonl): resume that run (--resume auto) or choose another folder (run_dir)"
    )

    again = run(train_command(mpiexec, 3, run_dir, "steps=100"), clean_env)  # a fresh run
    assert_one_line_per_rank(again, 3, refusal)
    assert _files(run_dir) == before  # nothing deleted, nothing rewritten, no lock left

    # Its config reloaded, as the README suggests, names the same folder: refused as well.
    config = [mpiexec, "-n", "3", sys.executable, "-m", "easgd_mpi", "train"]
    reloaded = run([*config, "--config", str(run_dir / "config.toml")], clean_env)
    assert_one_line_per_rank(reloaded, 3, refusal)
    assert _files(run_dir) == before

    resumed = run(train_command(mpiexec, 3, run_dir, "steps=150", resume="auto"), clean_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from checkpoint #1" in resumed.stdout
    assert [p.name for p in list_checkpoints(run_dir)] == [
        "checkpoint-000001.h5",
        "checkpoint-000002.h5",
    ]
    assert (run_dir / "checkpoint-000001.h5").read_bytes() == before["checkpoint-000001.h5"]
    final = load_checkpoint(run_dir / "checkpoint-000002.h5")
    assert final.sequence == 2 and final.total_steps == 300
    earlier = [json.loads(line) for line in before["metrics.jsonl"].decode().splitlines()]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[: len(earlier)] == earlier and len(records) > len(earlier)


def test_resume_auto_in_an_empty_folder_starts_a_first_segment(mpiexec, clean_env, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.out").write_text("the job script's output\n")  # as the Slurm templates do
    proc = run(train_command(mpiexec, 3, run_dir, "steps=50", resume="auto"), clean_env)
    assert proc.returncode == 0, proc.stderr
    assert f"easgd: no checkpoint in {run_dir}: starting a new run" in proc.stdout.splitlines()
    assert "resuming" not in proc.stdout and proc.stderr == ""
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "COMPLETED",
        "checkpoint-000001.h5",
        "config.toml",
        "job.out",
        "metrics.jsonl",
    ]
    assert (run_dir / "job.out").read_text() == "the job script's output\n"
    assert load_checkpoint(run_dir / "checkpoint-000001.h5").total_steps == 100


def _fill(folder: Path) -> None:
    """Take every free byte of ``folder``'s file system (again, after something was freed)."""
    with open(folder / "ballast", "ab", buffering=0) as fh:
        for chunk in (1 << 16, 1 << 12, 1 << 9):
            try:
                while True:
                    fh.write(bytes(chunk))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc


def test_a_failed_periodic_checkpoint_warns_and_training_goes_on(
    mpiexec, clean_env, tmp_path, small_fs
):
    disk = small_fs("1m")
    run_dir = disk / "run"
    job = _Job(
        train_command(
            mpiexec,
            3,
            run_dir,
            "steps=1000000",
            "eval_interval=0.05",
            "checkpoint.interval=1",
            "checkpoint.keep=1",
        ),
        clean_env,
        tmp_path / "job",
    )
    try:
        _wait(lambda: list_checkpoints(run_dir), "a first checkpoint")
        # Disk full: checkpoints fail (a failed try gives back only what it took, less than it
        # needs: no later try fits either) and, once its last page is full, metrics.jsonl.
        _fill(disk)
        _wait(
            lambda: (
                job.stderr().count("warning: checkpoint") >= 2 and "metrics file" in job.stderr()
            ),
            "the warnings of a full disk",
            between=lambda: _fill(disk),
        )
        assert job.proc.poll() is None
        kept = list_checkpoints(run_dir)
        assert len(kept) == 1
        good = load_checkpoint(kept[0])  # the good one is kept, and intact
        failed = run_dir / f"checkpoint-{good.sequence + 1:06d}.h5"
        lines_then = len((run_dir / "metrics.jsonl").read_text().splitlines())
        (disk / "ballast").unlink()
        _wait(
            lambda: checkpoint_sequence(list_checkpoints(run_dir)[-1]) > good.sequence,
            "a checkpoint once there is space again",
        )
        assert job.stop() == 0, job.stderr()
    finally:
        job.kill()
    lines = _lines(job.stderr())
    ckpt_lines = [ln for ln in lines if "warning: checkpoint" in ln]
    metrics_lines = [ln for ln in lines if "warning: metrics file" in ln]
    assert len(ckpt_lines) + len(metrics_lines) == len(lines), job.stderr()  # nothing else
    assert len(ckpt_lines) >= 2
    for line in ckpt_lines:  # the number of a failed checkpoint is taken by the next try
        assert line == (
            f"easgd: warning: checkpoint {failed} could not be written: No space left on "
            f"device; training goes on, the next try is in 1s"
        )
    assert len(metrics_lines) == 1 and metrics_lines[0].startswith(
        f"easgd: warning: metrics file {run_dir}/metrics.jsonl cannot be written: No space "
        f"left on device; training goes on"
    )
    final = load_checkpoint(list_checkpoints(run_dir)[-1])
    assert final.total_steps > good.total_steps and (run_dir / "PREEMPTED").exists()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == lines_then
    assert len(final.metrics) > lines_then  # the checkpoints keep every record
    assert not list(run_dir.glob(".checkpoint-*"))


def test_a_failed_final_checkpoint_fails_the_job_with_one_line_and_no_marker(
    mpiexec, clean_env, tmp_path, small_fs
):
    first = run(train_command(mpiexec, 3, tmp_path / "first", "steps=100"), clean_env)
    assert first.returncode == 0, first.stderr
    run_dir = small_fs("40k") / "run"  # room for the config and metrics, not a checkpoint
    run_dir.mkdir()
    for stale in ("COMPLETED", "PREEMPTED"):  # left by an earlier segment
        (run_dir / stale).write_text("2026-01-01T00:00:00+0000\n")
    # The next segment, continued in a folder that holds those markers.
    resume = str(list_checkpoints(tmp_path / "first")[-1])
    proc = run(
        train_command(mpiexec, 3, run_dir, "steps=200", "checkpoint.interval=0", resume=resume),
        clean_env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = _lines(proc.stderr)
    assert len(lines) == 3, proc.stderr
    for line in lines:  # numbered after the resumed checkpoint #1
        assert (
            line.startswith("easgd: error: [rank ")
            and (
                f"checkpoint {run_dir}/checkpoint-000002.h5 could not be written: No space left on "
                f"device"
            )
            in line
        )
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml", "metrics.jsonl"]


def _limited(mpiexec, limit: int, run_dir, *sets) -> list[str]:
    cmd = train_command(mpiexec, 3, run_dir, *sets)
    at = cmd.index("-m")
    return cmd[:at] + [str(SCRIPTS / "with_fsize_limit.py"), str(limit)] + cmd[at + 2 :]


def test_a_file_size_limit_gives_one_line_per_failed_file(mpiexec, clean_env, tmp_path):
    run_dir = tmp_path / "run"
    proc = run(
        _limited(
            mpiexec, 1500, run_dir, "steps=400", "eval_interval=0.001", "checkpoint.interval=0"
        ),
        clean_env,
    )
    assert proc.returncode == 2, proc.stderr
    lines = _lines(proc.stderr)
    assert lines[0].startswith(
        f"easgd: warning: metrics file {run_dir}/metrics.jsonl cannot be written: File too large"
    ), proc.stderr
    assert len(lines) == 4
    for line in lines[1:]:
        assert (
            line.startswith("easgd: error: [rank ")
            and (f"checkpoint {run_dir}/checkpoint-000001.h5 could not be written: File too large")
            in line
        )
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.toml", "metrics.jsonl"]

    # The first write of all, the config, under a limit smaller than it.
    proc = run(_limited(mpiexec, 500, tmp_path / "tiny", "steps=50"), clean_env)
    assert proc.returncode == 2, proc.stderr
    lines = _lines(proc.stderr)
    assert len(lines) == 3 and all(
        f"cannot write {tmp_path}/tiny/config.toml: File too large" in ln for ln in lines
    ), proc.stderr
    assert list((tmp_path / "tiny").iterdir()) == []  # no lock left, no partial config
