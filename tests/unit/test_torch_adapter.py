"""The PyTorch adapter on the flat buffers, through the real update rules (in one process).

A small in-memory center stands in for the RMA window so that a single worker's trajectory is
deterministic; the rules, the fused NumPy kernels and the adapter are the real ones.
"""

import numpy as np
import pytest

from easgd_mpi.algorithms import make_algorithm
from easgd_mpi.backend import NumpyBackend
from easgd_mpi.config import Config
from easgd_mpi.data import load_dataset
from easgd_mpi.data.sampling import worker_rng
from easgd_mpi.errors import ConfigError
from easgd_mpi.models import MLPProblem, TorchProblem
from local_center import LocalCenter

# PyTorch comes from the `torch` fixture (tests/conftest.py): imported when these tests run,
# never when the suite is collected.


def config(**values):
    cfg = Config()
    for key, value in values.items():
        cfg.set(key, value)
    return cfg.validate(workers=1)


def digits():
    return load_dataset(Config().data)


def on_digits(model, data, batch_size=16):
    return TorchProblem(
        model, (data.x_train, data.y_train), (data.x_test, data.y_test), batch_size=batch_size
    )


def torch_mlp(torch, widths):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def to_mlp_layout(torch_prob, mlp_prob, x_torch):
    """The torch problem's flat vector rearranged into the built-in MLP's layout."""
    tv = torch_prob.layout.views(x_torch)
    out = mlp_prob.layout.zeros()
    mv = mlp_prob.layout.views(out)
    for i in range(mlp_prob.n_layers):
        mv[f"w{i}"][...] = tv[f"{2 * i}.weight"].T
        mv[f"b{i}"][...] = tv[f"{2 * i}.bias"]
    return out


@pytest.mark.parametrize(
    "algorithm, extra",
    [("easgd", {}), ("eamsgd", {"momentum": 0.9}), ("downpour", {})],
)
def test_torch_mlp_follows_the_numpy_mlp(algorithm, extra, torch):
    """Same initial parameters, same batches: the same trajectory within 1e-5 for 50 steps."""
    cfg = config(algorithm=algorithm, lr=0.05, tau=3, weight_decay=1e-3, batch_size=32, **extra)
    data = digits()
    mlp = MLPProblem(data, hidden=[16], batch_size=32)
    tmodel = torch_mlp(torch, [64, 16, 10])
    tprob = TorchProblem(
        tmodel, (data.x_train, data.y_train), (data.x_test, data.y_test), batch_size=32
    )
    x0 = mlp.layout.zeros()
    mlp.init_params(x0, seed=3)
    views = mlp.layout.views(x0)
    with torch.no_grad():
        for i in range(2):
            tmodel[2 * i].weight.copy_(torch.from_numpy(views[f"w{i}"].T.copy()))
            tmodel[2 * i].bias.copy_(torch.from_numpy(views[f"b{i}"].copy()))
    t0 = tprob.layout.zeros()
    tprob.init_params(t0, seed=3)
    np.testing.assert_array_equal(to_mlp_layout(tprob, mlp, t0), x0)

    runs = []
    for prob, start in ((mlp, x0), (tprob, t0)):
        center = LocalCenter(start, chunk=97)
        algo = make_algorithm(cfg, prob, NumpyBackend(), center, 0.5, worker_rng(0, 0))
        algo.pull_center()
        runs.append((algo, center))
    (a_np, c_np), (a_t, c_t) = runs
    for t in range(50):
        loss_np = a_np.step(t)
        loss_t = a_t.step(t)
        assert float(loss_t) == pytest.approx(loss_np, abs=1e-5)
        np.testing.assert_allclose(to_mlp_layout(tprob, mlp, a_t.x), a_np.x, atol=1e-5)
        np.testing.assert_allclose(to_mlp_layout(tprob, mlp, c_t.value), c_np.value, atol=1e-5)
    assert a_t.exchanges == a_np.exchanges > 0


def test_parameters_and_gradients_stay_views_of_the_flat_buffers(torch):
    cfg = config(algorithm="eamsgd", momentum=0.9, lr=0.05, tau=2, batch_size=16)
    data = digits()
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 10)
    )
    prob = on_digits(model, data)
    x0 = prob.layout.zeros()
    prob.init_params(x0, 0)
    center = LocalCenter(x0, chunk=64)
    algo = make_algorithm(cfg, prob, NumpyBackend(), center, 0.5, worker_rng(0, 0))
    algo.pull_center()

    def inside(tensor, flat):
        lo = flat.ctypes.data
        ptr = tensor.data_ptr()
        return lo <= ptr and ptr + tensor.numel() * 4 <= lo + flat.nbytes

    for t in range(12):
        algo.step(t)
        for name, p in model.named_parameters():
            assert inside(p, algo.y), name  # EAMSGD: gradients are taken at x + δv
            assert inside(p.grad, algo.g), name
            spec = prob.layout[name]
            np.testing.assert_array_equal(
                p.detach().numpy().ravel(), algo.y[spec.offset : spec.offset + spec.size]
            )
        for name, b in model.named_buffers():
            if b.is_floating_point():
                assert inside(b, algo.x), name  # buffers live in the worker's own x
    assert algo.exchanges == 6


@pytest.mark.parametrize("algorithm, extra", [("easgd", {}), ("eamsgd", {"momentum": 0.9})])
def test_batchnorm_statistics_are_averaged_and_never_stepped(algorithm, extra, torch):
    cfg = config(algorithm=algorithm, lr=0.1, tau=4, weight_decay=0.1, batch_size=16, **extra)
    data = digits()
    bn = torch.nn.BatchNorm1d(8, momentum=0.0)  # forward passes leave the statistics alone
    model = torch.nn.Sequential(torch.nn.Linear(64, 8), bn, torch.nn.ReLU(), torch.nn.Linear(8, 10))
    prob = on_digits(model, data)
    buffers = [s for s in prob.layout.specs if s.offset >= prob.n_trainable]
    assert [s.name for s in buffers] == ["1.running_mean", "1.running_var"]
    assert "1.num_batches_tracked" in prob.local_state()
    x0 = prob.layout.zeros()
    prob.init_params(x0, 0)
    center = LocalCenter(x0, chunk=50)  # chunks straddle the parameter/buffer boundary
    m = prob.n_trainable
    center.value[m:] += 1.0  # the center's statistics differ from the worker's
    algo = make_algorithm(cfg, prob, NumpyBackend(), center, 0.25, worker_rng(0, 0))
    algo.x[...] = x0  # the worker starts away from the center
    buf0 = algo.x[m:].copy()
    c0 = center.value[m:].copy()

    algo.step(1)  # a local step: weight decay and momentum must not touch the buffers
    algo.step(2)
    np.testing.assert_array_equal(algo.x[m:], buf0)
    assert not algo.g[m:].any()
    if algo.v is not None:
        assert not algo.v[m:].any()

    algo.step(4)  # an exchange: the elastic pull, exactly, on the statistics
    e = np.float32(0.25) * (buf0 - c0)
    np.testing.assert_allclose(algo.x[m:], buf0 - e, rtol=1e-6)
    np.testing.assert_allclose(center.value[m:], c0 + e, rtol=1e-6)


def test_batchnorm_updates_land_in_the_workers_state_for_eamsgd(torch):
    cfg = config(algorithm="eamsgd", momentum=0.9, lr=0.05, tau=100, batch_size=16)
    data = digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.BatchNorm1d(10))
    prob = on_digits(model, data)
    x0 = prob.layout.zeros()
    prob.init_params(x0, 0)
    algo = make_algorithm(
        cfg, prob, NumpyBackend(), LocalCenter(x0, chunk=100), 0.5, worker_rng(0, 0)
    )
    algo.pull_center()
    m = prob.n_trainable
    before = algo.x[m:].copy()
    algo.step(1)
    assert not np.array_equal(algo.x[m:], before)  # running statistics moved, in x


def test_evaluation_uses_eval_mode_on_the_given_vector(torch):
    data = digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Dropout(0.9))
    prob = on_digits(model, data)
    x = prob.layout.zeros()
    prob.init_params(x, 0)
    first = prob.evaluate(x)
    assert prob.evaluate(x) == first  # dropout off: deterministic
    x2 = x.copy()
    x2[:] = 0
    assert prob.evaluate(x2)["loss"] == pytest.approx(np.log(10), rel=1e-6)
    assert 0.0 <= first["error"] <= 1.0


def test_bad_models_are_one_line_errors(torch):
    data = digits()
    pair = (data.x_train, data.y_train)
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        TorchProblem("a model", pair, pair)
    with pytest.raises(ConfigError, match=r"parameter '0.weight' is torch.float64"):
        TorchProblem(torch.nn.Sequential(torch.nn.Linear(64, 10).double()), pair, pair)
    with pytest.raises(ConfigError, match="fails on a batch of the training data.*Target"):
        TorchProblem(torch.nn.Linear(64, 3), pair, pair)  # 10 classes, 3 outputs
    with pytest.raises(ConfigError, match="fails on a batch of the training data"):
        TorchProblem(torch.nn.Linear(60, 10), pair, pair)  # wrong input size
    frozen = torch.nn.Linear(64, 10)
    frozen.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        TorchProblem(frozen, pair, pair)


def test_outputs_are_checked_against_every_label_not_the_probes_two(torch):
    """Five outputs, ten classes: the start-up forward pass on two samples would pass (their
    labels are below 5); the largest label of the whole data set refuses the model."""
    data = digits()
    probe = np.random.default_rng(0).integers(0, len(data.y_train), 16)[:2]  # as _probe draws
    y = np.where(np.isin(np.arange(len(data.y_train)), probe), 0, data.y_train)
    pair = (data.x_train, y)
    with pytest.raises(ConfigError) as info:
        TorchProblem(torch.nn.Linear(64, 5), pair, pair, batch_size=16)
    assert str(info.value) == (
        "the model gives 5 outputs per sample but the training data has label 9: a classifier "
        "needs one output per class (10 or more here); check its number of outputs against the "
        "data"
    )
    low = np.where(y > 4, 0, y)  # training labels 0..4 fit; a held-out 7 does not
    held_out = (data.x_test[:3], np.array([0, 7, 1]))
    with pytest.raises(ConfigError, match="the held-out data has label 7"):
        TorchProblem(torch.nn.Linear(64, 5), (data.x_train, low), held_out, batch_size=16)
    TorchProblem(torch.nn.Linear(64, 5), (data.x_train, low), (data.x_test[:3], low[:3]))


def test_a_datasets_targets_are_its_labels(torch):
    """A Dataset is not read item by item for this: torchvision's ``targets`` is used."""

    class Items(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y_items = torch.as_tensor(x), torch.as_tensor(y)
            self.targets = list(y)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], self.y_items[i]

    data = digits()
    ones = np.ones(len(data.y_train), np.int64)
    ones[-1] = 6  # never among the probe's two samples
    with pytest.raises(ConfigError, match="the training data has label 6"):
        TorchProblem(torch.nn.Linear(64, 3), Items(data.x_train, ones), (data.x_test, data.y_test))


def test_dropout_resumes_bit_identical_from_the_workers_stream(torch):
    """Dropout's masks are drawn from PyTorch's generator, reseeded each step from the worker's
    stream (which a checkpoint stores as six words): a worker stopped after 20 steps and
    continued by a fresh process (new module, PyTorch's generator elsewhere) ends bit-identical
    to one that never stopped. One worker, so nothing else varies."""
    from easgd_mpi.workerstate import WorkerState, encode_rng, generator_from_words

    cfg = config(algorithm="easgd", lr=0.05, tau=1, batch_size=16)
    data = digits()

    def build():
        torch.manual_seed(1)  # the module's initial values
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10)
        )
        return on_digits(model, data)

    def worker(center_value, x=None, rng_words=None):
        prob = build()
        rng = worker_rng(0, 0)
        if rng_words is not None:  # a new process: PyTorch's generator is not stored
            rng = generator_from_words(rng_words)
            torch.manual_seed(12345)
        center = LocalCenter(center_value, chunk=97)
        algo = make_algorithm(cfg, prob, NumpyBackend(), center, 0.5, rng)
        algo.pull_center()
        if x is not None:
            algo.restore(WorkerState(20, 20, 0, rng_words, rows={"x": x}))
        return algo, center

    start = build()
    x0 = start.layout.zeros()
    start.init_params(x0, 0)
    assert np.abs(x0).max() > 0.1

    whole, whole_center = worker(x0)
    for t in range(40):
        whole.step(t)

    first, first_center = worker(x0)
    for t in range(20):
        first.step(t)
    saved = (first.x.copy(), first_center.value.copy(), encode_rng(first.rng))
    resumed, resumed_center = worker(saved[1], x=saved[0], rng_words=saved[2])
    for t in range(20, 40):
        resumed.step(t)

    assert np.array_equal(resumed.x.view(np.uint32), whole.x.view(np.uint32))
    assert np.array_equal(resumed_center.value.view(np.uint32), whole_center.value.view(np.uint32))
    assert not np.array_equal(whole.x, saved[0])  # it trained on after the cut
