"""examples/own_loop.py, the README's first stop for PyTorch users, runs as written: a residual
network trained by the user's own loop (AdamW, one-cycle, clipping, bf16 autocast, a DataLoader
with worker processes), checkpointed while it runs, resumed from a checkpoint in the middle of
the run, and its center loads into the model (``center.pt``, ``easgd export``)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from easgd_mpi.checkpoint import load_checkpoint  # noqa: E402
from easgd_mpi.metrics import read_metrics  # noqa: E402
from easgd_mpi.rundir import list_checkpoints  # noqa: E402
from launching import run, with_path  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS = 150


def example(mpiexec, run_dir, *args):
    sets = [f"run_dir={run_dir}", f"steps={STEPS}", "eval_interval=0.2"]
    return [
        mpiexec, "-n", "3", sys.executable, str(EXAMPLES / "own_loop.py"),
        *(a for s in sets for a in ("--set", s)), *args,
    ]  # fmt: skip


def test_the_example_trains_checkpoints_resumes_and_exports(mpiexec, clean_env, tmp_path):
    first = tmp_path / "first"
    sets = ("--set", "checkpoint.interval=0.2", "--set", "checkpoint.keep=1000")
    done = run(example(mpiexec, first, *sets), clean_env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "own_loop: 300 worker steps" in done.stdout
    records = read_metrics(first / "metrics.jsonl")
    assert records[-1]["center_error"] < records[0]["center_error"]  # it learns
    assert "worker_accuracy" in records[-1]
    middle = [
        p
        for p in list_checkpoints(first)
        if 0 < load_checkpoint(p).states.counters["steps"].max() < STEPS
    ]
    assert middle, "no checkpoint was written mid-run"
    cut = tmp_path / "cut.h5"
    shutil.copy(middle[-1], cut)

    resumed = tmp_path / "resumed"
    done = run(example(mpiexec, resumed, "--resume", str(cut)), clean_env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming from checkpoint" in done.stdout and "own_loop: 300 worker steps" in done.stdout

    sys.path.insert(0, str(EXAMPLES))
    try:
        from own_loop import ResNet  # noqa: PLC0415
    finally:
        sys.path.remove(str(EXAMPLES))
    ResNet().load_state_dict(torch.load(resumed / "center.pt", weights_only=True))
    exported = tmp_path / "model.pt"
    final = list_checkpoints(resumed)[-1]
    cmd = [sys.executable, "-m", "easgd_mpi", "export", str(final), "-o", str(exported)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=with_path(clean_env), timeout=120
    )
    assert done.returncode == 0, done.stderr
    ResNet().load_state_dict(torch.load(exported, weights_only=True))
