"""Problems: gradients against central finite differences (float64), evaluation, data sets."""

import numpy as np
import pytest

from easgd_mpi.config import Config
from easgd_mpi.data import load_dataset
from easgd_mpi.errors import DataError
from easgd_mpi.models import make_problem


def finite_difference_check(problem, batch, n_checks=25, eps=1e-6, seed=0):
    x = np.zeros(problem.layout.size, np.float64)
    problem.init_params(x, seed)
    rng = np.random.default_rng(seed)
    x += 0.1 * rng.standard_normal(x.size)  # away from the symmetric start (zero biases)
    g = np.zeros_like(x)
    problem.loss_and_grad(x, batch, g)
    scratch = np.zeros_like(x)
    used = np.concatenate([np.arange(s.offset, s.offset + s.size) for s in problem.layout.specs])
    for j in rng.choice(used, min(n_checks, used.size), replace=False):
        xp, xm = x.copy(), x.copy()
        xp[j] += eps
        xm[j] -= eps
        fd = problem.loss_and_grad(xp, batch, scratch) - problem.loss_and_grad(xm, batch, scratch)
        fd /= 2 * eps
        assert g[j] == pytest.approx(fd, rel=1e-5, abs=1e-8), f"d/dx[{j}]"
    padding = np.setdiff1d(np.arange(x.size), used)
    assert np.all(g[padding] == 0)


@pytest.mark.parametrize(
    "model, hidden, activation",
    [
        ("softmax", [], "tanh"),
        ("mlp", [16], "tanh"),
        ("mlp", [8, 6], "relu"),
    ],
)
@pytest.mark.parametrize("data", ["digits", "synthetic"])
def test_classifier_gradients(model, hidden, activation, data):
    cfg = Config.from_toml(
        None,
        environ={},
        overrides={
            "model.name": model,
            "model.hidden": str(hidden),
            "model.activation": activation,
            "data.name": data,
            "batch_size": "17",
        },
    )
    problem = make_problem(cfg)
    batch = problem.sample_batch(np.random.default_rng(3))
    assert batch.shape == (17,)
    finite_difference_check(problem, batch)


def test_quadratic_gradient_optimum_and_noise():
    cfg = Config.from_toml(
        None,
        environ={},
        overrides={
            "model.name": "quadratic",
            "quadratic.dim": "5",
            "quadratic.curvature": "[1, 2, 3, 4, 5]",
            "quadratic.optimum": "2.0",
        },
    )
    problem = make_problem(cfg)
    assert problem.sample_batch(np.random.default_rng(0)) is None
    finite_difference_check(problem, None)
    x = np.zeros(problem.layout.size, np.float32)
    problem.init_params(x, 0)
    assert problem.evaluate(x) == {"loss": pytest.approx(0.5 * 4 * 15), "error": 2.0}
    x[:5] = 2.0
    assert problem.evaluate(x) == {"loss": 0.0, "error": 0.0}

    cfg.quadratic.noise = 0.5
    noisy = make_problem(cfg)
    g = np.zeros(noisy.layout.size, np.float32)
    noisy.loss_and_grad(x, noisy.sample_batch(np.random.default_rng(1)), g)
    assert np.all(g[5:] == 0) and np.any(g[:5] != 0)


def test_evaluate_reports_error_rate():
    cfg = Config.from_toml(None, environ={}, overrides={"model.name": "softmax"})
    problem = make_problem(cfg)
    x = np.zeros(problem.layout.size, np.float32)
    result = problem.evaluate(x)  # all logits equal: argmax picks class 0
    assert result["loss"] == pytest.approx(np.log(10), rel=1e-6)
    assert result["error"] == pytest.approx(np.mean(problem.data.y_test != 0))


def test_datasets_split_and_shapes():
    cfg = Config()
    digits = load_dataset(cfg.data)
    assert digits.n_features == 64 and digits.n_classes == 10
    assert len(digits.x_test) == round(1797 * 0.2)
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    cfg.data.name, cfg.data.classes = "synthetic", 3
    synth = load_dataset(cfg.data)
    assert synth.n_classes == 3 and synth.n_features == cfg.data.features
    again = load_dataset(cfg.data)
    assert np.array_equal(synth.x_test, again.x_test)  # fixed by data.seed
    cfg.data.samples, cfg.data.test_fraction = 10, 0.01
    with pytest.raises(DataError, match="too few"):
        load_dataset(cfg.data)
