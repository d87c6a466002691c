"""The quadratic of tests/recurrences.py in a user's own loop (easgd_mpi.torch) and in the
package's own loop, for the MPI tests that check the user loop's rules against the recurrences
(test_own_loop_rules.py, test_own_loop_diloco.py)."""

import numpy as np
import torch

import easgd_mpi as ea
import easgd_mpi.torch as et
from recurrences import LR, SETTINGS, START, H, WorkerQuadratic, as_toml, optimum

__all__ = ["STEPS", "SAME", "Quadratic", "settings", "user_loop", "builtin_loop", "assert_follows"]

STEPS = 13
#: User loop against the package's own loop, both float32: the optimizer's update rounds
#: differently from the fused kernel (PyTorch's add may fuse a multiply-add), nothing more.
SAME = 1e-6


class Quadratic(torch.nn.Module):
    """½ Σ H (w − m)²: one parameter, the start of tests/recurrences.py."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((len(H),), START, dtype=torch.float32))

    def forward(self, m):
        return 0.5 * (torch.as_tensor(H, dtype=torch.float32) * (self.w - m) ** 2).sum()


def settings(out, **values) -> dict:
    return {
        "eval_interval": 0.2,
        "checkpoint.interval": 0,
        "output": out,
        **values,
    }


def user_loop(comm, values):
    """The user's script on every rank of ``comm``: the master returns the center it
    evaluated last; a worker its gradient points (steps × dim)."""
    run = et.init(values, comm=comm)
    if run.serves:
        seen = []
        run.serve(evaluate=lambda sd: seen.append(sd["w"].numpy().astype(np.float64)) or 0.0)
        run.finish()
        return seen[-1]
    model = Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    et.ElasticAveraging(model, opt, run)
    elastic = run._elastic
    m = torch.as_tensor(optimum(run.worker), dtype=torch.float32)
    points = []
    while not run.should_stop:
        points.append(model.w.detach().numpy().astype(np.float64))
        loss = model(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        elastic.step(loss=loss)
    run.finish()
    return np.array(points)


def builtin_loop(comm, out, values):
    """The package's own loop on the same problem: the master's last evaluated center, a
    worker's gradient points."""
    made = []

    def factory(cfg, xp):
        made.append(WorkerQuadratic(cfg.quadratic, comm.Get_rank() - 1, xp))
        return made[-1]

    overrides = {**as_toml(SETTINGS), **as_toml(values), "output": f'"{out}"'}
    cfg = ea.Config.from_toml(None, environ={}, overrides=overrides)
    ea.train(cfg, problem=factory, comm=comm)
    return made[0].evaluated if comm.Get_rank() == 0 else np.array(made[0].points)


def assert_follows(got, serves: bool, points, center, tol) -> None:
    """What :func:`user_loop` returned on this rank against a recurrence: the master's last
    evaluated center, or this worker's gradient points (steps × dim)."""
    if serves:
        np.testing.assert_allclose(got, center, rtol=0, atol=tol)
        assert np.abs(center - START).max() > 0.1  # the center moved: exchanges were seen
    else:
        assert got.shape == points.shape
        np.testing.assert_allclose(got, points, rtol=0, atol=tol)
