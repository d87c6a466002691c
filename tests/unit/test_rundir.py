"""The run folder (src/easgd_mpi/rundir.py): what a run may find there, numbering, pruning,
markers, stale temporaries and resume specs, on real files."""

import logging

import numpy as np
import pytest

from easgd_mpi.checkpoint import CheckpointData, load_checkpoint, save_checkpoint
from easgd_mpi.config import Config
from easgd_mpi.errors import CheckpointError, ConfigError, RunFolderError
from easgd_mpi.flat import Layout
from easgd_mpi.metrics import read_metrics
from easgd_mpi.rundir import (
    RunFolder,
    Start,
    center_path,
    checkpoint_path,
    find_checkpoint,
    list_checkpoints,
    newest_valid_checkpoint,
    prune_checkpoints,
)
from easgd_mpi.runlock import LOCK_NAME
from easgd_mpi.workerstate import COUNTERS, WorkerStates

RECORDS = [{"time": 0.0, "steps": 0}, {"time": 1.0, "steps": 40}]


def data(sequence: int, records=()) -> CheckpointData:
    return CheckpointData(
        config_toml='algorithm = "easgd"\n',
        algorithm="easgd",
        layout=Layout([("w", (8,))]),
        center=np.full(8, 1000 + sequence, np.float32),
        states=WorkerStates(
            counters={k: np.zeros(1, np.int64) for k in COUNTERS}, rng_words=np.zeros((1, 6))
        ),
        sequence=sequence,
        metrics=list(records),
    )


def write(folder, sequence: int, records=()):
    return save_checkpoint(checkpoint_path(folder, sequence), data(sequence, records))


def damage(path):
    """Flip one bit of the stored center: the file still opens, its checksum fails."""
    raw = bytearray(path.read_bytes())
    at = raw.find(load_checkpoint(path).center.tobytes())
    raw[at + 1] ^= 0x01
    path.write_bytes(bytes(raw))


def config(run_dir, keep=3) -> Config:
    cfg = Config()
    cfg.run_dir = str(run_dir)
    cfg.checkpoint.keep = keep
    return cfg


def snapshot(folder) -> dict:
    """Every file of the folder with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def a_finished_run(folder, marker="COMPLETED"):
    folder.mkdir()
    write(folder, 1, RECORDS)
    (folder / "config.toml").write_text('algorithm = "easgd"\n')
    (folder / "metrics.jsonl").write_text('{"time": 0.0, "steps": 0}\n')
    (folder / marker).write_text("2026-01-01T00:00:00+0000\n")


def test_folder_newest_valid_and_prune(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="easgd_mpi")
    for seq in (1, 2, 3):
        write(tmp_path, seq)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-000001.h5",
        "checkpoint-000002.h5",
        "checkpoint-000003.h5",
    ]
    damage(checkpoint_path(tmp_path, 3))
    path, found = newest_valid_checkpoint(tmp_path)
    assert path.name == "checkpoint-000002.h5" and found.sequence == 2
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith(
        f"easgd: skipping bad checkpoint: checkpoint {tmp_path}/checkpoint-000003.h5"
    )
    # The damaged newest does not count toward keep: the newest good one stays.
    assert [p.name for p in prune_checkpoints(tmp_path, keep=1)] == ["checkpoint-000001.h5"]
    path, _ = newest_valid_checkpoint(tmp_path)
    assert path.name == "checkpoint-000002.h5"


@pytest.mark.parametrize(
    "left", ["checkpoint-000001.h5", "metrics.jsonl", "COMPLETED", "PREEMPTED"]
)
def test_a_new_run_refuses_a_folder_with_another_runs_files_and_changes_nothing(tmp_path, left):
    run_dir = tmp_path / "run"
    a_finished_run(run_dir, marker="PREEMPTED" if left == "PREEMPTED" else "COMPLETED")
    for p in run_dir.iterdir():  # only the file under test, and the config
        if p.name not in (left, "config.toml"):
            p.unlink()
    before = snapshot(run_dir)
    with pytest.raises(RunFolderError) as refused:
        RunFolder.open(config(run_dir), Start.NEW)
    text = str(refused.value)
    assert text.startswith(f"run folder {run_dir} holds another run's files (")
    assert text.endswith("resume that run (--resume auto) or choose another folder (run_dir)")
    assert ("1 checkpoint file(s)" if left.startswith("checkpoint") else left) in text
    assert "\n" not in text
    assert snapshot(run_dir) == before  # nothing deleted or rewritten, and the lock is gone


def test_a_new_run_may_use_a_folder_that_holds_no_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="easgd_mpi")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.out").write_text("the job script's own output\n")  # the Slurm templates'
    (run_dir / "config.toml").write_text("# a launch that failed before it trained\n")
    (run_dir / ".checkpoint-000001.h5.tmp-4242").write_bytes(b"half")  # a crashed write
    folder = RunFolder.open(config(run_dir), Start.NEW)
    try:
        assert (run_dir / LOCK_NAME).exists()
        folder.write_config('algorithm = "easgd"\n')
        folder.open_metrics().close()
    finally:
        folder.release()
    assert snapshot(run_dir) == {
        "config.toml": b'algorithm = "easgd"\n',
        "job.out": b"the job script's own output\n",
        "metrics.jsonl": b"",
    }
    assert caplog.messages == []


def test_a_first_segment_starts_over_what_a_segment_that_saved_nothing_left(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="easgd_mpi")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"time": 0.0, "steps": 0}\n')  # killed early
    assert find_checkpoint("auto", run_dir) is None
    assert Start.of("auto", None) is Start.FIRST_SEGMENT
    folder = RunFolder.open(config(run_dir), Start.FIRST_SEGMENT)
    try:
        folder.open_metrics().close()
        assert folder.save_checkpoint(data(0)).name == "checkpoint-000001.h5"
    finally:
        folder.release()
    assert read_metrics(run_dir / "metrics.jsonl") == []
    assert caplog.messages == [f"easgd: no checkpoint in {run_dir}: starting a new run"]


def test_a_first_segment_refuses_a_folder_where_a_run_ended(tmp_path):
    run_dir = tmp_path / "run"
    a_finished_run(run_dir)
    list_checkpoints(run_dir)[0].rename(tmp_path / "moved-away.h5")
    before = snapshot(run_dir)
    with pytest.raises(RunFolderError, match="holds a run that ended \\(COMPLETED\\) but no "):
        RunFolder.open(config(run_dir), Start.FIRST_SEGMENT)
    assert snapshot(run_dir) == before


def test_a_resume_numbers_above_every_file_clears_markers_and_rewrites_metrics(tmp_path):
    run_dir = tmp_path / "run"
    a_finished_run(run_dir)
    write(run_dir, 2, RECORDS)
    damage(write(run_dir, 3, RECORDS))  # a damaged newest, skipped by resume
    path, resumed = find_checkpoint("auto", run_dir)
    assert path.name == "checkpoint-000002.h5"
    assert Start.of("auto", resumed) is Start.RESUME
    folder = RunFolder.open(config(run_dir, keep=1), Start.RESUME, resumed)
    try:
        assert not (run_dir / "COMPLETED").exists()
        folder.open_metrics().close()
        saved = folder.save_checkpoint(data(0))
        folder.mark("PREEMPTED")
    finally:
        folder.release()
    assert saved.name == "checkpoint-000004.h5" and load_checkpoint(saved).sequence == 4
    # keep = 1: the newest good one stays, and the damaged one for inspection.
    assert [p.name for p in list_checkpoints(run_dir)] == [
        "checkpoint-000003.h5",
        "checkpoint-000004.h5",
    ]
    assert read_metrics(run_dir / "metrics.jsonl") == RECORDS
    assert (run_dir / "PREEMPTED").exists() and not (run_dir / "COMPLETED").exists()


def test_a_checkpoint_resumed_into_another_folder_keeps_its_numbering(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _, resumed = find_checkpoint(write(elsewhere, 9), None)
    folder = RunFolder.open(config(tmp_path / "new"), Start.RESUME, resumed)
    try:
        assert folder.save_checkpoint(data(0)).name == "checkpoint-000010.h5"
    finally:
        folder.release()


def test_a_failed_write_takes_no_number_and_prunes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    folder = RunFolder.open(config(run_dir, keep=1), Start.NEW)
    try:
        first = folder.save_checkpoint(data(0))
        blocker = checkpoint_path(run_dir, 2)
        (blocker / "inside").mkdir(parents=True)  # a folder under the next name: rename fails
        with pytest.raises(CheckpointError, match="checkpoint-000002.h5 could not be written"):
            folder.save_checkpoint(data(0))
        assert first.exists()  # not pruned for a checkpoint that does not exist
        (blocker / "inside").rmdir()
        blocker.rmdir()
        assert folder.save_checkpoint(data(0)) == blocker  # the same number, now written
    finally:
        folder.release()
    assert list_checkpoints(run_dir) == [blocker]
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]


def test_mark_leaves_exactly_one_marker(tmp_path):
    folder = RunFolder.open(config(tmp_path / "run"), Start.NEW)
    try:
        folder.mark("COMPLETED")
        folder.mark("PREEMPTED")
        with pytest.raises(ValueError):
            folder.mark("FINISHED")
    finally:
        folder.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["PREEMPTED"]


def test_the_center_file_is_the_folders_and_a_crashed_write_of_it_is_cleared(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".center.pt.tmp-4242").write_bytes(b"half")  # export.py's write, crashed
    folder = RunFolder.open(config(run_dir), Start.NEW)
    try:
        written = folder.write_center(lambda target: target.write_bytes(b"state_dict"))
    finally:
        folder.release()
    assert written == center_path(run_dir) == run_dir / "center.pt"
    assert snapshot(run_dir) == {"center.pt": b"state_dict"}


def test_timestamped_folders_are_created_exclusively(tmp_path):
    cfg = config("")
    cfg.output = str(tmp_path / "runs")
    first = RunFolder.open(cfg, Start.NEW)
    second = RunFolder.open(cfg, Start.NEW)
    first.release()
    second.release()
    assert first.path != second.path and first.path.parent == second.path.parent


def test_resume_specs(tmp_path):
    with pytest.raises(ConfigError, match="--resume auto needs the run folder"):
        find_checkpoint("auto", "")
    assert find_checkpoint("auto", tmp_path / "not-yet") is None
    with pytest.raises(CheckpointError, match=f"no checkpoint in {tmp_path}"):
        find_checkpoint(tmp_path, None)
    newest = write(tmp_path, 5)
    write(tmp_path, 4)
    for spec in (tmp_path, newest, "auto"):
        path, found = find_checkpoint(spec, tmp_path)
        assert path == newest and found.sequence == 5
