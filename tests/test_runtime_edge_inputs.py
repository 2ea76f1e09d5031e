"""OnnxMiner and ``exportminers export`` on inputs an audit found mishandled: mixed
torch/numpy arguments, DLPack producers other than torch, empty compact outputs, float16
range errors, float16 graphs verified against their own arithmetic, configuration
errors up front, metadata configs that rebuild the miner."""
import json

import numpy as np
import pytest
import torch

import exportminers
from exportminers import cli, miners, registry
from exportminers.export import build_miner, miner_config
from exportminers.verify import verify_graph

from onnx_graph_cache import graph, ref_graph


class _DLPackOnly:
    """A DLPack producer that is neither torch nor numpy (as CuPy or JAX arrays are)."""

    def __init__(self, arr):
        self.arr = arr

    def __dlpack__(self, *args, **kwargs):
        return self.arr.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.arr.__dlpack_device__()


def _sorted(out):
    out = [out] if isinstance(out, np.ndarray) else list(out)
    return [np.sort(np.asarray(o)) for o in out]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_sorted(a), _sorted(b)))


def test_torch_embeddings_with_numpy_reference():
    _, path = ref_graph("BatchHardMiner")
    om = exportminers.OnnxMiner(path)
    rng = np.random.default_rng(0)
    e, r = rng.standard_normal((7, 8), dtype=np.float32), rng.standard_normal((9, 8), dtype=np.float32)
    lab, rlab = np.arange(7) % 3, np.arange(9) % 3
    want = om(e, lab, r, rlab)
    for args in ((torch.from_numpy(e), lab, r, rlab), (e, lab, torch.from_numpy(r), rlab),
                 (torch.from_numpy(e), torch.from_numpy(lab), r, torch.from_numpy(rlab))):
        assert _same(om(*args), want)
    with pytest.raises(ValueError, match="ref_emb has dtype float64 but embeddings has float32"):
        om(torch.from_numpy(e), lab, r.astype(np.float64), rlab)


def test_dlpack_inputs_that_are_not_torch():
    _, path = ref_graph("BatchHardMiner")
    rng = np.random.default_rng(1)
    e, r = rng.standard_normal((7, 8), dtype=np.float32), rng.standard_normal((9, 8), dtype=np.float32)
    lab, rlab = np.arange(7) % 3, np.arange(9) % 3
    want = exportminers.OnnxMiner(path)(e, lab, r, rlab)
    assert _same(exportminers.OnnxMiner(path)(_DLPackOnly(e), lab, _DLPackOnly(r), rlab), want)
    with pytest.raises(ValueError, match=r"embeddings: mining in anchor blocks .* torch tensors "
                                         r"and numpy arrays only, not _DLPackOnly"):
        exportminers.OnnxMiner(path, chunk_size=3)(_DLPackOnly(e), lab, r, rlab)
    with pytest.raises(ValueError, match=r"embeddings: ONNX Runtime cannot take this DLPack "
                                         r"input \(strided, not contiguous\)"):
        exportminers.OnnxMiner(path)(_DLPackOnly(np.asfortranarray(e)), lab, r, rlab)
    # numpy embeddings with a DLPack reference: read on the host, strided or not
    assert _same(exportminers.OnnxMiner(path)(e, lab, _DLPackOnly(r[::2]), rlab[::2]),
                 exportminers.OnnxMiner(path)(e, lab, r[::2], rlab[::2]))
    with pytest.raises(ValueError, match=r"ref_emb: ONNX Runtime cannot take this DLPack"):
        exportminers.OnnxMiner(path)(_DLPackOnly(e), lab, _DLPackOnly(r[::2]), rlab[::2])


def test_return_raw_of_empty_batch_on_compact_graph():
    _, path = graph("BatchHardMiner", compact=True)
    om = exportminers.OnnxMiner(path)
    e = np.random.default_rng(2).standard_normal((5, 8), dtype=np.float32)
    full = om(e, np.arange(5) % 2, return_raw=True)
    empty = om(e[:0], np.zeros(0, np.int64), return_raw=True)
    assert [o.ndim for o in full] == [1] * len(full)
    assert [o.shape for o in empty] == [(0,)] * len(full)


def test_float16_graph_names_range_not_nan_for_torch_input():
    _, path = graph("BatchHardMiner", dtype=torch.float16)
    om = exportminers.OnnxMiner(path)
    big = torch.randn(7, 8) * 1e6
    for x in (big, big.numpy()):
        with pytest.raises(ValueError, match="embeddings has values beyond float16's range"):
            om(x, np.arange(7) % 3)
    nan = torch.randn(7, 8)
    nan[2, 3] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains NaN or inf"):
        om(nan, np.arange(7) % 3)


@pytest.mark.parametrize("name", ["UniformHistogramMiner", "TripletMarginMiner",
                                  "MultiSimilarityMiner"])
@pytest.mark.parametrize("with_ref", [False, True])
def test_float16_graphs_pass_verification(name, with_ref):
    """Float16 graphs are checked against torch running the graph's arithmetic; the
    UniformHistogram graph used to fail at most sizes (its bins moved by an ulp)."""
    miner, path = graph(name, 0, with_ref=with_ref, dtype=torch.float16,
                        embedding_dim=None if with_ref else 8)
    for seed in range(2):
        report = verify_graph(miner, path, sizes=(12, 20, 100), seed=seed)
        assert report["ok"], report["runs"]


def test_float16_distances_in_graph_arithmetic_round_once():
    """A float16 graph computes distances in float32 and rounds once: torch with the
    graph's arithmetic gives exactly what ONNX Runtime's CPU EP gives."""
    from exportminers import _ops, distances

    class D(torch.nn.Module):
        def __init__(self, dist):
            super().__init__()
            self.dist = dist

        def forward(self, x):
            return self.dist(x, None)

    x = torch.from_numpy(np.random.default_rng(3).standard_normal((20, 8)).astype(np.float16))
    for dist in (distances.LpDistance(), distances.CosineSimilarity(),
                 distances.DotProductSimilarity()):
        with _ops.graph_arithmetic():
            got = D(dist)(x)
        want = dist(x.float(), None).half()
        if isinstance(dist, distances.LpDistance):
            want = want.masked_fill(torch.eye(20, dtype=torch.bool), 0)
        assert got.dtype == torch.float16
        assert torch.equal(got, want) or float((got.float() - want.float()).abs().max()) < 1e-3


def test_metadata_config_rebuilds_the_miner():
    cases = [("AngularMiner", {"angle": 35}),
             ("TripletMarginMiner", {"max_triplets_per_anchor": 2, "cap_order": "random"}),
             ("TripletMarginMiner", {"margin": 0.1})]
    cases += [(n, c) for n, s in registry.MINERS.items() for c in s.configs]
    for name, cfg in cases:
        m = build_miner(name, cfg)
        c = miner_config(m)
        for k, v in cfg.items():
            if not isinstance(v, dict):
                assert c[k] == v, (name, k)
        assert miner_config(build_miner(name, c)) == c, name
    m = miners.AngularMiner(angle=35)
    assert exportminers.OnnxMiner(graph("AngularMiner", 1)[1]).config["angle"] == 35
    assert miner_config(m)["angle"] == 35


@pytest.mark.parametrize("config, match", [
    ({"distance": {"p": 1}}, "distance needs a 'class' key"),
    ({"distance": {"class": "Nope"}}, "'Nope' is not an exportminers distance"),
    ({"distance": {"class": "LpDistance", "q": 3}}, "distance LpDistance: .*'q'"),
    ({"bogus": 1}, "unexpected keyword argument 'bogus'"),
    ({"pos_margin": "x"}, "pos_margin must be a number"),
])
def test_build_miner_errors_name_the_miner(config, match):
    with pytest.raises(ValueError, match=f"PairMarginMiner: .*{match}|{match}"):
        build_miner("PairMarginMiner", config)


def test_export_cli_checks_configs_before_exporting(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"PairMarginMiner": {"distance": {"p": 1}},
                               "TripletMarginMiner": [{"bogus": 1}, {}]}))
    with pytest.raises(SystemExit, match=r"nothing exported:\n  --config/--set "
                                         r"PairMarginMiner\[0\]: .*'class' key.*\n  .*"
                                         r"TripletMarginMiner\[0\]: .*'bogus'"):
        cli.main(["export", "--out", str(tmp_path / "o"), "--config", str(cfg), "--no-verify"])
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.onnx"))


def test_export_cli_config_for_a_miner_not_listed(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"TripletMarginMiner": {}}))
    with pytest.raises(SystemExit, match="configures TripletMarginMiner, which is not among "
                                         "--miners"):
        cli.main(["export", "--out", str(tmp_path / "o"), "--miners", "BatchHardMiner",
                  "--config", str(cfg), "--no-verify"])


def test_export_cli_quiet_still_prints_failures(tmp_path, monkeypatch, capsys):
    import exportminers.export as export_mod

    def broken(*a, **k):
        raise RuntimeError("exporter exploded")
    monkeypatch.setattr(export_mod, "export_onnx", broken)
    rc = cli.main(["export", "--out", str(tmp_path / "o"), "--miners", "BatchHardMiner", "-q"])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.out == ""
    assert "BatchHardMiner_c0.onnx: failed: RuntimeError: exporter exploded" in captured.err


def test_demo_cli_every_miner_and_unknown(capsys):
    assert cli.main(["demo", "--miner", "EmbeddingsAlreadyPackagedAsTriplets"]) == 0
    out = capsys.readouterr().out
    assert "batch 33 x 16" in out and "same as eager: True" in out
    with pytest.raises(SystemExit, match="--miner 'FooMiner': unknown"):
        cli.main(["demo", "--miner", "FooMiner"])
