"""Compressed pushes into a center that computes (docs/ARCHITECTURE.md §2.16, §3.11), through the
real windows: each worker puts its codes and scales into a slot of its own at every server, and
the server decodes every slot it has not taken and applies the sum.

- p = 1 (pairs of ranks): the final center follows the float64 recurrence of the rule in which each
  push is replaced by its NumPy-coded-then-decoded value, the residual carried (tests/recurrences.py
  ``coded_sender``);
- p = world − 1: what the servers applied plus the workers' residuals is what the workers pushed,
  to float32 rounding (async-diloco with outer_lr = 1 and no momentum adds each push to the center);
- servers = 2 on the world (p = 1 at -n 3) gives the center of servers = 1 on a pair, bit for bit,
  when the slices fall on multiples of the coded block.
"""

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import pair
from test_recurrences import check, make_config, train_recording

import easgd_mpi as ea
from easgd_mpi.compress import PushCompressor
from easgd_mpi.models import QuadraticProblem
from recurrences import START, TOL, coded_sender, master_rule

CODED_CASES = [
    ("async-diloco", 1, {"outer_lr": 0.7, "outer_momentum": 0.9}),
    ("async-diloco", 4, {"outer_lr": 0.7, "outer_momentum": 0.9, "momentum": 0.5}),
    ("mdownpour", 3, {"momentum": 0.9}),
]


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("codec", ["int8", "fp8"])
@pytest.mark.parametrize("algorithm, tau, knobs", CODED_CASES)
def test_coded_pushes_follow_the_coded_recurrence_at_one_worker(
    tmp_path, algorithm, tau, knobs, codec
):
    comm = pair()
    if comm is None:
        return
    try:
        steps = 14
        out = comm.bcast(str(tmp_path), root=0)
        cfg = make_config(
            out, algorithm=f'"{algorithm}"', tau=tau, steps=steps, compress=f'"{codec}"', **knobs
        )
        summary, problem = train_recording(cfg, comm, comm.Get_rank() - 1)
        points, evaluated, _ = master_rule(algorithm, steps, tau, send=coded_sender(codec), **knobs)
        check(comm, summary, problem, points, evaluated)
        _, float32_center, _ = master_rule(algorithm, steps, tau, **knobs)
        assert np.abs(evaluated - float32_center).max() > 10 * TOL  # the coding shows
        assert summary["exchanges"] == -(-steps // tau)
        assert summary["center_lag"] == 0 and summary["center_pushes"] == summary["exchanges"]
    finally:
        comm.Free()


@pytest.mark.mpi(min_size=3)
def test_what_the_servers_applied_plus_the_residuals_is_what_was_pushed(tmp_path, monkeypatch):
    """async-diloco with outer_lr = 1, no momentum and no staleness scale adds each decoded push
    to the center: center − start + Σ residuals = Σ uncompressed pushes (to float32 rounding)."""
    world = MPI.COMM_WORLD
    pushed, coders = [], []
    code = PushCompressor.compress

    def recording(self, lo, hi, e):  # what each worker was asked to send, before coding
        pushed.append((lo, np.array(e, dtype=np.float64)))
        if self not in coders:
            coders.append(self)
        return code(self, lo, hi, e)

    monkeypatch.setattr(PushCompressor, "compress", recording)
    out = world.bcast(str(tmp_path), root=0)
    cfg = make_config(
        out,
        algorithm='"async-diloco"',
        tau=1,
        steps=80,
        compress='"int8"',
        outer_lr=1.0,
        outer_momentum=0.0,
        staleness_scale='"none"',
    )
    summary, problem = train_recording(cfg, world, world.Get_rank() - 1)
    dim = problem.layout.size
    sent = np.zeros(dim)
    for lo, e in pushed:
        sent[lo : lo + e.size] += e[:dim]
    kept = coders[0].residual[:dim].astype(np.float64) if coders else np.zeros(dim)
    total_sent, total_kept = world.reduce(sent, root=0), world.reduce(kept, root=0)
    if world.Get_rank() == 0:
        p = world.Get_size() - 1
        assert summary["exchanges"] == 80 * p
        applied = problem.evaluated - START
        np.testing.assert_allclose(applied + total_kept, total_sent, rtol=0, atol=2e-5)
        assert np.abs(total_kept).max() > 1e-4  # the residual is not negligible


class RecordingQuadratic(QuadraticProblem):
    def evaluate(self, x_host):
        self.evaluated = np.array(x_host, dtype=np.float32)
        return super().evaluate(x_host)


@pytest.mark.mpi(min_size=3)
def test_two_servers_decode_the_center_of_one(tmp_path):
    """p = 1: servers = 2 (ranks 0, 1; worker 2) against servers = 1 (ranks 0, 2), a noisy
    3000-element quadratic whose slices start at multiples of the coded block."""
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    out = world.bcast(str(tmp_path), root=0)
    knobs = {
        "model.name": '"quadratic"',
        "quadratic.dim": 3000,
        "quadratic.noise": 0.5,
        "quadratic.optimum": 1.0,
        "lr": 0.1,
        "eval_interval": 0.2,
        "checkpoint.interval": 0,
        "chunk": 1024,
        "algorithm": '"async-diloco"',
        "tau": 3,
        "steps": 15,
        "compress": '"int8"',
    }
    centers = {}
    for servers in (1, 2):
        made = []

        def factory(cfg, xp, made=made):
            made.append(RecordingQuadratic(cfg.quadratic, xp=xp))
            return made[-1]

        if servers == 1:  # ranks 0 and 2 (the worker of both runs): rank 1 sits out
            comm = world.Split(0 if rank in (0, 2) else MPI.UNDEFINED, rank)
        else:
            comm = world.Split(0 if rank < 3 else MPI.UNDEFINED, rank)
        if comm != MPI.COMM_NULL:
            cfg = ea.Config.from_toml(
                None,
                environ={},
                overrides={
                    "output": f'"{out}/s{servers}"',
                    "servers": str(servers),
                    **{k: str(v) for k, v in knobs.items()},
                },
            )
            ea.train(cfg, problem=factory, comm=comm)
            comm.Free()
            if rank == 0:
                centers[servers] = made[0].evaluated
        world.Barrier()
    if rank == 0:
        assert np.abs(centers[1] - 0.0).max() > 0.1
        np.testing.assert_array_equal(centers[2], centers[1])
