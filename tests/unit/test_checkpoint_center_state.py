"""The center-side state of a checkpoint (``/center_state``): stored, verified, shown."""

import dataclasses

import h5py
import numpy as np
import pytest
from test_checkpoint import LAYOUT, make_data

from easgd_mpi.checkpoint import format_summary, load_checkpoint, save_checkpoint, summarize
from easgd_mpi.errors import CheckpointError


def with_state(**rows):
    return dataclasses.replace(make_data(), algorithm="async-diloco", center_state=rows)


def test_center_state_round_trips_and_is_shown(tmp_path):
    rng = np.random.default_rng(3)
    rows = {
        "outer_momentum": rng.standard_normal(LAYOUT.size).astype(np.float32),
        "outer_buffer": rng.standard_normal(LAYOUT.size).astype(np.float32),
    }
    back = load_checkpoint(save_checkpoint(tmp_path / "c.h5", with_state(**rows)))
    assert sorted(back.center_state) == sorted(rows)
    for name, row in rows.items():
        assert np.array_equal(back.center_state[name], row)
    summary = summarize(back, tmp_path / "c.h5")
    assert summary["center_state"] == ["outer_buffer", "outer_momentum"]
    assert "center-side state: outer_buffer, outer_momentum" in format_summary(summary)
    # A rule without one writes no group (and older files, without it, still verify).
    plain = load_checkpoint(save_checkpoint(tmp_path / "p.h5", make_data()))
    assert plain.center_state == {}
    with h5py.File(tmp_path / "p.h5") as f:
        assert "center_state" not in f


def test_a_damaged_center_state_fails_the_checksum(tmp_path):
    path = save_checkpoint(tmp_path / "c.h5", with_state(velocity=np.ones(LAYOUT.size, np.float32)))
    with h5py.File(path, "r+") as f:
        f["center_state/velocity"][3] = 2.0
    with pytest.raises(CheckpointError, match="failed its checksum"):
        load_checkpoint(path)
