"""``train()``: one run of distributed training with the package's own loops, the call behind
``easgd train``.

Every rank calls it; it is a :class:`~easgd_mpi.session.Session` (set-up and tear-down of the
run) around :meth:`Session.run` (ranks 0..S−1 serve the center in slices, ``servers = S``, rank 0
also the master; ranks S..S+p−1 train).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from .comm import run_or_abort
from .session import STOP_SIGNALS, Session

__all__ = ["train", "run", "STOP_SIGNALS"]


def train(cfg, problem=None, comm=None, resume=None) -> dict:
    """Train with the server/worker layout on ``comm`` (default COMM_WORLD).

    ``problem``: a problem object, a factory ``f(cfg, xp) -> problem`` or None for the built-in
    problem of ``cfg.model.name``. ``resume`` (read on rank 0): a checkpoint file, a run folder
    (its newest valid checkpoint), ``"auto"`` (the same for ``cfg.run_dir``, or a fresh start
    when it has none) or a loaded :class:`~easgd_mpi.checkpoint.CheckpointData`; the
    checkpoint's config is the base and the keys ``cfg`` states win, as on the command line.
    Progress goes to the ``easgd_mpi`` logger (log.py). Returns a summary dict, the same on
    every rank.
    """
    with Session(cfg, problem=problem, comm=comm, resume=resume) as session:
        session.run()
    return session.summary


def run(main: Callable[[], object]) -> NoReturn:
    """Run a script's ``main()`` on every rank as ``easgd train`` runs, and exit.

    Launch the script like the command: ``mpiexec -n P python script.py`` (or ``srun``).
    Bad input (an :class:`~easgd_mpi.errors.EasgdError`: config, data, checkpoint, launch, a
    file that cannot be written) is one line per rank naming it and exit 2, with no traceback;
    an exception on one rank alone ends the whole job (``MPI_Abort``), so no rank is left
    waiting; ``main`` returning an int exits with it, anything else with 0::

        import easgd_mpi as ea

        def main():
            ea.train(ea.Config.from_toml("run.toml"), resume="auto")

        ea.run(main)
    """

    def body() -> int:
        result = main()
        return result if isinstance(result, int) and not isinstance(result, bool) else 0

    sys.exit(run_or_abort(body))
