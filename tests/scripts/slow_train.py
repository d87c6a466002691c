"""``easgd`` itself, with every worker step slowed down (the math untouched).

Usage: mpiexec -n P python slow_train.py SECONDS_PER_STEP train --set ... [--resume ...]

A run on the built-in problems takes well under a second; a test that must catch it in the
middle (periodic checkpoints, a signal, a stopped worker) slows each gradient by a sleep
instead of relying on the machine's speed. The sleep is a problem wrapper, not a product knob.
"""

import sys
import time

from wrapped_problem import WrappedProblem

import easgd_mpi.session
from easgd_mpi.cli import main

DELAY = float(sys.argv[1])


class SlowProblem(WrappedProblem):
    def loss_and_grad(self, x, batch, g):
        time.sleep(DELAY)
        return self.inner.loss_and_grad(x, batch, g)


easgd_mpi.session.make_problem = lambda cfg, xp=None: SlowProblem(cfg, xp)
sys.exit(main(sys.argv[2:]))
