"""bench/bench_torch.py --face loop --quick: your own loop's face (a plain PyTorch loop against
the same loop with ElasticAveraging) runs under the two ranks it starts and writes its JSON.

Only the structure is checked: timings on shared CI machines are too noisy for thresholds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the torch extra is installed by `make test`")

ROOT = Path(__file__).resolve().parents[2]


def test_bench_torch_loop_face_quick_smoke(tmp_path):
    out = tmp_path / "loop.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASGD_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *sys.path])
    res = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_torch.py"), "--face", "loop", "--quick"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "your own loop" in res.stdout and "one exchange" in res.stdout
    report = json.loads(out.read_text())
    assert report["face"] == "loop" and report["quick"] is True
    assert report["device"]["kind"] == "cpu" and report["batch"] == 16
    assert [r["variant"] for r in report["variants"]] == ["plain", "elastic"]
    # every timed elastic block starts at an exchange step: steps / τ exchanges in each
    assert report["exchanges"] >= report["repeats"] * report["steps"] // report["tau"]
    assert report["exchange_ms"] > 0
    for r in report["variants"]:
        assert r["cpu_median_ms_per_step"] > 0 and len(r["ms_per_step_by_repeat"]) == 2
    assert report["variants"][0]["ratio_to_plain"] == 1.0
    assert not list(tmp_path.glob("*.tmp"))
