"""bench/bench_kernels.py runs on the NumPy backend and writes the documented JSON.

Only the structure is checked: timings on shared CI machines are too noisy for thresholds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from easgd_mpi.backend.cupy_backend import KERNELS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "bench_kernels.py"

RESULT_KEYS = {
    "kernel", "n", "bytes_per_element", "bytes", "fused_s", "unfused_s", "copy_s",
    "fused_gbps", "unfused_gbps", "copy_gbps", "fused_over_copy", "speedup_vs_unfused",
}  # fmt: skip


def test_bench_kernels_numpy_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *sys.path]))
    cmd = [
        sys.executable, str(SCRIPT), "--backend", "numpy", "--sizes", "1000", "4097",
        "--repeats", "2", "--warmup", "1", "--json", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "fused/copy" in res.stdout and "exchange_sgd_step" in res.stdout

    report = json.loads(out.read_text())
    assert report["backend"] == "numpy"
    assert report["device"]["kind"] == "cpu" and report["device"]["name"]
    assert report["sizes"] == [1000, 4097] and report["repeats"] == 2
    rows = report["results"]
    assert len(rows) == 2 * len(KERNELS)
    assert {(r["kernel"], r["n"]) for r in rows} == {(k, n) for k in KERNELS for n in (1000, 4097)}
    for r in rows:
        assert set(r) >= RESULT_KEYS, set(RESULT_KEYS) - set(r)
        assert r["bytes"] == r["bytes_per_element"] * r["n"]
        assert r["bytes_per_element"] == KERNELS[r["kernel"]].bytes_per_element
        for k in ("fused_s", "unfused_s", "copy_s", "fused_gbps", "copy_gbps", "unfused_gbps"):
            assert r[k] > 0, (r["kernel"], k)
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"
