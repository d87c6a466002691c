"""TEMPORARY shim (replaced by the run-folder module of branch rundir17)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from .checkpoint import list_checkpoints, load_checkpoint, newest_valid_checkpoint  # noqa: F401
from .errors import CheckpointError, ConfigError, RunFolderError, os_reason
from .runlock import acquire, release

_MARKERS = ("PREEMPTED", "COMPLETED")
_log = logging.getLogger(__name__)


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        self.metrics_path = path / "metrics.jsonl"

    @classmethod
    def open(cls, cfg, resuming: bool) -> RunFolder:
        if cfg.run_dir:
            path = Path(cfg.run_dir)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunFolderError(
                    f"run folder {path} cannot be created: {os_reason(exc)}"
                ) from None
        else:
            base = Path(cfg.output) / time.strftime("%Y%m%d-%H%M%S")
            path, k = base, 1
            while True:
                try:
                    path.mkdir(parents=True)
                    break
                except FileExistsError:
                    path, k = Path(f"{base}-{k}"), k + 1
                except OSError as exc:
                    raise RunFolderError(
                        f"run folder {path} cannot be created: {os_reason(exc)}"
                    ) from None
        acquire(path)
        folder = cls(path)
        try:
            for name in _MARKERS:
                (path / name).unlink(missing_ok=True)
            if not resuming:
                (path / "metrics.jsonl").unlink(missing_ok=True)
        except OSError as exc:
            release(path)
            raise RunFolderError(f"cannot clear {path}: {os_reason(exc)}") from None
        return folder

    def write_config(self, text: str) -> None:
        tmp = self.path / ".config.toml.tmp"
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.path / "config.toml")
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            self.release()
            raise RunFolderError(
                f"cannot write {self.path / 'config.toml'}: {os_reason(exc)}"
            ) from None

    def mark(self, name: str) -> None:
        try:
            for old in _MARKERS:
                (self.path / old).unlink(missing_ok=True)
            (self.path / name).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")
        except OSError as exc:
            raise RunFolderError(f"cannot write {self.path / name}: {os_reason(exc)}") from None

    def release(self) -> None:
        release(self.path)


def find_checkpoint(spec, run_dir: str):
    if str(spec) == "auto":
        if not run_dir:
            raise ConfigError(
                "--resume auto needs the run folder: set run_dir (e.g. --set run_dir=runs/myjob)"
            )
        found = newest_valid_checkpoint(run_dir, _log.info)
        if found is None:
            _log.info(f"easgd: no checkpoint in {run_dir}: starting a new run")
            return None, None
        return found
    path = Path(spec)
    if path.is_dir():
        found = newest_valid_checkpoint(path, _log.info)
        if found is None:
            raise CheckpointError(f"no checkpoint in {path} (checkpoint-NNNNNN.h5 files)")
        return found
    return path, load_checkpoint(path)
