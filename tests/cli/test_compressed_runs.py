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
