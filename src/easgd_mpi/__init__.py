"""easgd-mpi: Elastic Averaging SGD (EASGD, EAMSGD) on MPI clusters.

Rank 0 holds the center variable in an MPI one-sided window; ranks 1..p train local copies and
exchange an elastic difference with it every τ steps. The public API::

    import easgd_mpi as ea
    cfg = ea.Config.from_toml("run.toml", overrides={"tau": 8})
    summary = ea.train(cfg)              # every rank calls it; rank 0 is the master
"""

from .center import CenterWindow
from .config import Config
from .errors import (
    BackendError,
    CheckpointError,
    ConfigError,
    DataError,
    EasgdError,
    LaunchError,
)
from .flat import Layout
from .models import MLPProblem, QuadraticProblem, make_problem
from .training import train

__version__ = "0.1.0"

__all__ = [
    "Config",
    "train",
    "Layout",
    "CenterWindow",
    "make_problem",
    "MLPProblem",
    "QuadraticProblem",
    "EasgdError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "BackendError",
    "LaunchError",
    "__version__",
]
