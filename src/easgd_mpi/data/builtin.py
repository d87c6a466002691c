"""Built-in data sets: scikit-learn's handwritten digits (shipped with the package, no download)
and a synthetic Gaussian-classes set. Each comes as a train split (the workers') and a held-out
split (the master's evaluation of the center)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["Dataset", "load_dataset", "load_images"]


@dataclass
class Dataset:
    """Features as float32 rows, labels as int64 class indices."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]


def load_dataset(data_cfg, batch_size: int | None = None) -> Dataset:
    """The data set named by ``data_cfg.name`` (a :class:`~easgd_mpi.config.DataConfig`).

    Both splits must hold a sample; with ``batch_size`` the training split must hold a whole
    minibatch (the samplers would otherwise draw fewer samples without saying so), the rule the
    config applies to the synthetic set before anything is read."""
    data = _load(data_cfg)
    if batch_size is not None and len(data.y_train) < batch_size:
        raise DataError(
            f"{_source(data_cfg)}: the training split has {len(data.y_train):,d} samples, fewer "
            f"than batch_size = {batch_size}; lower batch_size or use a larger data set"
        )
    return data


def _load(data_cfg) -> Dataset:
    if data_cfg.name == "digits":
        x, y = _digits()
    elif data_cfg.name == "synthetic":
        x, y = _synthetic(data_cfg)
    elif data_cfg.name in ("cifar10", "mnist"):
        # Feature models (MLP, softmax) see the images as rows of pixels scaled to [0, 1].
        images = load_images(data_cfg)
        return Dataset(
            data_cfg.name,
            _pixels(images.x_train),
            images.y_train,
            _pixels(images.x_test),
            images.y_test,
            images.n_classes,
        )
    elif data_cfg.name == "file":
        from .files import load_arrays  # noqa: PLC0415

        # The labels are checked against the samples there, before a class count is taken.
        x, y, held_out = load_arrays(data_cfg.path, data_cfg.x_key, data_cfg.y_key)
        if held_out is not None:
            x_test, y_test = held_out
            n_classes = int(max(y.max(), y_test.max())) + 1
            return Dataset("file", x, y, x_test, y_test, n_classes)
    else:
        raise DataError(f"data.name = '{data_cfg.name}' is not a built-in data set")
    n_classes = int(y.max()) + 1
    if n_classes < 2:
        raise DataError(f"{_source(data_cfg)} has a single class: nothing to classify")
    return _split(data_cfg, x, y, n_classes)


def load_images(data_cfg):
    """CIFAR-10 or MNIST files at ``data_cfg.path`` as an :class:`~.images.ImageSet`."""
    if not data_cfg.path:
        raise DataError(f"data.name = '{data_cfg.name}' needs data.path (the data set's files)")
    if data_cfg.name == "cifar10":
        from .cifar import load_cifar10  # noqa: PLC0415

        return load_cifar10(data_cfg.path)
    if data_cfg.name == "mnist":
        from .mnist import load_mnist  # noqa: PLC0415

        return load_mnist(data_cfg.path)
    raise DataError(f"data.name = '{data_cfg.name}' is not an image data set (cifar10, mnist)")


def _pixels(images: np.ndarray) -> np.ndarray:
    return images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.name = 'digits' needs scikit-learn (pip install scikit-learn)")
    # Read scikit-learn's shipped file directly: importing sklearn.datasets costs ~2 s per
    # rank, which on a small node is most of a short run's start-up.
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        data, target = table[:, :-1], table[:, -1]
    else:  # a future scikit-learn may move the file; the public loader still works
        from sklearn.datasets import load_digits  # noqa: PLC0415

        bunch = load_digits()
        data, target = bunch.data, bunch.target
    # Pixel intensities are 0..16; scale to [0, 1] so the default learning rate fits.
    return (data / 16.0).astype(np.float32), target.astype(np.int64)


def _synthetic(cfg) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    means = rng.standard_normal((cfg.classes, cfg.features))
    means *= cfg.separation / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, cfg.classes, cfg.samples)
    # Every class present, so n_classes is what the config says.
    y[: cfg.classes] = np.arange(cfg.classes)
    x = means[y] + rng.standard_normal((cfg.samples, cfg.features))
    return x.astype(np.float32), y.astype(np.int64)


def _source(data_cfg) -> str:
    """How errors name a data set: by its file when it has one."""
    if data_cfg.name == "file":
        return f"data file {data_cfg.path}"
    return f"data set '{data_cfg.name}'"


def _split(data_cfg, x, y, n_classes) -> Dataset:
    """The held-out split is round(n × test_fraction) samples (config.py's synthetic check
    uses the same rounding); both splits must hold at least one."""
    source, test_fraction = _source(data_cfg), data_cfg.test_fraction
    n = x.shape[0]
    n_test = int(round(n * test_fraction))
    held = f"round({n}*{test_fraction:g}) = {n_test}"
    if n_test < 1:
        raise DataError(
            f"{source} has {n} samples: too few for data.test_fraction = {test_fraction} "
            f"({held} held out: the master would have nothing to evaluate)"
        )
    if n - n_test < 1:
        raise DataError(
            f"{source} has {n} samples: too few for data.test_fraction = {test_fraction} "
            f"({held} held out, leaving none to train on)"
        )
    order = np.random.default_rng(data_cfg.seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    return Dataset(data_cfg.name, x[train], y[train], x[test], y[test], n_classes)
