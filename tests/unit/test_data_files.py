"""Your own data from a file (data.name = "file"): .npz and HDF5, and every way it can be wrong."""

import h5py
import numpy as np
import pytest

from easgd_mpi.config import Config
from easgd_mpi.data import load_dataset
from easgd_mpi.errors import ConfigError, DataError
from easgd_mpi.models import make_problem


def data_cfg(path, **extra):
    return Config.from_toml(
        None, environ={}, overrides={"data.name": "file", "data.path": str(path), **extra}
    )


def images(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, 4, 4)).astype(np.float64), rng.integers(0, 3, n)


def test_npz_with_a_split_fraction(tmp_path):
    x, y = images()
    np.savez(tmp_path / "d.npz", x=x, y=y)
    d = load_dataset(data_cfg(tmp_path / "d.npz").data)
    assert d.n_features == 16 and d.n_classes == 3  # images flattened to rows
    assert len(d.x_test) == 12 and len(d.x_train) == 48
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64


def test_hdf5_with_its_own_test_split_and_other_keys(tmp_path):
    x, y = images()
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["feat"], f["lab"] = x[:50], y[:50].astype(np.float32)  # whole-number floats are fine
        f["feat_test"], f["lab_test"] = x[50:], y[50:]
    cfg = data_cfg(tmp_path / "d.h5", **{"data.x_key": "feat", "data.y_key": "lab"})
    d = load_dataset(cfg.data)
    assert len(d.x_train) == 50 and len(d.x_test) == 10
    problem = make_problem(cfg)  # and the MLP builds on it
    assert problem.layout["w0"].shape == (16, 64)


@pytest.mark.parametrize(
    "write, fragment",
    [
        (lambda p: None, "not found (data.path)"),
        (lambda p: p.write_text("hello"), "neither a NumPy .npz nor an HDF5 file"),
        (
            lambda p: np.savez(p, features=np.zeros((5, 2)), y=np.zeros(5)),
            "has no array 'x' (it has: features, y)",
        ),
        (lambda p: np.savez(p, x=np.zeros(5), y=np.zeros(5)), "'x' has shape [5]"),
        (lambda p: np.savez(p, x=np.zeros((5, 2)), y=np.zeros(4)), "need one label per row"),
        (lambda p: np.savez(p, x=np.zeros((5, 2)), y=np.array([0, 1, 0.5, 1, 0])), "class indices"),
        (
            lambda p: np.savez(p, x=np.full((5, 2), np.nan), y=np.array([0, 1, 0, 1, 0])),
            "NaN or infinite",
        ),
        (lambda p: np.savez(p, x=np.zeros((5, 2)), y=np.zeros(5)), "a single class"),
        (
            lambda p: np.savez(
                p, x=np.zeros((5, 2)), y=np.array([0, 1, 0, 1, 0]), x_test=np.zeros((2, 2))
            ),
            "only one of 'x_test' and 'y_test'",
        ),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, write, fragment):
    path = tmp_path / "d.npz"
    write(path)
    with pytest.raises(DataError) as info:
        load_dataset(data_cfg(path).data)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_file_data_needs_a_path():
    with pytest.raises(ConfigError, match="data.name = 'file' needs data.path"):
        Config.from_toml(None, environ={}, overrides={"data.name": "file"})
