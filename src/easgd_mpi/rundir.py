"""The run folder: the one module that names, creates and deletes the files of a run's folder.

A run folder (docs/CHECKPOINT.md, "The run folder") holds one run, which may span several
segments (a preempted job resumed with ``--resume auto``):

- ``config.toml``: the resolved config (written atomically, the text comes from the caller);
- ``metrics.jsonl``: the metrics records (:class:`~easgd_mpi.metrics.MetricsLog` writes them;
  this module decides the path and whether a run may start the file);
- ``checkpoint-NNNNNN.h5``: the checkpoints, numbered above every one already in the folder
  (:mod:`easgd_mpi.checkpoint` knows the format of one file, nothing about folders);
- ``PREEMPTED`` / ``COMPLETED``: how the newest segment ended;
- ``center.pt``: a user's own loop's center as a PyTorch ``state_dict``, left at its end
  (:meth:`RunFolder.write_center`; easgd_mpi.torch);
- ``easgd.lock``: the lock of the run that uses the folder (:mod:`easgd_mpi.runlock`).

Nothing a finished run left is deleted by a new run: a run that does not resume refuses a folder
that holds another run's checkpoints, metrics or markers. :class:`RunFolder` is the master's
open folder; the module functions are for read-only users (resume, inspect, export).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from .checkpoint import CheckpointData, load_checkpoint, save_checkpoint
from .errors import CheckpointError, ConfigError, RunFolderError, os_reason
from .metrics import MetricsLog
from .runlock import acquire as lock_folder

__all__ = [
    "CONFIG_NAME",
    "METRICS_NAME",
    "CENTER_NAME",
    "PREEMPTED",
    "COMPLETED",
    "Start",
    "RunFolder",
    "config_path",
    "metrics_path",
    "center_path",
    "checkpoint_path",
    "checkpoint_sequence",
    "list_checkpoints",
    "checkpoint_is_valid",
    "newest_valid_checkpoint",
    "prune_checkpoints",
    "find_checkpoint",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.toml"
METRICS_NAME = "metrics.jsonl"
#: A user loop's center as a ``state_dict`` (run.finish() in easgd_mpi.torch).
CENTER_NAME = "center.pt"
#: Markers of how a run ended; a starting segment clears those of an earlier one.
PREEMPTED = "PREEMPTED"
COMPLETED = "COMPLETED"
_MARKERS = (PREEMPTED, COMPLETED)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)\.h5$")
#: Temporary names a crashed write leaves behind: checkpoint.save_checkpoint's
#: (``.<name>.tmp-<pid>``), this module's config, MetricsLog's rewrite of the metrics and
#: export.py's of the center.
_TEMPORARIES = (
    ".checkpoint-*.h5.tmp-*",
    f".{CONFIG_NAME}.tmp",
    f"{METRICS_NAME}.tmp",
    f".{CENTER_NAME}.tmp-*",
)


def config_path(folder) -> Path:
    return Path(folder) / CONFIG_NAME


def metrics_path(folder) -> Path:
    return Path(folder) / METRICS_NAME


def center_path(folder) -> Path:
    return Path(folder) / CENTER_NAME


# ---------------------------------------------------------------------------------------------
# The master's open folder


class Start(enum.Enum):
    """How a run starts in its folder, which decides what the folder may already hold."""

    #: No resume asked: the folder must hold no other run's checkpoints, metrics or markers.
    NEW = "new"
    #: ``--resume auto`` and the folder holds no checkpoint at all: the first segment of a
    #: preemptible job. A segment that saved nothing (killed before its first checkpoint) can
    #: leave a config and a metrics file: they are started over. A marker means a run ended
    #: here, so its checkpoints were moved away: refused, like a new run.
    FIRST_SEGMENT = "first segment"
    #: Continuing a checkpoint: the folder's metrics are rewritten from the checkpoint's.
    RESUME = "resume"

    @classmethod
    def of(cls, spec, checkpoint: CheckpointData | None) -> Start:
        """The start that a resume ``spec`` (None: no resume) and what it found mean."""
        if checkpoint is not None:
            return cls.RESUME
        return cls.NEW if spec is None else cls.FIRST_SEGMENT


class RunFolder:
    """The folder of the run this process masters, locked until :meth:`release`."""

    def __init__(self, path: Path, lock, start: Start, sequence: int, history, keep: int):
        self.path = path
        self.start = start
        self._lock = lock
        self._keep = keep
        self._sequence = sequence  # the highest number in use: the next checkpoint is above it
        self._history = history

    @classmethod
    def open(cls, cfg, start: Start, resumed: CheckpointData | None = None) -> RunFolder:
        """Create (or reuse) ``cfg.run_dir``, or create ``<cfg.output>/<timestamp>``
        exclusively; lock it; check what it holds against ``start``; clear what an earlier
        segment left (stale temporary files, markers). Every failure is a
        :class:`RunFolderError` naming the folder or file, and leaves the folder unlocked."""
        if (start is Start.RESUME) != (resumed is not None):
            raise ValueError("a resumed run needs its checkpoint, and only a resumed run has one")
        path = _create(cfg)
        lock = lock_folder(path)  # before anything is read or written there
        try:
            existing = list_checkpoints(path)
            _check_start(path, start, existing)
            for pattern in _TEMPORARIES:
                for stale in path.glob(pattern):
                    _change("remove", stale, stale.unlink, missing_ok=True)
            _clear_markers(path)
        except BaseException:
            lock.release()
            raise
        if start is Start.FIRST_SEGMENT:
            log.info(f"easgd: no checkpoint in {path}: starting a new run")
        floor = resumed.sequence if resumed is not None else 0
        sequence = max([floor, *(checkpoint_sequence(p) for p in existing)])
        history = list(resumed.metrics) if resumed is not None else []
        return cls(path, lock, start, sequence, history, cfg.checkpoint.keep)

    @property
    def metrics_path(self) -> Path:
        return metrics_path(self.path)

    def write_config(self, text: str) -> Path:
        """Write ``config.toml`` atomically (a temporary name, then a rename)."""
        target = config_path(self.path)
        tmp = target.with_name(f".{CONFIG_NAME}.tmp")
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise RunFolderError(f"cannot write {target}: {os_reason(exc)}") from None
        return target

    def open_metrics(self) -> MetricsLog:
        """The run's metrics file: a resumed run's holds the checkpoint's records (lines written
        after it are dropped), a new run's starts empty (what a segment that saved nothing
        wrote is started over)."""
        return MetricsLog(self.metrics_path, history=self._history)

    def save_checkpoint(self, data: CheckpointData) -> Path:
        """Write ``data`` as the next checkpoint (its ``sequence`` is the number this folder
        gives it), then keep the newest ``checkpoint.keep`` valid ones. A write that fails
        raises its :class:`CheckpointError`, takes no number (the next try gets the same one)
        and prunes nothing: a failed checkpoint never costs a good one."""
        sequence = self._sequence + 1
        path = save_checkpoint(
            checkpoint_path(self.path, sequence), dataclasses.replace(data, sequence=sequence)
        )
        self._sequence = sequence
        _remember(path, True)  # written atomically, then renamed: good by construction
        try:
            prune_checkpoints(self.path, self._keep)
        except OSError as exc:
            log.warning(
                f"easgd: warning: an older checkpoint ({exc.filename or self.path}) cannot "
                f"be removed: {os_reason(exc)}"
            )
        return path

    def write_center(self, write: Callable[[Path], object]) -> Path:
        """Leave the center as ``center.pt``: ``write(target)`` writes the file (export.py
        writes it atomically); returns its path."""
        target = center_path(self.path)
        write(target)
        return target

    def mark(self, outcome: str) -> None:
        """Leave ``PREEMPTED`` or ``COMPLETED``, and no other marker."""
        if outcome not in _MARKERS:
            raise ValueError(f"a run ends {' or '.join(_MARKERS)}, not {outcome!r}")
        _clear_markers(self.path)
        target = self.path / outcome
        _change("write", target, target.write_text, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")

    def release(self) -> None:
        """Give the folder's lock back (again: nothing)."""
        self._lock.release()


def _create(cfg) -> Path:
    if cfg.run_dir:
        path = Path(cfg.run_dir)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"run folder {path} cannot be created: {os_reason(exc)}") from None
        return path
    base = Path(cfg.output) / time.strftime("%Y%m%d-%H%M%S")
    path, k = base, 1
    while True:  # created exclusively: two runs started in the same second never share one
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            path, k = Path(f"{base}-{k}"), k + 1
        except OSError as exc:
            raise RunFolderError(f"run folder {path} cannot be created: {os_reason(exc)}") from None


def _check_start(path: Path, start: Start, checkpoints: list[Path]) -> None:
    """Refuse a folder that holds what ``start`` must not overwrite (nothing is changed)."""
    if start is Start.RESUME:
        return
    markers = [name for name in _MARKERS if (path / name).exists()]
    found = ([f"{len(checkpoints)} checkpoint file(s)"] if checkpoints else []) + markers
    if start is Start.NEW and metrics_path(path).exists():
        found.append(METRICS_NAME)
    if start is Start.FIRST_SEGMENT and markers and not checkpoints:
        raise RunFolderError(
            f"run folder {path} holds a run that ended ({', '.join(markers)}) but no checkpoint "
            f"to resume it from: choose another folder (run_dir)"
        )
    if found:
        raise RunFolderError(
            f"run folder {path} holds another run's files ({', '.join(found)}): resume that run "
            f"(--resume auto) or choose another folder (run_dir)"
        )


def _clear_markers(path: Path) -> None:
    for name in _MARKERS:
        target = path / name
        _change("remove", target, target.unlink, missing_ok=True)


def _change(action: str, target: Path, do, *args, **kwargs) -> None:
    """One change to the folder; a failure is one line naming the file and the reason."""
    try:
        do(*args, **kwargs)
    except OSError as exc:
        raise RunFolderError(f"cannot {action} {target}: {os_reason(exc)}") from None


# ---------------------------------------------------------------------------------------------
# Checkpoints in a folder (read-only users too)


def checkpoint_path(folder, sequence: int) -> Path:
    return Path(folder) / f"checkpoint-{sequence:06d}.h5"


def checkpoint_sequence(path) -> int:
    """The sequence number in a checkpoint's file name (checkpoint-000012.h5 → 12)."""
    match = _CHECKPOINT.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not named like a checkpoint (checkpoint-NNNNNN.h5)")
    return int(match.group(1))


def list_checkpoints(folder) -> list[Path]:
    """Checkpoint files of a run folder, oldest first (by sequence number)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


#: Verdicts on checkpoint files already checked by this process: path → (size, mtime_ns, ok).
#: One cache for the process: what resume found damaged is not reported again by pruning.
_VERDICTS: dict[Path, tuple[int, int, bool]] = {}


def _remember(path: Path, ok: bool) -> None:
    try:
        st = path.stat()
    except OSError:
        return
    _VERDICTS[Path(path)] = (st.st_size, st.st_mtime_ns, ok)


def checkpoint_is_valid(path) -> bool:
    """Whether ``path`` loads and passes its checksum (cached per file version)."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return False
    known = _VERDICTS.get(path)
    if known is not None and known[:2] == (st.st_size, st.st_mtime_ns):
        return known[2]
    try:
        load_checkpoint(path)
        ok = True
    except CheckpointError:
        ok = False
    _VERDICTS[path] = (st.st_size, st.st_mtime_ns, ok)
    return ok


def newest_valid_checkpoint(folder) -> tuple[Path, CheckpointData] | None:
    """The newest checkpoint that loads and validates; bad ones are logged and skipped.

    None when the folder holds no checkpoint at all; a :class:`CheckpointError` naming them
    when it holds checkpoints and every one is damaged (starting over would silently drop the
    run's progress and metrics).
    """
    bad = []
    for path in reversed(list_checkpoints(folder)):
        try:
            data = load_checkpoint(path)
        except CheckpointError as exc:
            log.info(f"easgd: skipping bad checkpoint: {exc}")
            _remember(path, False)
            bad.append(path.name)
            continue
        _remember(path, True)
        return path, data
    if bad:
        raise CheckpointError(
            f"every checkpoint in {folder} is damaged ({', '.join(reversed(bad))}): refusing "
            f"to start over; resume a copy you trust (--resume FILE), or choose another folder "
            f"(run_dir) for a new run"
        )
    return None


def prune_checkpoints(folder, keep: int) -> list[Path]:
    """Keep the newest ``keep`` *valid* checkpoints and delete older valid ones.

    Damaged checkpoints never count toward ``keep`` (so they never cause a good one to be
    pruned) and are never deleted: each is reported once (a warning) and left for the user to
    inspect. Returns what was removed; an OSError of a removal propagates.
    """
    kept, doomed = 0, []
    for path in reversed(list_checkpoints(folder)):
        before = _VERDICTS.get(path)
        if not checkpoint_is_valid(path):
            if before is None or before[2]:
                log.warning(
                    f"easgd: warning: checkpoint {path} is damaged: it is kept for inspection "
                    f"and does not count toward checkpoint.keep"
                )
            continue
        kept += 1
        if kept > keep:
            doomed.append(path)
    doomed.reverse()  # oldest first, like list_checkpoints
    for p in doomed:
        p.unlink(missing_ok=True)
        _VERDICTS.pop(p, None)
    return doomed


def find_checkpoint(spec, run_dir) -> tuple[Path, CheckpointData] | None:
    """The checkpoint ``--resume spec`` means, loaded.

    ``auto``: the newest valid checkpoint of ``run_dir``, or None when it holds no checkpoint
    at all (a first segment: :attr:`Start.FIRST_SEGMENT`); an error when it holds only
    damaged ones. A folder: its newest valid checkpoint (an error when it has none). A file:
    that file.
    """
    if str(spec) == "auto":
        if not run_dir:
            raise ConfigError(
                "--resume auto needs the run folder: set run_dir (e.g. --set run_dir=runs/myjob)"
            )
        return newest_valid_checkpoint(run_dir)
    path = Path(spec)
    if path.is_dir():
        found = newest_valid_checkpoint(path)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path} (checkpoint-NNNNNN.h5 files)")
        return found
    return path, load_checkpoint(path)
