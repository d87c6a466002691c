"""The Python API and the command line are one Session: they resume a folder to the same config
and the same state, report bad input the same way, and print through the ``easgd_mpi`` logger,
which a user's script configures or silences."""

import shutil
import sys
from pathlib import Path

import numpy as np

from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.config import Config
from easgd_mpi.rundir import list_checkpoints
from launching import assert_one_line_per_rank, run, train_command

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "api_train.py"
#: Deterministic (sync EASGD, 2 workers), so the two resumes must agree bit for bit.
SETTINGS = ("algorithm=sync-easgd", "data.name=digits", "tau=2", "eval_interval=0.2")


def _script(mpiexec, n, *pairs, resume=None, log="none"):
    cmd = [mpiexec, "-n", str(n), sys.executable, str(SCRIPT), "--log", log]
    if resume:
        cmd += ["--resume", resume]
    return cmd + list(pairs)


def test_the_api_and_the_cli_resume_a_folder_to_the_same_config_and_state(
    mpiexec, clean_env, tmp_path
):
    first = tmp_path / "first"
    proc = run(train_command(mpiexec, 3, first, *SETTINGS, "steps=200", "lr=0.04"), clean_env)
    assert proc.returncode == 0, proc.stderr
    by_cli, by_api = tmp_path / "cli", tmp_path / "api"
    shutil.copytree(first, by_cli)
    shutil.copytree(first, by_api)
    # Both state steps = 400 and a new seed (ignored by a resume's generators, but recorded):
    # the checkpoint's lr 0.04 must survive both; the run folder is each one's own.
    cli = run(train_command(mpiexec, 3, by_cli, "steps=400", "seed=5", resume="auto"), clean_env)
    assert cli.returncode == 0, cli.stderr
    api = run(
        _script(mpiexec, 3, f"run_dir={by_api}", "steps=400", "seed=5", resume="auto"), clean_env
    )
    assert api.returncode == 0, api.stderr
    for proc in (cli, api):  # the same start-up line of a resume, with where each change came from
        assert "resuming from checkpoint #" in proc.stdout, proc.stdout
        assert "steps 200 → 400" in proc.stdout and "seed 0 → 5" in proc.stdout, proc.stdout
    a = load_checkpoint(list_checkpoints(by_cli)[-1])
    b = load_checkpoint(list_checkpoints(by_api)[-1])
    ca = Config.from_toml(base_toml=a.config_toml, environ={}).to_dict()
    cb = Config.from_toml(base_toml=b.config_toml, environ={}).to_dict()
    assert ca.pop("run_dir") == str(by_cli) and cb.pop("run_dir") == str(by_api)
    assert ca == cb and ca["lr"] == 0.04 and ca["steps"] == 400 and ca["seed"] == 5
    assert np.array_equal(a.center.view(np.uint32), b.center.view(np.uint32))
    for name in ("x", "v"):
        left, right = a.states.row(name), b.states.row(name)
        assert (left is None) == (right is None)
        if left is not None:
            assert np.array_equal(left.view(np.uint32), right.view(np.uint32))
    assert list(a.states.counters["steps"]) == list(b.states.counters["steps"]) == [400, 400]
    assert np.array_equal(a.states.rng_words, b.states.rng_words)


def test_a_script_gets_the_clis_one_line_errors(mpiexec, clean_env, tmp_path):
    proc = run(_script(mpiexec, 3, f"run_dir={tmp_path / 'r'}", "tau=0"), clean_env)
    assert_one_line_per_rank(proc, 3, "tau")


def test_a_script_alone_is_told_how_to_launch_itself(clean_env, tmp_path):
    proc = run([sys.executable, str(SCRIPT), f"run_dir={tmp_path / 'r'}"], clean_env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"mpiexec -n 5 python {SCRIPT}" in proc.stderr, proc.stderr


def test_the_scripts_logging_decides_what_is_printed(mpiexec, clean_env, tmp_path):
    common = ("steps=150", "eval_interval=0.1")
    plain = run(_script(mpiexec, 2, f"run_dir={tmp_path / 'a'}", *common), clean_env)
    assert plain.returncode == 0, plain.stderr
    assert "easgd: easgd, 1 workers" in plain.stdout and "done: easgd" in plain.stdout
    quiet = run(_script(mpiexec, 2, f"run_dir={tmp_path / 'b'}", *common, log="quiet"), clean_env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == "", quiet.stdout
    mine = run(_script(mpiexec, 2, f"run_dir={tmp_path / 'c'}", *common, log="format"), clean_env)
    assert mine.returncode == 0, mine.stderr
    lines = [ln for ln in mine.stdout.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("MINE easgd_mpi.") for ln in lines), mine.stdout
    assert any(ln.startswith("MINE easgd_mpi.session done: easgd") for ln in lines), mine.stdout
