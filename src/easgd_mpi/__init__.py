"""easgd-mpi: Elastic Averaging SGD (EASGD, EAMSGD) on MPI clusters.

Rank 0 holds the center variable in an MPI one-sided window (with ``servers = S``, ranks
0..S−1 hold it in slices); the other ranks train local copies and exchange an elastic
difference with it every τ steps. The public API::

    import easgd_mpi as ea
    cfg = ea.Config.from_toml("run.toml", overrides={"tau": 8})
    summary = ea.train(cfg)              # every rank calls it; rank 0 is the master
    ea.run(main)                         # a script's main(): the CLI's one-line errors and exits

    # your own PyTorch model (pip install 'easgd-mpi[torch]'):
    ea.train(cfg, problem=ea.TorchProblem.factory(build_model, train_data, test_data))

    # your own PyTorch training loop: easgd_mpi.torch (examples/own_loop.py)
    import easgd_mpi.torch as et
    run = et.init("run.toml")
"""

from .center import CenterWindow
from .config import Config
from .errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    DataError,
    EasgdError,
    ExportError,
    LaunchError,
    RunFolderError,
    UsageError,
)
from .flat import Layout
from .models import MLPProblem, QuadraticProblem, make_problem
from .training import run, train


def __getattr__(name):
    # The PyTorch adapter is public but imports torch only when it is used.
    if name == "TorchProblem":
        from .models.torch_adapter import TorchProblem  # noqa: PLC0415

        return TorchProblem
    raise AttributeError(f"module 'easgd_mpi' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Config",
    "train",
    "run",
    "Layout",
    "CenterWindow",
    "make_problem",
    "MLPProblem",
    "QuadraticProblem",
    "TorchProblem",
    "EasgdError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "BackendError",
    "LaunchError",
    "ExportError",
    "RunFolderError",
    "UsageError",
    "__version__",
]
