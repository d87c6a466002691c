"""DiLoCo and async DiLoCo in a user's own PyTorch loop (easgd_mpi.torch) follow the package's
recurrences through the real windows.

With ``torch.optim.SGD(lr)`` and no schedule on the quadratic of tests/recurrences.py (each
worker its own optimum, exact gradients): ``diloco`` at p = world size − 1 takes its gradients
where the float64 recurrence says (H local steps, then the outer Nesterov step on the mean
pseudo-gradient), ends with its center and outer momentum (in the final checkpoint), and agrees
with the package's own DiLoCo to 1e-6; at outer_lr = 1 and outer_momentum = 0 it is local SGD
averaging every H steps. ``async-diloco`` with one worker (pairs of ranks: no staleness) goes
through the servers' inboxes and the active center and follows the same recurrence.
"""

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import pair

pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from own_loop_quadratic import (  # noqa: E402
    SAME,
    STEPS,
    assert_follows,
    builtin_loop,
    settings,
    user_loop,
)

from easgd_mpi.checkpoint import load_checkpoint  # noqa: E402
from easgd_mpi.rundir import list_checkpoints  # noqa: E402
from recurrences import TOL, coded_sender, local_sgd, master_rule, optimum  # noqa: E402

OUTER = {"outer_lr": 0.7, "outer_momentum": 0.9}


def final_rows(comm, run_dir):
    """The center-side rows of the run's final checkpoint (read on the master)."""
    if comm.Get_rank() != 0:
        return None
    return load_checkpoint(list_checkpoints(run_dir)[-1]).center_state


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tau", [1, 4])
def test_diloco_follows_the_recurrence(tmp_path, tau):
    comm = MPI.COMM_WORLD
    p, worker = comm.Get_size() - 1, comm.Get_rank() - 1
    out = comm.bcast(str(tmp_path), root=0)
    rule = {"algorithm": "diloco", "tau": tau, "steps": STEPS, **OUTER}
    got = user_loop(comm, settings(out, run_dir=f"{out}/loop", **rule))
    points, center, momentum = local_sgd(p, STEPS, tau, **OUTER)
    if worker < 0:
        np.testing.assert_allclose(got, center, rtol=0, atol=TOL)
        rows = final_rows(comm, f"{out}/loop")
        np.testing.assert_allclose(rows["outer_momentum"], momentum, rtol=0, atol=TOL)
        assert np.abs(momentum).max() > 0.1  # the outer momentum is in play
        plain = local_sgd(p, STEPS, tau)[1]  # the outer step is what makes the difference
        assert np.abs(center - plain).max() > 0.1
    else:
        assert got.shape == points[:, worker].shape
        np.testing.assert_allclose(got, points[:, worker], rtol=0, atol=TOL)
    own = builtin_loop(comm, f"{out}/builtin", rule)
    np.testing.assert_allclose(got, own, rtol=0, atol=SAME)


@pytest.mark.mpi(min_size=2)
def test_diloco_with_outer_sgd_at_lr_one_is_local_sgd_every_h_steps(tmp_path):
    comm = MPI.COMM_WORLD
    p, worker = comm.Get_size() - 1, comm.Get_rank() - 1
    out = comm.bcast(str(tmp_path), root=0)
    tau = 3
    rule = {"algorithm": "diloco", "tau": tau, "steps": STEPS}
    got = user_loop(comm, settings(out, outer_lr=1.0, outer_momentum=0.0, **rule))
    points, center, _ = local_sgd(p, STEPS, tau)  # θ ← mean x^i after steps 3, 6, 9, 12, 13
    if worker < 0:
        np.testing.assert_allclose(got, center, rtol=0, atol=TOL)
    else:
        np.testing.assert_allclose(got, points[:, worker], rtol=0, atol=TOL)
        if p >= 2:  # the workers differ: the averaging is what brings them together
            assert np.abs(optimum(0) - optimum(1)).max() > 0.5
    averaged = builtin_loop(comm, f"{out}/builtin", {**rule, "algorithm": "localsgd"})
    np.testing.assert_allclose(got, averaged, rtol=0, atol=SAME)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tau", [1, 3])
def test_async_diloco_at_one_worker_follows_the_recurrence(tmp_path, tau):
    comm = pair()
    if comm is None:
        return
    try:
        out = comm.bcast(str(tmp_path), root=0)
        rule = {"algorithm": "async-diloco", "tau": tau, "steps": STEPS, **OUTER}
        got = user_loop(comm, settings(out, run_dir=f"{out}/loop", **rule))
        points, center, rows = master_rule("async-diloco", STEPS, tau, **OUTER)
        assert_follows(got, comm.Get_rank() == 0, points, center, TOL)
        if comm.Get_rank() == 0:  # the servers' outer momentum, checkpointed
            saved = final_rows(comm, f"{out}/loop")["outer_momentum"]
            np.testing.assert_allclose(saved, rows["outer_momentum"], rtol=0, atol=TOL)
            assert np.abs(rows["outer_momentum"]).max() > 0.1
        own = builtin_loop(comm, f"{out}/builtin", rule)
        np.testing.assert_allclose(got, own, rtol=0, atol=SAME)
    finally:
        comm.Free()


@pytest.mark.mpi(min_size=2)
def test_async_diloco_with_int8_pushes_in_your_own_loop_follows_the_coded_recurrence(tmp_path):
    """The user's loop pushes through the same coded slots (docs/ARCHITECTURE.md §3.11): each
    push replaced by its NumPy-coded-then-decoded value, the residual carried."""
    comm = pair()
    if comm is None:
        return
    try:
        out = comm.bcast(str(tmp_path), root=0)
        rule = {"algorithm": "async-diloco", "tau": 3, "steps": STEPS, "compress": "int8", **OUTER}
        got = user_loop(comm, settings(out, run_dir=f"{out}/loop", **rule))
        points, center, _ = master_rule(
            "async-diloco", STEPS, 3, send=coded_sender("int8"), **OUTER
        )
        assert_follows(got, comm.Get_rank() == 0, points, center, TOL)
    finally:
        comm.Free()
