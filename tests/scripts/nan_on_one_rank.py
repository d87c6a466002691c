"""A user script whose model returns a NaN gradient on one worker at a few steps.

Usage: mpiexec -n P python nan_on_one_rank.py RANK STEP[,STEP...] OUTPUT_DIR [KEY=VALUE ...]
The center must stay finite and the run must keep converging.
"""

import sys

import numpy as np
from mpi4py import MPI
from wrapped_problem import WrappedProblem

import easgd_mpi as ea

RANK, STEPS, RUN_DIR = int(sys.argv[1]), {int(s) for s in sys.argv[2].split(",")}, sys.argv[3]


class Poisoned(WrappedProblem):
    """The built-in problem, except that one worker's gradient is NaN at a few steps."""

    def loss_and_grad(self, x, batch, g):
        self.calls += 1
        loss = self.inner.loss_and_grad(x, batch, g)
        if MPI.COMM_WORLD.Get_rank() == RANK and self.calls in STEPS:
            g[:] = np.nan
        return loss


def main() -> int:
    cfg = ea.Config.from_toml(
        None,
        overrides={
            "steps": 1500,
            "lr": 0.1,
            "run_dir": RUN_DIR,
            "eval_interval": 0.3,
            **dict(arg.split("=", 1) for arg in sys.argv[4:]),
        },
    )
    ea.train(cfg, problem=Poisoned)  # progress lines on stdout: nothing configured logging
    return 0


ea.run(main)
