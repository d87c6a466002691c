"""A multilayer perceptron (softmax regression when it has no hidden layer) on flat parameters.

Written against an array module ``xp`` (NumPy or CuPy), so the same code trains on a CPU or a
GPU; parameters and gradients are views into the flat vectors, never copies.
"""

from __future__ import annotations

import numpy as np

from ..flat import Layout

__all__ = ["MLPProblem"]


class MLPProblem:
    def __init__(self, data, hidden, activation="tanh", batch_size=128, init_scale=1.0, xp=np):
        self.xp = xp
        self.data = data
        self.widths = [data.n_features, *hidden, data.n_classes]
        self.activation = activation
        self.batch_size = int(batch_size)
        self.init_scale = float(init_scale)
        tensors = []
        for i, (fan_in, fan_out) in enumerate(zip(self.widths[:-1], self.widths[1:], strict=True)):
            tensors += [(f"w{i}", (fan_in, fan_out)), (f"b{i}", (fan_out,))]
        self.layout = Layout(tensors)
        self.n_layers = len(self.widths) - 1
        # Training data lives where the computation happens (the GPU for a CuPy worker).
        self._x_train = xp.asarray(data.x_train)
        self._y_train = xp.asarray(data.y_train)

    # ---- the problem protocol -------------------------------------------------------------
    def init_params(self, x_host: np.ndarray, seed: int) -> None:
        rng = np.random.default_rng([int(seed), 0x1A7E])
        x_host[:] = 0.0
        views = self.layout.views(x_host)
        for i in range(self.n_layers):
            fan_in, fan_out = self.widths[i], self.widths[i + 1]
            bound = self.init_scale * np.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform
            views[f"w{i}"][...] = rng.uniform(-bound, bound, (fan_in, fan_out))

    def sample_batch(self, rng: np.random.Generator):
        n = self.data.x_train.shape[0]
        return rng.integers(0, n, min(self.batch_size, n))

    def loss_and_grad(self, x, batch, g):
        xp = self.xp
        idx = xp.asarray(batch)
        return self._loss_and_grad(x, self._x_train[idx], self._y_train[idx], g)

    def evaluate(self, x_host: np.ndarray) -> dict:
        logits = self._forward(np, x_host.astype(np.float32, copy=False), self.data.x_test)[-1]
        loss = _cross_entropy(np, logits, self.data.y_test)
        error = float(np.mean(np.argmax(logits, axis=1) != self.data.y_test))
        return {"loss": float(loss), "error": error}

    # ---- maths ----------------------------------------------------------------------------
    def _forward(self, xp, x, inputs):
        views = self.layout.views(x)
        acts = [inputs.astype(x.dtype, copy=False)]
        for i in range(self.n_layers):
            z = acts[-1] @ views[f"w{i}"] + views[f"b{i}"]
            if i < self.n_layers - 1:
                z = xp.tanh(z) if self.activation == "tanh" else xp.maximum(z, 0)
            acts.append(z)
        return acts  # inputs, hidden activations..., logits

    def _loss_and_grad(self, x, inputs, labels, g):
        xp = self.xp
        acts = self._forward(xp, x, inputs)
        logits = acts[-1]
        m = logits.shape[0]
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = xp.exp(shifted)
        norm = exp.sum(axis=1, keepdims=True)
        rows = xp.arange(m)
        # Log-sum-exp form: finite even when a probability underflows to 0.
        loss = xp.mean(xp.log(norm[:, 0]) - shifted[rows, labels])
        delta = exp / norm
        delta[rows, labels] -= 1
        delta /= m
        views = self.layout.views(x)
        grads = self.layout.views(g)
        g[...] = 0  # padding between tensors keeps a zero gradient
        for i in reversed(range(self.n_layers)):
            grads[f"w{i}"][...] = acts[i].T @ delta
            grads[f"b{i}"][...] = delta.sum(axis=0)
            if i > 0:
                back = delta @ views[f"w{i}"].T
                a = acts[i]
                delta = back * (1 - a * a) if self.activation == "tanh" else back * (a > 0)
        return loss  # a 0-d array: on a GPU, converting it here would wait for the device


def _cross_entropy(xp, logits, labels) -> float:
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = xp.log(xp.exp(shifted).sum(axis=1))
    return float(xp.mean(log_norm - shifted[xp.arange(logits.shape[0]), labels]))
