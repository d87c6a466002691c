"""Small pieces every benchmark script needs (the scripts run as ``python bench/NAME.py``, so
this folder is on their import path)."""

from __future__ import annotations

import platform
import shutil
import statistics
import sys
from pathlib import Path

__all__ = ["launcher", "cpu_name", "machine_facts", "timing_rows", "timing_table"]


def launcher() -> str:
    """The mpiexec next to this Python (the venv's, matching its mpi4py), else the PATH's."""
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        raise SystemExit("no mpiexec next to this Python or on PATH")
    return found


def cpu_name() -> str:
    """The CPU's model name, for the machine line of a report."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts(torch, MPI) -> dict:
    """When and where a torch benchmark ran: the date, host, platform and library versions."""
    import datetime  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    return {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
    }


def timing_rows(times: dict, variants, metrics) -> list[dict]:
    """Per variant, for each metric ("wall", "cpu"; keys of ``times``, each variant → seconds
    per step of every repeat): the median in ms, every repeat's, the ratio of the medians to
    the first variant's (the baseline), the overhead in percent, and the median of the
    per-repeat ratios (``paired``). CPU numbers carry a ``cpu_`` prefix."""
    base_name = variants[0]
    rows = []
    for name in variants:
        row = {"variant": name}
        for metric in metrics:
            t, base = times[metric][name], times[metric][base_name]
            med, med_base = statistics.median(t), statistics.median(base)
            pre = "" if metric == "wall" else "cpu_"
            row[f"{pre}median_ms_per_step"] = 1e3 * med
            row[f"{pre}ms_per_step_by_repeat"] = [1e3 * v for v in t]
            row[f"{pre}ratio_to_plain"] = med / med_base
            row[f"{pre}overhead_pct"] = 100.0 * (med / med_base - 1.0)
            # Each repeat's ratio against the baseline's block of the same repeat; their median.
            row[f"{pre}paired_ratio_to_plain"] = statistics.median(
                [v / p for v, p in zip(t, base, strict=True)]
            )
        rows.append(row)
    return rows


def timing_table(rows: list[dict], metrics) -> list[str]:
    """The rows of :func:`timing_rows` as a text table (ms per step, overhead, paired), after
    the line that says what the columns are."""
    head = f"{'variant':<10}" + "".join(
        f"{m + ' ms':>10}{'overhead':>10}{'paired':>8}" for m in metrics
    )
    lines = [
        "ms per step: median over repeats; overhead = median / plain's median - 1; paired ="
        " median of the per-repeat ratios to plain",
        head,
        "-" * len(head),
    ]
    for r in rows:
        line = f"{r['variant']:<10}"
        for m in metrics:
            pre = "" if m == "wall" else "cpu_"
            line += (
                f"{r[pre + 'median_ms_per_step']:>10.2f}{r[pre + 'overhead_pct']:>9.1f}%"
                f"{r[pre + 'paired_ratio_to_plain']:>8.3f}"
            )
        lines.append(line)
    return lines
