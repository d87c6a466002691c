"""HDF5 checkpoints: the format of one file (docs/CHECKPOINT.md), atomic save, validated load,
inspect. Which files a run folder holds, their numbers and pruning are rundir.py's.

A checkpoint is plain HDF5 (h5dump and HDFView open it; no pickles anywhere). It holds the
center, the flat layout, the resolved config as TOML text, global counters and every worker's
state at the cut (workerstate.py: counters, generator words, the rows x and v or DOWNPOUR's
pending row unless ``checkpoint.worker_states = false``, each state's age), the trainable size,
a model's local tensors, and the metrics so far. A SHA-256 over every stored array and the config
is checked on load.

Files are written to a temporary name in the same folder, flushed, fsynced and renamed over the
target, then the folder is fsynced: a crash at any point leaves either the old set of
checkpoints or the new one, never a half-written file under a checkpoint name.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import CheckpointError, os_reason
from .flat import Layout
from .workerstate import COUNTERS, ROW_NAMES, UserState, WorkerStates, encode_rng

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointData",
    "save_checkpoint",
    "load_checkpoint",
    "check_matches",
    "summarize",
    "format_summary",
]

FORMAT_NAME = "easgd-mpi checkpoint"
FORMAT_VERSION = 2
#: The version of a file that holds a user loop's worker states (``/workers/user``): older
#: readers refuse it by its version instead of failing its checksum.
USER_STATE_VERSION = 3
#: Versions this code reads (1: generator states as JSON text; 2: as int64 words; 3: 2 with
#: the user loop's states).
READABLE_VERSIONS = (1, 2, 3)


@dataclass
class CheckpointData:
    """Everything a run needs to continue, as host arrays and plain values."""

    config_toml: str
    algorithm: str
    layout: Layout
    center: np.ndarray  # float32 [n]
    #: Every worker's state at the checkpoint's cut (workerstate.py): counters, generator
    #: words and, when ``checkpoint.worker_states`` keeps them, the named rows x, v, pending.
    states: WorkerStates
    #: Run-wide counters: wall_time (s of training so far), sequence (checkpoint number).
    wall_time: float = 0.0
    sequence: int = 0
    #: Metrics records so far (each a dict of numbers).
    metrics: list[dict] = field(default_factory=list)
    created: str = ""
    #: Where the trainable prefix of the flat vector ends (PyTorch models: the buffers that
    #: follow are averaged, never stepped); None = the whole vector is trainable.
    trainable_size: int | None = None
    #: Tensors a model keeps per process instead of averaging (a PyTorch module's integer
    #: buffers, e.g. BatchNorm's num_batches_tracked), as the master holds them.
    local_tensors: dict[str, np.ndarray] = field(default_factory=dict)
    #: The format version of the file it was read from (what a save writes otherwise).
    format_version: int = FORMAT_VERSION
    #: The center-side vectors of a rule whose center keeps state (``Config.center_rows``:
    #: momentum, Adagrad sums, moving average, outer optimizer state): name → float32 [n].
    center_state: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def workers(self) -> int:
        return self.states.p

    @property
    def total_steps(self) -> int:
        return int(self.states.counters["steps"].sum())

    @property
    def total_exchanges(self) -> int:
        return int(self.states.counters["exchanges"].sum())


# ---------------------------------------------------------------------------------------------
# Save


def save_checkpoint(path: str | os.PathLike, data: CheckpointData) -> Path:
    """Write ``data`` atomically to ``path``; returns the path.

    A write that fails (disk full, quota, file-size limit, I/O error, folder removed) raises a
    :class:`CheckpointError` naming the file and the system's reason ("No space left on
    device"), and leaves nothing under the temporary name. HDF5 writes through a Python file
    object (:class:`_Sink`): the system's error reaches us as it was (writing to a path, h5py
    reports some as a RuntimeError about something else, after HDF5's own tracebacks), HDF5
    never sees it fail, and the descriptor is ours to close, so a failed attempt gives its disk
    space back at once.
    """
    import h5py  # noqa: PLC0415

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    reason = None
    with _quiet_hdf5():
        sink = None
        try:
            sink = _Sink(tmp)
            with h5py.File(sink, "w", libver=("earliest", "v110")) as f:  # HDF5 1.10 tools
                _write(f, data)
                f.flush()
            sink.sync()  # h5py has no fsync: make the bytes durable ourselves
            if sink.error is not None:
                raise sink.error
            sink.close()
            os.replace(tmp, path)
        except BaseException as exc:  # cleaned up here; a system error is reported below
            found = sink.error if sink is not None and sink.error is not None else exc
            if sink is not None:
                sink.abandon()
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if not isinstance(found, OSError):
                raise  # not a failed write: a bug, or an interrupt
            reason = os_reason(found)
        if reason is not None:
            gc.collect()  # HDF5 objects of the failed file close here, where nothing prints
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} could not be written: {reason}")
    _fsync_dir(path.parent)
    return path


class _Sink:
    """The file HDF5 writes, as a Python file object that never fails under HDF5.

    The first system error is kept and from then on the file is only pretended: writes are
    counted, not made; reads give zeros. HDF5 so finishes and closes the file on its normal
    path; its error paths are never taken (a write error there can leave it printing
    tracebacks, or crash it, long after the file is gone). The caller looks at :attr:`error`.
    """

    def __init__(self, path: Path):
        self.error: OSError | None = None
        self._fh = open(path, "wb+", buffering=0)  # noqa: SIM115 - closed by close/abandon
        self._pos = 0
        self._end = 0

    def _failed(self, exc: OSError) -> None:
        if self.error is None:
            self.error = exc

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        if self.error is None:
            try:
                while view:  # a regular file writes short only at the limit: then it raises
                    view = view[self._fh.write(view) :]
            except OSError as exc:
                self._failed(exc)
        self._pos += size
        self._end = max(self._end, self._pos)
        return size

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._end}[whence]
        self._pos = base + offset
        if self.error is None:
            try:
                self._fh.seek(self._pos)
            except OSError as exc:
                self._failed(exc)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        got = 0
        if self.error is None:
            try:
                got = self._fh.readinto(view) or 0
            except OSError as exc:
                self._failed(exc)
        view[got:] = bytes(len(view) - got)  # past the end (or pretended): zeros, as HDF5 expects
        self._pos += len(view)
        if got != len(view):
            self.seek(self._pos)
        return len(view)

    def read(self, size: int = -1) -> bytes:
        size = max(0, self._end - self._pos) if size is None or size < 0 else size
        buffer = bytearray(size)
        self.readinto(buffer)
        return bytes(buffer)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                self._fh.truncate(size)
            except OSError as exc:
                self._failed(exc)
        self._end = size
        return size

    def flush(self) -> None:
        pass  # unbuffered: every write is with the system already

    def sync(self) -> None:
        if self.error is None:
            try:
                os.fsync(self._fh.fileno())
            except OSError as exc:
                self._failed(exc)

    def close(self) -> None:
        self._fh.close()

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()


@contextlib.contextmanager
def _quiet_hdf5():
    """No HDF5 diagnostics on stderr from a failed write: HDF5's automatic error printing off in
    this thread (h5py does it at import, for the importing thread only), and the "Exception
    ignored" lines of h5py objects that cannot close a failed file dropped."""
    import h5py  # noqa: PLC0415

    with contextlib.suppress(AttributeError, RuntimeError):
        h5py._errors.silence_errors()
    previous = sys.unraisablehook

    def hook(unraisable):
        if "h5py" not in repr(unraisable.object) and "h5py" not in repr(unraisable.exc_value):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


def _write(f, d: CheckpointData) -> None:
    import h5py  # noqa: PLC0415

    text = h5py.string_dtype("utf-8")
    f.attrs["format"] = FORMAT_NAME
    f.attrs["format_version"] = FORMAT_VERSION if d.states.user is None else USER_STATE_VERSION
    f.attrs["created"] = d.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    f.attrs["algorithm"] = d.algorithm
    f.attrs["workers"] = d.workers
    f.attrs["sequence"] = d.sequence
    f.attrs["wall_time"] = d.wall_time
    f.attrs["total_steps"] = d.total_steps
    f.attrs["total_exchanges"] = d.total_exchanges
    f.create_dataset("config", data=d.config_toml, dtype=text)

    lay = f.create_group("layout")
    lay.attrs["size"] = d.layout.size
    lay.create_dataset("names", data=np.array(d.layout.names, dtype=object), dtype=text)
    lay.create_dataset("offsets", data=np.array([s.offset for s in d.layout.specs], np.int64))
    lay.create_dataset("ndims", data=np.array([len(s.shape) for s in d.layout.specs], np.int64))
    lay.create_dataset(
        "dims", data=np.array([x for s in d.layout.specs for x in s.shape], np.int64)
    )
    if d.trainable_size is not None:
        lay.attrs["trainable_size"] = int(d.trainable_size)
    if d.local_tensors:
        local = f.create_group("local_tensors")
        for name, value in d.local_tensors.items():
            local.create_dataset(name, data=np.asarray(value))

    f.create_dataset("center", data=d.center.astype(np.float32, copy=False))
    if d.center_state:
        group = f.create_group("center_state")
        for name, value in d.center_state.items():
            group.create_dataset(name, data=np.asarray(value, np.float32))
    workers = f.create_group("workers")
    states = d.states
    for name in COUNTERS:
        workers.create_dataset(name, data=states.counters[name])
    for name, rows in states.rows.items():
        workers.create_dataset(name, data=rows, chunks=(1, d.layout.size or 1))
    if states.age is not None:
        workers.create_dataset("state_age", data=np.asarray(states.age, np.float64))
    workers.create_dataset("rng", data=states.rng_words)
    if states.user is not None:
        _write_user_states(workers.create_group("user"), states.user, text)

    met = f.create_group("metrics")
    # HDF5 lists members alphabetically; the column order is kept so records read back equal.
    met.attrs["columns"] = json.dumps(_metric_keys(d.metrics))
    for key in _metric_keys(d.metrics):
        met.create_dataset(key, data=np.array([_num(r.get(key)) for r in d.metrics], np.float64))
    f.attrs["checksum_sha256"] = _checksum(d)


def _write_user_states(group, user: list[UserState | None], text) -> None:
    """``/workers/user/<i>``: worker i's structure (JSON text) and its arrays as datasets
    ``0``, ``1``, ... (absent for a worker that has none)."""
    for i, state in enumerate(user):
        if state is None:
            continue
        mine = group.create_group(str(i))
        mine.create_dataset("structure", data=state.structure, dtype=text)
        for k, array in enumerate(state.arrays):
            mine.create_dataset(str(k), data=array)


def _read_user_states(group, p: int, path) -> list[UserState | None]:
    user: list[UserState | None] = [None] * p
    for name, mine in group.items():
        if not name.isdigit() or int(name) >= p:
            raise CheckpointError(f"checkpoint {path}: user state '{name}' names no worker of {p}")
        structure = mine["structure"][()]
        count = sum(1 for key in mine if key.isdigit())
        try:
            user[int(name)] = UserState(
                structure=structure.decode() if isinstance(structure, bytes) else structure,
                arrays=[mine[str(k)][()] for k in range(count)],
            )
        except ValueError as exc:
            raise CheckpointError(
                f"checkpoint {path}: user state of worker {name}: {exc}"
            ) from None
    return user


def _metric_keys(records: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in records:
        keys.extend(
            k for k, v in r.items() if k not in keys and isinstance(v, (int, float, type(None)))
        )
    return keys


def _num(v) -> float:
    # Every NaN is the canonical one: a NaN computed with its sign bit set (x86's default NaN)
    # reads back from HDF5 as "no value" and must hash the same as when it was written.
    if v is None:
        return float("nan")
    v = float(v)
    return float("nan") if v != v else v


def _checksum(d: CheckpointData, rng_text: str | None = None) -> str:
    h = hashlib.sha256()
    h.update(d.config_toml.encode())
    h.update(json.dumps(d.layout.to_records()).encode())
    h.update(np.ascontiguousarray(d.center, np.float32).tobytes())
    states = d.states
    for name in COUNTERS:
        h.update(np.ascontiguousarray(states.counters[name], np.int64).tobytes())
    for name in ("x", "v"):
        arr = states.row(name)
        h.update(b"-" if arr is None else np.ascontiguousarray(arr, np.float32).tobytes())
    # Version 1 stored (and hashed) the generators as JSON text; version 2 as words.
    h.update(rng_text.encode() if rng_text is not None else b"rng:" + states.rng_words.tobytes())
    # Added after format 1 was first written: hashed only when present, so older files verify.
    for name in ("pending", "residual"):
        if states.row(name) is not None:
            h.update(
                f"{name}:".encode() + np.ascontiguousarray(states.row(name), np.float32).tobytes()
            )
    if states.age is not None:
        h.update(b"age:" + np.ascontiguousarray(states.age, np.float64).tobytes())
    if d.trainable_size is not None:
        h.update(f"trainable:{int(d.trainable_size)}".encode())
    for i, state in enumerate(states.user or ()):
        if state is None:
            continue
        h.update(f"user:{i}:".encode() + state.structure.encode())
        for array in state.arrays:
            h.update(f"{array.dtype.str}:{list(array.shape)}".encode())
            h.update(np.ascontiguousarray(array).tobytes())
    for name, value in sorted(d.center_state.items()):  # hashed only when present
        h.update(f"center_state:{name}:".encode())
        h.update(np.ascontiguousarray(value, np.float32).tobytes())
    for name, value in sorted(d.local_tensors.items()):
        value = np.ascontiguousarray(value)
        h.update(f"{name}:{value.dtype.str}:{list(value.shape)}".encode())
        h.update(value.tobytes())
    for key in _metric_keys(d.metrics):
        h.update(key.encode())
        h.update(np.array([_num(r.get(key)) for r in d.metrics], np.float64).tobytes())
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Load


def load_checkpoint(path: str | os.PathLike) -> CheckpointData:
    """Read and validate a checkpoint; every problem is a :class:`CheckpointError` naming it."""
    import h5py  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic != b"\x89HDF\r\n\x1a\n":
        raise CheckpointError(f"checkpoint {path} is not an HDF5 file")
    try:
        with h5py.File(path, "r") as f:
            return _read(f, path)
    except CheckpointError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or damaged ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})"
        ) from None


def _read(f, path: Path) -> CheckpointData:
    if f.attrs.get("format") != FORMAT_NAME:
        raise CheckpointError(f"checkpoint {path} is HDF5 but not an easgd-mpi checkpoint")
    version = int(f.attrs.get("format_version", -1))
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}; this easgd-mpi reads versions "
            + ", ".join(str(v) for v in READABLE_VERSIONS)
        )
    lay = f["layout"]
    names = [n.decode() if isinstance(n, bytes) else n for n in lay["names"][()]]
    ndims, dims = lay["ndims"][()], list(lay["dims"][()])
    shapes, pos = [], 0
    for k in ndims:
        shapes.append(tuple(int(x) for x in dims[pos : pos + k]))
        pos += k
    layout = Layout(zip(names, shapes, strict=True))
    if layout.size != int(lay.attrs["size"]) or [s.offset for s in layout.specs] != list(
        lay["offsets"][()]
    ):
        raise CheckpointError(f"checkpoint {path}: the stored layout is inconsistent")
    workers = f["workers"]
    rng_text = None
    if version == 1:
        texts = [s.decode() if isinstance(s, bytes) else s for s in workers["rng_state"][()]]
        rng_text = "\n".join(texts)
        rng_words = np.stack([_words_of_json(t) for t in texts])
    else:
        rng_words = workers["rng"][()]
    states = WorkerStates(
        counters={name: workers[name][()] for name in COUNTERS},
        rng_words=rng_words,
        rows={name: workers[name][()] for name in ROW_NAMES if name in workers},
        age=workers["state_age"][()] if "state_age" in workers else None,
        user=_read_user_states(workers["user"], len(rng_words), path)
        if "user" in workers
        else None,
    )
    config = f["config"][()]
    metrics_group = f["metrics"]
    columns = {k: metrics_group[k][()] for k in json.loads(metrics_group.attrs["columns"])}
    n_records = len(next(iter(columns.values()))) if columns else 0
    metrics = [
        {k: (None if np.isnan(v[i]) else _int_if_whole(k, v[i])) for k, v in columns.items()}
        for i in range(n_records)
    ]
    data = CheckpointData(
        config_toml=config.decode() if isinstance(config, bytes) else config,
        algorithm=str(f.attrs["algorithm"]),
        layout=layout,
        center=f["center"][()],
        states=states,
        wall_time=float(f.attrs["wall_time"]),
        sequence=int(f.attrs["sequence"]),
        metrics=metrics,
        created=str(f.attrs.get("created", "")),
        trainable_size=int(lay.attrs["trainable_size"]) if "trainable_size" in lay.attrs else None,
        local_tensors={k: v[()] for k, v in f["local_tensors"].items()}
        if "local_tensors" in f
        else {},
        format_version=version,
        center_state={k: v[()] for k, v in f["center_state"].items()}
        if "center_state" in f
        else {},
    )
    if _checksum(data, rng_text) != f.attrs["checksum_sha256"]:
        raise CheckpointError(f"checkpoint {path} failed its checksum: the data is damaged")
    for name, value in data.center_state.items():
        if value.shape != (layout.size,):
            raise CheckpointError(
                f"checkpoint {path}: center_state/{name} has {value.shape[0]} elements, "
                f"layout needs {layout.size}"
            )
    if data.center.shape != (layout.size,):
        raise CheckpointError(
            f"checkpoint {path}: center has {data.center.shape[0]} elements, "
            f"layout needs {layout.size}"
        )
    return data


def _words_of_json(text: str) -> np.ndarray:
    """A version-1 generator state (JSON of numpy's bit_generator.state) as words."""
    rng = np.random.Generator(np.random.PCG64())
    try:
        rng.bit_generator.state = json.loads(text)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"a worker's generator state is not readable ({exc})") from None
    return encode_rng(rng)


_INT_METRICS = {
    "steps",
    "exchanges",
    "bytes",
    "push_bytes",
    "resets",
    "steps_per_worker",
    "step_budget",
    "slowest_rank",
    "slowest_steps",
}


def _int_if_whole(key: str, value) -> float | int:
    return int(value) if key in _INT_METRICS else float(value)


def check_matches(data: CheckpointData, layout: Layout, path) -> None:
    """The checkpoint must fit the model the config builds: same tensors, shapes, order."""
    if data.layout == layout:
        return
    stored = {s.name: s.shape for s in data.layout.specs}
    wanted = {s.name: s.shape for s in layout.specs}
    for name, shape in wanted.items():
        if name not in stored:
            raise CheckpointError(
                f"checkpoint {path} has no tensor '{name}' that the model "
                f"needs (it has {', '.join(stored)})"
            )
        if stored[name] != shape:
            raise CheckpointError(
                f"checkpoint {path}: tensor '{name}' has shape "
                f"{list(stored[name])}, the model needs {list(shape)}"
            )
    extra = [n for n in stored if n not in wanted]
    raise CheckpointError(
        f"checkpoint {path} does not match the model: extra tensors "
        f"{', '.join(extra) or '(order differs)'}"
    )


# ---------------------------------------------------------------------------------------------
# Inspect


def summarize(data: CheckpointData, path=None) -> dict:
    """What ``easgd inspect`` shows, as plain JSON-able values."""
    tensors = []
    trainable = data.layout.size if data.trainable_size is None else data.trainable_size
    for spec in data.layout.specs:
        part = data.center[spec.offset : spec.offset + spec.size].astype(np.float64)
        tensors.append(
            {
                "name": spec.name,
                "shape": list(spec.shape),
                "offset": spec.offset,
                "kind": "parameter" if spec.offset < trainable else "averaged buffer",
                "norm": float(np.linalg.norm(part)) if part.size else 0.0,
                "min": float(part.min()) if part.size else None,
                "max": float(part.max()) if part.size else None,
            }
        )
    distances = None
    states = data.states
    if states.row("x") is not None:
        distances = [
            float(np.linalg.norm(states.row("x")[i].astype(np.float64) - data.center))
            for i in range(data.workers)
        ]
    return {
        "file": str(path) if path else None,
        "format": FORMAT_NAME,
        "format_version": data.format_version,
        "created": data.created,
        "algorithm": data.algorithm,
        "workers": data.workers,
        "sequence": data.sequence,
        "counters": {
            "steps": data.total_steps,
            "exchanges": data.total_exchanges,
            "resets": int(states.counters["resets"].sum()),
            "wall_time": data.wall_time,
            "per_worker": {k: [int(v) for v in states.counters[k]] for k in COUNTERS},
        },
        "parameters": data.layout.size,
        "center_norm": float(np.linalg.norm(data.center.astype(np.float64))),
        "tensors": tensors,
        "local_tensors": {
            k: {"dtype": str(np.asarray(v).dtype), "shape": list(np.shape(v))}
            for k, v in data.local_tensors.items()
        },
        "worker_state": {name: states.row(name) is not None for name in ROW_NAMES},
        "center_state": sorted(data.center_state),
        "worker_state_age": None
        if states.age is None
        else [round(float(a), 3) for a in states.age],
        "worker_center_distance": distances,
        # A user loop's own states (optimizer, schedules, ...): bytes of each, None where none.
        "user_states": None
        if states.user is None
        else [None if u is None else u.nbytes for u in states.user],
        "last_metrics": data.metrics[-1] if data.metrics else None,
        "metrics_records": len(data.metrics),
        "config": data.config_toml,
    }


def format_summary(s: dict) -> str:
    c = s["counters"]
    lines = [
        f"{s['file']}: {s['format']} version {s['format_version']}, written {s['created']}",
        f"algorithm {s['algorithm']}, {s['workers']} workers, checkpoint #{s['sequence']}",
        f"counters: {c['steps']:,d} worker steps, {c['exchanges']:,d} exchanges, "
        f"{c['resets']} non-finite resets, {c['wall_time']:.1f}s of training",
        "  per worker steps: " + ", ".join(f"{v:,d}" for v in c["per_worker"]["steps"]),
        f"center: {s['parameters']:,d} parameters, norm {s['center_norm']:.6g}",
    ]
    if s.get("center_state"):
        lines.append("center-side state: " + ", ".join(s["center_state"]))
    # Module names (features.0.weight) are longer than the built-in ones (w0): fit the widest.
    width = max(
        [16, *(len(t["name"]) + (1 if t.get("kind") != "parameter" else 0) for t in s["tensors"])]
    )
    lines.append(f"  {'tensor':<{width}} {'shape':<18} {'norm':>12} {'min':>12} {'max':>12}")
    for t in s["tensors"]:
        lo = "-" if t["min"] is None else f"{t['min']:.5g}"
        hi = "-" if t["max"] is None else f"{t['max']:.5g}"
        name = t["name"] + ("*" if t.get("kind") == "averaged buffer" else "")
        lines.append(
            f"  {name:<{width}} {str(t['shape']):<18} {t['norm']:>12.6g} {lo:>12} {hi:>12}"
        )
    if any(t.get("kind") == "averaged buffer" for t in s["tensors"]):
        lines.append("  * a buffer (averaged with the center, never stepped)")
    for name, info in s.get("local_tensors", {}).items():
        lines.append(f"  {name}: {info['dtype']} {info['shape']}, kept per process (not averaged)")
    if s["worker_center_distance"] is not None:
        lines.append(
            "worker-to-center distance: "
            + ", ".join(f"{d:.5g}" for d in s["worker_center_distance"])
        )
    else:
        lines.append("worker states: not stored")
    user = s.get("user_states")
    if user is not None:
        saved = [b for b in user if b is not None]
        lines.append(
            f"workers' own states (your loop: optimizer, schedules, sampler, ...): "
            f"{len(saved)} of {len(user)} saved"
            + (f", {max(saved) / 1024:.1f} KiB at most" if saved else "")
        )
    ages = s.get("worker_state_age")
    if ages is not None:
        lines.append("age of each worker's saved state (s): " + ", ".join(f"{a:.2f}" for a in ages))
    last = s["last_metrics"]
    if last:
        lines.append(
            f"last metrics ({s['metrics_records']} records): "
            + ", ".join(
                f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()
            )
        )
    lines.append("config:")
    lines.extend("  " + ln for ln in s["config"].rstrip().splitlines())
    return "\n".join(lines)
