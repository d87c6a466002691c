"""Minibatches for PyTorch models: what a worker feeds its module, on the module's device.

Three kinds of training data, one small interface (``draw(rng)`` picks a minibatch with the
worker's own random stream, ``batch(drawn)`` turns it into ``(inputs, targets)`` tensors):

- :class:`ImageBatches`: uint8 images (N, C, H, W) that stay uint8 on the device and are
  cropped and normalised per batch (CIFAR-10, MNIST): a quarter of the memory of float32 and
  no per-epoch preprocessing pass;
- :class:`TensorBatches`: any tensors or arrays ``(x, y)`` moved once to the device;
- :class:`DatasetBatches`: a ``torch.utils.data.Dataset``, indexed item by item and collated.

Every step's host data (the drawn indices, the crop offsets, a Dataset's collated batch) reaches
the device through one ``upload`` function (:func:`device_upload`) that never makes the host
wait for the GPU: on a GPU worker CuPy copies it into pinned memory and from there
asynchronously, on the stream PyTorch shares with the fused kernels. A blocking ``.to(device)``
from pageable memory would wait for everything already queued on the GPU, every step.

Nothing here imports MPI; ``torch`` is imported by the caller (the adapter) and passed in.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

__all__ = [
    "ImageBatches",
    "TensorBatches",
    "DatasetBatches",
    "make_batches",
    "largest_label",
    "device_upload",
]


def device_upload(torch, xp):
    """``f(host ndarray) -> tensor`` of the same values where ``xp`` computes, never blocking.

    On the host (``xp`` is NumPy) the tensor views the array. Otherwise ``xp.asarray`` moves it
    (CuPy stages a host array through its pinned-memory pool and copies it asynchronously on
    the current stream, the one PyTorch shares) and DLPack hands it to PyTorch without a copy.
    The array must not change afterwards (every caller draws a fresh one).
    """
    if getattr(xp, "__name__", "") == "numpy":
        return lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return lambda a: torch.from_dlpack(xp.asarray(np.ascontiguousarray(a)))


def _default_upload(torch, device):
    """The upload of a source used outside an adapter: pinned and asynchronous on a GPU."""
    if torch.device(device).type == "cpu":
        return lambda a: torch.from_numpy(np.ascontiguousarray(a))
    return lambda a: (
        torch.from_numpy(np.ascontiguousarray(a)).pin_memory().to(device, non_blocking=True)
    )


class _Uploads:
    """A source's way to the device: ``upload`` (set by :func:`make_batches` to the worker's
    :func:`device_upload`), else a pinned, asynchronous copy of PyTorch's own."""

    upload = None

    def _to_device(self, host: np.ndarray):
        if self.upload is None:
            self.upload = _default_upload(self.torch, self._device)
        return self.upload(host)


class ImageBatches(_Uploads):
    """uint8 images on the device; per batch: random (training) or centre crop, then
    per-channel normalisation with the training set's mean and standard deviation."""

    def __init__(self, torch, images, labels, device, mean, std, crop=0, train=True, batch=128):
        self.torch = torch
        self._device = device
        self.n = int(images.shape[0])
        self.train = train
        self.batch_size = int(batch)
        self.x = torch.as_tensor(np.ascontiguousarray(images)).to(device)
        self.y = torch.as_tensor(np.asarray(labels, dtype=np.int64)).to(device)
        _, c, h, w = images.shape
        self.crop = int(crop) if crop else 0
        if self.crop and (self.crop > h or self.crop > w):
            raise DataError(f"data.crop = {crop} is larger than the {h}×{w} images")
        shape = (1, c, 1, 1)
        self.mean = torch.as_tensor(np.asarray(mean, np.float32).reshape(shape)).to(device)
        self.inv_std = torch.as_tensor((1.0 / np.asarray(std, np.float32)).reshape(shape)).to(
            device
        )
        self.height, self.width = h, w
        self._arange = {}

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = int(self.x.shape[1])
        return (c, self.crop or self.height, self.crop or self.width)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """The indices, and for random crops their rows and columns below them: one int64
        array, so that a step moves one small array to the device."""
        idx = rng.integers(0, self.n, min(self.batch_size, self.n))
        if not (self.train and self.crop):
            return idx
        rows = rng.integers(0, self.height - self.crop + 1, idx.shape[0])
        cols = rng.integers(0, self.width - self.crop + 1, idx.shape[0])
        return np.stack([idx, rows, cols])

    def batch(self, drawn):
        drawn = self._to_device(drawn)
        if drawn.ndim == 1:
            return self.take(drawn)
        return self.take(drawn[0], drawn[1], drawn[2])

    def take(self, idx, rows=None, cols=None):
        """Images ``idx`` (a device tensor), cropped at (rows, cols) (device tensors) or
        centred, normalised."""
        images = self.x[idx]
        if self.crop:
            k = self.crop
            if rows is None:  # evaluation: the centre crop
                top, left = (self.height - k) // 2, (self.width - k) // 2
                images = images[:, :, top : top + k, left : left + k]
            else:  # one random window per image, gathered in a single indexing operation
                device = images.device
                r = rows[:, None] + self._range(k, device)
                c = cols[:, None] + self._range(k, device)
                m = images.shape[0]
                images = images[
                    self._range(m, device)[:, None, None, None],
                    self._range(images.shape[1], device)[None, :, None, None],
                    r[:, None, :, None],
                    c[:, None, None, :],
                ]
        inputs = (images.float() - self.mean) * self.inv_std
        return inputs, self.y[idx]

    def _range(self, k, device):
        key = (k, str(device))
        if key not in self._arange:
            self._arange[key] = self.torch.arange(k, device=device)
        return self._arange[key]

    def batches(self, size: int):
        """The whole set in order, ``size`` at a time (the master's evaluation)."""
        for lo in range(0, self.n, size):
            idx = self.torch.arange(lo, min(lo + size, self.n), device=self.x.device)
            yield self.take(idx)


class TensorBatches(_Uploads):
    """Inputs and targets held as tensors on the device (moved there once)."""

    def __init__(self, torch, x, y, device, batch=128, what="training data"):
        self.torch = torch
        self._device = device
        self.x = _as_tensor(torch, x, f"{what} inputs").to(device)
        self.y = _as_tensor(torch, y, f"{what} targets").to(device)
        if self.x.shape[0] != self.y.shape[0] or self.x.shape[0] == 0:
            raise DataError(
                f"{what}: {self.x.shape[0]} inputs but {self.y.shape[0]} targets "
                f"(need the same number, at least one)"
            )
        if self.x.dtype == torch.float64:  # float32 models: NumPy's default would not fit
            self.x = self.x.float()
        self.n = int(self.x.shape[0])
        self.batch_size = int(batch)

    def draw(self, rng: np.random.Generator):
        return rng.integers(0, self.n, min(self.batch_size, self.n))

    def batch(self, idx):
        idx = self._to_device(idx)
        return self.x[idx], self.y[idx]

    def batches(self, size: int):
        for lo in range(0, self.n, size):
            yield self.x[lo : lo + size], self.y[lo : lo + size]


class DatasetBatches(_Uploads):
    """A ``torch.utils.data.Dataset``: items fetched one by one, collated, moved to the device."""

    def __init__(self, torch, dataset, device, batch=128, what="training data"):
        from torch.utils.data import default_collate  # noqa: PLC0415

        self.torch = torch
        self.dataset = dataset
        self.device = self._device = device
        self.collate = default_collate
        try:
            self.n = len(dataset)
        except TypeError:
            raise DataError(f"{what}: the Dataset has no length (len() fails)") from None
        if self.n == 0:
            raise DataError(f"{what}: the Dataset is empty")
        self.batch_size = int(batch)

    def draw(self, rng: np.random.Generator):
        return rng.integers(0, self.n, min(self.batch_size, self.n))

    def batch(self, idx):
        return self._collate([self.dataset[int(i)] for i in idx])

    def batches(self, size: int):
        for lo in range(0, self.n, size):
            yield self._collate([self.dataset[i] for i in range(lo, min(lo + size, self.n))])

    def _collate(self, items):
        inputs, targets = self.collate(items)[:2]
        if inputs.dtype == self.torch.float64:
            inputs = inputs.float()
        return self._move(inputs), self._move(targets)

    def _move(self, t):
        """A collated host tensor to the device through the upload (a tensor already on a
        device, or of a dtype NumPy lacks, is moved by PyTorch, asynchronously)."""
        if t.device.type == "cpu" and not t.requires_grad:
            try:
                return self._to_device(t.numpy())
            except (TypeError, RuntimeError):  # e.g. bfloat16: no NumPy dtype
                pass
        return t.to(self.device, non_blocking=True)


def make_batches(torch, data, device, batch=128, what="training data", upload=None):
    """The right minibatch source for ``data``: an ``(x, y)`` pair, a Dataset, a source, or a
    function ``f(device)`` that builds a source there. ``upload`` (:func:`device_upload`):
    how the built-in sources move each step's host data to the device."""
    if hasattr(data, "draw") and hasattr(data, "batch"):
        source = data
    elif isinstance(data, torch.utils.data.Dataset):
        source = DatasetBatches(torch, data, device, batch=batch, what=what)
    elif callable(data):
        source = data(device)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        source = TensorBatches(torch, data[0], data[1], device, batch=batch, what=what)
    else:
        raise DataError(
            f"{what} must be a pair (inputs, targets) of tensors or arrays, or a "
            f"torch.utils.data.Dataset; got {type(data).__name__}"
        )
    if upload is not None and isinstance(source, _Uploads) and source.upload is None:
        source.upload = upload
    return source


def largest_label(data) -> int | None:
    """The largest class index among the targets of ``data``: a batch source, an ``(x, y)``
    pair or a Dataset with a ``targets`` attribute (torchvision's). None when the targets are
    not integer class indices, or cannot be had without fetching every item of a Dataset."""
    if isinstance(data, DatasetBatches):
        data = data.dataset
    if isinstance(data, (tuple, list)) and len(data) == 2:
        targets = data[1]
    else:
        targets = getattr(data, "y", getattr(data, "targets", None))
    if targets is None:
        return None
    if hasattr(targets, "detach"):  # a tensor, perhaps on a GPU: its labels come to the host
        targets = targets.detach().cpu().numpy()
    try:
        labels = np.asarray(targets)
    except (TypeError, ValueError):
        return None
    if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iu":
        return None
    return int(labels.max())


def _as_tensor(torch, a, what):
    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.as_tensor(np.asarray(a))
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} cannot become a tensor ({exc})") from None
