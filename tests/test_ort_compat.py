"""Older ONNX Runtime releases (1.18 to 1.25) fuse a float64 Transpose -> MatMul into a
FusedMatMul that has no double kernel, so AngularMiner's graphs failed to load there;
sessions exportminers builds turn that fusion off on those releases only."""
from types import SimpleNamespace

import numpy as np
import pytest

import exportminers
from exportminers import miners
from exportminers.runtime import compat
from exportminers.verify import compare, eager_tuples, random_batch, sensitive_tuples

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("version, off", [
    ("1.18.1", True), ("1.25.1", True), ("1.26.0", False), ("1.32.0", False),
    ("2.0.0", False), ("1.24.0.dev20250101", True), ("unknown", False)])
def test_fusion_is_turned_off_only_before_the_fix(version, off):
    got = compat.session_kwargs(SimpleNamespace(__version__=version))
    assert got == ({"disabled_optimizers": ["MatmulTransposeFusion"]} if off else {})


def test_onnx_miner_passes_the_work_around_to_onnx_runtime(tmp_path, monkeypatch):
    path = exportminers.export_onnx(miners.AngularMiner(), tmp_path / "angular.onnx")
    seen = []
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        seen.append(kwargs.get("disabled_optimizers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "__version__", "1.25.1")
    monkeypatch.setattr(ort, "InferenceSession", spy)
    monkeypatch.setattr(compat, "_WARNED", [False])
    with pytest.warns(UserWarning, match="older than 1.26"):
        om = exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"])
    assert seen == [["MatmulTransposeFusion"]]     # a name this ONNX Runtime accepts too
    batch = random_batch(24, 6, seed=int(np.random.default_rng().integers(1 << 30)))
    miner = miners.AngularMiner()
    got, want = om(batch["embeddings"], batch["labels"]), eager_tuples(miner, batch)
    ok, info = compare(got, want, "triplets")
    if not ok:   # tuples within 1e-4 of the angle threshold may go either way
        ok, info = compare(got, want, "triplets",
                           sensitive_tuples(miner, batch, "triplets", 1e-4))
    assert ok, info


def test_graph_newer_than_onnx_runtime_names_the_requirement(tmp_path):
    import onnx
    path = exportminers.export_onnx(miners.BatchHardMiner(), tmp_path / "bh.onnx")
    model = onnx.load(path)
    model.ir_version = 99          # as an IR-10 graph looks to onnxruntime 1.17
    onnx.save(model, tmp_path / "future.onnx")
    with pytest.raises(ValueError, match=r"future\.onnx.*IR version.*need onnxruntime>=1\.18 \(tested from 1\.26\)"):
        exportminers.OnnxMiner(tmp_path / "future.onnx", providers=["CPUExecutionProvider"])


def test_older_onnx_runtime_warns_once_and_refuses_dlpack_clearly(tmp_path, monkeypatch):
    import warnings
    path = exportminers.export_onnx(miners.BatchHardMiner(), tmp_path / "bh.onnx")
    monkeypatch.setattr(compat, "_WARNED", [False])
    monkeypatch.setattr(ort, "__version__", "1.24.4")
    with pytest.warns(UserWarning, match="onnxruntime 1.24.4 is older than 1.26"):
        om = exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # once per process
        exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng().standard_normal((10, 4)).astype(np.float32)
    y = np.arange(10) % 3
    assert len(om(x, y)) == 3                 # numpy inputs work
    monkeypatch.delattr(ort.OrtValue, "from_dlpack", raising=False)   # as before 1.26
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"embeddings: .*lacks \(added in 1\.26\); pass numpy"):
        om(torch.from_numpy(x), torch.from_numpy(y))
    monkeypatch.setattr(ort, "__version__", "1.26.0")
    monkeypatch.setattr(compat, "_WARNED", [False])
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # tested releases: no warning
        exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"])
