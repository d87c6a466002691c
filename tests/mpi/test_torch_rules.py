"""Every rule trains a PyTorch module through the real MPI center, at any world size.

The synchronous rules are deterministic: a torch MLP that starts where the built-in NumPy MLP
starts must end where it ends (their layouts differ by a transpose); with a BatchNorm model the
running statistics reach the center; the staged (GPU-style) path gives the host path's center.
"""

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import config, train_quietly

torch = pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

import easgd_mpi.session as training  # noqa: E402
from easgd_mpi.backend import NumpyBackend  # noqa: E402
from easgd_mpi.checkpoint import load_checkpoint  # noqa: E402
from easgd_mpi.data import load_dataset  # noqa: E402
from easgd_mpi.models import MLPProblem, TorchProblem  # noqa: E402
from easgd_mpi.rundir import list_checkpoints  # noqa: E402

HIDDEN = 12


class TorchMLP(TorchProblem):
    """A torch MLP whose initial center is the built-in MLP's (transposed into torch's)."""

    def __init__(self, cfg, xp=np, batchnorm=False):
        self.data = load_dataset(cfg.data)
        layers = [torch.nn.Linear(64, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, 10)]
        if batchnorm:
            layers.insert(1, torch.nn.BatchNorm1d(HIDDEN))
        self.mlp = MLPProblem(self.data, hidden=[HIDDEN], batch_size=cfg.batch_size)
        super().__init__(
            torch.nn.Sequential(*layers),
            (self.data.x_train, self.data.y_train),
            (self.data.x_test, self.data.y_test),
            batch_size=cfg.batch_size,
            xp=xp,
        )
        self.linears = [i for i, m in enumerate(self.module) if isinstance(m, torch.nn.Linear)]

    def init_params(self, x_host, seed):
        super().init_params(x_host, seed)  # buffers as built (BatchNorm: 0 and 1)
        x0 = self.mlp.layout.zeros()
        self.mlp.init_params(x0, seed)
        self.to_torch(x0, x_host)

    def to_torch(self, x_mlp, out):
        mv, tv = self.mlp.layout.views(x_mlp), self.layout.views(out)
        for i, k in enumerate(self.linears):
            tv[f"{k}.weight"][...] = mv[f"w{i}"].T
            tv[f"{k}.bias"][...] = mv[f"b{i}"]


def final_center(tmp_path, problem, **overrides):
    cfg = config(tmp_path, **overrides)
    summary = train_quietly(cfg, problem=problem)
    center = None
    if MPI.COMM_WORLD.Get_rank() == 0:
        center = load_checkpoint(list_checkpoints(summary["run_dir"])[-1]).center
    return MPI.COMM_WORLD.bcast(center, root=0), summary


COMMON = {"steps": 40, "tau": 3, "batch_size": 16, "lr": 0.05, "checkpoint.interval": 0}
SYNC = [("sync-easgd", {"momentum": 0.5}), ("allreduce-sgd", {"weight_decay": 1e-3})]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm, extra", SYNC, ids=[s[0] for s in SYNC])
def test_sync_rules_match_the_numpy_mlp(tmp_path, algorithm, extra):
    params = {"algorithm": f'"{algorithm}"', **COMMON, **extra}
    reference, _ = final_center(tmp_path / "numpy", None, **{**params, "model.hidden": [HIDDEN]})
    center, summary = final_center(tmp_path / "torch", TorchMLP, **params)
    assert summary["steps"] == 40 * summary["workers"]
    probe = TorchMLP(config(tmp_path, **params))
    expected = probe.layout.zeros()
    probe.to_torch(reference, expected)
    np.testing.assert_allclose(center, expected, atol=2e-5)


RULES = [
    ("easgd", {}),
    ("eamsgd", {"momentum": 0.9}),
    ("downpour", {"lr": 0.02}),
    ("sync-easgd", {"momentum": 0.5}),
    ("allreduce-sgd", {}),
]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm, extra", RULES, ids=[r[0] for r in RULES])
def test_batchnorm_statistics_reach_the_center_under_every_rule(tmp_path, algorithm, extra):
    params = {"algorithm": f'"{algorithm}"', **COMMON, **extra}
    center, summary = final_center(
        tmp_path, lambda cfg, xp: TorchMLP(cfg, xp, batchnorm=True), **params
    )
    probe = TorchMLP(config(tmp_path, **params), batchnorm=True)
    views = probe.layout.views(center)
    assert probe.layout["1.running_mean"].offset >= probe.n_trainable
    # Built as 0 and 1; training moved them, and the center holds the moved statistics.
    assert np.abs(views["1.running_mean"]).max() > 1e-3
    assert np.abs(views["1.running_var"] - 1).max() > 1e-3
    assert np.all(np.isfinite(center))
    assert summary["center_error"] < 0.75  # it learns (chance: 0.9); async runs vary


@pytest.mark.mpi(min_size=2)
def test_staged_path_gives_the_host_paths_center(tmp_path, monkeypatch):
    class StagedNumpy(NumpyBackend):
        name = "numpy-staged"
        is_gpu = True

    params = {"algorithm": '"sync-easgd"', "chunk": 1024, **COMMON}
    make = lambda cfg, xp: TorchMLP(cfg, xp, batchnorm=True)  # noqa: E731
    host, _ = final_center(tmp_path / "host", make, **params)
    monkeypatch.setattr(training, "select_backend", lambda **kw: (StagedNumpy(), ""))
    staged, _ = final_center(tmp_path / "staged", make, **params)
    np.testing.assert_array_equal(staged, host)
