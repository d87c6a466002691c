"""Every bad use of a user's own loop (easgd_mpi.torch) ends the job with one line, exit 2, no
traceback and no hang.

Mistakes found before or while the model is bound are agreed: one line on every rank (the
binding is collective, and a rank that misuses the API joins it with its error). Mistakes
found later, on one worker in the middle of training, are that worker's line and the job's
end (``MPI_Abort(2)``: the other ranks cannot know).
"""

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from easgd_mpi.rundir import list_checkpoints  # noqa: E402
from launching import assert_one_line_per_rank, run  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

#: (case, ranks, what every rank's line says): two ranks where one worker shows the mistake.
AGREED = [
    ("no-serves-check", 2, "et.ElasticAveraging(model, optimizer, run) on rank 0, which serves"),
    ("serve-everywhere", 2, "run.serve() on rank 1, a worker: the serving ranks"),
    ("epochs-before-binding", 2, "before et.ElasticAveraging(model, optimizer, run): bind the"),
    ("finish-before-binding", 2, "before et.ElasticAveraging(model, optimizer, run): the run"),
    ("models-differ", 3, "worker rank 2's model differs from worker rank 1's: tensor '0.weight'"),
    ("half-parameters", 2, "model parameter '0.weight' is torch.float16; easgd-mpi trains"),
]
ALONE = [
    ("added-after-binding", "model tensor '3.weight' was added after et.ElasticAveraging bound"),
    ("step-after-stop", "elastic.step() after run.should_stop turned true"),
    ("no-finish", "the script ended on rank 1 without run.finish()"),
]


def misuse(mpiexec, case, run_dir, ranks=3):
    return [mpiexec, "-n", str(ranks), sys.executable, str(SCRIPTS / "own_loop_misuse.py"), case]


@pytest.mark.parametrize(("case", "ranks", "fragment"), AGREED, ids=[c for c, _, _ in AGREED])
def test_a_mistake_before_the_run_starts_is_one_line_on_every_rank(
    case, ranks, fragment, mpiexec, clean_env, tmp_path
):
    proc = run([*misuse(mpiexec, case, tmp_path, ranks), str(tmp_path)], clean_env, timeout=120)
    assert_one_line_per_rank(proc, ranks, fragment)
    assert not list_checkpoints(tmp_path)
    assert not (tmp_path / "easgd.lock").exists()  # the folder is free for the next run


@pytest.mark.parametrize(("case", "fragment"), ALONE, ids=[c for c, _ in ALONE])
def test_a_mistake_in_the_middle_of_training_ends_the_job(
    case, fragment, mpiexec, clean_env, tmp_path
):
    proc = run([*misuse(mpiexec, case, tmp_path, ranks=2), str(tmp_path)], clean_env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("easgd: error: ")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr
    assert "[rank 1]" in errors[0] and "Traceback" not in proc.stderr


# ---- rules of the package's own loop only --------------------------------------------------------

#: DOWNPOUR's variants push the sum of the package's own SGD steps (what to use instead is in the
#: line); EAMSGD is easgd around the user's Nesterov SGD; async-diloco's coded pushes need
#: push_lag = 0.
REFUSED = [
    (
        "mdownpour",
        (),
        "config: algorithm = 'mdownpour' does not run in your own loop: its push is the sum of "
        "the package's own SGD steps",
    ),
    ("eamsgd", (), "config: algorithm = 'eamsgd' does not run in your own loop: use easgd"),
    (
        "async-diloco",
        ("compress=int8", "push_lag=1"),
        "config: push_lag = 1 cannot be used with compress = 'int8'",
    ),
]


@pytest.mark.parametrize(
    ("algorithm", "extra", "fragment"), REFUSED, ids=[a for a, _, _ in REFUSED]
)
def test_a_rule_that_does_not_run_in_your_own_loop_is_one_line_on_every_rank(
    algorithm, extra, fragment, mpiexec, clean_env, tmp_path
):
    args = (f"algorithm={algorithm}", "steps=24", *extra)
    proc = run(train(mpiexec, 2, tmp_path, *args), clean_env, timeout=120)
    assert_one_line_per_rank(proc, 2, fragment)
    assert not list_checkpoints(tmp_path)
    if algorithm == "mdownpour":  # and what to use instead
        assert "use 'async-diloco'" in proc.stderr


# ---- resumes that do not fit ------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(mpiexec, clean_env, tmp_path_factory):
    """A short sync EASGD run of tests/scripts/own_loop_train.py (AdamW, 2 workers)."""
    folder = tmp_path_factory.mktemp("finished")
    done = run(train(mpiexec, 3, folder, "algorithm=sync-easgd", "steps=24"), clean_env)
    assert done.returncode == 0, done.stderr
    return list_checkpoints(folder)[-1]


def train(mpiexec, ranks, run_dir, *args):
    script = SCRIPTS / "own_loop_train.py"
    return [mpiexec, "-n", str(ranks), sys.executable, str(script), str(run_dir), *args]


RESUMES = [
    (3, ("--optimizer", "sgd"), "the checkpoint's optimizer is AdamW, this run's is SGD"),
    (3, ("--wide",), "tensor '0.weight' has shape [16, 8], the model needs [24, 8]"),
    (4, (), "was written by 2 workers, this launch has 3"),
]


@pytest.mark.parametrize(("ranks", "args", "fragment"), RESUMES, ids=["optimizer", "model", "p"])
def test_a_resume_that_does_not_fit_is_one_line_on_every_rank(
    ranks, args, fragment, finished, mpiexec, clean_env, tmp_path
):
    source = tmp_path / "cut.h5"
    shutil.copy(finished, source)
    sets = ("algorithm=sync-easgd", "steps=48", "--resume", str(source), *args)
    proc = run(train(mpiexec, ranks, tmp_path / "resumed", *sets), clean_env, timeout=120)
    assert_one_line_per_rank(proc, ranks, fragment)
