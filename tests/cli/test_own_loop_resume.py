"""A user's own loop (easgd_mpi.torch) stops and resumes exactly, with its optimizer, schedule,
gradient scaler, sampler and registered state.

Real launches of tests/scripts/own_loop_train.py (sync EASGD, 2 workers, AdamW with a one-cycle
schedule, a GradScaler, bf16 autocast, clipping, a DataLoader over ``run.sampler``): a run
resumed from a periodic checkpoint, and a run stopped by SIGTERM mid-epoch (exit 0,
``PREEMPTED``) and resumed with ``--resume auto``, both end bit-identical to the run that never
stopped: center, every worker's rows, counters and own state (optimizer moments, schedule,
scaler, sampler position, the registered dict). The samples each worker trained on, over both
segments, are the uninterrupted run's, in its order.
"""

import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from easgd_mpi.checkpoint import load_checkpoint  # noqa: E402
from easgd_mpi.rundir import list_checkpoints  # noqa: E402
from easgd_mpi.torch.state import decode_state  # noqa: E402
from launching import run, start  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "own_loop_train.py"
STEPS = 400
RULE = ("algorithm=sync-easgd", f"steps={STEPS}", "tau=1")


def launch(mpiexec, run_dir, *args, delay=0.0):
    return [
        mpiexec,
        "-n",
        "3",
        sys.executable,
        str(SCRIPT),
        str(run_dir),
        "--delay",
        str(delay),
        *args,
    ]


def final(run_dir: Path):
    return load_checkpoint(list_checkpoints(run_dir)[-1])


def assert_identical(a, b) -> None:
    assert np.array_equal(a.center.view(np.uint32), b.center.view(np.uint32)), "center differs"
    assert np.array_equal(a.states.row("x").view(np.uint32), b.states.row("x").view(np.uint32))
    for key in ("steps", "exchanges", "resets"):
        assert np.array_equal(a.states.counters[key], b.states.counters[key]), key
    for i, (mine, theirs) in enumerate(zip(a.states.user, b.states.user, strict=True)):
        assert mine.structure == theirs.structure, f"worker {i}: state structure differs"
        for k, (x, y) in enumerate(zip(mine.arrays, theirs.arrays, strict=True)):
            assert x.dtype == y.dtype and np.array_equal(x, y), f"worker {i}: array {k} differs"


def trained_on(run_dir: Path, worker: int) -> list[str]:
    return (run_dir / f"indices-{worker}.txt").read_text().splitlines()


@pytest.fixture(scope="module")
def reference(mpiexec, clean_env, tmp_path_factory):
    """The run that never stops."""
    ref = tmp_path_factory.mktemp("reference")
    done = run(launch(mpiexec, ref, *RULE, "checkpoint.interval=0"), clean_env)
    assert done.returncode == 0, done.stderr
    data = final(ref)
    assert data.states.counters["steps"].tolist() == [STEPS, STEPS]
    assert data.format_version == 3 and all(s is not None for s in data.states.user)
    return ref, data


@pytest.fixture(scope="module")
def stopped(mpiexec, clean_env, tmp_path_factory):
    """The same run, slowed (a sleep per step), with periodic checkpoints, stopped by SIGTERM:
    its folder, and a copy of a periodic checkpoint from the middle of the run."""
    folder = tmp_path_factory.mktemp("stopped")
    sets = (*RULE, "checkpoint.interval=0.1", "checkpoint.keep=100")
    proc = start(launch(mpiexec, folder, *sets, delay=0.01), clean_env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(_trained(folder)) < 60:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    assert "stop requested" in out
    middle = [
        p
        for p in list_checkpoints(folder)
        if 0 < load_checkpoint(p).states.counters["steps"].max() < STEPS
    ]
    assert len(middle) >= 2, "no periodic checkpoint was written mid-run"
    cut = folder.parent / "cut.h5"
    shutil.copy(middle[len(middle) // 2 - 1], cut)
    return folder, cut


def test_sigterm_mid_epoch_ends_preempted_and_resume_auto_continues_where_it_stopped(
    reference, stopped, mpiexec, clean_env
):
    ref, expected = reference
    folder, _ = stopped
    assert (folder / "PREEMPTED").exists() and not (folder / "COMPLETED").exists()
    cut = final(folder)
    steps = int(cut.states.counters["steps"][0])
    assert 0 < steps < STEPS, "the stop came too late to test"
    sampler = decode_state(cut.states.user[0])["sampler"]
    assert 0 < sampler["position"] < 128, f"not mid-epoch: {sampler}"  # 128 samples each
    assert [len(trained_on(folder, w)) for w in (0, 1)] == [steps, steps]

    done = run(launch(mpiexec, folder, *RULE, "--resume", "auto"), clean_env)
    assert done.returncode == 0, done.stderr
    assert (folder / "COMPLETED").exists() and (folder / "center.pt").exists()
    assert_identical(final(folder), expected)
    for worker in (0, 1):  # the second segment took the sampler up exactly where it stopped
        assert trained_on(folder, worker) == trained_on(ref, worker)


def test_resuming_a_periodic_checkpoint_in_a_fresh_folder_ends_bit_identical(
    reference, stopped, mpiexec, clean_env, tmp_path
):
    _, expected = reference
    _, source = stopped
    cut = load_checkpoint(source)
    assert len(set(cut.states.counters["steps"].tolist())) == 1  # one common round
    saved = decode_state(cut.states.user[0])
    assert saved["optimizer"]["class"] == "AdamW" and saved["optimizer"]["state"]["state"]
    assert saved["schedulers"][0]["class"] == "OneCycleLR"
    assert saved["scaler"]["scale"] > 0 and saved["registered"]["seen"]["batches"] > 0
    assert saved["sampler"]["epoch"] == saved["run"]["epoch"]

    done = run(launch(mpiexec, tmp_path, *RULE, "--resume", str(source)), clean_env)
    assert done.returncode == 0, done.stderr
    assert "resuming from checkpoint" in done.stdout
    assert_identical(final(tmp_path), expected)


def _trained(run_dir: Path) -> list[str]:
    path = run_dir / "indices-0.txt"
    return path.read_text().splitlines() if path.exists() else []
