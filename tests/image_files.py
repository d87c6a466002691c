"""Writers of small CIFAR-10 and MNIST files in exactly the published formats, for tests.

The images are synthetic but learnable: every class has its own mean level per channel and its
own bright band of rows, under moderate noise, so a small model trained for a few hundred steps
gets far below chance error. Everything is derived from ``seed``, so a test can regenerate the
arrays it expects a loader to return.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np

__all__ = [
    "synthetic_images",
    "synthetic_cifar",
    "synthetic_mnist",
    "cifar_batch_bytes",
    "write_cifar_folder",
    "write_cifar_tar",
    "idx_bytes",
    "write_mnist",
    "CIFAR_BATCHES",
    "MNIST_NAMES",
]

CIFAR_BATCHES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
MNIST_NAMES = {
    "train images": "train-images-idx3-ubyte",
    "train labels": "train-labels-idx1-ubyte",
    "test images": "t10k-images-idx3-ubyte",
    "test labels": "t10k-labels-idx1-ubyte",
}
_CIFAR_LABEL_NAMES = [
    b"airplane",
    b"automobile",
    b"bird",
    b"cat",
    b"deer",
    b"dog",
    b"frog",
    b"horse",
    b"ship",
    b"truck",
]


def synthetic_images(n, n_classes=10, shape=(3, 32, 32), seed=0):
    """``(uint8 images (n, C, H, W), int64 labels (n,))``; labels cycle through the classes so
    every class is present once ``n >= n_classes``."""
    channels, height, width = shape
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % n_classes
    classes = np.arange(n_classes)[:, None]
    # Class c, channel ch: a base level from 30 to 138 in steps of 12. (3c + 7ch) mod 10 takes
    # ten different values for the ten classes in every channel, and channels differ too.
    base = 30 + 12 * ((3 * classes + 7 * np.arange(channels)[None, :]) % 10)
    means = np.broadcast_to(base[:, :, None, None], (n_classes, channels, height, width)).copy()
    # ... plus a band of rows 100 levels brighter, at a different height for every class.
    band = max(1, height // n_classes)
    for c in range(n_classes):
        top = (c * band) % height
        means[c, :, top : top + band, :] += 100
    noise = rng.integers(-20, 21, size=(n, channels, height, width))
    images = np.clip(means[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels


def synthetic_cifar(per_batch=20, test=40, seed=0):
    """``(x_train, y_train, x_test, y_test)`` that :func:`write_cifar_folder` writes."""
    x_train, y_train = synthetic_images(5 * per_batch, seed=seed)
    x_test, y_test = synthetic_images(test, seed=seed + 1)
    return x_train, y_train, x_test, y_test


def synthetic_mnist(n_train=60, n_test=20, seed=0):
    """``(x_train, y_train, x_test, y_test)`` that :func:`write_mnist` writes (images with a
    channel axis: ``(N, 1, 28, 28)``)."""
    x_train, y_train = synthetic_images(n_train, shape=(1, 28, 28), seed=seed)
    x_test, y_test = synthetic_images(n_test, shape=(1, 28, 28), seed=seed + 1)
    return x_train, y_train, x_test, y_test


# -- CIFAR-10 -----------------------------------------------------------------------------------


def cifar_batch_bytes(images, labels, batch_label=b"training batch 1 of 1", style="py3"):
    """One CIFAR-10 python batch as bytes: ``{b"batch_label", b"labels", b"data",
    b"filenames"}`` with ``data`` a uint8 ``(n, 3072)`` array of CHW rows.

    ``style="py3"`` pickles it with protocol 2 from Python 3 (bytes go through
    ``_codecs.encode``); ``style="py2"`` writes the opcodes Python 2's cPickle wrote for the
    published files (byte strings as BINSTRING, ``numpy.core.multiarray._reconstruct``)."""
    images = np.asarray(images, dtype=np.uint8)
    n = images.shape[0]
    batch = {
        b"batch_label": batch_label,
        b"labels": [int(label) for label in labels],
        b"data": np.ascontiguousarray(images.reshape(n, -1)),
        b"filenames": [f"synthetic_{i:05d}.png".encode() for i in range(n)],
    }
    if style == "py3":
        return pickle.dumps(batch, protocol=2)
    if style == "py2":
        return b"\x80\x02" + _py2(batch) + b"."
    raise ValueError(f"style must be 'py3' or 'py2', not {style!r}")


def _py2(obj) -> bytes:
    """Protocol-2 opcodes for ``obj`` as Python 2 wrote them (no memo: it is optional)."""
    if isinstance(obj, bytes):  # a Python 2 str
        if len(obj) < 256:
            return b"U" + bytes([len(obj)]) + obj
        return b"T" + struct.pack("<I", len(obj)) + obj
    if isinstance(obj, bool):
        return b"\x88" if obj else b"\x89"
    if isinstance(obj, int):
        if 0 <= obj < 256:
            return b"K" + bytes([obj])
        if 0 <= obj < 65536:
            return b"M" + struct.pack("<H", obj)
        return b"J" + struct.pack("<i", obj)
    if isinstance(obj, list):
        return b"](" + b"".join(_py2(item) for item in obj) + b"e"
    if isinstance(obj, dict):
        return b"}(" + b"".join(_py2(k) + _py2(v) for k, v in obj.items()) + b"u"
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint8:
        shape = b"".join(_py2(d) for d in obj.shape) + {1: b"\x85", 2: b"\x86"}[obj.ndim]
        dtype = (
            b"cnumpy\ndtype\n" + _py2(b"u1") + b"K\x00K\x01\x87R"
            b"(K\x03" + _py2(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + b"K\x00tb"
        )
        return (
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
            + b"K\x00\x85"
            + _py2(b"b")
            + b"\x87R"
            + b"(K\x01"
            + shape
            + dtype
            + b"\x89"
            + _py2(obj.tobytes())
            + b"tb"
        )
    raise TypeError(f"no Python 2 pickle for {type(obj).__name__}")


def _cifar_members(per_batch, test, seed, style):
    x_train, y_train, x_test, y_test = synthetic_cifar(per_batch, test, seed)
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        label = f"training batch {i + 1} of 5".encode()
        yield f"data_batch_{i + 1}", cifar_batch_bytes(x_train[part], y_train[part], label, style)
    yield "test_batch", cifar_batch_bytes(x_test, y_test, b"testing batch 1 of 1", style)
    meta = {b"label_names": _CIFAR_LABEL_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    yield "batches.meta", pickle.dumps(meta, protocol=2)


def write_cifar_folder(folder, per_batch=20, test=40, seed=0, style="py3") -> Path:
    """Write ``data_batch_1..5``, ``test_batch`` and ``batches.meta`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in _cifar_members(per_batch, test, seed, style):
        (folder / name).write_bytes(data)
    return folder


def write_cifar_tar(path, per_batch=20, test=40, seed=0, extra_members=(), style="py3") -> Path:
    """Write a ``.tar.gz`` laid out like ``cifar-10-python.tar.gz``; ``extra_members`` is a list
    of ``(arcname, bytes)`` added as regular files under exactly that name (e.g. ``../x``)."""
    path = Path(path)

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o755
        tar.addfile(folder)
        for name, data in _cifar_members(per_batch, test, seed, style):
            add(tar, f"cifar-10-batches-py/{name}", data)
        for arcname, data in extra_members:
            add(tar, arcname, data)
    return path


# -- MNIST --------------------------------------------------------------------------------------


def idx_bytes(array) -> bytes:
    """``array`` (uint8, 1 or 3 dimensions) as an IDX file: magic, big-endian sizes, bytes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x00000800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def write_mnist(folder, n_train=60, n_test=20, gz=False, seed=0) -> Path:
    """Write the four MNIST IDX files (28×28, labels 0..9) into ``folder``, gzipped (with a
    ``.gz`` suffix) when ``gz``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = synthetic_mnist(n_train, n_test, seed)
    arrays = {
        "train images": x_train[:, 0],
        "train labels": y_train,
        "test images": x_test[:, 0],
        "test labels": y_test,
    }
    for what, stem in MNIST_NAMES.items():
        data = idx_bytes(arrays[what])
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return folder
