"""Training with the center in slices on several servers (``servers = S``,
docs/ARCHITECTURE.md §3.3).

Needs S + 1 ranks at least (`make test`: 3 and 5 ranks run it, 2 skips it). p = world size − S
workers; the digits MLP must learn as well as with one server, and the synchronous rules,
which are deterministic, must give the same center to the last bit with one server or two.
"""

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import config, train_quietly

import easgd_mpi as ea
from easgd_mpi.checkpoint import load_checkpoint
from easgd_mpi.comm import wait_for_all
from easgd_mpi.rundir import list_checkpoints

# A chunk smaller than the model (4,812 floats): each slice is exchanged in several chunks.
SLICED = {"chunk": 1024, "threads": 1}

RULES = [
    ("easgd", {"lr": 0.1, "steps": 1500}, 0.06),
    ("easgd", {"lr": 0.1, "steps": 1500, "lock_mode": '"exclusive"'}, 0.06),
    ("eamsgd", {"momentum": 0.5, "lr": 0.05, "steps": 1500}, 0.06),
    ("downpour", {"lr": 0.05, "steps": 1000}, 0.08),
    ("sync-easgd", {"lr": 0.1, "steps": 1000}, 0.08),
    ("allreduce-sgd", {"momentum": 0.9, "lr": 0.02, "steps": 1000}, 0.08),
]


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize(
    "algorithm, extra, bound",
    RULES,
    ids=[f"{r[0]}-{r[1].get('lock_mode', 'shared').strip(chr(34))}" for r in RULES],
)
def test_every_rule_learns_the_digits_with_two_servers(tmp_path, algorithm, extra, bound):
    size = MPI.COMM_WORLD.Get_size()
    summary = train_quietly(
        config(
            tmp_path, algorithm=f'"{algorithm}"', servers=2, eval_interval=0.5, **SLICED, **extra
        )
    )
    assert summary["servers"] == 2 and summary["workers"] == size - 2
    assert summary["center_error"] <= bound, summary
    assert summary["steps"] == extra["steps"] * (size - 2)
    # Rank 1 only served its slice: a test-and-sleep loop, not a busy core.
    (served,) = summary["server_cpu"]
    assert served["rank"] == 1 and served["tests"] >= 1
    assert served["cpu_s"] <= 0.2 * served["wall_s"] + 0.05, served


def final_center(summary) -> np.ndarray | None:
    if MPI.COMM_WORLD.Get_rank() != 0:
        return None
    return load_checkpoint(list_checkpoints(summary["run_dir"])[-1]).center


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize(
    "algorithm, extra",
    [("sync-easgd", {"momentum": 0.5, "lr": 0.05}), ("allreduce-sgd", {"lr": 0.1})],
)
def test_sync_rules_give_the_same_center_with_one_or_two_servers(tmp_path, algorithm, extra):
    """The same p workers, once with the center on rank 0 alone (the last rank sits out) and
    once in two slices: the final centers are equal bit for bit."""
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    params = {"algorithm": f'"{algorithm}"', "steps": 120, "tau": 4, **SLICED, **extra}
    params["checkpoint.interval"] = 0
    one_server = config(tmp_path / "one", servers=1, **params)  # (a collective: on every rank)
    two_servers = config(tmp_path / "two", servers=2, **params)
    one = None
    sub = world.Split(0 if rank < size - 1 else MPI.UNDEFINED, rank)
    if sub != MPI.COMM_NULL:
        one = final_center(ea.train(one_server, comm=sub))
        sub.Free()
    wait_for_all(world)  # the rank that sat out waits here without spinning a core
    two = final_center(train_quietly(two_servers))
    if rank == 0:
        assert one.dtype == two.dtype == np.float32 and one.shape == two.shape
        assert np.array_equal(one.view(np.uint32), two.view(np.uint32))
        assert np.abs(one).sum() > 0


def _final_checkpoint(summary):
    if MPI.COMM_WORLD.Get_rank() != 0:
        return None
    return load_checkpoint(list_checkpoints(summary["run_dir"])[-1])


def _train_on_first(world, ranks: int, cfg):
    """Train on world ranks 0..ranks−1 (the others wait without spinning); rank 0 gets the
    final checkpoint."""
    rank = world.Get_rank()
    sub = world.Split(0 if rank < ranks else MPI.UNDEFINED, rank)
    final = None
    if sub != MPI.COMM_NULL:
        final = _final_checkpoint(ea.train(cfg, comm=sub))
        sub.Free()
    wait_for_all(world)
    return final


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("localsgd", {"momentum": 0.5, "lr": 0.05}),
        ("diloco", {"lr": 0.1, "outer_lr": 0.7, "outer_momentum": 0.9}),
        ("mdownpour", {"lr": 0.05, "momentum": 0.9, "tau": 1}),
        ("adownpour", {"lr": 0.1, "outer_lr": 0.02}),
        ("mvadownpour", {"lr": 0.1, "moving_rate": 0.05}),
        ("async-diloco", {"lr": 0.1, "momentum": 0.5}),
    ],
)
def test_issue19_rules_give_the_same_center_with_one_or_two_servers(tmp_path, algorithm, extra):
    """The deterministic new rules (local SGD and DiLoCo at any p; a center that computes
    with one worker): the same workers with the center on one server and in two slices end
    with the same center and the same center-side rows, bit for bit."""
    world = MPI.COMM_WORLD
    size = world.Get_size()
    p = size - 2 if algorithm in ("localsgd", "diloco") else 1
    params = {"algorithm": f'"{algorithm}"', "steps": 120, "tau": 4, **SLICED, **extra}
    params["checkpoint.interval"] = 0
    one_server = config(tmp_path / "one", servers=1, **params)  # (a collective: on every rank)
    two_servers = config(tmp_path / "two", servers=2, **params)
    one = _train_on_first(world, p + 1, one_server)
    two = _train_on_first(world, p + 2, two_servers)
    if world.Get_rank() == 0:
        assert np.array_equal(one.center.view(np.uint32), two.center.view(np.uint32))
        assert np.abs(one.center).sum() > 0
        assert sorted(one.center_state) == sorted(two.center_state)
        for name, row in one.center_state.items():
            assert np.array_equal(row.view(np.uint32), two.center_state[name].view(np.uint32))
            if name != "outer_buffer":  # (one worker: every push updates the momentum)
                assert np.abs(row).sum() > 0, name  # the state is really kept
