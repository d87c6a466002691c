"""The HDF5 checkpoint format: round trip, validation, damage, inspect (a folder of them:
test_rundir.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

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
from easgd_mpi.workerstate import WorkerStates, encode_rng

LAYOUT = Layout([("w", (5, 3)), ("b", (3,))])


def make_data(seed=0, with_v=True, p=3) -> CheckpointData:
    rng = np.random.default_rng(seed)
    n = LAYOUT.size
    return CheckpointData(
        config_toml=Config().to_toml(),
        algorithm="eamsgd",
        layout=LAYOUT,
        center=rng.standard_normal(n).astype(np.float32),
        states=WorkerStates(
            counters={
                "steps": np.array([10, 11, 12]),
                "exchanges": np.array([3, 3, 4]),
                "resets": np.array([0, 1, 0]),
            },
            rows={
                "x": rng.standard_normal((p, n)).astype(np.float32),
                **({"v": rng.standard_normal((p, n)).astype(np.float32)} if with_v else {}),
            },
            rng_words=np.stack([encode_rng(np.random.default_rng(i)) for i in range(p)]),
        ),
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
        (data.states.row("x"), back.states.row("x")),
        (data.states.row("v"), back.states.row("v")),
    ]:
        assert a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    for k, v in data.states.counters.items():
        assert np.array_equal(v, back.states.counters[k])
    assert np.array_equal(back.states.rng_words, data.states.rng_words)
    for i in range(3):  # the words give back the very generator that was saved
        want = np.random.default_rng(i).standard_normal(4)
        assert np.array_equal(back.states.of(i).generator().standard_normal(4), want)
    assert back.metrics == data.metrics
    assert (back.wall_time, back.sequence, back.config_toml) == (12.5, 7, data.config_toml)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporaries left


def test_without_worker_states(tmp_path):
    data = make_data(with_v=False)
    data.states.rows.clear()
    back = load_checkpoint(save_checkpoint(tmp_path / "c.h5", data))
    assert back.states.row("x") is None and back.states.row("v") is None
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
        np.linalg.norm(data.states.row("x")[1].astype(np.float64) - data.center)
    )
    text = format_summary(s)
    assert "algorithm eamsgd, 3 workers, checkpoint #7" in text
    assert "33 worker steps" in text and "[5, 3]" in text


def test_easgd_inspect_command(tmp_path):
    path = save_checkpoint(tmp_path / "c.h5", make_data())
    cmd = [sys.executable, "-m", "easgd_mpi", "inspect", str(path)]
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "checkpoint version 2" in text.splitlines()[0] and "worker-to-center distance" in text
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


def test_a_version_1_file_still_loads_and_resumes_its_generators():
    # tests/data/checkpoint-v1.h5 was written by the release before the worker-state type
    # (generators as JSON text); its checksum, rows and generators read back as they were.
    back = load_checkpoint(Path(__file__).parents[1] / "data" / "checkpoint-v1.h5")
    assert back.format_version == 1 and back.sequence == 4 and back.workers == 2
    assert list(back.states.counters["steps"]) == [7, 8]
    assert set(back.states.rows) == {"x", "v"} and list(back.states.age) == [0.5, 1.5]
    # The workers' streams continue where they were: their next draws, recorded at writing.
    want = [[-1.18395674, 0.69795518, -2.16380642], [-0.75332789, 0.73413405, 0.82402834]]
    for i, row in enumerate(want):
        got = back.states.of(i).generator().standard_normal(3)
        assert np.allclose(got, row, rtol=0, atol=1e-8)
