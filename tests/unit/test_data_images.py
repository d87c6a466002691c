"""CIFAR-10 and MNIST loaders: the published formats load exactly, and every damaged, wrong or
hostile file is a one-line DataError naming the file, refused before it can run code, write
files or allocate what its header claims."""

from __future__ import annotations

import collections
import gzip
import io
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from easgd_mpi.data import images as images_module
from easgd_mpi.data.cifar import load_cifar10
from easgd_mpi.data.images import ImageSet, available_memory_bytes, check_allocation
from easgd_mpi.data.mnist import load_mnist
from easgd_mpi.data.safe_pickle import safe_load_cifar_batch
from easgd_mpi.errors import DataError
from image_files import (
    CIFAR_BATCHES,
    MNIST_NAMES,
    cifar_batch_bytes,
    idx_bytes,
    synthetic_cifar,
    synthetic_images,
    synthetic_mnist,
    write_cifar_folder,
    write_cifar_tar,
    write_mnist,
)


def _refused(call, *names) -> str:
    """The DataError message ``call`` raises; checks it is one line naming every ``names``."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message, f"{name!r} not in {message!r}"
    return message


def _assert_cifar(loaded: ImageSet, per_batch=20, test=40, seed=0):
    x_train, y_train, x_test, y_test = synthetic_cifar(per_batch, test, seed)
    assert loaded.name == "cifar10" and loaded.n_classes == 10
    assert loaded.x_train.dtype == np.uint8 and loaded.x_test.dtype == np.uint8
    assert loaded.y_train.dtype == np.int64 and loaded.y_test.dtype == np.int64
    assert loaded.x_train.shape == (5 * per_batch, 3, 32, 32)
    assert loaded.x_test.shape == (test, 3, 32, 32)
    assert loaded.image_shape == (3, 32, 32) and loaded.n_features == 3072
    np.testing.assert_array_equal(loaded.x_train, x_train)
    np.testing.assert_array_equal(loaded.y_train, y_train)
    np.testing.assert_array_equal(loaded.x_test, x_test)
    np.testing.assert_array_equal(loaded.y_test, y_test)


# -- CIFAR-10: what loads -------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar_folder_loads_exactly(tmp_path, style):
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", style=style)
    _assert_cifar(load_cifar10(folder))


def test_cifar_parent_folder_loads(tmp_path):
    write_cifar_folder(tmp_path / "cifar-10-batches-py", per_batch=7, test=9, seed=3)
    _assert_cifar(load_cifar10(tmp_path), per_batch=7, test=9, seed=3)


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar_archive_loads_in_place(tmp_path, style):
    archive = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", style=style)
    _assert_cifar(load_cifar10(archive))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


def test_py2_batch_matches_what_stock_pickle_reads():
    # The hand-written Python 2 opcodes must mean what the published files mean to pickle.
    x, y = synthetic_images(5)
    raw = cifar_batch_bytes(x, y, style="py2")
    stock = pickle.loads(raw, encoding="bytes")
    safe = safe_load_cifar_batch(io.BytesIO(raw), "batch")
    assert sorted(safe) == sorted(stock) == [b"batch_label", b"data", b"filenames", b"labels"]
    np.testing.assert_array_equal(safe[b"data"], stock[b"data"])
    assert safe[b"labels"] == stock[b"labels"] and safe[b"filenames"] == stock[b"filenames"]


def test_cifar_str_keys_and_wider_integer_data_load(tmp_path):
    folder = write_cifar_folder(tmp_path / "c")
    x, y = synthetic_images(4, seed=9)
    batch = {"batch_label": "b", "labels": y.tolist(), "data": x.reshape(4, -1).astype(np.int64)}
    (folder / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    loaded = load_cifar10(folder)
    np.testing.assert_array_equal(loaded.x_train[20:24], x)


# -- CIFAR-10: what is refused --------------------------------------------------------------------


def test_cifar_missing_path(tmp_path):
    _refused(lambda: load_cifar10(tmp_path / "nowhere"), tmp_path / "nowhere")


@pytest.mark.parametrize("missing", ["data_batch_3", "test_batch"])
def test_cifar_folder_missing_batch(tmp_path, missing):
    folder = write_cifar_folder(tmp_path / "c")
    (folder / missing).unlink()
    _refused(lambda: load_cifar10(folder), folder, missing, "data.path")


def test_cifar_archive_missing_batch(tmp_path):
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = cifar_batch_bytes(*synthetic_images(2))
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    _refused(lambda: load_cifar10(archive), archive, "data_batch_2")


def test_cifar_not_an_archive(tmp_path):
    bogus = tmp_path / "cifar.tar.gz"
    bogus.write_bytes(b"this is not a tar file" * 100)
    _refused(lambda: load_cifar10(bogus), bogus)


def _batch(override=None, n=5) -> dict:
    """A small batch dict as the published files hold it, with entries replaced by
    ``override``."""
    x, y = synthetic_images(n)
    batch = {b"batch_label": b"x", b"labels": y.tolist(), b"data": x.reshape(n, -1)}
    batch.update(override or {})
    return batch


def _with_batch(tmp_path, raw: bytes, name="data_batch_2") -> tuple[Path, Path]:
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py")
    (folder / name).write_bytes(raw)
    return folder, folder / name


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],
        lambda raw: raw[:40],
        lambda raw: b"",
        lambda raw: np.random.default_rng(5).bytes(3000),
        lambda raw: b"\x80\x02" + b"\xff" * 100,
        lambda raw: raw[:-1],
    ],
    ids=["half", "header-only", "empty", "random", "bad-opcode", "no-stop"],
)
def test_cifar_damaged_batch(tmp_path, damage):
    raw = cifar_batch_bytes(*synthetic_images(20))
    folder, file = _with_batch(tmp_path, damage(raw))
    message = _refused(lambda: load_cifar10(folder), file)
    assert "damaged" in message or "asks to load" in message or "not a CIFAR-10" in message


def test_cifar_damaged_archive(tmp_path):
    archive = write_cifar_tar(tmp_path / "c.tar.gz")
    raw = archive.read_bytes()
    archive.write_bytes(raw[: len(raw) // 2])
    _refused(lambda: load_cifar10(archive), archive)


@pytest.mark.parametrize("label", [10, -1, 255])
def test_cifar_label_out_of_range(tmp_path, label):
    labels = [0, 1, label, 3, 4]
    folder, file = _with_batch(tmp_path, pickle.dumps(_batch({b"labels": labels}), protocol=2))
    message = _refused(lambda: load_cifar10(folder), file, f"label {label}")
    assert "0..9" in message


def test_cifar_labels_and_images_disagree(tmp_path):
    batch = _batch({b"labels": [1, 2, 3]})
    folder, file = _with_batch(tmp_path, pickle.dumps(batch, protocol=2))
    _refused(lambda: load_cifar10(folder), file, "5 images but 3 labels")


def test_cifar_wrong_row_length(tmp_path):
    batch = _batch({b"data": np.zeros((5, 100), np.uint8)})
    folder, file = _with_batch(tmp_path, pickle.dumps(batch, protocol=2))
    _refused(lambda: load_cifar10(folder), file, "'data'", "3072")


def test_cifar_lossy_float_data_refused(tmp_path):
    batch = _batch({b"data": np.full((5, 3072), 0.5)})
    folder, file = _with_batch(tmp_path, pickle.dumps(batch, protocol=2))
    _refused(lambda: load_cifar10(folder), file, "0..255")


def test_cifar_missing_labels_key(tmp_path):
    batch = _batch()
    batch[b"fine_labels"] = batch.pop(b"labels")
    folder, file = _with_batch(tmp_path, pickle.dumps(batch, protocol=2))
    _refused(lambda: load_cifar10(folder), file, "'labels'", "CIFAR-100")


class _OpensFile:
    """Unpickling this opens (creates) ``path`` for writing."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class _RunsShell:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_cifar_batch_that_would_create_a_file(tmp_path):
    victim = tmp_path / "created_by_pickle"
    raw = pickle.dumps(_batch({b"batch_label": _OpensFile(victim)}), protocol=2)
    # The payload is real: a plain unpickler does create the file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_OpensFile(probe), protocol=2)).close()
    assert probe.exists()

    folder, file = _with_batch(tmp_path, raw)
    message = _refused(lambda: load_cifar10(folder), file, "asks to load io.open")
    assert "not a CIFAR-10 batch" in message
    assert not victim.exists()


@pytest.mark.skipif(os.name != "posix", reason="os.system pickles as posix.system")
def test_cifar_batch_that_would_run_a_shell(tmp_path):
    marker = tmp_path / "touched"
    raw = pickle.dumps(_batch({b"labels": _RunsShell(f"touch '{marker}'")}), protocol=2)
    folder, file = _with_batch(tmp_path, raw, name="test_batch")
    _refused(lambda: load_cifar10(folder), file, "asks to load posix.system")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "target"),
    [
        (_Evaluates(), "__builtin__.eval"),
        (collections.OrderedDict(a=1), "collections.OrderedDict"),
        (_OpensFile("/nonexistent/x"), "io.open"),
        ({1, 2}, "__builtin__.set"),
        (bytearray(b"ab"), "__builtin__.bytearray"),
    ],
    ids=["eval", "OrderedDict", "open", "set", "bytearray"],
)
def test_cifar_unexpected_objects_refused(tmp_path, payload, target):
    # Protocol 2 names builtins by their Python 2 module, __builtin__; the error quotes the file.
    raw = pickle.dumps(_batch({b"filenames": payload}), protocol=2)
    folder, file = _with_batch(tmp_path, raw)
    _refused(lambda: load_cifar10(folder), file, f"asks to load {target}")


def test_user_class_refused():
    raw = pickle.dumps(_batch({b"batch_label": _RunsShell}), protocol=2)
    _refused(lambda: safe_load_cifar_batch(io.BytesIO(raw), "b1"), "b1", "_RunsShell")


def test_object_arrays_refused():
    raw = pickle.dumps(_batch({b"data": np.array([b"x", 1], dtype=object)}), protocol=2)
    _refused(
        lambda: safe_load_cifar_batch(io.BytesIO(raw), "b1"),
        "b1",
        "'O8'",
        "not a plain number type",
    )


def test_structured_dtype_refused():
    records = np.zeros(3, dtype=[("a", "u1"), ("b", "i4")])
    raw = pickle.dumps(_batch({b"data": records}), protocol=2)
    _refused(lambda: safe_load_cifar_batch(io.BytesIO(raw), "b1"), "b1", "damaged")


def test_array_reconstruction_cannot_allocate():
    # _reconstruct(ndarray, (10**12,), b"b") and ndarray((10**12,)) would each allocate a TB.
    big = b"\x8a\x06\x00\x10\xa5\xd4\xe8\x00"  # LONG1 10**12
    calls = [
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + big + b"\x85U\x01b\x87R.",
        b"cnumpy\nndarray\n" + big + b"\x85\x85R.",
        b"c__builtin__\nbytes\n" + big + b"\x85R.",
    ]
    for call in calls:
        start = time.perf_counter()
        _refused(lambda c=call: safe_load_cifar_batch(io.BytesIO(b"\x80\x02" + c), "b1"), "b1")
        assert time.perf_counter() - start < 1


def test_array_state_must_match_its_bytes():
    raw = pickle.dumps(_batch(), protocol=2)
    # Claim 500 rows for the 5 rows of pixels the pickle really holds.
    forged = raw.replace(b"K\x05M\x00\x0c\x86", b"M\xf4\x01M\x00\x0c\x86", 1)
    assert forged != raw
    _refused(lambda: safe_load_cifar_batch(io.BytesIO(forged), "b1"), "b1", "damaged")


def test_persistent_ids_refused():
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "external" if isinstance(obj, str) and obj == "ext" else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(_batch({b"batch_label": "ext"}))
    _refused(lambda: safe_load_cifar_batch(io.BytesIO(buffer.getvalue()), "b1"), "b1", "external")


def test_cifar_oversized_batch_refused_before_reading(tmp_path):
    folder = write_cifar_folder(tmp_path / "c")
    _refused(lambda: load_cifar10(folder, max_bytes=1000), folder / "data_batch_1", "kB")
    archive = write_cifar_tar(tmp_path / "c.tar.gz")
    _refused(lambda: load_cifar10(archive, max_bytes=1000), archive, "data_batch_1")


def test_cifar_archive_escaping_members_ignored(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    absolute = tmp_path / "abs_escape"
    payload = cifar_batch_bytes(*synthetic_images(3))
    archive = write_cifar_tar(
        downloads / "cifar-10-python.tar.gz",
        extra_members=[
            ("../escape", b"escaped"),
            ("cifar-10-batches-py/../../escape", b"escaped"),
            (str(absolute), b"escaped"),
            ("../data_batch_1", payload),  # a batch name outside the folder is not used either
        ],
    )
    with tarfile.open(archive) as tar:
        assert {"../escape", str(absolute)} <= set(tar.getnames())
    _assert_cifar(load_cifar10(archive))
    for place in (tmp_path, downloads, cwd, cwd.parent):
        assert not (place / "escape").exists()
    assert not absolute.exists()
    assert sorted(p.name for p in downloads.iterdir()) == ["cifar-10-python.tar.gz"]
    assert list(cwd.iterdir()) == []


def test_cifar_archive_links_are_not_batches(tmp_path):
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        for name in CIFAR_BATCHES:
            link = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            link.type = tarfile.SYMTYPE
            link.linkname = "/etc/passwd"
            tar.addfile(link)
    _refused(lambda: load_cifar10(archive), archive, "data_batch_1")


# -- MNIST ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_loads_exactly(tmp_path, gz):
    folder = write_mnist(tmp_path / "mnist", gz=gz, seed=4)
    loaded = load_mnist(folder)
    x_train, y_train, x_test, y_test = synthetic_mnist(seed=4)
    assert loaded.name == "mnist" and loaded.n_classes == 10
    assert loaded.x_train.shape == (60, 1, 28, 28) and loaded.x_train.dtype == np.uint8
    assert loaded.x_test.shape == (20, 1, 28, 28) and loaded.y_test.dtype == np.int64
    assert loaded.image_shape == (1, 28, 28) and loaded.n_features == 784
    np.testing.assert_array_equal(loaded.x_train, x_train)
    np.testing.assert_array_equal(loaded.y_train, y_train)
    np.testing.assert_array_equal(loaded.x_test, x_test)
    np.testing.assert_array_equal(loaded.y_test, y_test)


def test_mnist_mixed_plain_and_gz(tmp_path):
    folder = write_mnist(tmp_path / "m")
    stem = MNIST_NAMES["test images"]
    (folder / f"{stem}.gz").write_bytes(gzip.compress((folder / stem).read_bytes()))
    (folder / stem).unlink()
    assert load_mnist(folder).x_test.shape == (20, 1, 28, 28)


def test_mnist_missing_file(tmp_path):
    folder = write_mnist(tmp_path / "m")
    (folder / MNIST_NAMES["train labels"]).unlink()
    _refused(lambda: load_mnist(folder), folder, MNIST_NAMES["train labels"])
    _refused(lambda: load_mnist(tmp_path / "none"), tmp_path / "none")


def _replace(folder: Path, what: str, data: bytes, gz=False) -> Path:
    file = folder / (MNIST_NAMES[what] + (".gz" if gz else ""))
    file.write_bytes(gzip.compress(data) if gz else data)
    return file


def test_mnist_wrong_magic(tmp_path):
    folder = write_mnist(tmp_path / "m")
    labels = (folder / MNIST_NAMES["train labels"]).read_bytes()
    file = _replace(folder, "train images", labels)
    _refused(lambda: load_mnist(folder), file, "not an IDX image file", "0x00000801")


def test_mnist_counts_disagree(tmp_path):
    folder = write_mnist(tmp_path / "m")
    _replace(folder, "train labels", idx_bytes(np.arange(59) % 10))
    _refused(lambda: load_mnist(folder), folder, "train images 60 ", "but train labels 59")


def test_mnist_label_out_of_range(tmp_path):
    folder = write_mnist(tmp_path / "m")
    labels = np.arange(20) % 10
    labels[7] = 12
    file = _replace(folder, "test labels", idx_bytes(labels))
    _refused(lambda: load_mnist(folder), file, "label 12", "item 7")


def _header(n, rows=28, cols=28) -> bytes:
    return struct.pack(">4I", 0x803, n, rows, cols)


def test_mnist_gz_header_claiming_too_much_refused_before_allocating(tmp_path):
    folder = write_mnist(tmp_path / "m", gz=True)
    file = _replace(folder, "train images", _header(2**31 - 1) + b"\0" * 784, gz=True)
    start = time.perf_counter()
    _refused(lambda: load_mnist(folder), file, "2,147,483,647 images of 28×28", "memory")
    assert time.perf_counter() - start < 2


def test_mnist_plain_header_claiming_more_than_the_file(tmp_path):
    folder = write_mnist(tmp_path / "m")
    file = _replace(folder, "train images", _header(2**31 - 1) + b"\0" * 784)
    promised = 16 + (2**31 - 1) * 784
    _refused(lambda: load_mnist(folder), file, "is short", f"{promised:,}", "holds 800")


def test_mnist_max_bytes(tmp_path):
    folder = write_mnist(tmp_path / "m", gz=True)
    _refused(lambda: load_mnist(folder, max_bytes=1000), MNIST_NAMES["train images"], "60 images")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_trailing_bytes(tmp_path, gz):
    folder = write_mnist(tmp_path / "m", gz=gz)
    data = idx_bytes(synthetic_mnist()[0][:, 0]) + b"\0" * 5
    file = _replace(folder, "train images", data, gz=gz)
    _refused(lambda: load_mnist(folder), file, "trailing bytes")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_short_file(tmp_path, gz):
    folder = write_mnist(tmp_path / "m", gz=gz)
    data = idx_bytes(synthetic_mnist()[0][:, 0])[:-100]
    file = _replace(folder, "train images", data, gz=gz)
    promised = 16 + 60 * 784
    _refused(lambda: load_mnist(folder), file, "is short", f"{promised:,}", f"{promised - 100:,}")


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_mnist_short_header(tmp_path, gz):
    folder = write_mnist(tmp_path / "m", gz=gz)
    file = _replace(folder, "test labels", struct.pack(">I", 0x801), gz=gz)
    _refused(lambda: load_mnist(folder), file, "is short")


def test_mnist_truncated_gzip_stream(tmp_path):
    folder = write_mnist(tmp_path / "m", gz=True)
    file = folder / (MNIST_NAMES["train images"] + ".gz")
    file.write_bytes(file.read_bytes()[:-30])
    _refused(lambda: load_mnist(folder), file)


def test_mnist_not_gzip(tmp_path):
    folder = write_mnist(tmp_path / "m", gz=True)
    file = folder / (MNIST_NAMES["train images"] + ".gz")
    file.write_bytes(b"plain bytes, no gzip")
    _refused(lambda: load_mnist(folder), file)


# -- shared pieces -------------------------------------------------------------------------------


def test_available_memory_is_positive():
    assert available_memory_bytes() > 0


def test_check_allocation_message(monkeypatch):
    monkeypatch.setattr(images_module, "available_memory_bytes", lambda: 20_100_000_000)
    check_allocation(1000, "small", "file f")
    message = _refused(
        lambda: check_allocation(784 * 10**12, "header claims 10**12 images", "IDX file f"),
        "IDX file f",
        "784.0 TB",
        "20.1 GB of available memory",
    )
    assert message.startswith("IDX file f: header claims")


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_synthetic_images_are_learnable(shape):
    # A linear softmax model after 100 SGD steps: far below the 90% error of chance.
    x, y = synthetic_images(200, shape=shape, seed=0)
    xt, yt = synthetic_images(100, shape=shape, seed=1)
    assert set(y.tolist()) == set(range(10))
    x = x.reshape(len(x), -1) / 255.0
    xt = xt.reshape(len(xt), -1) / 255.0
    mean = x.mean(axis=0)
    x, xt = x - mean, xt - mean
    w, b = np.zeros((x.shape[1], 10)), np.zeros(10)
    rng = np.random.default_rng(0)
    for _ in range(100):
        idx = rng.integers(0, len(x), 32)
        z = x[idx] @ w + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(32), y[idx]] -= 1
        w -= 0.05 * x[idx].T @ p / 32
        b -= 0.05 * p.mean(axis=0)
    error = np.mean((xt @ w + b).argmax(axis=1) != yt)
    assert error < 0.2


def test_cifar_archive_in_published_member_order(tmp_path):
    # cifar-10-python.tar.gz stores the batches out of name order, with other files between.
    folder = write_cifar_folder(tmp_path / "cifar-10-batches-py", style="py2")
    order = ["data_batch_4", "test_batch", "data_batch_3", "batches.meta", "data_batch_2"]
    order += ["data_batch_5", "data_batch_1"]
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in order:
            tar.add(folder / name, arcname=f"cifar-10-batches-py/{name}")
    _assert_cifar(load_cifar10(archive))
