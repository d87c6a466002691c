"""A center in slices (``servers = S``) in real runs under mpiexec: a checkpoint holds the whole
center, so a run written with S servers resumes with any other S (same number of workers)."""

import numpy as np

from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.metrics import read_metrics
from easgd_mpi.rundir import list_checkpoints
from launching import run, train_command

COMMON = ["lr=0.1", "eval_interval=0.3", "checkpoint.interval=0", "chunk=1024"]


def newest(run_dir):
    return load_checkpoint(list_checkpoints(run_dir)[-1])


def test_a_checkpoint_resumes_with_another_number_of_servers(mpiexec, clean_env, tmp_path):
    run_dir = tmp_path / "run"

    def segment(ranks, servers, steps, resume="auto"):
        proc = run(
            train_command(
                mpiexec,
                ranks,
                run_dir,
                f"servers={servers}",
                f"steps={steps}",
                *COMMON,
                resume=resume,
            ),
            clean_env,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc, newest(run_dir)

    proc, first = segment(4, 2, 400, resume=None)  # 2 servers, 2 workers
    assert "the center on 2 servers: rank 0 [0, 2,048), 8.0 KiB; rank 1 [2,048, " in proc.stdout
    assert list(first.states.counters["steps"]) == [400, 400]

    # 2 → 1 server, nothing left to train: the center comes back to the last bit.
    proc, same = segment(3, 1, 400)
    assert "resuming from checkpoint #1: 800 worker steps" in proc.stdout
    assert "servers" not in proc.stdout.split("resuming")[0]  # one server: no slice line
    assert same.sequence == 2 and np.array_equal(same.center, first.center)
    # 1 → 2 servers, the same.
    _, again = segment(4, 2, 400)
    assert again.sequence == 3 and np.array_equal(again.center, first.center)
    assert np.array_equal(again.states.row("x"), first.states.row("x"))

    # 2 → 1 server and on to the end: counters continue, the digits are learnt.
    _, final = segment(3, 1, 1500)
    assert list(final.states.counters["steps"]) == [1500, 1500]
    records = read_metrics(run_dir / "metrics.jsonl")
    assert records[-1]["steps"] == 3000 and records[-1]["center_error"] <= 0.06
    assert (run_dir / "COMPLETED").exists()

    # Async EASGD, whose resume is not exact anyway, may also change its number of workers
    # (the exact rules refuse: tests/cli/test_checkpoint_runs.py): the new one starts at the
    # center, from step 0.
    proc, more = segment(4, 1, 1600)
    assert "2 workers then, 3 now (workers 2..2 start at the center)" in proc.stdout
    assert list(more.states.counters["steps"]) == [1600, 1600, 1600]
