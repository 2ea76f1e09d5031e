"""Graphs over listed positives (``export_onnx(..., gather_positives=True)``).

TripletMarginMiner (no cap) and AngularMiner test each anchor's positives against every
negative, [N, P, M] candidates instead of [N, M, M]. The caller lists the positives
(``positive_index``, :func:`exportminers.runtime.positives.positive_index`), the graph
checks the list (``unmatched_positives``), OnnxMiner does both. Checked here: the lists
against a brute-force reference, the graph's check against wrong lists, parity with the
eager miner (tuples and their order) and with PML, blocks, edge batches, the memory
sizing with P, errors, and a run with torch unimportable.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest
import torch

import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.miners as pml_miners

from exportminers import distances, export, miners
from exportminers.runtime import OnnxMiner, onnx_miner, positives
from exportminers.utils import loss_and_miner_utils as lmu
from exportminers.verify import as_multisets, eager_tuples, random_batch, verify_graph

import onnx_graph_cache

D = onnx_graph_cache.D
CPU = ["CPUExecutionProvider"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["self", "ref", "anchors"]
CONFIGS = [("TripletMarginMiner", c) for c in range(4)] + [("AngularMiner", c) for c in range(2)]


def _graph(name, cfg=0, mode="self", **kw):
    return onnx_graph_cache.graph(name, cfg, with_ref=mode == "ref",
                                  embedding_dim=None if mode == "ref" else D,
                                  anchor_blocks=mode == "anchors", gather_positives=True, **kw)


def _brute_lists(labels, ref_labels=None, anchor_index=None):
    """Each anchor's positive columns by a double loop."""
    labels = list(np.asarray(labels))
    if ref_labels is None:
        refs = labels
        anchors = list(range(len(labels))) if anchor_index is None else list(anchor_index)
        rows = [[j for j in range(len(refs)) if refs[j] == refs[a] and j != a] for a in anchors]
    else:
        refs = list(np.asarray(ref_labels))
        rows = [[j for j in range(len(refs)) if refs[j] == a] for a in labels]
    return rows


def _as_lists(index):
    return [[int(c) for c in row if c >= 0] for row in index]


def _tuples(out):
    return [np.asarray(x) for x in out]


# ------------------------------------------------------------------------ the lists


@pytest.mark.parametrize("case", ["random", "one_class", "distinct", "huge_labels", "single",
                                  "empty_refs"])
@pytest.mark.parametrize("mode", MODES)
def test_positive_index_matches_brute_force(case, mode):
    rng = np.random.default_rng(hash((case, mode)) % 2 ** 32)
    n, m = 23, 31
    draw = {"random": lambda k: rng.integers(0, 6, k), "one_class": lambda k: np.zeros(k, int),
            "distinct": lambda k: np.arange(k) * 7,
            "huge_labels": lambda k: rng.choice([-2 ** 62, 3, 2 ** 62], k),
            "single": lambda k: rng.integers(0, 2, k), "empty_refs": lambda k: rng.integers(0, 3, k)}[case]
    if case == "single":
        n = 1
    labels = draw(n).astype(np.int64)
    ref = anchors = None
    if mode == "ref":
        ref = draw(0 if case == "empty_refs" else m).astype(np.int64)
    elif mode == "anchors":
        anchors = rng.permutation(n)[: max(1, n // 2)]
    got = positives.positive_index(labels, ref, anchors)
    want = _brute_lists(labels, ref, anchors)
    assert got.dtype == np.int64 and got.shape[0] == len(want) and got.shape[1] >= 1
    assert _as_lists(got) == want
    # left-packed, as narrow as the longest list (at least one column)
    assert got.shape[1] == max([1] + [len(r) for r in want])
    for row in got:
        k = int((row >= 0).sum())
        assert (row[k:] == -1).all()


def test_positive_index_argument_errors():
    with pytest.raises(ValueError, match="anchor_index must hold rows"):
        positives.positive_index(np.array([0, 1]), anchor_index=np.array([2]))
    with pytest.raises(ValueError, match="anchor_index: a self-mining"):
        positives.positive_index(np.array([0]), np.array([0]), np.array([0]))


def test_listed_positives_flags_every_wrong_list():
    """``unmatched`` is zero exactly for a correct list: a list is read while it increases,
    so a missing, repeated, out-of-order or out-of-range column (and every column after a
    repeat, step back or hole) leaves positives unmatched; a listed non-positive is
    skipped."""
    labels = torch.tensor([0, 0, 0, 1, 0])
    pos, _ = lmu.pair_masks(labels)                      # anchor 0: positives 1, 2, 4

    def check(row):
        idx = torch.full((5, 4), -1, dtype=torch.int64)
        idx[0, :len(row)] = torch.tensor(row)
        cols, valid, unmatched = lmu.listed_positives(pos, idx)
        return int(unmatched[0]), sorted(int(c) for c, v in zip(cols[0], valid[0]) if v)

    assert check([1, 2, 4]) == (0, [1, 2, 4])
    assert check([1, 2, 3, 4]) == (0, [1, 2, 4])        # 3 is no positive: skipped
    assert check([1, 4]) == (1, [1, 4])                  # 2 missing
    assert check([1, -1, 2, 4]) == (2, [1])              # a hole: what follows is not read
    assert check([1, 4, 2]) == (1, [1, 4])               # out of order
    assert check([1, 1, 2, 4]) == (2, [1])               # a repeat ends the list
    assert check([2, 4, 1, 2]) == (1, [2, 4])            # no repeat gets in after a step back
    assert check([-5, 1, 2, 4]) == (3, [])               # any negative value is padding
    # one row for every anchor: broadcast, each anchor checked against its own positives
    cols, valid, unmatched = lmu.listed_positives(pos, torch.tensor([[1, 2, 4]]))
    assert cols.shape == (5, 3) and unmatched.tolist() == [0, 1, 1, 0, 1]
    assert check([1, 2, 9]) == (1, [1, 2])               # out of range
    assert check([]) == (3, [])


# ------------------------------------------------------------------------ parity


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,cfg", CONFIGS)
def test_parity_with_eager(name, cfg, mode):
    """The graph's tuples are the eager miner's (tie-aware for AngularMiner's exported
    arithmetic), and anchor blocks give the one-call result (verify_graph)."""
    miner, path = _graph(name, cfg, mode)
    counts = export.op_types(path)
    assert not (export.FORBIDDEN_OPS | export.SHAPE_OPS).intersection(counts), counts
    report = verify_graph(miner, path, sizes=(12, 21), ref_sizes=(17, 8), seed=cfg + 40)
    assert report["ok"], json.dumps(report["runs"], indent=1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["TripletMarginMiner", "AngularMiner"])
def test_same_tuples_in_the_same_order_as_the_dense_graph(name, mode):
    """Over listed positives the graph computes each candidate with the dense graph's own
    arithmetic and decodes in (anchor, positive, negative) order: identical arrays."""
    _, dense = onnx_graph_cache.graph(name, 0, with_ref=mode == "ref",
                                      embedding_dim=None if mode == "ref" else D,
                                      anchor_blocks=mode == "anchors")
    _, gather = _graph(name, 0, mode)
    for seed in range(3):
        b = random_batch(19, D, m=26 if mode == "ref" else None, seed=seed)
        args = [b[k] for k in ("embeddings", "labels", "ref_emb", "ref_labels") if k in b]
        want = OnnxMiner(dense, providers=CPU)(*args)
        got = OnnxMiner(gather, providers=CPU)(*args)
        assert len(want[0]) > 0
        assert all(np.array_equal(g, w) for g, w in zip(got, want)), seed


@pytest.mark.parametrize("kw,pml_kw", [
    ({"margin": 0.3, "type_of_triplets": "semihard", "distance": distances.CosineSimilarity()},
     {"margin": 0.3, "type_of_triplets": "semihard", "distance": pml_distances.CosineSimilarity()}),
    ({"margin": -0.05}, {"margin": -0.05}),
    ({"margin": 1e30, "type_of_triplets": "hard"}, {"margin": 1e30, "type_of_triplets": "hard"}),
    ({"margin": 0.5, "distance": distances.LpDistance(normalize_embeddings=False)},
     {"margin": 0.5, "distance": pml_distances.LpDistance(normalize_embeddings=False)}),
])
def test_triplet_margin_matches_pml_in_order(kw, pml_kw, tmp_path):
    """TripletMarginMiner over listed positives, other distances and margins: PML's
    triplets, in PML's (row-major) order, on fresh inputs at two sizes."""
    path = export.export_onnx(miners.TripletMarginMiner(**kw), tmp_path / "g.onnx",
                              embedding_dim=D, gather_positives=True)
    om = OnnxMiner(path, providers=CPU)
    pml = pml_miners.TripletMarginMiner(**pml_kw)
    for seed, n in ((1, 16), (2, 33)):
        g = torch.Generator().manual_seed(seed)
        lab = torch.randint(0, 5, (n,), generator=g)
        emb = torch.randn(5, D, generator=g)[lab] + 0.8 * torch.randn(n, D, generator=g)
        want = pml(emb, lab)
        got = om(emb.numpy(), lab.numpy())
        assert len(want[0]) > 0
        assert all(np.array_equal(x, y.numpy()) for x, y in zip(got, want)), seed


def test_float16_graph(tmp_path):
    """AngularMiner's float16 graph gathers float64 terms: exact, ties included (rows
    repeated under other labels give exact ties). TripletMarginMiner's is refused:
    ONNX Runtime's CPU EP would round the gathered d(a, p) to float16 and leave d(a, n)
    in float32, flipping exact ties."""
    miner, path = _graph("AngularMiner", 0, "self", dtype=torch.float16)
    om = OnnxMiner(path, providers=CPU)
    assert om.dtype == np.float16
    report = verify_graph(miner, path, sizes=(12, 20), seed=5)
    assert report["ok"], json.dumps(report["runs"], indent=1)
    _, dense = onnx_graph_cache.graph("AngularMiner", 0, dtype=torch.float16)
    rng = np.random.default_rng(2)
    for _ in range(5):
        base = rng.standard_normal((6, D)).astype(np.float16)
        emb = np.concatenate([base, base[1:4], base[1:4]])
        lab = rng.integers(0, 3, len(emb))
        want = OnnxMiner(dense, providers=CPU)(emb, lab)
        assert all(np.array_equal(g, w) for g, w in zip(om(emb, lab), want))
    with pytest.raises(ValueError, match=r"gather_positives: TripletMarginMiner .* "
                                         r"\['float32'\] only, not float16"):
        export.export_onnx(miners.TripletMarginMiner(), tmp_path / "x.onnx",
                           dtype=torch.float16, gather_positives=True)


@pytest.mark.parametrize("labels", [[3] * 9, list(range(9)), [5], [0, 0]])
@pytest.mark.parametrize("mode", ["self", "anchors"])
def test_edge_batches(labels, mode):
    """One class, no positives at all (a column of -1 is passed), one row, two rows."""
    miner, path = _graph("TripletMarginMiner", 0, mode)
    lab = np.array(labels, dtype=np.int64)
    emb = np.random.default_rng(len(labels)).standard_normal((len(lab), D)).astype(np.float32)
    b = {"embeddings": emb, "labels": lab}
    got = OnnxMiner(path, providers=CPU)(emb, lab)
    want = eager_tuples(miner, b)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    empty = OnnxMiner(path, providers=CPU)(emb[:0], lab[:0])
    assert [len(x) for x in empty] == [0, 0, 0]


def test_torch_and_numpy_inputs_and_raw_outputs():
    miner, path = _graph("AngularMiner", 0, "ref")
    b = random_batch(14, 5, m=20, seed=9)
    args = [b[k] for k in ("embeddings", "labels", "ref_emb", "ref_labels")]
    om = OnnxMiner(path, providers=CPU)
    host = om(*args)
    tens = om(*[torch.from_numpy(a) for a in args])
    assert all(np.array_equal(x, y) for x, y in zip(host, tens))
    out = om(*args, device_output=False, return_raw=True)
    assert om.output_names == ["mask0", "index1", "unmatched_positives"]
    p = positives.positive_index(b["labels"], b["ref_labels"]).shape[1]
    assert [list(o.shape) for o in out] == [[14, p, 20], [14, p, 1], [14]]
    assert not np.asarray(out[2]).any()
    model = onnx.load(path)
    inp = model.graph.input[-1]
    assert inp.name == "positive_index"
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["N", "P"]


def test_blocks_and_memory_sizing_use_the_list_width(monkeypatch):
    """The largest-tensor shapes carry P: block sizes follow them, each block gets its own
    (narrower) list, and the blocks' tuples equal one call's."""
    miner, path = _graph("TripletMarginMiner", 0, "anchors")
    om = OnnxMiner(path, providers=CPU)
    assert any("P" in map(str, s) for s in om.largest_tensors)
    b = random_batch(40, D, seed=3, num_classes=6)
    p = positives.positive_index(b["labels"]).shape[1]
    assert om.largest_tensor_elements(40, 40, D, p) == 40 * p * 40
    one = om(b["embeddings"], b["labels"])
    monkeypatch.setattr(onnx_miner, "CPU_BLOCK_ELEMENTS", 10 * p * 40)
    om = OnnxMiner(path, providers=CPU)
    widths, real = [], om.session.run

    def counting(names, feeds, *rest):
        widths.append(feeds["positive_index"].shape)
        return real(names, feeds, *rest)

    om.session.run = counting
    got = om(b["embeddings"], b["labels"])
    assert [w[0] for w in widths] == [10, 10, 10, 10]
    assert all(w[1] <= p for w in widths)
    assert all(np.array_equal(x, y) for x, y in zip(got, one))
    assert as_multisets(got, "triplets") == as_multisets(eager_tuples(miner, b), "triplets")


def test_a_wrong_list_is_an_error_not_missing_triplets(monkeypatch):
    _, path = _graph("TripletMarginMiner", 0, "self")
    b = random_batch(12, D, seed=4, num_classes=3)
    real = positives.positive_index

    def drop_last(*a, **k):
        lists = real(*a, **k)
        lists[5, (lists[5] >= 0).sum() - 1] = -1
        return lists

    monkeypatch.setattr(positives, "positive_index", drop_last)
    with pytest.raises(RuntimeError, match=r"1 positive\(s\) of anchor 5 .* not listed"):
        OnnxMiner(path, providers=CPU)(b["embeddings"], b["labels"])


def test_export_refuses_miners_that_cannot_gather(tmp_path):
    for miner, what in ((miners.TripletMarginMiner(max_triplets_per_anchor=3),
                         "with max_triplets_per_anchor"),
                        (miners.BatchHardMiner(), "BatchHardMiner")):
        with pytest.raises(ValueError, match=f"gather_positives: .*{what}"):
            export.export_onnx(miner, tmp_path / "x.onnx", gather_positives=True)
    with pytest.raises(ValueError, match="gather_positives: not with compact"):
        export.export_onnx(miners.TripletMarginMiner(), tmp_path / "x.onnx",
                           gather_positives=True, compact=True)
    with pytest.raises(ValueError, match="gather_positives must be True or False"):
        export.export_onnx(miners.TripletMarginMiner(), tmp_path / "x.onnx",
                           gather_positives=1)
    assert not (tmp_path / "x.onnx").exists()


def test_runs_without_torch(tmp_path):
    miner, path = _graph("AngularMiner", 1, "anchors")
    b = random_batch(15, D, seed=21, num_classes=4)
    np.savez(tmp_path / "batch.npz", **b)
    want = [a.tolist() for a in eager_tuples(miner, b)]
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None          # any `import torch` now raises ImportError
        import numpy as np
        from exportminers import OnnxMiner
        b = np.load({str(tmp_path / 'batch.npz')!r})
        om = OnnxMiner({path!r}, chunk_size=4)
        print(json.dumps([a.tolist() for a in om(b["embeddings"], b["labels"])]))
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert as_multisets(got, "triplets") == as_multisets(want, "triplets")
