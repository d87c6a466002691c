"""A user's own data set from a file: NumPy ``.npz`` or HDF5, features and integer labels.

Each problem is named with the file and the array, so a wrong file is a one-line error on every
rank instead of a traceback from deep inside NumPy or h5py.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..errors import DataError

__all__ = ["load_arrays"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def load_arrays(path, x_key: str = "x", y_key: str = "y"):
    """``(x, y, held_out)`` from ``path``; ``held_out`` is ``(x_test, y_test)`` when the file has
    ``<x_key>_test`` and ``<y_key>_test``, else None. Features come back as float32 rows
    (trailing dimensions flattened: images become vectors), labels as int64 class indices."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found (data.path)")
    arrays = _read(path, [x_key, y_key, f"{x_key}_test", f"{y_key}_test"])
    for key in (x_key, y_key):
        if key not in arrays:
            raise DataError(
                f"data file {path} has no array '{key}' (it has: "
                f"{', '.join(sorted(arrays['__names__'])) or 'nothing'}); "
                f"set data.x_key / data.y_key"
            )
    x, y = _check(path, x_key, arrays[x_key], y_key, arrays[y_key])
    held_out = None
    tx, ty = f"{x_key}_test", f"{y_key}_test"
    if (tx in arrays) != (ty in arrays):
        raise DataError(f"data file {path} has only one of '{tx}' and '{ty}': give both or none")
    if tx in arrays:
        held_out = _check(path, tx, arrays[tx], ty, arrays[ty])
        if held_out[0].shape[1] != x.shape[1]:
            raise DataError(
                f"data file {path}: '{tx}' has {held_out[0].shape[1]} features per sample, "
                f"'{x_key}' has {x.shape[1]}"
            )
    _check_class_count(path, {y_key: y, ty: held_out[1]} if held_out else {y_key: y})
    return x, y, held_out


def _check_class_count(path, labels: dict[str, np.ndarray]) -> None:
    """Labels are class indices, so the largest one fixes the class count, and the model's
    outputs are sized from it: check it before anything is. More classes than the file has
    samples cannot each have one, so such a label is no class index (a raw identifier, a
    value that should have been renumbered), and it would size a model of absurd width."""
    samples = sum(len(y) for y in labels.values())
    key, top = max(((k, int(y.max())) for k, y in labels.items()), key=lambda kv: kv[1])
    if top + 1 > samples:
        distinct = len(np.unique(np.concatenate(list(labels.values()))))
        raise DataError(
            f"data file {path}: '{key}' holds label {top}, i.e. {top + 1:,d} classes for "
            f"{samples:,d} samples ({distinct:,d} distinct labels); labels must be class "
            f"indices 0, 1, 2, ...: renumber them, e.g. np.unique(y, return_inverse=True)[1]"
        )


def _read(path: Path, wanted: list[str]) -> dict:
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic == _HDF5_MAGIC:
        import h5py  # noqa: PLC0415

        try:
            with h5py.File(path, "r") as f:
                out = {k: f[k][()] for k in wanted if k in f and isinstance(f[k], h5py.Dataset)}
                out["__names__"] = list(f.keys())
                return out
        except (OSError, KeyError, ValueError) as exc:
            raise DataError(f"data file {path} is a damaged HDF5 file ({exc})") from None
    if magic[:2] == b"PK":  # .npz is a zip archive
        try:
            with np.load(path, allow_pickle=False) as npz:
                out = {k: npz[k] for k in wanted if k in npz.files}
                out["__names__"] = list(npz.files)
                return out
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"data file {path} is a damaged .npz file ({exc})") from None
    raise DataError(f"data file {path} is neither a NumPy .npz nor an HDF5 file")


def _check(path, x_key, x, y_key, y):
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(
            f"data file {path}: '{x_key}' has shape {list(x.shape)}; need one row per sample "
            f"(samples × features, or samples × any image shape)"
        )
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise DataError(f"data file {path}: '{x_key}' has dtype {x.dtype}, not real numbers")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(
            f"data file {path}: '{y_key}' has shape {list(y.shape)}; need one label per row "
            f"of '{x_key}' ({x.shape[0]})"
        )
    if (
        not np.issubdtype(y.dtype, np.number)
        or not np.all(np.isfinite(y))
        or np.any(y != np.round(y))
        or np.any(y < 0)
    ):
        raise DataError(
            f"data file {path}: '{y_key}' must hold class indices 0, 1, 2, ... (integers >= 0)"
        )
    x = x.reshape(x.shape[0], -1).astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataError(f"data file {path}: '{x_key}' has NaN or infinite values")
    return x, y.astype(np.int64)
