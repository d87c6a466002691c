"""Metrics as JSON lines (one object per evaluation of the center) and the progress line."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path

from .errors import os_reason

__all__ = ["MetricsLog", "STANDARD_KEYS", "format_error", "format_progress", "read_metrics"]


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a crash loses at most one line.

    A write that fails (disk full, quota, file-size limit, I/O error, folder removed) never
    stops training: one warning names the file and the reason, and the file gets no more
    lines, so it stays a gap-free prefix of the run's records. Every checkpoint holds all the
    records, and a resumed run rewrites the file from them.
    """

    def __init__(
        self, path: str | os.PathLike, history: list[dict] | None = None, warn=None
    ) -> None:
        """``history``: records of a resumed run; the file is rewritten to hold exactly those
        (lines written after the checkpoint that is resumed are dropped), atomically.
        ``warn`` gets the one warning line (default: stderr)."""
        self.path = Path(path)
        self._warn = warn or _stderr
        self._fh = None
        self.failed = False
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            if history is not None:
                with open(tmp, "w", encoding="utf-8") as fh:
                    for record in history:
                        fh.write(json.dumps(_jsonable(record)) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives for the run
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self._fail(exc)

    def write(self, record: dict) -> None:
        if self._fh is None:
            return
        try:
            self._fh.write(json.dumps(_jsonable(record), sort_keys=False) + "\n")
            self._fh.flush()
            if os.fstat(self._fh.fileno()).st_nlink == 0:  # the file (or its folder) was removed
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(self.path))
        except OSError as exc:
            self._fail(exc)

    def close(self) -> None:
        if self._fh is None:
            return
        try:
            self._fh.close()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()  # flushes the unwritten line again: it fails again, and closes
            except OSError:
                pass
        if not self.failed:
            self.failed = True
            self._warn(
                f"easgd: warning: metrics file {self.path} cannot be written: {os_reason(exc)}; "
                f"training goes on and the file gets no more lines (every checkpoint holds the "
                f"metrics; a resumed run rewrites the file from them)"
            )


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def format_error(error: float | None, is_rate: bool = True) -> str:
    """An error rate as a percentage; any other error measure as a number."""
    if error is None:
        return "n/a"
    return f"{100 * error:.2f}%" if is_rate else f"{error:.4g}"


#: The keys of every metrics record (master.py); a user's own loop adds its own after them.
STANDARD_KEYS = (
    "time",
    "steps",
    "exchanges",
    "center_loss",
    "center_error",
    "distance",
    "worker_loss",
    "bytes",
    "resets",
)


def format_progress(rec: dict, error_is_rate: bool = True) -> str:
    """One readable line: time, worker steps, exchanges, center loss and error, distance, and
    a user loop's own numbers. Without an evaluation of the center (a user loop that gives
    none), the workers' loss takes its place."""
    head = f"[{rec['time']:7.1f}s] steps {rec['steps']:>9,d}  exchanges {rec['exchanges']:>7,d}  "
    loss = rec.get("center_loss")
    if loss is None or not math.isfinite(loss):
        body = f"worker loss {_number(rec.get('worker_loss'))}"
    else:
        error_txt = format_error(rec.get("center_error"), error_is_rate)
        body = f"center loss {loss:.4f}  error {error_txt:>7}"
    extras = "".join(
        f"  {key} {_number(value)}"
        for key, value in rec.items()
        if key not in STANDARD_KEYS and isinstance(value, (int, float))
    )
    return f"{head}{body}  |x-c| {rec['distance']:.4g}{extras}"


def _number(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.4g}"


def _stderr(line: str) -> None:
    logging.getLogger(__name__).warning(line)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if hasattr(value, "item"):
        return _jsonable(value.item())
    return value
