"""The benchmark runner: its --quick run writes JSON, markdown and plots, and a row that
runs past its cap or out of memory is recorded as such (no timing assertions)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

pytest.importorskip("matplotlib")
pytest.importorskip("pytorch_metric_learning")

from benchmarks import run as bench_run  # noqa: E402

STATUSES = {"ok", "oom", "timeout", "skipped", "unavailable", "error"}


def _onnx_available() -> bool:
    return bench_run.onnx_api_problem() is None


def test_quick_run_writes_json_markdown_and_plots(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--threads", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["pml"]
    rows = data["rows"]
    assert rows and all(r["status"] in STATUSES for r in rows)
    assert all(r["status"] == "ok" for r in rows if r["impl"] in ("pml", "eager", "torchscript"))
    for r in rows:
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["repeats"] >= 1 and r["peak_mem_mb"] is not None
    ort = [r for r in rows if r["impl"] == "ort_cpu"]
    assert ort, "the quick run has at least one ONNX Runtime row"
    if _onnx_available():
        assert any(r["status"] == "ok" for r in ort), ort
    else:
        assert all(r["status"] == "unavailable" for r in ort)

    md = (tmp_path / "bench_cpu.md").read_text()
    assert "| Miner | N |" in md and "PML eager" in md and "BatchHardMiner" in md
    for name in ("time_vs_n_cpu.png", "memory_vs_n_cpu.png", "ratio_vs_pml_cpu.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_timeout_and_oom_are_recorded_not_dropped():
    gib = 2 ** 30
    # PML's TripletMarginMiner at N = 1024 takes well over 0.2 s per call: past that cap
    # the row is killed and recorded as a timeout. PML's AngularMiner at N = 2048 builds an
    # 8.6e9-element triplet mask: under a 3 GiB address-space limit it runs out of memory.
    slow = bench_run.row_task("TripletMarginMiner", "pml", 1024, cap_s=0.2, warmup=1, repeats=1)
    hungry = bench_run.row_task("AngularMiner", "pml", 2048, warmup=1, repeats=1)
    (timed_out,) = bench_run.run_tasks([slow], "as", 8 * gib)
    assert timed_out["status"] == "timeout", timed_out
    (oom,) = bench_run.run_tasks([hungry], "as", 3 * gib)
    assert oom["status"] == "oom", oom
