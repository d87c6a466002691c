"""A user script whose model raises on one rank mid-run: the whole job must end, promptly.

Usage: mpiexec -n P python fail_on_one_rank.py RANK STEP OUTPUT_DIR
"""

import logging
import sys

from mpi4py import MPI
from wrapped_problem import WrappedProblem

import easgd_mpi as ea

FAIL_RANK, FAIL_STEP, OUTPUT = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


class Exploding(WrappedProblem):
    """The built-in problem, except that one rank raises at one step."""

    def _count(self):
        self.calls += 1
        if MPI.COMM_WORLD.Get_rank() == FAIL_RANK and self.calls == FAIL_STEP:
            raise RuntimeError(f"injected failure at step {FAIL_STEP}")

    def loss_and_grad(self, x, batch, g):  # what a worker calls
        self._count()
        return self.inner.loss_and_grad(x, batch, g)

    def evaluate(self, x_host):  # what the master calls
        self._count()
        return self.inner.evaluate(x_host)


def main() -> int:
    cfg = ea.Config.from_toml(
        None, overrides={"steps": 100000, "output": OUTPUT, "eval_interval": 0.2}
    )
    logging.getLogger("easgd_mpi").setLevel(logging.WARNING)  # no progress lines
    ea.train(cfg, problem=Exploding)
    return 0


ea.run(main)
