"""bench/bench_stragglers.py on a small scale: real launches, the table and JSON it promises.

No timing thresholds: this checks that the benchmark runs end to end and reports every
(algorithm, k) with its baseline ratio, not how fast anything is.
"""

import json
import sys
from pathlib import Path

from launching import run

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_stragglers.py"


def test_small_run_writes_the_table_and_json(tmp_path, clean_env):
    out = tmp_path / "stragglers.json"
    proc = run(
        [
            sys.executable,
            str(BENCH),
            "--algorithms",
            "easgd,allreduce-sgd",
            "--slowdowns",
            "2",
            "--seconds",
            "2",
            "--workers",
            "2",
            "--out",
            str(out),
        ],
        clean_env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [(r["algorithm"], r["slowdown"]) for r in rows] == [
        ("easgd", 1.0),
        ("easgd", 2.0),
        ("allreduce-sgd", 1.0),
        ("allreduce-sgd", 2.0),
    ]
    for r in rows:
        assert r["steps_per_s"] > 0 and 0.0 <= r["center_error"] <= 1.0
        assert r["error_at"] <= report["seconds"]
    assert [r["ratio"] for r in rows if r["slowdown"] == 1.0] == [1.0, 1.0]
    assert rows[1]["expected_ratio"] == (2 - 1 + 1 / 2) / 2  # asynchronous: (p − 1 + 1/k)/p
    assert rows[3]["expected_ratio"] == 1 / 2  # synchronous: 1/k
    assert "| algorithm | k | worker steps/s |" in proc.stdout
