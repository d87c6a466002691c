"""Metrics as JSON lines (one object per evaluation of the center) and the progress line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

__all__ = ["MetricsLog", "format_error", "format_progress", "read_metrics"]


class MetricsLog:
    """Appends one JSON object per line and flushes it, so a crash loses at most one line."""

    def __init__(self, path: str | os.PathLike, history: list[dict] | None = None):
        """``history``: records of a resumed run; the file is rewritten to hold exactly those
        (lines written after the checkpoint that is resumed are dropped), atomically."""
        self.path = Path(path)
        if history is not None:
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as fh:
                for record in history:
                    fh.write(json.dumps(_jsonable(record)) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives for the run

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(_jsonable(record), sort_keys=False) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


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


def format_progress(rec: dict, error_is_rate: bool = True) -> str:
    """One readable line: time, worker steps, exchanges, center loss and error, distance."""
    error_txt = format_error(rec.get("center_error"), error_is_rate)
    return (
        f"[{rec['time']:7.1f}s] steps {rec['steps']:>9,d}  exchanges {rec['exchanges']:>7,d}  "
        f"center loss {rec['center_loss']:.4f}  error {error_txt:>7}  "
        f"|x-c| {rec['distance']:.4g}"
    )


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
