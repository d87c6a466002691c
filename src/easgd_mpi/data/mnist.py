"""MNIST from its four published IDX files, plain or gzip-compressed.

An IDX file is a 4-byte magic number, one big-endian 32-bit size per dimension, then the bytes.
The header is checked against the file before anything is allocated: a damaged or hostile
header cannot make every MPI rank allocate terabytes, and a gzip stream is decompressed only as
far as the header promises, in bounded pieces.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .images import ImageSet, check_allocation, human_bytes

__all__ = ["load_mnist", "IMAGE_MAGIC", "LABEL_MAGIC", "MNIST_FILES"]

IMAGE_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
MNIST_FILES = {
    "train images": "train-images-idx3-ubyte",
    "train labels": "train-labels-idx1-ubyte",
    "test images": "t10k-images-idx3-ubyte",
    "test labels": "t10k-labels-idx1-ubyte",
}
_N_CLASSES = 10
_CHUNK = 1 << 20  # decompress at most this much at a time


def load_mnist(path, max_bytes=None) -> ImageSet:
    """MNIST from the folder ``path`` holding the four IDX files (each plain or ``.gz``; the
    plain file wins when both are there).

    ``max_bytes`` bounds the bytes any one file's header may promise (default: this machine's
    available memory). Images come back as ``uint8 (N, 1, rows, cols)``, labels as int64."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"MNIST folder {folder} not found (data.path)")
    files = {what: _pick(folder, stem) for what, stem in MNIST_FILES.items()}
    x_train = _read_idx(files["train images"], IMAGE_MAGIC, 3, max_bytes)
    y_train = _read_idx(files["train labels"], LABEL_MAGIC, 1, max_bytes)
    x_test = _read_idx(files["test images"], IMAGE_MAGIC, 3, max_bytes)
    y_test = _read_idx(files["test labels"], LABEL_MAGIC, 1, max_bytes)
    for split, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"MNIST folder {folder}: {split} images {images.shape[0]} "
                f"({files[f'{split} images'].name}) but {split} labels {labels.shape[0]} "
                f"({files[f'{split} labels'].name}); both files must come from the same set"
            )
        _check_labels(labels, files[f"{split} labels"])
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(
            f"MNIST folder {folder}: train images are {x_train.shape[1]}×{x_train.shape[2]} but "
            f"test images are {x_test.shape[1]}×{x_test.shape[2]}"
        )
    # A channel axis, so every image set has the same (N, C, H, W) layout.
    return ImageSet(
        "mnist",
        x_train[:, None],
        y_train.astype(np.int64),
        x_test[:, None],
        y_test.astype(np.int64),
        _N_CLASSES,
    )


def _pick(folder: Path, stem: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"MNIST folder {folder} has no {stem} (nor {stem}.gz) (data.path)")


def _read_idx(file: Path, magic: int, ndim: int, max_bytes) -> np.ndarray:
    """The array in IDX file ``file``, after checking its magic and that the sizes its header
    promises are exactly what the file holds."""
    compressed = file.suffix == ".gz"
    kind = "image" if magic == IMAGE_MAGIC else "label"
    source = f"MNIST file {file}"
    try:
        with gzip.open(file, "rb") if compressed else open(file, "rb") as fh:
            head = fh.read(4)
            if len(head) < 4 or int.from_bytes(head, "big") != magic:
                found = f"0x{int.from_bytes(head, 'big'):08x}" if len(head) == 4 else "none"
                raise DataError(
                    f"{source} is not an IDX {kind} file (magic {found}, expected "
                    f"0x{magic:08x}); is it one of the four MNIST files?"
                )
            raw_dims = fh.read(4 * ndim)
            header = 4 + 4 * ndim
            if len(raw_dims) < 4 * ndim:
                raise DataError(
                    f"{source} is short: its header alone needs {header} bytes, file holds "
                    f"{4 + len(raw_dims)}"
                )
            dims = struct.unpack(f">{ndim}I", raw_dims)
            if 0 in dims:
                raise DataError(f"{source} holds no {kind}s (its header says {list(dims)})")
            payload = math.prod(dims)
            total = header + payload
            if not compressed:
                # Compare the claim with the file before allocating anything for it.
                _check_length(source, total, os.fstat(fh.fileno()).st_size, compressed)
            claim = f"header claims {dims[0]:,} {kind}s" + (
                f" of {dims[1]}×{dims[2]}" if ndim == 3 else ""
            )
            if max_bytes is not None and payload > max_bytes:
                raise DataError(
                    f"{source}: {claim} ({human_bytes(payload)}), more than the "
                    f"{human_bytes(max_bytes)} allowed"
                )
            check_allocation(payload, claim, source)
            values = np.empty(payload, dtype=np.uint8)
            held = header + _read_into(fh, values)
            if held == total and fh.read(1):
                held += 1  # at least one byte more than promised; how many does not matter
            _check_length(source, total, held, compressed)
    except (OSError, EOFError, zlib.error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DataError(f"{source} is damaged or unreadable: {reason}") from None
    return values.reshape(dims)


def _read_into(fh, out: np.ndarray) -> int:
    """Fill ``out`` from ``fh`` in bounded pieces; the number of bytes read."""
    view = memoryview(out)
    done = 0
    while done < len(view):
        count = fh.readinto(view[done : done + _CHUNK])
        if not count:
            break
        done += count
    return done


def _check_length(source: str, promised: int, held: int, compressed: bool) -> None:
    unit = "bytes uncompressed" if compressed else "bytes"
    if held < promised:
        raise DataError(
            f"{source} is short: header promises {promised:,} {unit}, file holds {held:,}; "
            f"download it again"
        )
    if held > promised:
        extra = "" if compressed else f" ({held - promised:,} bytes)"
        raise DataError(
            f"{source} has trailing bytes{extra} after the {promised:,} {unit} its header promises"
        )


def _check_labels(labels: np.ndarray, file: Path) -> None:
    bad = np.flatnonzero(labels >= _N_CLASSES)
    if bad.size:
        index = int(bad[0])
        raise DataError(
            f"MNIST file {file}: label {int(labels[index])} (item {index}) is outside "
            f"0..{_N_CLASSES - 1}"
        )
