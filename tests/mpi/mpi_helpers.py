"""Shared by the MPI tests: a config written under rank 0's tmp folder, a quiet train(), the
noiseless quadratic the convergence tests use."""

from mpi4py import MPI

import easgd_mpi as ea

QUADRATIC = {
    "model.name": '"quadratic"',
    "quadratic.dim": 16,
    "quadratic.curvature": "[" + ", ".join(str(0.5 + 0.1 * j) for j in range(16)) + "]",
    "quadratic.optimum": "[" + ", ".join(str(j - 8) for j in range(16)) + "]",
    "quadratic.start": 3.0,
    "lr": 0.1,
    "eval_interval": 0.5,
}


def config(tmp_path, **overrides) -> ea.Config:
    """A config from TOML-valued overrides; output goes to rank 0's tmp folder (only rank 0
    writes the run folder)."""
    out = MPI.COMM_WORLD.bcast(str(tmp_path), root=0)
    overrides.setdefault("output", f'"{out}"')
    return ea.Config.from_toml(
        None, environ={}, overrides={k: str(v) for k, v in overrides.items()}
    )


def pair():
    """This rank's pair (ranks 2k, 2k + 1) as a communicator, or None for a leftover rank: the
    deterministic one-worker runs, several at once."""
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    alone = rank == size - 1 and size % 2 == 1
    sub = world.Split(MPI.UNDEFINED if alone else rank // 2, rank)
    return None if alone else sub


def train_quietly(cfg, **kwargs) -> dict:
    return ea.train(cfg, comm=MPI.COMM_WORLD, **kwargs)
