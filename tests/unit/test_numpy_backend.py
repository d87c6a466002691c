"""The NumPy reference against the equations of docs/ARCHITECTURE.md §2, computed independently
in float64."""

import numpy as np
import pytest

from easgd_mpi.backend import NumpyBackend

B = NumpyBackend()
N = 1001


@pytest.fixture
def vecs():
    rng = np.random.default_rng(1)
    return [rng.standard_normal(N).astype(np.float32) for _ in range(4)]


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)


def test_sgd_step(vecs):
    x, g = vecs[0].copy(), vecs[1]
    x0 = x.astype(np.float64)
    B.sgd_step(x, g, 0.1, 0.01)
    close(x, x0 - 0.1 * (g + 0.01 * x0))


def test_exchange_conserves_the_sum(vecs):
    x, c = vecs[0].copy(), vecs[1]
    e = np.empty_like(x)
    x0 = x.astype(np.float64)
    B.exchange(x, c, e, 0.25)
    close(e, 0.25 * (x0 - c))
    close(x, x0 - 0.25 * (x0 - c))
    close(x + (c + e), x0 + c)  # what the worker loses the center gains


def test_exchange_sgd_step_takes_gradient_at_old_x(vecs):
    x, c, g = vecs[0].copy(), vecs[1], vecs[2]
    e = np.empty_like(x)
    x0 = x.astype(np.float64)
    B.exchange_sgd_step(x, c, g, e, 0.3, 0.05, 0.1)
    close(e, 0.3 * (x0 - c))
    close(x, x0 - 0.3 * (x0 - c) - 0.05 * (g + 0.1 * x0))


def test_nesterov(vecs):
    x, v, g = vecs[0].copy(), vecs[1].copy(), vecs[2]
    x0, v0 = x.astype(np.float64), v.astype(np.float64)
    y = np.empty_like(x)
    B.nesterov_lookahead(x, v, 0.9, y)
    close(y, x0 + 0.9 * v0)
    B.nesterov_step(x, v, g, 0.05, 0.9, 0.01)
    v1 = 0.9 * v0 - 0.05 * (g + 0.01 * (x0 + 0.9 * v0))
    close(v, v1)
    close(x, x0 + v1)


def test_exchange_nesterov_step(vecs):
    x, v, c, g = vecs[0].copy(), vecs[1].copy(), vecs[2], vecs[3]
    x0, v0 = x.astype(np.float64), v.astype(np.float64)
    e = np.empty_like(x)
    B.exchange_nesterov_step(x, v, c, g, e, 0.2, 0.05, 0.9, 0.0)
    v1 = 0.9 * v0 - 0.05 * g
    close(e, 0.2 * (x0 - c))
    close(v, v1)
    close(x, x0 - 0.2 * (x0 - c) + v1)


def test_downpour_and_sync_updates(vecs):
    x, acc, g = vecs[0].copy(), vecs[1].copy(), vecs[2]
    x0, acc0 = x.astype(np.float64), acc.astype(np.float64)
    B.downpour_step(x, acc, g, 0.1, 0.0)
    close(x, x0 - 0.1 * g)
    close(acc, acc0 - 0.1 * g)

    x, c, xm = vecs[0].copy(), vecs[1].copy(), vecs[3]
    x0, c0 = x.astype(np.float64), c.astype(np.float64)
    B.sync_easgd_update(x, c, xm, 0.225, 0.9)
    close(x, x0 - 0.225 * (x0 - c0))
    close(c, 0.1 * c0 + 0.9 * xm)


def test_memory_helpers(vecs):
    a = vecs[0].copy()
    B.scale(a, 2.0)
    close(a, 2.0 * vecs[0].astype(np.float64))
    assert B.sum_squares(np.array([3, 4], np.float32)) == 25.0
    assert B.all_finite(a) and not B.all_finite(np.array([np.nan], np.float32))
    h = B.host_empty(5)
    assert h.dtype == np.float32 and h.shape == (5,)
    out = B.zeros(N)
    B.from_host(vecs[1], out)
    assert np.array_equal(B.to_host(out), vecs[1])
