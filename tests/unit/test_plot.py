"""``easgd plot``: fabricated run folders in, a PNG out; bad paths are one-line errors.

An image that cannot be written is one line naming it and the OS reason, exit 2 (the tests run
as root, which no permission bit stops: the paths below fail for root too).
"""

import functools
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from easgd_mpi.cli import main
from easgd_mpi.plot import PlotError, load_run, plot_runs

# matplotlib comes from the `matplotlib` fixture (tests/conftest.py: skipped without it),
# imported when these tests run, never when the suite is collected.
pytestmark = pytest.mark.usefixtures("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(folder, algorithm, tau, seed=0, diverged=False):
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(f'algorithm = "{algorithm}"\ntau = {tau}\nseed = {seed}\n')
    lines = []
    for k in range(6):
        error = 0.9 * 0.5**k
        loss = None if diverged and k > 3 else 2.3 * 0.6**k  # null = a NaN loss
        lines.append(
            json.dumps(
                {
                    "time": 0.5 * k,
                    "steps": 400 * k,
                    "exchanges": 100 * k,
                    "center_loss": loss,
                    "center_error": error,
                    "distance": 0.1,
                    "bytes": 1000 * k,
                }
            )
        )
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_two_runs_make_a_png(tmp_path):
    a = fake_run(tmp_path / "a", "easgd", 4)
    b = fake_run(tmp_path / "b", "downpour", 16, diverged=True)
    out = plot_runs([a, b / "metrics.jsonl"], tmp_path / "figs" / "fig.png", title="t")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_labels_come_from_the_config_and_equal_ones_get_the_seed(tmp_path):
    runs = [load_run(fake_run(tmp_path / f"r{s}", "eamsgd", 4, seed=s)) for s in (1, 2)]
    assert runs[0].label == "eamsgd, τ=4"
    plot_runs(runs, tmp_path / "fig.png")
    assert [r.label for r in runs] == ["eamsgd, τ=4 (seed 1)", "eamsgd, τ=4 (seed 2)"]


def test_cli_writes_the_png(tmp_path, capsys):
    a = fake_run(tmp_path / "a", "sync-easgd", 1)
    b = fake_run(tmp_path / "b", "allreduce-sgd", 1)
    assert main(["plot", str(a), str(b), "-o", str(tmp_path / "out.png")]) == 0
    assert (tmp_path / "out.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p, "has no metrics.jsonl"),
        (
            lambda p: (p / "m.jsonl").write_text("not json\n") and p / "m.jsonl",
            "no metrics records",
        ),
    ],
)
def test_bad_paths_are_errors(tmp_path, make, fragment):
    path = make(tmp_path)
    with pytest.raises(PlotError, match=fragment):
        load_run(path)


def test_bad_path_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "easgd_mpi",
            "plot",
            str(tmp_path / "nope"),
            "-o",
            str(tmp_path / "x.png"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0], proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "where, reason",
    [
        ("under-a-file", "Not a directory"),  # its folder is a regular file
        ("a-folder", "Is a directory"),  # the image's name is a folder
        ("proc", "No such file or directory"),  # /proc takes no new files, even from root
        ("unknown-format", "matplotlib does not write '.xyz' files (use one of "),
    ],
)
def test_every_unwritable_image_is_one_line_naming_it(tmp_path, capsys, where, reason):
    run = fake_run(tmp_path / "a", "easgd", 4)
    (tmp_path / "plain-file").write_text("x")
    output = {
        "under-a-file": tmp_path / "plain-file" / "fig.png",
        "a-folder": tmp_path / "folder.png",
        "proc": Path("/proc") / "easgd-test" / "fig.png",
        "unknown-format": tmp_path / "fig.xyz",
    }[where]
    if where == "a-folder":
        output.mkdir()
    assert main(["plot", str(run), "-o", str(output)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"easgd: error: plot: cannot write {output}: {reason}")
    assert err.count("\n") == 1 and not out
    assert where == "a-folder" or not output.exists()


def test_a_write_that_fails_part_way_is_one_line(tmp_path):
    """The command itself, under a 1,000-byte file-size limit: saving fails with EFBIG."""
    run = fake_run(tmp_path / "a", "easgd", 4)
    output = tmp_path / "fig.png"
    limit = functools.partial(resource.setrlimit, resource.RLIMIT_FSIZE, (1000, 1000))
    proc = subprocess.run(
        [sys.executable, "-m", "easgd_mpi", "plot", str(run), "-o", str(output)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"easgd: error: plot: cannot write {output}: File too large\n"


def test_a_name_without_a_suffix_is_a_png_and_says_so(tmp_path, capsys):
    run = fake_run(tmp_path / "a", "easgd", 4)
    assert main(["plot", str(run), "-o", str(tmp_path / "fig")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'fig.png'}\n"
    assert (tmp_path / "fig.png").read_bytes()[:8] == PNG_MAGIC
