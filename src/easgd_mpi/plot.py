"""Plots of runs: the center's test error and loss against wall time and against worker steps.

``easgd plot RUN ... -o FIG.png`` overlays several runs; each is a run folder (or its
``metrics.jsonl``) and is labelled from the ``config.toml`` next to it (algorithm and τ).
matplotlib (the ``plot`` extra) is imported only here, with the non-interactive Agg backend, so
plotting works on a cluster node without a display.
"""

from __future__ import annotations

import contextlib
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import PlotError, os_reason
from .metrics import read_metrics
from .rundir import METRICS_NAME as _METRICS
from .rundir import config_path, metrics_path

__all__ = ["PlotError", "Run", "load_run", "plot_runs"]

#: (record key, axis label) of the quantities plotted, one row of panels each.
_ROWS = (("center_error", "center test error"), ("center_loss", "center loss"))
#: (record key, axis label) of the x axes, one column of panels each.
_COLUMNS = (("time", "wall time (s)"), ("steps", "worker steps (all workers)"))


@dataclass
class Run:
    """One run's metrics and what it is called in a legend."""

    path: Path
    records: list[dict]
    config: dict = field(default_factory=dict)
    label: str = ""

    def series(self, key: str) -> list[float]:
        """The values of ``key`` over the records (missing or null, e.g. a NaN loss: nan)."""
        out = []
        for record in self.records:
            value = record.get(key)
            out.append(float(value) if isinstance(value, (int, float)) else math.nan)
        return out


def load_run(path: str | os.PathLike) -> Run:
    """Read a run folder or a metrics.jsonl file (and the config.toml next to it, if any)."""
    path = Path(path)
    metrics = metrics_path(path) if path.is_dir() else path
    if not metrics.is_file():
        where = f"{path} has no {_METRICS}" if path.is_dir() else f"{path} does not exist"
        raise PlotError(f"plot: {where} (give a run folder or its {_METRICS})")
    try:
        records = read_metrics(metrics)
    except (OSError, UnicodeDecodeError) as exc:
        raise PlotError(f"plot: {metrics} cannot be read: {exc}") from None
    records = [r for r in records if isinstance(r, dict) and "steps" in r and "time" in r]
    if not records:
        raise PlotError(
            f"plot: {metrics} holds no metrics records (one JSON object per line "
            f"with time, steps, center_error, ...)"
        )
    config = {}
    config_file = config_path(metrics.parent)
    if config_file.is_file():
        try:
            config = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            config = {}  # a label is all it is for; the folder name will do
    return Run(
        path=metrics.parent, records=records, config=config, label=_label(config, metrics.parent)
    )


def _label(config: dict, folder: Path) -> str:
    if not config:
        return folder.name
    label = f"{config.get('algorithm', '?')}, τ={config.get('tau', '?')}"
    if config.get("momentum"):
        label += f", δ={config['momentum']:g}"
    return label


def _disambiguate(runs: list[Run]) -> None:
    """Runs with equal labels (e.g. several seeds) get the seed, then the folder, appended."""
    for extra in (lambda r: f"seed {r.config.get('seed', '?')}", lambda r: r.path.name):
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.label] = counts.get(run.label, 0) + 1
        for run in runs:
            if counts[run.label] > 1:
                run.label = f"{run.label} ({extra(run)})"


def plot_runs(runs, output: str | os.PathLike, title: str | None = None) -> Path:
    """Overlay runs (paths or :class:`Run` objects) in a 2×2 figure and save it as ``output``.

    Rows: center test error, center loss; columns: against wall time, against worker steps.
    A row whose values are all positive and span more than two decades uses a log scale.
    """
    runs = [r if isinstance(r, Run) else load_run(r) for r in runs]
    if not runs:
        raise PlotError("plot: no runs given")
    _disambiguate(runs)
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise PlotError(
            "plot: matplotlib is not installed (pip install 'easgd-mpi[plot]')"
        ) from None

    output = _output_path(output)
    fig, axes = plt.subplots(len(_ROWS), len(_COLUMNS), figsize=(12, 8), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    styles = ("-", "--", ":", "-.")
    by_algorithm = {}
    for i, (ykey, ylabel) in enumerate(_ROWS):
        for j, (xkey, xlabel) in enumerate(_COLUMNS):
            ax = axes[i][j]
            values = []
            for run in runs:
                algorithm = run.config.get("algorithm", run.label)
                color = by_algorithm.setdefault(algorithm, colors[len(by_algorithm) % len(colors)])
                style = styles[_tau_rank(runs, run) % len(styles)]
                ys = run.series(ykey)
                values.extend(y for y in ys if math.isfinite(y))
                ax.plot(
                    run.series(xkey),
                    ys,
                    style,
                    color=color,
                    label=run.label,
                    linewidth=1.4,
                    marker="." if len(ys) < 30 else None,
                )
            if values and min(values) > 0 and max(values) / min(values) > 100:
                ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with contextlib.suppress(FileExistsError):  # a file in the way: saving says ENOTDIR
            output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(output, dpi=100)
    except OSError as exc:
        raise PlotError(f"plot: cannot write {output}: {os_reason(exc)}") from None
    finally:
        plt.close(fig)
    return output


def _output_path(output) -> Path:
    """``output`` as the file matplotlib will write: its suffix picks the format, and a name
    without one gets ``.png`` (matplotlib would append it, and the path reported would be
    wrong). An unknown format is refused before anything is drawn."""
    output = Path(output)
    if not output.suffix:
        return output.with_name(output.name + ".png")
    from matplotlib.backend_bases import FigureCanvasBase  # noqa: PLC0415

    formats = FigureCanvasBase.get_supported_filetypes()
    if output.suffix[1:].lower() not in formats:
        raise PlotError(
            f"plot: cannot write {output}: matplotlib does not write '{output.suffix}' files "
            f"(use one of {', '.join('.' + f for f in sorted(formats))})"
        )
    return output


def _tau_rank(runs: list[Run], run: Run) -> int:
    """Index of the run's τ among the distinct τ of all runs (picks its line style)."""
    taus = sorted({r.config.get("tau", 0) for r in runs})
    return taus.index(run.config.get("tau", 0))
