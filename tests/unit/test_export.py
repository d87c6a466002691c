"""`easgd export`: a checkpoint's center as a state_dict (.pt) or arrays (.npz), and its errors.

A target that cannot be written is one line naming it and the OS reason, exit 2, whatever
the reason (these tests run as root, which no permission bit stops: the paths below fail for
root too). A run folder stands for its newest valid checkpoint, for export and inspect alike.
"""

import functools
import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from easgd_mpi.checkpoint import CheckpointData, save_checkpoint  # noqa: E402
from easgd_mpi.cli import main  # noqa: E402
from easgd_mpi.models.torch_binding import layout_of  # noqa: E402
from easgd_mpi.workerstate import COUNTERS, WorkerStates  # noqa: E402


def write_checkpoint(path, module, seed=0):
    layout, trainable, local = layout_of(torch, module)
    center = np.random.default_rng(seed).standard_normal(layout.size).astype(np.float32)
    data = CheckpointData(
        config_toml='algorithm = "easgd"\n',
        algorithm="easgd",
        layout=layout,
        center=center,
        states=WorkerStates(
            counters={k: np.zeros(1, np.int64) for k in COUNTERS}, rng_words=np.zeros((1, 6))
        ),
        trainable_size=trainable,
        local_tensors={k: v.numpy() + 7 for k, v in local.items()},
        sequence=seed,
    )
    save_checkpoint(path, data)
    return layout, center


def easgd(*args, limit_bytes=None):
    """``python -m easgd_mpi ARGS``; ``limit_bytes``: under that file-size limit (ulimit -f),
    so a write fails part-way with EFBIG (CPython ignores SIGXFSZ)."""
    limit = (limit_bytes, limit_bytes)
    return subprocess.run(
        [sys.executable, "-m", "easgd_mpi", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=None
        if limit_bytes is None
        else functools.partial(resource.setrlimit, resource.RLIMIT_FSIZE, limit),
    )


def export(*args, limit_bytes=None):
    return easgd("export", *args, limit_bytes=limit_bytes)


def model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(), torch.nn.Linear(4, 2)
    )


def test_pt_and_npz_hold_the_center_under_the_modules_names(tmp_path):
    ckpt = tmp_path / "checkpoint-000001.h5"
    layout, center = write_checkpoint(ckpt, model())
    assert export(ckpt, "-o", tmp_path / "m.pt").returncode == 0
    assert export(ckpt, "-o", tmp_path / "c.npz").returncode == 0
    fresh = model()
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert not fresh.load_state_dict(state).missing_keys
    assert int(fresh[1].num_batches_tracked) == 7  # the stored integer buffer
    for spec in layout.specs:
        expected = center[spec.offset : spec.offset + spec.size].reshape(spec.shape)
        np.testing.assert_array_equal(fresh.state_dict()[spec.name].numpy(), expected)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as arrays:
        assert set(arrays.files) == set(fresh.state_dict())
        np.testing.assert_array_equal(arrays["1.running_var"], fresh[1].running_var.numpy())
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temporary name, then renamed


@pytest.mark.parametrize(
    "target, fragment",
    [("model.pkl", "must end in .pt or .pth"), ("no/such/folder/m.pt", "cannot write")],
)
def test_bad_targets_are_one_line(tmp_path, target, fragment):
    ckpt = tmp_path / "checkpoint-000001.h5"
    write_checkpoint(ckpt, model())
    proc = export(ckpt, "-o", tmp_path / target)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr


def test_a_damaged_checkpoint_is_refused_by_name(tmp_path):
    ckpt = tmp_path / "checkpoint-000001.h5"
    write_checkpoint(ckpt, model())
    raw = ckpt.read_bytes()
    ckpt.write_bytes(raw[: len(raw) // 2])  # a copy cut short
    proc = export(ckpt, "-o", tmp_path / "m.pt")
    assert proc.returncode == 2 and str(ckpt) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.pt").exists()


def assert_one_line(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("easgd: error: "), proc.stderr
    assert all(f in proc.stderr for f in fragments), proc.stderr
    assert "Traceback" not in proc.stderr


def in_process(capsys, *args):
    """The command run by ``cli.main`` in this process (no interpreter start, torch already
    imported), as a CompletedProcess; an exception escaping main fails the test."""
    code = main([*map(str, args)])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize(
    "where, reason",
    [
        ("under-a-file", "Not a directory"),  # its folder is a regular file
        ("missing-folder", "No such file or directory"),
        ("a-folder", "Is a directory"),  # the target itself is a folder
        ("proc", "No such file or directory"),  # /proc takes no new files, even from root
    ],
)
def test_every_unwritable_target_is_one_line_naming_it(tmp_path, capsys, suffix, where, reason):
    ckpt = tmp_path / "checkpoint-000001.h5"
    write_checkpoint(ckpt, model())
    (tmp_path / "plain-file").write_text("x")
    target = {
        "under-a-file": tmp_path / "plain-file" / f"m{suffix}",
        "missing-folder": tmp_path / "missing" / f"m{suffix}",
        "a-folder": tmp_path / f"folder{suffix}",
        "proc": Path("/proc") / f"easgd-test{suffix}",
    }[where]
    if where == "a-folder":
        target.mkdir()
    assert_one_line(
        in_process(capsys, "export", ckpt, "-o", target), f"cannot write {target}: {reason}"
    )
    assert not list(tmp_path.rglob(".*tmp*"))  # no half-written temporary file stays
    assert where == "a-folder" or not target.exists()


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_a_write_that_fails_part_way_is_one_line(tmp_path, suffix):
    """The command itself, under a 300-byte file-size limit: the write fails with EFBIG."""
    ckpt = tmp_path / "checkpoint-000001.h5"
    write_checkpoint(ckpt, model())
    target = tmp_path / f"m{suffix}"
    assert_one_line(
        export(ckpt, "-o", target, limit_bytes=300), f"cannot write {target}: File too large"
    )
    assert not target.exists() and not list(tmp_path.glob(".*tmp*"))


def test_a_run_folder_means_its_newest_valid_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    layout, older = write_checkpoint(run / "checkpoint-000001.h5", model(), seed=1)
    write_checkpoint(run / "checkpoint-000002.h5", model(), seed=2)
    raw = (run / "checkpoint-000002.h5").read_bytes()
    (run / "checkpoint-000002.h5").write_bytes(raw[: len(raw) // 2])  # the newest is damaged

    proc = export(run, "-o", tmp_path / "c.npz")
    assert proc.returncode == 0, proc.stderr
    assert "skipping bad checkpoint" in proc.stderr and "checkpoint-000002.h5" in proc.stderr
    with np.load(tmp_path / "c.npz") as arrays:
        spec = layout.specs[0]
        expected = older[spec.offset : spec.offset + spec.size].reshape(spec.shape)
        np.testing.assert_array_equal(arrays[spec.name], expected)

    shown = easgd("inspect", run, "--json")
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["file"] == str(run / "checkpoint-000001.h5") and summary["sequence"] == 1
    assert easgd("inspect", run).stdout.startswith(f"{run / 'checkpoint-000001.h5'}: ")


@pytest.mark.parametrize("command", ["export", "inspect"])
def test_a_folder_without_a_valid_checkpoint_says_so(tmp_path, command):
    out = ["-o", tmp_path / "m.npz"] if command == "export" else []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line(easgd(command, empty, *out), f"no checkpoint in {empty}")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "checkpoint-000001.h5").write_bytes(b"\x89HDF\r\n\x1a\n cut short")
    proc = easgd(command, damaged, *out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.splitlines()[-1]  # after a note on each damaged file
    assert f"every checkpoint in {damaged} is damaged (checkpoint-000001.h5)" in last
    assert not (tmp_path / "m.npz").exists()


def test_the_cli_module_runs_as_a_script(tmp_path):
    """``python -m easgd_mpi.cli`` is the same command as ``python -m easgd_mpi``."""
    ckpt = tmp_path / "checkpoint-000001.h5"
    write_checkpoint(ckpt, model())
    target = tmp_path / "c.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "easgd_mpi.cli", "export", str(ckpt), "-o", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"wrote {target}\n" and target.is_file()
