"""The ``easgd`` command under the venv's real ``mpiexec``: bad input and failures.

Bad input: one line per rank naming the problem, exit code 2, no traceback, no hang.
A failure on one rank: the whole job ends promptly with a non-zero exit.
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launching import assert_one_line_per_rank, run

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def launch(mpiexec, n, args, env, cwd, timeout=90):
    cmd = [mpiexec, "-n", str(n), *args]
    start = time.monotonic()
    proc = run(cmd, env, timeout=timeout, cwd=cwd)
    return proc, time.monotonic() - start


BAD_INPUTS = [
    ("unknown algorithm", ["--set", "algorithm=easgdd"], "algorithm = 'easgdd' is not one of"),
    ("misspelt key", ["--set", "taw=4"], "unknown key 'taw'; did you mean 'tau'?"),
    ("lr <= 0", ["--set", "lr=0"], "lr = 0.0 must be > 0"),
    ("tau < 1", ["--set", "tau=0"], "tau = 0 must be >= 1"),
    (
        "momentum >= 1",
        ["--set", "algorithm=eamsgd", "--set", "momentum=1.0"],
        "momentum = 1.0 must be in [0, 1)",
    ),
    ("alpha unstable", ["--set", "alpha=1.5"], "outside the stability region 0 < alpha <= 1"),
    ("beta unstable", ["--set", "beta=2.5"], "outside the stable range 0 < beta < 2"),
    ("malformed --set", ["--set", "tau"], "--set expects KEY=VALUE"),
]


@pytest.mark.parametrize("label, args, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_per_rank_and_exit_2(
    label, args, fragment, mpiexec, easgd_cmd, clean_env, tmp_path
):
    proc, elapsed = launch(mpiexec, 3, [*easgd_cmd, "train", *args], clean_env, tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 3, proc.stderr  # one per rank, nothing else
    assert {ln.split("]")[0] for ln in lines} == {
        "easgd: error: [rank 0",
        "easgd: error: [rank 1",
        "easgd: error: [rank 2",
    }
    assert all(fragment in ln for ln in lines), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("lr = [\n", "is not valid TOML"),
        (None, "config file not found"),
        ('algorithm = "easgd"\nlerning_rate = 0.1\n', "unknown key 'lerning_rate'"),
    ],
)
def test_bad_config_file(content, fragment, mpiexec, easgd_cmd, clean_env, tmp_path):
    path = tmp_path / "run.toml"
    if content is not None:
        path.write_text(content)
    proc, _ = launch(mpiexec, 2, [*easgd_cmd, "train", "--config", str(path)], clean_env, tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 2 and all(fragment in ln and str(path) in ln for ln in lines)
    assert "Traceback" not in proc.stderr


def test_world_size_one_is_a_clear_error(mpiexec, easgd_cmd, clean_env, tmp_path):
    proc, _ = launch(mpiexec, 1, [*easgd_cmd, "train"], clean_env, tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "at least 2 MPI ranks" in proc.stderr and "world size 1" in proc.stderr


@pytest.mark.parametrize("fail_rank", [0, 2])
def test_an_exception_on_one_rank_ends_the_whole_job(fail_rank, mpiexec, clean_env, tmp_path):
    # Rank 0's problem evaluates the center; the workers' problems train.
    proc, elapsed = launch(
        mpiexec,
        3,
        [sys.executable, str(SCRIPTS / "fail_on_one_rank.py"), str(fail_rank), "5", str(tmp_path)],
        clean_env,
        tmp_path,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "injected failure at step 5" in proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f}s to end"


def test_demo_command_runs_and_learns(mpiexec, easgd_cmd, clean_env, tmp_path):
    """The README's main job, shortened: real launch, progress lines, summary, run folder."""
    proc, _ = launch(
        mpiexec,
        3,
        [
            *easgd_cmd,
            "train",
            "--set",
            "steps=1500",
            "--set",
            "lr=0.1",
            "--set",
            "eval_interval=0.5",
        ],
        clean_env,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("easgd: easgd, 2 workers")
    assert any("center loss" in ln for ln in lines)
    assert lines[-1].startswith("done: easgd with 2 workers, 3,000 worker steps")
    error = float(lines[-1].split("center test error ")[1].split("%")[0])
    assert error <= 6.0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    assert {p.name for p in runs[0].iterdir()} >= {"config.toml", "metrics.jsonl"}


def test_check_reports_every_rank(mpiexec, easgd_cmd, clean_env, tmp_path):
    proc, _ = launch(mpiexec, 3, [*easgd_cmd, "check"], clean_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("MPI: ") and "world size 3" in lines[0]
    # the two workers report the same thing: one line names both (test_check_report.py)
    assert [ln.split(" (")[0] for ln in lines[1:]] == ["rank 0", "ranks 1-2"]
    assert lines[2].startswith("ranks 1-2 (workers 0-1) on ")
    assert "(master)" in lines[1] and "holds no GPU" in lines[1]
    for line in lines[1:]:
        assert "CUDA-aware MPI off" in line and "kernels from" in line
        assert ("no GPU" in line) or ("GPU 0:" in line)
    js, _ = launch(mpiexec, 2, [*easgd_cmd, "check", "--json"], clean_env, tmp_path)
    infos = json.loads(js.stdout)
    assert [i["rank"] for i in infos] == [0, 1] and infos[1]["role"] == "worker 0"


def test_check_names_each_servers_slice(mpiexec, easgd_cmd, clean_env, tmp_path):
    """servers = 2 on 4 ranks: ranks 0 and 1 hold the digits MLP's center (4,812 floats) in two
    chunk-aligned halves, ranks 2 and 3 are workers 0 and 1."""
    args = [*easgd_cmd, "check", "--set", "servers=2"]
    proc, _ = launch(mpiexec, 4, args, clean_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("world size 4; the center on 2 servers"), lines[0]
    assert lines[1].startswith("rank 0 (master, server 0: center [0, 2,432), 9.5 KiB) on ")
    assert lines[2].startswith("rank 1 (server 1: center [2,432, 4,812), 9.3 KiB) on ")
    assert "holds no GPU" in lines[2]
    assert [ln.split(") on ")[0] for ln in lines[3:]] == ["ranks 2-3 (workers 0-1"]
    js, _ = launch(mpiexec, 4, [*args, "--json"], clean_env, tmp_path)
    infos = json.loads(js.stdout)
    assert [i.get("slice") for i in infos] == [[0, 2432], [2432, 4812], None, None]
    assert [i["role"] for i in infos] == ["master, server 0", "server 1", "worker 0", "worker 1"]

    bad, _ = launch(mpiexec, 2, [*easgd_cmd, "check", "--set", "servers=2"], clean_env, tmp_path)
    assert_one_line_per_rank(bad, 2, "servers = 2 leaves no worker in a world of 2 ranks")


def test_training_on_your_own_data_file(mpiexec, easgd_cmd, clean_env, tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    x = rng.standard_normal((600, 10)) + 3.0 * np.eye(10)[y]  # three separable blobs
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    args = [
        *easgd_cmd,
        "train",
        "--set",
        "data.name=file",
        "--set",
        f"data.path={tmp_path / 'mine.npz'}",
        "--set",
        "steps=600",
        "--set",
        "lr=0.1",
    ]
    proc, _ = launch(mpiexec, 3, args, clean_env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    error = float(proc.stdout.splitlines()[-1].split("center test error ")[1].split("%")[0])
    assert error <= 5.0

    bad = [
        *easgd_cmd,
        "train",
        "--set",
        "data.name=file",
        "--set",
        f"data.path={tmp_path / 'missing.npz'}",
    ]
    proc, _ = launch(mpiexec, 3, bad, clean_env, tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 3 and all("missing.npz not found (data.path)" in ln for ln in lines)
    assert "Traceback" not in proc.stderr


def test_the_custom_problem_example_runs(mpiexec, clean_env, tmp_path):
    """examples/least_squares.py: the README's Python API with a user-written problem."""
    example = Path(__file__).resolve().parents[2] / "examples" / "least_squares.py"
    proc, _ = launch(
        mpiexec,
        3,
        [sys.executable, str(example), "steps=1500", f"output={tmp_path}"],
        clean_env,
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.splitlines()[-1]
    assert last.startswith("done: easgd with 2 workers, 3,000 worker steps")
    assert float(last.split("loss ")[1].split(";")[0]) <= 0.05
