"""Training with compressed pushes through real launches (docs/ARCHITECTURE.md §2.16).

The digits MLP learns with int8 pushes and error feedback, and the metrics count each push in
its coded form (``push_bytes``: one byte per element and a float32 scale per block) beside the
bytes the window's transfers move (``bytes``: the center's read and the float32 accumulate).
Exact resume with a residual: tests/cli/test_exact_resume.py.
"""

import json

from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.compress import coded_bytes
from easgd_mpi.rundir import list_checkpoints
from launching import run, train_command


def test_int8_pushes_with_error_feedback_learn(mpiexec, clean_env, tmp_path):
    run_dir = tmp_path / "int8"
    sets = ("steps=1500", "lr=0.1", "eval_interval=0.5", "compress=int8")
    done = run(train_command(mpiexec, 3, run_dir, *sets), clean_env, timeout=180)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "pushes coded in int8 with error feedback" in lines[0]
    error = float(lines[-1].split("center test error ")[1].split("%")[0])
    assert error <= 6.0

    final = load_checkpoint(list_checkpoints(run_dir)[-1])
    n = final.layout.size
    residual = final.states.row("residual")
    assert residual is not None and residual.shape == (2, n) and abs(residual).max() > 0
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    exchanges = last["exchanges"]
    assert exchanges == 2 * 1500 // 4
    assert last["bytes"] == exchanges * 8 * n  # read and accumulate in float32
    assert last["push_bytes"] == exchanges * coded_bytes(n, "int8")  # one chunk per push
    assert last["push_bytes"] * 3.9 < exchanges * 4 * n


def test_async_diloco_sends_int8_codes_to_its_center_and_resumes(mpiexec, clean_env, tmp_path):
    """A center that computes decodes what the workers push (§2.16, §3.11): p = 2 workers send
    one byte per element and a scale per block, about 1/3.94 of the float32 run's bytes per
    push; the residual row is checkpointed and a resumed run continues from it."""
    common = ("algorithm=async-diloco", "lr=0.1", "eval_interval=0.5", "checkpoint.interval=0")
    plain = run(train_command(mpiexec, 3, tmp_path / "f32", "steps=600", *common), clean_env)
    assert plain.returncode == 0, plain.stderr
    coded_dir, coded = tmp_path / "int8", (*common, "compress=int8")
    first = run(train_command(mpiexec, 3, coded_dir, "steps=300", *coded), clean_env)
    assert first.returncode == 0, first.stderr
    assert "pushes coded in int8 with error feedback" in first.stdout.splitlines()[0]
    # Bytes per push from this first segment (a resumed segment counts its own bytes again).
    i8 = json.loads((coded_dir / "metrics.jsonl").read_text().splitlines()[-1])
    saved = load_checkpoint(list_checkpoints(coded_dir)[-1])
    n = saved.layout.size
    residual = saved.states.row("residual")
    assert residual is not None and residual.shape == (2, n) and abs(residual).max() > 0
    rest = run(train_command(mpiexec, 3, coded_dir, "steps=600", *coded, resume="auto"), clean_env)
    assert rest.returncode == 0, rest.stderr
    assert "resuming from checkpoint #1: 600 worker steps" in rest.stdout
    final = load_checkpoint(list_checkpoints(coded_dir)[-1])
    assert list(final.states.counters["steps"]) == [600, 600]
    assert abs(final.states.row("residual")).max() > 0

    f32 = json.loads((tmp_path / "f32" / "metrics.jsonl").read_text().splitlines()[-1])
    assert f32["exchanges"] == 2 * 600 // 4 and i8["exchanges"] == 2 * 300 // 4
    assert f32["push_bytes"] == f32["exchanges"] * 4 * n
    assert i8["push_bytes"] == i8["exchanges"] * coded_bytes(n, "int8")  # codes + scales
    assert f32["bytes"] == f32["exchanges"] * 8 * n  # float32 push and read of the center
    assert i8["bytes"] == i8["push_bytes"] + i8["exchanges"] * 4 * n  # coded push, float32 read
    ratio = (f32["push_bytes"] / f32["exchanges"]) / (i8["push_bytes"] / i8["exchanges"])
    assert 3.9 < ratio < 4.0, ratio
    resumed = json.loads((coded_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert resumed["exchanges"] == f32["exchanges"]
    assert resumed["center_error"] <= f32["center_error"] + 0.03, (resumed, f32)
