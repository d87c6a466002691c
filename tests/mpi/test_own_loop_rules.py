"""A user's own PyTorch loop (easgd_mpi.torch) follows the rules' exact recurrences through the
real window, and binds the module without copies.

With ``torch.optim.SGD(lr)`` and no schedule, the user loop's async EASGD at p = 1 (pairs of
ranks, like tests/mpi/test_recurrences.py) and sync EASGD at p = world size − 1 must take their
gradients where the float64 recurrences of tests/recurrences.py say, and end with their center;
and against the package's own loop on the same problem (float32 both) they agree to 1e-6.
Model averaging (``localsgd``) must follow PyTorch's ``PeriodicModelAverager`` on the same
batches (the workers also form a gloo process group for the reference).
"""

import numpy as np
import pytest
from mpi4py import MPI
from mpi_helpers import pair

torch = pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

from own_loop_quadratic import (  # noqa: E402
    SAME,
    STEPS,
    assert_follows,
    builtin_loop,
    settings,
    user_loop,
)

import easgd_mpi.torch as et  # noqa: E402
from recurrences import TOL, async_rule, optimum, sync_easgd  # noqa: E402


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tau, alpha", [(1, 0.6), (3, 0.5)])
def test_async_easgd_at_one_worker_follows_the_recurrence(tmp_path, tau, alpha):
    comm = pair()
    if comm is None:
        return
    try:
        out = comm.bcast(str(tmp_path), root=0)
        rule = {"algorithm": "easgd", "tau": tau, "steps": STEPS, "alpha": alpha}
        got = user_loop(comm, settings(f"{out}/loop", **rule))
        points, _, center = async_rule("easgd", STEPS, tau, alpha)
        assert_follows(got, comm.Get_rank() == 0, points, center, TOL)
        own = builtin_loop(comm, f"{out}/builtin", rule)
        np.testing.assert_allclose(got, own, rtol=0, atol=SAME)
    finally:
        comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tau", [1, 4])
def test_sync_easgd_follows_the_recurrence(tmp_path, tau):
    comm = MPI.COMM_WORLD
    p, worker = comm.Get_size() - 1, comm.Get_rank() - 1
    out = comm.bcast(str(tmp_path), root=0)
    rule = {"algorithm": "sync-easgd", "tau": tau, "steps": STEPS}
    got = user_loop(comm, settings(f"{out}/loop", **rule))
    points, _, center = sync_easgd(p, STEPS, tau, 0.9 / p, 0.0)
    if worker < 0:
        np.testing.assert_allclose(got, center, rtol=0, atol=TOL)
    else:
        np.testing.assert_allclose(got, points[:, worker], rtol=0, atol=TOL)
        if p >= 2:  # the workers differ: the averaging is what brings them together
            assert np.abs(optimum(0) - optimum(1)).max() > 0.5
    own = builtin_loop(comm, f"{out}/builtin", rule)
    np.testing.assert_allclose(got, own, rtol=0, atol=SAME)


# ---- model averaging against PyTorch's PeriodicModelAverager ------------------------------------

FEATURES, OUTPUTS, BATCH = 6, 3, 8


def regression_model():
    torch.manual_seed(5)
    return torch.nn.Sequential(
        torch.nn.Linear(FEATURES, 5), torch.nn.Tanh(), torch.nn.Linear(5, OUTPUTS)
    )


def batches(worker: int, steps: int):
    """Each worker's own batches (its own data: the averaging is what brings them together)."""
    g = torch.Generator().manual_seed(100 + worker)
    return [
        (torch.randn(BATCH, FEATURES, generator=g), torch.randn(BATCH, OUTPUTS, generator=g))
        for _ in range(steps)
    ]


def train_on(model, opt, data, after_step):
    """The loop both sides run: the parameters after every step."""
    trajectory = []
    for x, y in data:
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step(loss)
        trajectory.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    return torch.stack(trajectory).numpy()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("tau", [1, 3])
def test_model_averaging_follows_pytorchs_periodic_model_averager(tmp_path, tau):
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed.algorithms.model_averaging.averagers import (  # noqa: PLC0415
        PeriodicModelAverager,
    )

    comm = MPI.COMM_WORLD
    p, worker = comm.Get_size() - 1, comm.Get_rank() - 1
    out = comm.bcast(str(tmp_path), root=0)
    steps = 10
    run = et.init(settings(out, algorithm="localsgd", tau=tau, steps=steps), comm=comm)
    if run.serves:
        run.serve()
        run.finish()
        return
    data = batches(worker, steps)
    # The reference: PyTorch's averager over a gloo group of the workers.
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/gloo-store", rank=worker, world_size=p
    )
    try:
        reference = regression_model()
        opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        averager = PeriodicModelAverager(period=tau, warmup_steps=0)
        expected = train_on(
            reference, opt, data, lambda loss: averager.average_parameters(reference.parameters())
        )
    finally:
        dist.destroy_process_group()
    model = regression_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    elastic = et.ElasticAveraging(model, opt, run)
    got = train_on(model, opt, data, lambda loss: elastic.step(loss=loss))
    assert run.should_stop
    run.finish()
    np.testing.assert_allclose(got, expected, rtol=0, atol=SAME)
    if p == 2:  # a mean of two is (a + b)/2 rounded once, whichever way it is summed
        assert np.array_equal(got, expected)
    if p >= 2:  # the workers' own data pull them apart between averagings
        assert np.abs(np.diff(got[:, :5], axis=0)).max() > 1e-3


# ---- zero copy -----------------------------------------------------------------------------


class WithBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.lin = torch.nn.Linear(4, 6)
        self.norm = torch.nn.BatchNorm1d(6)
        self.out = torch.nn.Linear(6, 2)
        # Averaged like any float buffer, but not in the state_dict the master hands over.
        self.register_buffer("gain", torch.ones(6), persistent=False)

    def forward(self, x):
        return self.out(torch.relu(self.norm(self.lin(x)) * self.gain))


@pytest.mark.mpi(min_size=2)
def test_the_module_views_the_flat_buffer_across_steps_and_exchanges(tmp_path):
    comm = pair()
    if comm is None:
        return
    try:
        out = comm.bcast(str(tmp_path), root=0)
        run = et.init(settings(out, algorithm="easgd", tau=2, steps=8, alpha=0.5), comm=comm)
        if run.serves:
            loaded = []
            # The center is a state_dict the module loads as it is (strict).
            run.serve(evaluate=lambda sd: loaded.append(WithBuffers().load_state_dict(sd)))
            run.finish()
            assert loaded and all(not r.missing_keys and not r.unexpected_keys for r in loaded)
            return
        model = WithBuffers()
        opt = torch.optim.AdamW(model.parameters(), lr=0.05)
        elastic = et.ElasticAveraging(model, opt, run)
        x = elastic._rule.x  # the worker's flat vector (NumPy on the host)
        start, end = x.ctypes.data, x.ctypes.data + x.nbytes
        tensors = dict(model.named_parameters()) | {
            n: b for n, b in model.named_buffers() if b.is_floating_point()
        }
        pointers = {n: t.data_ptr() for n, t in tensors.items()}
        assert all(start <= ptr < end for ptr in pointers.values())
        views = elastic._binding.layout.views(x)
        g = torch.Generator().manual_seed(0)
        exchanges = []
        while not run.should_stop:
            before = x.copy()
            batch = torch.randn(16, 4, generator=g)
            loss = model(batch).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            elastic.step(loss=loss)
            exchanges.append(elastic._rule.exchanges)
            assert {n: t.data_ptr() for n, t in tensors.items()} == pointers
            for name, tensor in tensors.items():  # the module sees x as the rules left it
                assert np.array_equal(tensor.detach().numpy(), views[name]), name
            assert not np.array_equal(before, x)  # the step wrote x itself
        assert exchanges[-1] == 4  # at steps 0, 2, 4, 6: the exchanges moved x in place too
        assert np.abs(views["norm.running_mean"]).max() > 0  # buffers live in x as well
        run.finish()
    finally:
        comm.Free()
