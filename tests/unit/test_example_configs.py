"""Every example in configs/ loads, validates for a few worker counts, and builds its model."""

from pathlib import Path

import numpy as np
import pytest

from easgd_mpi.config import Config
from easgd_mpi.models import make_problem

# Configs for data sets read from files (CIFAR-10, MNIST) point at where a user keeps them;
# here they read small files in the same formats, written by the tests' writers.
from image_files import write_cifar_folder, write_mnist  # noqa: E402

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.toml"))


def test_there_are_examples():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_config_is_valid(path, tmp_path):
    cfg = Config.from_toml(path, environ={})
    if cfg.data.name == "cifar10":
        cfg.set("data.path", str(write_cifar_folder(tmp_path / "cifar-10-batches-py")))
    elif cfg.data.name == "mnist":
        cfg.set("data.path", str(write_mnist(tmp_path / "mnist")))
    for workers in (1, 2, 4, 8):
        cfg.validate(workers=workers)
    problem = make_problem(cfg)
    x = np.zeros(problem.layout.size, np.float32)
    problem.init_params(x, cfg.seed)
    assert np.isfinite(problem.evaluate(x)["loss"])
