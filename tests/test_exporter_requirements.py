"""ONNX export names what it needs before tracing anything: a torch at least
MIN_EXPORT_TORCH (older exporters fail deep inside torch, or name the dynamic axes
s0, s1, ...) and onnxscript. Eager miners and OnnxMiner need neither."""
import os
import re
import sys

import numpy as np
import pytest
import torch

import exportminers
from exportminers import export as export_mod
from exportminers import miners
from exportminers.cli import main as cli_main
from exportminers.pipeline import graphs as pipeline_graphs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import run as bench_run  # noqa: E402  (the repository's benchmarks/)


@pytest.mark.parametrize("version", ["2.4.1+cu121", "2.5.1", "2.6.0+cpu"])
def test_old_torch_is_refused_with_the_version(version, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "__version__", version)
    msg = rf"needs torch>=2\.7 .*this is torch {re.escape(version)}\."
    with pytest.raises(RuntimeError, match=msg):
        exportminers.export_onnx(miners.BatchHardMiner(), tmp_path / "g.onnx")
    assert not (tmp_path / "g.onnx").exists()
    for argv in (["export", "--out", str(tmp_path / "graphs")], ["demo"]):
        with pytest.raises(SystemExit, match=r"needs torch>=2\.7"):
            cli_main(argv)
    assert not (tmp_path / "graphs").exists()
    spec = pipeline_graphs.all_specs()[0]
    with pytest.raises(RuntimeError, match=r"needs torch>=2\.7"):
        pipeline_graphs.export_graph(spec, tmp_path / "block.onnx")
    assert "needs torch>=2.7" in bench_run.onnx_api_problem()   # ONNX rows: 'unavailable'
    # what does not export still works
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    assert len(miners.BatchHardMiner()(x, y)) == 3


@pytest.mark.parametrize("version", ["2.7.1+cu126", "2.8.0", "2.10.0a0+git1234", "3.0.0"])
def test_supported_versions_pass_the_check(version, monkeypatch):
    monkeypatch.setattr(torch, "__version__", version)
    export_mod.require_onnx_exporter()


def test_missing_onnxscript_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)   # import onnxscript fails
    with pytest.raises(ImportError, match=r"onnxscript.*exportminers\[export\]"):
        exportminers.export_onnx(miners.BatchHardMiner(), tmp_path / "g.onnx")
    with pytest.raises(SystemExit, match="onnxscript"):
        cli_main(["export", "--out", str(tmp_path / "graphs")])
    assert "onnxscript" in bench_run.onnx_api_problem()


def test_graphs_exported_here_run_without_the_exporter(tmp_path, monkeypatch):
    path = exportminers.export_onnx(miners.BatchHardMiner(), tmp_path / "g.onnx")
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    rng = np.random.default_rng()
    x = rng.standard_normal((10, 4)).astype(np.float32)
    y = rng.integers(0, 3, 10)
    got = exportminers.OnnxMiner(path)(x, y)
    want = miners.BatchHardMiner()(torch.from_numpy(x), torch.from_numpy(y))
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
