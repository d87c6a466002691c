"""bench/bench_convergence.py --quick: real launches, JSON with the expected structure.

No timing thresholds: this checks that the comparison runs end to end and reports every
algorithm × τ, not how fast anything is.
"""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_convergence.py"
ALGORITHMS = {"easgd", "eamsgd", "sync-easgd", "downpour", "allreduce-sgd"}


def test_quick_run_writes_json_and_figures(tmp_path, clean_env):
    out = tmp_path / "conv.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=clean_env,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report["algorithms"]) == ALGORITHMS
    taus = report["taus"]
    assert len(taus) >= 2 and report["seeds"] >= 1
    runs = report["runs"]
    assert len(runs) == len(ALGORITHMS) * len(taus) * report["seeds"]
    budget = report["steps_per_worker"] * report["workers"]
    for run in runs:
        assert run["returncode"] == 0, run
        assert run["steps"] == budget and run["complete"]
        assert 0.0 <= run["final_error"] <= 1.0 and run["best_error"] <= run["final_error"]
        assert run["bytes"] > 0 and run["time"] >= 0
        assert len(run["curve"]) >= 2 and all(len(point) == 4 for point in run["curve"])
    summary = report["summary"]
    assert {(r["algorithm"], r["tau"]) for r in summary} == {
        (a, t) for a in ALGORITHMS for t in taus
    }
    for row in summary:
        for key in ("final_error", "final_error_sd", "best_error", "time", "bytes"):
            assert row[key] is not None, row
    assert "| algorithm" in proc.stdout and "allreduce-sgd" in report["table"]
    assert report["figures"] and all(
        Path(f).read_bytes()[:4] == b"\x89PNG" for f in report["figures"]
    )
