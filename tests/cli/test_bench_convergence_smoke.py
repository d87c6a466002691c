"""bench/bench_convergence.py --quick: real launches, JSON with the expected structure.

No timing thresholds: this checks that the comparison runs end to end and reports every
algorithm × τ, not how fast anything is.
"""

import json
import sys
from pathlib import Path

import launching

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_convergence.py"
ALGORITHMS = {"easgd", "eamsgd", "sync-easgd", "downpour", "allreduce-sgd"}


def test_quick_run_writes_json_and_figures(tmp_path, clean_env):
    out = tmp_path / "conv.json"
    proc = launching.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(out)], clean_env, timeout=240
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


def test_cifar_convnet_run_reports_steps_to_target(tmp_path, clean_env):
    """--model cifar-convnet on a tiny synthetic CIFAR-format set: the data set is written in
    the CIFAR-10 python format and read by the real loader, and every run reports, per target
    error, the steps and wall time of the first evaluation at or below it."""
    out = tmp_path / "conv-cifar.json"
    cache = tmp_path / "data"
    proc = launching.run(
        [
            sys.executable,
            str(BENCH),
            "--model",
            "cifar-convnet",
            "--data-cache",
            str(cache),
            "--synthetic-size",
            "100,50",
            "--workers",
            "2",
            "--algorithms",
            "easgd,eamsgd",
            "--taus",
            "4",
            "--steps",
            "10",
            "--targets",
            "1.0,0.0",
            "--out",
            str(out),
        ],
        clean_env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"):
        assert (cache / "cifar-10-batches-py" / name).is_file()
    report = json.loads(out.read_text())
    assert report["model"] == "cifar-convnet"
    assert report["data"]["name"] == "synthetic-cifar" and report["data"]["why"]
    assert report["data"]["parameters"]["train"] == 100
    assert report["targets"] == [1.0, 0.0]
    assert report["shared_settings"]["model.name"] == "cifar-convnet"
    assert report["algorithm_settings"]["eamsgd"]["momentum"] == "0.99"
    budget = report["steps_per_worker"] * report["workers"]
    runs = report["runs"]
    assert {r["algorithm"] for r in runs} == {"easgd", "eamsgd"} and len(runs) == 2
    for run in runs:
        assert run["returncode"] == 0, run
        assert run["steps"] == budget and run["complete"]
        assert 0.0 <= run["final_error"] <= 1.0
        hits = run["to_target"]
        assert [h["target"] for h in hits] == [1.0, 0.0]
        for h in hits:
            assert set(h) == {
                "target", "reached", "steps", "time", "exchanges", "bytes", "push_bytes"
            }  # fmt: skip
            if h["reached"]:
                assert 0 <= h["steps"] <= budget and h["time"] >= 0
            else:
                assert h["steps"] is None and h["time"] is None
        # Every error is at most 100 %: the first evaluation already reaches target 1.0.
        first_time, first_steps = run["curve"][0][:2]
        assert hits[0]["reached"]
        assert (hits[0]["time"], hits[0]["steps"]) == (first_time, first_steps)
    for row in report["summary"]:
        assert [t["target"] for t in row["to_target"]] == [1.0, 0.0]
        assert row["to_target"][0]["reached"] == row["to_target"][0]["runs"] == 1
        assert row["to_target"][0]["steps"] is not None
    assert "steps / time" in report["target_table"] and "≤100%" in proc.stdout
    assert "synthetic CIFAR-format" in proc.stdout
    figures = report["figures"]
    assert any(f.endswith("-to-target.png") for f in figures)
    assert all(Path(f).read_bytes()[:4] == b"\x89PNG" for f in figures)


def test_compress_variants_report_coded_push_bytes(tmp_path, clean_env):
    """--compress runs each configuration per coding of the pushes and compares each coded
    variant with none: push bytes per target, as coded, and the final error's difference."""
    out = tmp_path / "conv-compress.json"
    options = "--workers 2 --algorithms easgd --taus 4 --seeds 1 --steps 200 --targets 1.0"
    options += " --compress none,int8,int8-nofeedback"
    cmd = [sys.executable, str(BENCH), *options.split(), "--out", str(out)]
    proc = launching.run(cmd, clean_env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["compress"] == ["none", "int8", "int8-nofeedback"]
    runs = {r["compress"]: r for r in report["runs"]}
    assert set(runs) == {"none", "int8", "int8-nofeedback"}
    assert runs["int8-nofeedback"]["settings"]["error_feedback"] == "false"
    exchanges = 2 * 200 // 4
    n = runs["none"]["bytes"] // (8 * exchanges)
    assert runs["none"]["push_bytes"] == 4 * n * exchanges
    for coded in ("int8", "int8-nofeedback"):
        assert runs[coded]["bytes"] == runs["none"]["bytes"]  # the window moves float32
        assert runs[coded]["push_bytes"] == exchanges * (n + 4 * -(-n // 256))
    assert {r["compress"] for r in report["summary"]} == set(runs)
    table = report["compression_table"]
    assert "int8-nofeedback" in table and "push × / read+push ×" in table
    assert "push MB (coded)" in report["table"]
    assert any(f.endswith("-push-bytes.png") for f in report["figures"])
