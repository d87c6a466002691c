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
    "kernel", "variant", "offsets", "n", "launches", "bytes_per_element", "bytes", "fused_s",
    "fused_host_s", "unfused_s", "copy_s", "fused_gbps", "unfused_gbps", "copy_gbps",
    "fused_over_copy", "speedup_vs_unfused",
}  # fmt: skip
OVERHEAD_KEYS = {"kernel", "n", "launches", "host_us", "device_us"}


def test_bench_kernels_numpy_smoke(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *sys.path]))
    cmd = [
        sys.executable, str(SCRIPT), "--backend", "numpy", "--sizes", "1000", "4097",
        "--repeats", "2", "--warmup", "1", "--launches", "3", "--misaligned", "--json", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "fused/copy" in res.stdout and "exchange_sgd_step" in res.stdout
    assert "3 back-to-back calls" in res.stdout and "launch overhead" in res.stdout
    assert "sgd_step [misaligned]" in res.stdout and "sgd_step [shifted]" in res.stdout

    report = json.loads(out.read_text())
    assert report["backend"] == "numpy"
    assert report["device"]["kind"] == "cpu" and report["device"]["name"]
    assert report["sizes"] == [1000, 4097] and report["repeats"] == 2
    assert report["launches"] == 3 and report["misaligned"] is True
    rows = report["results"]
    aligned = [r for r in rows if r["variant"] == "aligned"]
    assert len(aligned) == 2 * len(KERNELS)
    assert {(r["kernel"], r["n"]) for r in aligned} == {
        (k, n) for k in KERNELS for n in (1000, 4097)
    }
    # --misaligned: sgd_step at the largest size on views offset by one float
    extra = {(r["kernel"], r["n"], r["variant"]): r["offsets"] for r in rows if r not in aligned}
    assert extra == {
        ("sgd_step", 4097, "shifted"): {"x": 1, "others": 1},
        ("sgd_step", 4097, "misaligned"): {"x": 1, "others": 0},
    }
    for r in rows:
        assert set(r) >= RESULT_KEYS, set(RESULT_KEYS) - set(r)
        assert r["launches"] == 3
        assert r["bytes"] == r["bytes_per_element"] * r["n"]
        assert r["bytes_per_element"] == KERNELS[r["kernel"]].bytes_per_element
        for k in ("fused_s", "unfused_s", "copy_s", "fused_gbps", "copy_gbps", "unfused_gbps"):
            assert r[k] > 0, (r["kernel"], k)
    # the per-call overhead, measured on its own for every kernel and the copy
    over = report["launch_overhead"]
    assert [o["kernel"] for o in over] == [*KERNELS, "copy"]
    for o in over:
        assert set(o) == OVERHEAD_KEYS and o["launches"] == 3
        assert o["host_us"] > 0 and o["device_us"] is None  # no device on the NumPy backend
    assert not list(tmp_path.glob("*.tmp")), "temporary file left behind"


def test_bench_kernels_default_launches_numpy(tmp_path):
    """Without --launches the NumPy backend times 10 back-to-back calls (a GPU: 100)."""
    out = tmp_path / "k.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), *sys.path]))
    cmd = [
        sys.executable, str(SCRIPT), "--backend", "numpy", "--sizes", "64", "--repeats", "1",
        "--warmup", "0", "--kernels", "scale", "--json", str(out),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["launches"] == 10 and report["misaligned"] is False
    assert [(r["kernel"], r["variant"]) for r in report["results"]] == [("scale", "aligned")]
    assert [o["kernel"] for o in report["launch_overhead"]] == ["scale", "copy"]
