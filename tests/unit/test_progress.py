"""The progress line and the record behind it: per-worker steps against the per-worker budget,
percent done, rate, time left and the slowest worker; older records still format."""

import json
import logging

import numpy as np
import pytest

from easgd_mpi.comm import Roles
from easgd_mpi.config import Config
from easgd_mpi.master import _Run
from easgd_mpi.metrics import MetricsLog, format_progress, progress_fields
from easgd_mpi.models import QuadraticProblem
from easgd_mpi.status_board import STATUS_FIELDS
from easgd_mpi.workerstate import COUNTERS, WorkerStates

#: The fields every record had before the progress fields were added (easgd plot reads them).
OLD_FIELDS = [
    "time",
    "steps",
    "exchanges",
    "center_loss",
    "center_error",
    "distance",
    "worker_loss",
    "bytes",
    "resets",
]


def test_fields_from_each_workers_steps():
    fields = progress_fields([100, 80, 120], budget=1000, first_rank=1, now=2.0, previous=(1, 150))
    assert fields == {
        "steps_per_worker": 100,  # the mean, not the sum over workers
        "step_budget": 1000,
        "done": 0.1,
        "steps_per_s": 50.0,  # (300 − 150) steps over 3 workers in 1 s
        "time_left": 18.4,  # the slowest worker's 920 steps left at 50/s
        "slowest_rank": 2,  # world rank of the worker with the fewest steps
        "slowest_steps": 80,
    }


def test_no_rate_before_a_second_record_nor_time_left_when_stalled():
    first = progress_fields([0, 0], budget=50, first_rank=1, now=0.0)
    assert first["steps_per_s"] is None and first["time_left"] is None and first["done"] == 0
    stalled = progress_fields([10, 10], budget=50, first_rank=1, now=3.0, previous=(2.0, 20))
    assert stalled["steps_per_s"] == 0 and stalled["time_left"] is None


def test_done_counts_each_worker_up_to_its_budget():
    # A resumed run whose budget is below one worker's steps: that worker is done, not more.
    fields = progress_fields([1200, 900], budget=1000, first_rank=2, now=5.0, previous=(4.0, 2000))
    assert fields["done"] == 0.95 and fields["slowest_rank"] == 3
    finished = progress_fields([1000, 1000], budget=1000, first_rank=1, now=5.0)
    assert finished["done"] == 1.0 and finished["time_left"] == 0.0


def record(**progress):
    return {
        "time": 12.34,
        "steps": 6000,
        "exchanges": 1500,
        "center_loss": 0.12341,
        "center_error": 0.0334,
        "distance": 0.0205,
        **progress,
    }


def test_the_line_shows_per_worker_steps_against_the_budget():
    fields = progress_fields(
        [1000, 950, 1050], budget=20_000, first_rank=1, now=12.34, previous=(11.84, 2500)
    )
    assert format_progress(record(**fields)) == (
        "[   12.3s] steps 1,000/20,000 per worker, 5.0%, 333/s, 58s left (slowest: rank 2 at "
        "950)  center loss 0.1234  error   3.34%  |x-c| 0.0205"
    )


@pytest.mark.parametrize(
    "rate, left, text",
    [
        (12345.6, 7300.0, ", 12,346/s, 2h01m left"),
        (45.61, 725.2, ", 45.6/s, 12m06s left"),
        (0.1234, 0.4, ", 0.123/s, 1s left"),  # rounded up: not "0s" while steps remain
        (None, None, ""),  # the first record: no rate yet
    ],
)
def test_rate_and_time_left_read_at_any_scale(rate, left, text):
    fields = {
        "steps_per_worker": 10,
        "step_budget": 100,
        "done": 0.1,
        "steps_per_s": rate,
        "time_left": left,
        "slowest_rank": 1,
        "slowest_steps": 10,
    }
    line = format_progress(record(**fields), error_is_rate=False)
    assert line.startswith(f"[   12.3s] steps 10/100 per worker, 10.0%{text}  center loss ")
    assert "slowest" not in line  # no worker lags the mean (a synchronous rule, one worker)
    assert line.endswith("error  0.0334  |x-c| 0.0205")


def test_an_older_record_still_formats():
    assert format_progress(record()) == (
        "[   12.3s] steps     6,000  exchanges   1,500  center loss 0.1234  error   3.34%  "
        "|x-c| 0.0205"
    )


class HostCenter:
    """The center as a host array (no MPI): what the master reads of its window."""

    def __init__(self, n):
        self.n = n
        self.value = np.zeros(n, np.float32)

    def read(self, out):
        out[...] = self.value


class HostStatus:
    """The status slots as host arrays (no MPI): what the master reads of the StatusBoard."""

    def __init__(self, workers):
        self.status = {name: np.zeros(workers) for name in STATUS_FIELDS}

    def read(self):
        return {name: column.copy() for name, column in self.status.items()}


def test_the_masters_record_keeps_its_fields_and_adds_the_progress(tmp_path, caplog):
    cfg = Config.from_toml(None, environ={}, overrides={"model.name": "quadratic", "steps": 500})
    problem = QuadraticProblem(cfg.quadratic)
    center, board = HostCenter(problem.layout.size), HostStatus(workers=3)
    roles = Roles(world=None, workers=None, rank=0, size=5, servers=2)  # workers on ranks 2-4
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    run = _Run(cfg, roles, problem, center, board, None, metrics, None, None)
    caplog.set_level(logging.INFO, logger="easgd_mpi")

    first = run.evaluate()
    board.status["steps"][:] = [120, 90, 150]
    second = run.evaluate()
    metrics.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "easgd_mpi.master"]

    assert list(second)[: len(OLD_FIELDS)] == OLD_FIELDS  # unchanged, in their order
    assert second["steps"] == 360  # still the sum over the workers
    assert first["steps_per_s"] is None and first["time_left"] is None
    rate = 120 / (second["time"] - first["time"])  # 360 steps over 3 workers
    assert second["steps_per_s"] == pytest.approx(rate, rel=1e-3)
    assert second["time_left"] == pytest.approx(410 / second["steps_per_s"], abs=0.1)
    assert second["steps_per_worker"] == 120 and second["step_budget"] == 500
    assert second["done"] == 0.24 and (second["slowest_rank"], second["slowest_steps"]) == (3, 90)
    assert lines[1].startswith(f"[{second['time']:7.1f}s] steps 120/500 per worker, 24.0%, ")
    assert "(slowest: rank 3 at 90)" in lines[1]
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written == [first, second]


def test_a_resumed_runs_first_record_has_no_rate_from_the_earlier_start(tmp_path):
    cfg = Config.from_toml(None, environ={}, overrides={"model.name": "quadratic", "steps": 500})
    problem = QuadraticProblem(cfg.quadratic)
    center, board = HostCenter(problem.layout.size), HostStatus(workers=1)
    board.status["steps"][:] = [200]

    class Resumed:  # what _Run reads of a checkpoint
        wall_time, sequence = 30.0, 1
        states = WorkerStates(counters={k: [200] for k in COUNTERS}, rng_words=np.zeros((1, 6)))
        metrics = [{**record(), "time": 29.5, "steps": 190}]

    roles = Roles(world=None, workers=None, rank=0, size=2)
    metrics = MetricsLog(tmp_path / "metrics.jsonl")
    run = _Run(cfg, roles, problem, center, board, None, metrics, None, Resumed)
    resumed = run.evaluate()
    metrics.close()
    assert resumed["time"] >= 30.0 and resumed["steps_per_s"] is None
    assert resumed["steps_per_worker"] == 200 and resumed["done"] == 0.4
