"""Your own model with easgd-mpi: least-squares regression written as a *problem*.

    mpiexec -n 5 python examples/least_squares.py [--set key=value ...]

A problem is the only code that knows the model: its flat layout, how to initialise it, how to
draw a minibatch, the loss and gradient of a minibatch, and the held-out evaluation. The package
does the rest (master, workers, exchanges, metrics, checkpoints). ``xp`` is NumPy, or CuPy on a
GPU worker, so the same code runs on both.
"""

import sys

import numpy as np

import easgd_mpi as ea
from easgd_mpi.comm import run_or_abort


class LeastSquares:
    """Find w, b minimising mean (a·w + b − t)² over noisy linear data."""

    error_is_rate = False  # our "error" is the test MSE, not a misclassification rate

    def __init__(self, cfg, xp, n=4000, d=32, noise=0.1):
        self.xp = xp
        rng = np.random.default_rng(cfg.data.seed)  # the same data on every rank
        self.w_true = rng.standard_normal(d)
        a = rng.standard_normal((n, d))
        t = a @ self.w_true + 0.5 + noise * rng.standard_normal(n)
        split = int(0.8 * n)
        self.a_train, self.t_train = xp.asarray(a[:split]), xp.asarray(t[:split])
        self.a_test, self.t_test = a[split:], t[split:]
        self.batch_size = cfg.batch_size
        self.layout = ea.Layout([("w", (d,)), ("b", ())])

    def init_params(self, x_host, seed):
        x_host[:] = 0.0

    def sample_batch(self, rng):
        return rng.integers(0, self.a_train.shape[0], self.batch_size)

    def loss_and_grad(self, x, batch, g):
        xp, views, grads = self.xp, self.layout.views(x), self.layout.views(g)
        idx = xp.asarray(batch)
        a, t = self.a_train[idx].astype(x.dtype), self.t_train[idx].astype(x.dtype)
        r = a @ views["w"] + views["b"] - t
        g[...] = 0
        grads["w"][...] = 2.0 * (a.T @ r) / len(batch)
        grads["b"][...] = 2.0 * r.mean()
        return float((r * r).mean())

    def evaluate(self, x_host):
        v = self.layout.views(x_host.astype(np.float64))
        r = self.a_test @ v["w"] + v["b"] - self.t_test
        mse = float((r * r).mean())
        return {"loss": mse, "error": mse}  # for regression the "error" is the test MSE


def main() -> int:
    overrides = dict(arg.split("=", 1) for arg in sys.argv[1:] if "=" in arg)
    overrides = {"steps": 3000, "lr": 0.02, "eval_interval": 1.0, **overrides}
    cfg = ea.Config.from_toml(None, overrides=overrides)
    summary = ea.train(cfg, problem=LeastSquares)
    if summary is not None and summary["center_loss"] > 0.05:
        print(f"least squares did not converge: test MSE {summary['center_loss']:.4f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_or_abort(main))
