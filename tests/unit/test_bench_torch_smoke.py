"""bench/bench_torch.py --quick runs the three variants and writes the documented JSON.

Only the structure is checked: timings on shared CI machines are too noisy for thresholds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_torch.py"
VARIANTS = ["plain", "adapter", "exchange"]


def test_bench_torch_quick_smoke(tmp_path):
    out = tmp_path / "torch.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASGD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *sys.path])
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "overhead" in res.stdout and "where the time goes" in res.stdout

    report = json.loads(out.read_text())
    assert report["benchmark"] == "bench_torch" and report["quick"] is True
    assert report["device"]["kind"] == "cpu" and report["device"]["name"]
    assert report["torch_version"] and report["mpi"] and report["threads"] == 1
    assert report["batch"] == 16 and report["input"] == [3, 28, 28]
    assert report["parameters"] > 0 and report["primary_metric"] == "cpu"
    assert report["steps"] % report["tau"] == 0
    rows = report["variants"]
    assert [r["variant"] for r in rows] == VARIANTS
    # Only 'exchange' exchanges in the timed blocks (once per τ steps); 'adapter' only at t = 0.
    assert [r["exchanges"] for r in rows[:2]] == [0, 1]
    assert rows[2]["exchanges"] >= report["repeats"] * report["steps"] // report["tau"]
    for r in rows:
        for pre in ("", "cpu_"):
            assert r[pre + "median_ms_per_step"] > 0, (r["variant"], pre)
            assert len(r[pre + "ms_per_step_by_repeat"]) == report["repeats"]
            assert all(t > 0 for t in r[pre + "ms_per_step_by_repeat"])
            assert r[pre + "ratio_to_plain"] > 0 and r[pre + "paired_ratio_to_plain"] > 0
        assert r["parts_ms_per_step"]["whole step"] > 0
        assert r["parts_ms_per_step"]["forward"] > 0
    plain = rows[0]
    assert plain["ratio_to_plain"] == 1.0 and plain["overhead_pct"] == 0.0
    assert "exchange (RMA + fused kernel)" in rows[2]["parts_ms_per_step"]
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"
