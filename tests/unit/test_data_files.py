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
    cfg = data_cfg(
        tmp_path / "d.h5", **{"data.x_key": "feat", "data.y_key": "lab", "batch_size": 50}
    )
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


# ---- the real cause, before anything is sized from the labels -------------------------------


def test_a_label_beyond_the_samples_is_named_before_a_model_is_sized(tmp_path):
    x, y = images(600)
    y[5] = 65_000_000_000  # a raw identifier where a class index belongs
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = data_cfg(tmp_path / "d.npz")
    with pytest.raises(DataError) as info:
        make_problem(cfg)  # the MLP would be sized from the labels: 65e9 outputs
    message = str(info.value)
    assert message.startswith(f"data file {tmp_path / 'd.npz'}: 'y' holds label 65000000000")
    assert "65,000,000,001 classes for 600 samples (4 distinct labels)" in message
    assert "parameters" not in message and "\n" not in message


def test_as_many_classes_as_samples_is_the_most(tmp_path):
    x = np.random.default_rng(0).random((10, 3))
    np.savez(tmp_path / "ok.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 9]))
    assert load_dataset(data_cfg(tmp_path / "ok.npz").data).n_classes == 10
    np.savez(tmp_path / "bad.npz", x=x, y=np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 10]))
    with pytest.raises(DataError, match="'y' holds label 10, i.e. 11 classes for 10 samples"):
        load_dataset(data_cfg(tmp_path / "bad.npz").data)


def test_a_held_out_label_counts_with_the_training_ones(tmp_path):
    x, y = images(20)
    np.savez(tmp_path / "d.npz", x=x[:15], y=y[:15], x_test=x[15:], y_test=[0, 1, 2, 0, 40])
    with pytest.raises(DataError, match="'y_test' holds label 40, i.e. 41 classes for 20 samples"):
        load_dataset(data_cfg(tmp_path / "d.npz").data)


@pytest.mark.parametrize(
    "n, fraction, fragment",
    [
        (
            2,
            "0.2",
            "has 2 samples: too few for data.test_fraction = 0.2 (round(2*0.2) = 0 held "
            "out: the master would have nothing to evaluate)",
        ),
        (
            4,
            "0.9",
            "has 4 samples: too few for data.test_fraction = 0.9 (round(4*0.9) = 4 held "
            "out, leaving none to train on)",
        ),
    ],
)
def test_a_file_too_small_for_both_splits_is_refused_by_name(tmp_path, n, fraction, fragment):
    x, y = images(n)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(n) % 2)
    with pytest.raises(DataError) as info:
        load_dataset(data_cfg(tmp_path / "d.npz", **{"data.test_fraction": fraction}).data)
    assert str(info.value) == f"data file {tmp_path / 'd.npz'} {fragment}"


def test_the_training_split_must_hold_a_minibatch(tmp_path):
    """As config.py requires of the synthetic set: 5 samples, 1 held out, 4 to train on."""
    x, y = images(5)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([0, 1, 0, 1, 1]))
    with pytest.raises(DataError) as info:
        make_problem(data_cfg(tmp_path / "d.npz"))  # batch_size = 128
    assert str(info.value) == (
        f"data file {tmp_path / 'd.npz'}: the training split has 4 samples, fewer than "
        f"batch_size = 128; lower batch_size or use a larger data set"
    )
    problem = make_problem(data_cfg(tmp_path / "d.npz", batch_size=4))  # exactly one batch
    assert problem.layout["w0"].shape == (16, 64)
