"""A fake GPU for the CPU tests: NumPy memory that the code under test must treat as device
memory, with every host synchronisation it causes counted.

``FakeCupy`` stands in for the ``cupy`` module as a problem's array module ``xp``: its arrays
are :class:`DeviceArray` (NumPy arrays underneath), and it does what CuPy does where the host
could be made to wait:

- ``asarray`` of a host array is CuPy's asynchronous upload (CuPy stages it through its pinned
  memory pool and copies on the current stream): counted as an upload, not a synchronisation;
- reading a device array on the host (``float()``, ``int()``, ``bool()``, ``.item()``,
  ``.tolist()``, ``.get()``) waits for the device: counted as a synchronisation.

:func:`count_torch_syncs` does the same for PyTorch: a ``.to(device)`` that is not
``non_blocking`` (from pageable memory it waits for the device's queue), ``.item()``,
``.tolist()``, ``float()`` and ``int()`` of a tensor are synchronisations.
"""

from __future__ import annotations

import types
from collections import Counter

import numpy as np

__all__ = ["DeviceArray", "FakeCupy", "count_torch_syncs"]


class DeviceArray(np.ndarray):
    """An array on the fake device; ``counts`` is the fake device's counter."""

    counts: Counter = Counter()

    def _host_read(self, what):
        DeviceArray.counts["sync"] += 1
        DeviceArray.counts[f"sync:{what}"] += 1

    def __float__(self):
        self._host_read("float")
        return float(np.asarray(self))

    def __int__(self):
        self._host_read("int")
        return int(np.asarray(self))

    def __bool__(self):
        self._host_read("bool")
        return bool(np.asarray(self))

    def item(self, *args):
        self._host_read("item")
        return np.asarray(self).item(*args)

    def tolist(self):
        self._host_read("tolist")
        return np.asarray(self).tolist()

    def get(self):
        self._host_read("get")
        return np.array(self)


def _on_device(value):
    """Results of NumPy functions, as device arrays (CuPy returns 0-d arrays, not scalars)."""
    if isinstance(value, DeviceArray):
        return value
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value).view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_on_device(v) for v in value)
    return value


class FakeCupy(types.SimpleNamespace):
    """The ``cupy`` module as the problems use it, over NumPy (see the module's docstring)."""

    __name__ = "fake_cupy"

    def __init__(self, counts: Counter):
        super().__init__()
        DeviceArray.counts = counts
        self.counts = counts
        self.ndarray = DeviceArray
        stream = types.SimpleNamespace(ptr=0, synchronize=self._synchronize)
        self.cuda = types.SimpleNamespace(get_current_stream=lambda: stream)

    def _synchronize(self):
        self.counts["sync"] += 1
        self.counts["sync:stream"] += 1

    def asarray(self, a, dtype=None):
        if isinstance(a, DeviceArray):
            return a if dtype is None or a.dtype == dtype else a.astype(dtype)
        self.counts["uploads"] += 1  # CuPy: pinned staging, asynchronous on the current stream
        return np.array(a, dtype=dtype, copy=True).view(DeviceArray)

    def __getattr__(self, name):
        attr = getattr(np, name)
        if not callable(attr) or isinstance(attr, type):
            return attr

        def on_device(*args, **kwargs):
            return _on_device(attr(*args, **kwargs))

        return on_device


def count_torch_syncs(torch, monkeypatch, counts: Counter) -> None:
    """Count PyTorch's host synchronisations into ``counts`` (see the module's docstring)."""

    def host_read(name):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            counts["sync"] += 1
            counts[f"sync:torch {name}"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in ("item", "tolist", "__float__", "__int__"):
        host_read(name)
    to = torch.Tensor.to

    def counted_to(self, *args, **kwargs):
        moves = "device" in kwargs or any(isinstance(a, str | torch.device) for a in args)
        if moves and not kwargs.get("non_blocking", False):
            counts["sync"] += 1
            counts["sync:torch .to(device)"] += 1
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", counted_to)
