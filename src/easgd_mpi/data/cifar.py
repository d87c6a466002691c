"""CIFAR-10 from the published python version: the ``cifar-10-batches-py`` folder, or the
``cifar-10-python.tar.gz`` archive read in place.

The archive is never extracted: members are read into memory through ``tarfile``, so a member
named ``../x`` or ``/x`` cannot write anywhere (such names are simply not used). Every batch is
read with a size bound and unpickled by :mod:`.safe_pickle`, which refuses anything that is not
a CIFAR-10 batch before it runs.
"""

from __future__ import annotations

import io
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import DataError
from .images import ImageSet, check_allocation, human_bytes
from .safe_pickle import safe_load_cifar_batch

__all__ = ["load_cifar10", "BATCH_NAMES", "MAX_BATCH_BYTES"]

FOLDER_NAME = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
BATCH_NAMES = (*TRAIN_BATCHES, TEST_BATCH)

# A real batch is 10,000 × 3,072 pixel bytes plus labels, file names and pickle framing: about
# 31 MB. Twice that leaves room for a re-saved batch while bounding what a damaged or hostile
# file can make every MPI rank read into memory.
MAX_BATCH_BYTES = 64 * 1024 * 1024
_ROW = 3 * 32 * 32
_N_CLASSES = 10
# The real archive has 8 members; scanning an archive of millions of tiny members would only
# fill memory with their headers.
_MAX_MEMBERS = 10_000

try:
    import lzma

    _ARCHIVE_ERRORS: tuple = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
except ImportError:  # Python built without lzma: .tar.xz cannot be opened at all
    _ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def load_cifar10(path, max_bytes=None) -> ImageSet:
    """CIFAR-10 from ``path``: the ``cifar-10-batches-py`` folder, a folder holding it, or a
    ``.tar``/``.tar.gz``/``.tgz`` archive of it (read in place, never extracted).

    ``max_bytes`` bounds the size of any one batch file (default :data:`MAX_BATCH_BYTES`).
    Images come back as ``uint8 (N, 3, 32, 32)``; train is ``data_batch_1..5`` in order, test
    is ``test_batch``."""
    path = Path(path)
    bound = MAX_BATCH_BYTES if max_bytes is None else int(max_bytes)
    if path.is_dir():
        batches = _folder_batches(_batch_folder(path), bound)
    elif path.is_file():
        batches = _archive_batches(path, bound)
    else:
        raise DataError(f"CIFAR-10 data {path} not found (data.path)")

    parsed = {}
    for name, source, raw in batches:
        batch = safe_load_cifar_batch(io.BytesIO(raw), source)
        del raw  # the pickle's buffer and the array are both batch-sized; keep only one
        parsed[name] = _images_and_labels(batch, source)
    x_train = np.concatenate([parsed[name][0] for name in TRAIN_BATCHES])
    y_train = np.concatenate([parsed[name][1] for name in TRAIN_BATCHES])
    x_test, y_test = parsed[TEST_BATCH]
    return ImageSet("cifar10", x_train, y_train, x_test, y_test, _N_CLASSES)


def _batch_folder(path: Path) -> Path:
    # Accept the folder a user extracted the archive into as well as the batch folder itself.
    if not any((path / name).exists() for name in BATCH_NAMES) and (path / FOLDER_NAME).is_dir():
        return path / FOLDER_NAME
    return path


def _check_size(size: int, bound: int, source: str) -> None:
    if size > bound:
        raise DataError(
            f"CIFAR-10 batch {source} is {human_bytes(size)}, more than the "
            f"{human_bytes(bound)} allowed for one batch (a real one is about 31 MB); "
            f"is this the right file?"
        )


def _folder_batches(folder: Path, bound: int) -> Iterator[tuple[str, str, bytes]]:
    files = [folder / name for name in BATCH_NAMES]
    # Check every batch is there before reading any: a missing one is the common mistake.
    for file in files:
        if not file.is_file():
            raise DataError(f"CIFAR-10 folder {folder} has no {file.name} (data.path)")
    sizes = [file.stat().st_size for file in files]
    for file, size in zip(files, sizes, strict=True):
        _check_size(size, bound, str(file))
    check_allocation(sum(sizes), "the six batches", f"CIFAR-10 folder {folder}")
    for file in files:
        try:
            with open(file, "rb") as fh:
                raw = fh.read(bound + 1)  # the file may have grown since stat()
        except OSError as exc:
            raise DataError(f"CIFAR-10 batch {file} cannot be read: {exc.strerror}") from None
        _check_size(len(raw), bound, str(file))
        yield file.name, str(file), raw


def _archive_batches(path: Path, bound: int) -> Iterator[tuple[str, str, bytes]]:
    try:
        tar = tarfile.open(path, "r:*")
    except PermissionError as exc:
        raise DataError(f"CIFAR-10 archive {path} cannot be read: {exc.strerror}") from None
    except _ARCHIVE_ERRORS:
        raise DataError(
            f"CIFAR-10 data {path} is neither a folder of batches nor a tar archive of one "
            f"(data.path)"
        ) from None
    with tar:
        try:
            # One pass in archive order: the published archive does not store the batches in
            # name order, and seeking back in a gzip stream means decompressing it again from
            # the start (a second pass over 160 MB).
            found: dict[str, tarfile.TarInfo] = {}
            for name, member in _batch_members(tar, path):
                if name in found:
                    raise DataError(
                        f"CIFAR-10 archive {path} holds {name} twice ({found[name].name} and "
                        f"{member.name}): keep one"
                    )
                found[name] = member
                source = f"{member.name} in {path}"
                _check_size(member.size, bound, source)
                check_allocation(member.size, "this batch", f"CIFAR-10 batch {source}")
                fh = tar.extractfile(member)
                # member.size is bounded; read exactly that much, never "the rest".
                raw = fh.read(member.size) if fh is not None else b""
                if len(raw) != member.size:
                    raise DataError(
                        f"CIFAR-10 archive {path} is damaged: {member.name} is cut short; "
                        f"download it again"
                    )
                yield name, source, raw
        except _ARCHIVE_ERRORS as exc:
            raise DataError(
                f"CIFAR-10 archive {path} is damaged: {exc or type(exc).__name__}; "
                f"download it again"
            ) from None
    for name in BATCH_NAMES:
        if name not in found:
            raise DataError(f"CIFAR-10 archive {path} has no {name} (data.path)")


def _batch_members(tar: tarfile.TarFile, path: Path) -> Iterator[tuple[str, tarfile.TarInfo]]:
    """``(batch name, member)`` for the regular files at top level or directly inside a
    ``cifar-10-batches-py/`` folder, in archive order. Absolute names and names with ``..`` are
    never used."""
    for count, member in enumerate(iter(tar.next, None), start=1):
        if count > _MAX_MEMBERS:
            raise DataError(
                f"CIFAR-10 archive {path} has more than {_MAX_MEMBERS:,} members: "
                f"not a CIFAR-10 archive"
            )
        if not member.isreg() or member.name.startswith("/") or "\\" in member.name:
            continue
        parts = [part for part in PurePosixPath(member.name).parts if part != "."]
        if not parts or ".." in parts or parts[-1] not in BATCH_NAMES:
            continue
        if len(parts) > 1 and parts[-2] != FOLDER_NAME:
            continue
        yield parts[-1], member


def _images_and_labels(batch: dict, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(uint8 (n, 3, 32, 32), int64 (n,))`` from one unpickled batch."""
    # The original files were pickled by Python 2, so their keys load as bytes.
    entries = {
        key.decode("latin-1") if type(key) is bytes else key: value
        for key, value in batch.items()
        if type(key) in (str, bytes)
    }
    if "data" not in entries:
        raise DataError(f"CIFAR-10 batch {source} has no 'data' entry: not a CIFAR-10 batch")
    if "labels" not in entries:
        hint = ""
        if "fine_labels" in entries:
            hint = " (it has 'fine_labels': this is CIFAR-100, not CIFAR-10)"
        raise DataError(f"CIFAR-10 batch {source} has no 'labels' entry{hint}")
    data = entries["data"]
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != _ROW:
        shape = list(data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(
            f"CIFAR-10 batch {source}: 'data' is {shape}; a CIFAR-10 batch holds one row of "
            f"{_ROW} pixel values (3×32×32) per image"
        )
    n = data.shape[0]
    if n == 0:
        raise DataError(f"CIFAR-10 batch {source} holds no images")
    pixels = _as_uint8(data, source)
    labels = _labels(entries["labels"], source)
    if labels.shape[0] != n:
        raise DataError(f"CIFAR-10 batch {source} holds {n} images but {labels.shape[0]} labels")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    return pixels.reshape(n, 3, 32, 32), labels


def _as_uint8(data: np.ndarray, source: str) -> np.ndarray:
    if data.dtype == np.uint8:
        return np.ascontiguousarray(data)
    kind = data.dtype.kind
    # A re-saved batch may hold wider integers or floats; accept them only when converting to
    # uint8 loses nothing.
    lossless = kind in "iuf" and bool(data.min() >= 0) and bool(data.max() <= 255)
    if lossless and kind == "f":
        lossless = bool(np.isfinite(data).all()) and bool((data == np.floor(data)).all())
    if not lossless:
        raise DataError(
            f"CIFAR-10 batch {source}: 'data' holds {data.dtype} values that are not all "
            f"whole numbers in 0..255"
        )
    return data.astype(np.uint8)


def _labels(labels, source: str) -> np.ndarray:
    if isinstance(labels, np.ndarray):
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(
                f"CIFAR-10 batch {source}: 'labels' is a {labels.dtype} array of shape "
                f"{list(labels.shape)}; need one integer class per image"
            )
        values = labels.tolist()
    elif type(labels) is list:
        values = labels
    else:
        raise DataError(
            f"CIFAR-10 batch {source}: 'labels' is a {type(labels).__name__}; need a list of "
            f"integer classes"
        )
    for index, label in enumerate(values):
        if type(label) is not int:
            raise DataError(
                f"CIFAR-10 batch {source}: label {index} is a {type(label).__name__}, "
                f"not an integer class"
            )
        if not 0 <= label < _N_CLASSES:
            raise DataError(
                f"CIFAR-10 batch {source}: label {label} (image {index}) is outside "
                f"0..{_N_CLASSES - 1}"
            )
    return np.asarray(values, dtype=np.int64)
