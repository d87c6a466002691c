"""Damaged checkpoints never cost a good one: not counted toward `keep`, never pruned in its
place, and a folder of only damaged ones is refused instead of silently starting over."""

import logging
import subprocess
import sys

import numpy as np
import pytest

from easgd_mpi.checkpoint import CheckpointData, save_checkpoint
from easgd_mpi.errors import CheckpointError
from easgd_mpi.flat import Layout
from easgd_mpi.rundir import (
    checkpoint_path,
    list_checkpoints,
    newest_valid_checkpoint,
    prune_checkpoints,
)
from easgd_mpi.workerstate import COUNTERS, WorkerStates


def write(folder, sequence):
    data = CheckpointData(
        config_toml='algorithm = "easgd"\n',
        algorithm="easgd",
        layout=Layout([("w", (8,))]),
        center=np.full(8, sequence, np.float32),
        states=WorkerStates(
            counters={k: np.zeros(1, np.int64) for k in COUNTERS}, rng_words=np.zeros((1, 6))
        ),
        sequence=sequence,
    )
    return save_checkpoint(checkpoint_path(folder, sequence), data)


def damage(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def test_damaged_newest_does_not_count_toward_keep(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="easgd_mpi")
    paths = [write(tmp_path, k) for k in range(1, 6)]
    damage(paths[-1])
    removed = prune_checkpoints(tmp_path, keep=2)
    assert removed == paths[:2]  # the two newest *good* ones (3, 4) stay
    assert list_checkpoints(tmp_path) == paths[2:]  # the damaged 5 stays for inspection
    said = caplog.messages
    assert len(said) == 1 and "checkpoint-000005.h5 is damaged" in said[0]
    assert caplog.records[0].levelno == logging.WARNING
    prune_checkpoints(tmp_path, keep=2)
    assert len(caplog.messages) == 1  # reported once
    path, data = newest_valid_checkpoint(tmp_path)
    assert path == paths[3] and data.center[0] == 4


def test_all_damaged_is_refused_by_name_and_empty_is_a_fresh_start(tmp_path):
    assert newest_valid_checkpoint(tmp_path) is None
    paths = [write(tmp_path, k) for k in (1, 2)]
    for p in paths:
        damage(p)
    with pytest.raises(CheckpointError, match="checkpoint-000001.h5, checkpoint-000002.h5"):
        newest_valid_checkpoint(tmp_path)
    assert list_checkpoints(tmp_path) == paths  # nothing deleted


def test_resume_auto_on_a_folder_of_damaged_checkpoints_exits_2(mpiexec, clean_env, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    damage(write(run_dir, 1))
    cmd = [
        mpiexec,
        "-n",
        "3",
        sys.executable,
        "-m",
        "easgd_mpi",
        "train",
        "--set",
        f"run_dir={run_dir}",
        "--set",
        "steps=50",
        "--resume",
        "auto",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=clean_env, timeout=120, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("easgd: error:")]
    assert len(errors) == 3 and all("every checkpoint in" in ln for ln in errors)
    assert "checkpoint-000001.h5" in errors[0] and "Traceback" not in proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_negative_nan_metric_round_trips(tmp_path):
    """x86 computes 0/0 as a NaN with its sign bit set; HDF5 gives it back as "no value"."""
    from easgd_mpi.checkpoint import load_checkpoint

    negative_nan = -np.float64("nan")
    assert np.signbit(negative_nan)
    path = write(tmp_path, 1)
    data = load_checkpoint(path)
    data.metrics = [{"time": 1.0, "center_loss": float(negative_nan), "steps": 3}]
    save_checkpoint(path, data)
    back = load_checkpoint(path)
    assert back.metrics[0]["center_loss"] is None and back.metrics[0]["steps"] == 3
