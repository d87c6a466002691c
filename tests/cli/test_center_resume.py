"""Exact resume of the issue-19 rules, center-side state included.

Local SGD and DiLoCo (any p) and the rules whose center computes (one worker) are
deterministic, so a run resumed from a checkpoint written mid-run must end bit-identical to the
run that never stopped: center, worker rows, counters, generators, and now the center-side rows
(DiLoCo's outer momentum, kept on the workers; MDOWNPOUR's velocity, ADOWNPOUR's Adagrad sums,
MVADOWNPOUR's moving average, async-diloco's outer momentum and buffer, kept on the servers).
The same launches as tests/cli/test_exact_resume.py: an uninterrupted run, a slowed run with
periodic checkpoints, one of them resumed in a fresh folder.
"""

import shutil

import numpy as np
import pytest
from test_exact_resume import STEPS, _assert_identical, _final, _reference, _slow_command

from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.rundir import list_checkpoints
from launching import run, train_command

#: (algorithm, ranks, extra settings). τ = 1 for the rules that move the center every step.
CASES = [
    ("localsgd", 3, ("tau=3", "momentum=0.5", "lr=0.05")),
    ("diloco", 3, ("tau=2", "momentum=0.5", "lr=0.05")),
    ("mdownpour", 2, ("tau=1", "momentum=0.9", "lr=0.02")),
    ("adownpour", 2, ("tau=2", "outer_lr=0.01")),
    ("mvadownpour", 2, ("tau=1", "moving_rate=0.05")),
    ("async-diloco", 2, ("tau=3", "momentum=0.5", "lr=0.05")),
    # Coded pushes into the servers' slots: the worker's residual row resumes with it.
    ("async-diloco", 2, ("tau=3", "momentum=0.5", "lr=0.05", "compress=int8")),
    ("mdownpour", 2, ("tau=1", "momentum=0.9", "lr=0.02", "compress=fp8")),
]
IDS = [
    a + "".join(f"-{e[len('compress=') :]}" for e in extra if e.startswith("compress="))
    for a, _, extra in CASES
]


def _assert_center_state_identical(a, b) -> None:
    assert sorted(a.center_state) == sorted(b.center_state)
    for name, row in a.center_state.items():
        assert np.array_equal(row.view(np.uint32), b.center_state[name].view(np.uint32)), name


@pytest.mark.parametrize(("algorithm", "n", "extra"), CASES, ids=IDS)
def test_resuming_mid_run_ends_bit_identical_with_the_center_state(
    algorithm, n, extra, mpiexec, clean_env, tmp_path
):
    reference = _reference(mpiexec, clean_env, tmp_path, algorithm, n, extra)
    want_rows = {"localsgd": set()}.get(algorithm)
    if want_rows is None:  # every other rule keeps center-side rows, and they moved
        assert reference.center_state
        assert any(np.abs(r).sum() > 0 for r in reference.center_state.values())

    slowed = tmp_path / "slowed"
    sets = (f"algorithm={algorithm}", f"steps={STEPS}", *extra)
    done = run(
        _slow_command(mpiexec, n, slowed, *sets, "checkpoint.interval=0.1", "checkpoint.keep=100"),
        clean_env,
    )
    assert done.returncode == 0, done.stderr
    _assert_identical(_final(slowed), reference)
    _assert_center_state_identical(_final(slowed), reference)

    middle = [
        p
        for p in list_checkpoints(slowed)
        if 0 < load_checkpoint(p).states.counters["steps"].max() < STEPS
    ]
    assert middle, "no checkpoint was written mid-run"
    source = tmp_path / "cut.h5"
    shutil.copy(middle[len(middle) // 2], source)
    cut = load_checkpoint(source)
    if want_rows is None:  # the cut holds the state of its moment, not zeros
        assert any(np.abs(r).sum() > 0 for r in cut.center_state.values())

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    done = run(train_command(mpiexec, n, resumed, *sets, resume=str(source)), clean_env)
    assert done.returncode == 0, done.stderr
    _assert_identical(_final(resumed), reference)
    _assert_center_state_identical(_final(resumed), reference)
