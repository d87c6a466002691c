"""The HDF5 checkpoint format: round trip, validation, damage, inspect (a folder of them:
test_rundir.py)."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from easgd_mpi.checkpoint import (
    CheckpointData,
    check_matches,
    format_summary,
    load_checkpoint,
    save_checkpoint,
    summarize,
)
from easgd_mpi.config import Config
from easgd_mpi.errors import CheckpointError
from easgd_mpi.flat import Layout

LAYOUT = Layout([("w", (5, 3)), ("b", (3,))])


def make_data(seed=0, with_v=True, p=3) -> CheckpointData:
    rng = np.random.default_rng(seed)
    n = LAYOUT.size
    return CheckpointData(
        config_toml=Config().to_toml(),
        algorithm="eamsgd",
        layout=LAYOUT,
        center=rng.standard_normal(n).astype(np.float32),
        worker_counters={
            "steps": np.array([10, 11, 12]),
            "exchanges": np.array([3, 3, 4]),
            "resets": np.array([0, 1, 0]),
        },
        worker_x=rng.standard_normal((p, n)).astype(np.float32),
        worker_v=rng.standard_normal((p, n)).astype(np.float32) if with_v else None,
        worker_rng=[json.dumps(np.random.default_rng(i).bit_generator.state) for i in range(p)],
        wall_time=12.5,
        sequence=7,
        metrics=[
            {"time": 0.0, "steps": 0, "center_error": 0.9, "distance": None},
            {"time": 1.5, "steps": 33, "center_error": 0.1, "distance": 0.25},
        ],
    )


def test_round_trip_is_bit_exact(tmp_path):
    data = make_data()
    path = save_checkpoint(tmp_path / "c.h5", data)
    back = load_checkpoint(path)
    assert back.layout == LAYOUT and back.algorithm == "eamsgd"
    for a, b in [
        (data.center, back.center),
        (data.worker_x, back.worker_x),
        (data.worker_v, back.worker_v),
    ]:
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    for k, v in data.worker_counters.items():
        assert np.array_equal(v, back.worker_counters[k])
    assert back.worker_rng == data.worker_rng
    assert back.metrics == data.metrics
    assert (back.wall_time, back.sequence, back.config_toml) == (12.5, 7, data.config_toml)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left


def test_without_worker_states(tmp_path):
    data = make_data(with_v=False)
    data.worker_x = None
    back = load_checkpoint(save_checkpoint(tmp_path / "c.h5", data))
    assert back.worker_x is None and back.worker_v is None
    assert summarize(back)["worker_center_distance"] is None


def flip_byte_in_center(path):
    """Flip one byte inside the stored center values (found by content, not by guessing)."""
    data = load_checkpoint(path)
    raw = bytearray(path.read_bytes())
    needle = data.center.tobytes()[:16]
    at = raw.find(needle)
    assert at >= 0
    raw[at + 5] ^= 0x40
    path.write_bytes(bytes(raw))


def test_damage_is_named(tmp_path):
    path = save_checkpoint(tmp_path / "c.h5", make_data())
    good = path.read_bytes()
    flip_byte_in_center(path)
    with pytest.raises(CheckpointError, match="failed its checksum"):
        load_checkpoint(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_checkpoint(path)
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="is not an HDF5 file"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.h5")


def test_unknown_version_and_foreign_hdf5(tmp_path):
    import h5py

    path = save_checkpoint(tmp_path / "c.h5", make_data())
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CheckpointError, match="not an easgd-mpi checkpoint"):
        load_checkpoint(tmp_path / "other.h5")


def test_layout_mismatch_names_the_tensor(tmp_path):
    data = make_data()
    check_matches(data, LAYOUT, "c.h5")
    with pytest.raises(CheckpointError, match="tensor 'w' has shape \\[5, 3\\], the model needs"):
        check_matches(data, Layout([("w", (5, 4)), ("b", (3,))]), "c.h5")
    with pytest.raises(CheckpointError, match="has no tensor 'w2'"):
        check_matches(data, Layout([("w", (5, 3)), ("b", (3,)), ("w2", (2,))]), "c.h5")


def test_summary_text_and_json(tmp_path):
    data = make_data()
    path = save_checkpoint(tmp_path / "c.h5", data)
    s = summarize(load_checkpoint(path), path)
    assert s["counters"]["steps"] == 33 and s["counters"]["resets"] == 1
    assert [t["name"] for t in s["tensors"]] == ["w", "b"]
    w = data.center[:15].astype(np.float64)
    assert s["tensors"][0]["norm"] == pytest.approx(np.linalg.norm(w))
    assert s["worker_center_distance"][1] == pytest.approx(
        np.linalg.norm(data.worker_x[1].astype(np.float64) - data.center)
    )
    text = format_summary(s)
    assert "algorithm eamsgd, 3 workers, checkpoint #7" in text
    assert "33 worker steps" in text and "[5, 3]" in text


def test_easgd_inspect_command(tmp_path):
    path = save_checkpoint(tmp_path / "c.h5", make_data())
    cmd = [sys.executable, "-m", "easgd_mpi", "inspect", str(path)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "checkpoint version 1" in text.splitlines()[0] and "worker-to-center distance" in text
    js = json.loads(
        subprocess.run(cmd + ["--json"], capture_output=True, text=True, check=True).stdout
    )
    assert js["counters"]["per_worker"]["steps"] == [10, 11, 12]
    assert js["last_metrics"]["center_error"] == 0.1
    bad = subprocess.run(
        [sys.executable, "-m", "easgd_mpi", "inspect", str(tmp_path / "no.h5")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


def test_h5dump_reads_it(tmp_path):
    h5dump = shutil.which("h5dump")
    if h5dump is None:
        pytest.fail("h5dump is missing: `make test` installs Debian's hdf5-tools")
    path = save_checkpoint(tmp_path / "c.h5", make_data())
    out = subprocess.run([h5dump, "-H", str(path)], capture_output=True, text=True, check=True)
    for name in ("center", "layout", "workers", "metrics", "checksum_sha256"):
        assert name in out.stdout
