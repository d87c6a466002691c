"""Metrics as JSON lines (one object per evaluation of the center) and the progress line.

A record's fields, all numbers (or null), one record per evaluation of the center:

- ``time`` (s since the run's first start), ``steps`` and ``exchanges`` (summed over the
  workers), ``center_loss``, ``center_error``, ``distance`` (mean worker-to-center distance),
  ``worker_loss``, ``bytes``, ``resets``;
- the progress against the budget (added later; older files lack them and still plot):
  ``steps_per_worker`` (the mean), ``step_budget`` (the config's ``steps``, per worker),
  ``done`` (fraction of all workers' budgets done), ``steps_per_s`` (per worker, since the
  previous record of this start; null for the first), ``time_left`` (s, from the slowest
  worker at that rate; null when unknown), ``slowest_rank`` and ``slowest_steps`` (the world
  rank of the worker with the fewest steps, and its steps).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from .errors import os_reason

__all__ = [
    "MetricsLog",
    "STANDARD_KEYS",
    "format_error",
    "format_progress",
    "progress_fields",
    "read_metrics",
]


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


#: The keys the package writes in a record (master.py): the fields above, then ``push_bytes``
#: and a center that computes's (docs/ARCHITECTURE.md §3.11). A user's own loop adds its own
#: after them (``center_<key>``, ``worker_<key>``), which the progress line shows.
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
    "steps_per_worker",
    "step_budget",
    "done",
    "steps_per_s",
    "time_left",
    "slowest_rank",
    "slowest_steps",
    "push_bytes",
    "staleness",
    "staleness_max",
    "push_wait_s",
    "center_pushes",
    "center_lag",
    "center_applies",
    "center_busy_s",
)


def progress_fields(steps, budget: int, first_rank: int, now: float, previous=None) -> dict:
    """The record's progress fields (see the module's docstring) from each worker's steps
    (``steps[i]`` is the worker on world rank ``first_rank + i``), the per-worker ``budget``
    and the record's time ``now``; ``previous`` is ``(time, summed steps)`` of the previous
    record of this start, from which the rate is measured."""
    steps = np.asarray(steps, dtype=np.int64)
    p = max(int(steps.size), 1)
    slowest = int(np.argmin(steps)) if steps.size else 0
    least = int(steps[slowest]) if steps.size else 0
    rate = None
    if previous is not None and now > previous[0]:
        rate = (int(steps.sum()) - previous[1]) / p / (now - previous[0])
    if least >= budget:
        left = 0.0
    elif rate:
        left = (budget - least) / rate
    else:
        left = None  # no rate yet, or every worker stalled
    return {
        "steps_per_worker": int(round(steps.sum() / p)),
        "step_budget": int(budget),
        "done": round(float(np.minimum(steps, budget).sum()) / (p * budget), 4),
        "steps_per_s": None if rate is None else round(rate, 3),
        "time_left": None if left is None else round(left, 1),
        "slowest_rank": first_rank + slowest,
        "slowest_steps": least,
    }


def format_progress(rec: dict, error_is_rate: bool = True) -> str:
    """One readable line: time, per-worker steps against the budget (percent, rate, time left,
    the slowest worker when one lags), center loss and error, distance, and a user loop's own
    numbers. A record without the progress fields (an older file's) shows the summed steps and
    exchanges instead; without an evaluation of the center (a user loop that gives none), the
    workers' loss takes the center's place."""
    if rec.get("step_budget"):
        steps = (
            f"steps {rec['steps_per_worker']:,d}/{rec['step_budget']:,d} per worker, "
            f"{100 * rec['done']:.1f}%"
        )
        if rec.get("steps_per_s") is not None:
            steps += f", {_rate(rec['steps_per_s'])}/s"
        if rec.get("time_left") is not None:
            steps += f", {_duration(rec['time_left'])} left"
        if rec["slowest_steps"] < rec["steps_per_worker"]:
            steps += f" (slowest: rank {rec['slowest_rank']} at {rec['slowest_steps']:,d})"
    else:
        steps = f"steps {rec['steps']:>9,d}  exchanges {rec['exchanges']:>7,d}"
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
    return f"[{rec['time']:7.1f}s] {steps}  {body}  |x-c| {rec['distance']:.4g}{extras}"


def _number(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.4g}"


def _rate(per_second: float) -> str:
    """Three significant digits, without an exponent: 12,345 / 996 / 45.6 / 0.123."""
    if per_second >= 100:
        return f"{per_second:,.0f}"
    return f"{per_second:.1f}" if per_second >= 10 else f"{per_second:.3g}"


def _duration(seconds: float) -> str:
    """``42s``, ``12m05s``, ``3h20m`` (rounded up: a run about to end has 1s left, not 0s)."""
    s = math.ceil(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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
