"""NaN distances (SNR between constant rows): the exported masked max/min pick the same
column as torch (a row's first NaN candidate), so ONNX Runtime returns the eager miner's
tuples, which equal PML's wherever PML's are valid."""
from collections import Counter

import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import miners as pml_miners

import exportminers as em

CONFIGS = [
    ("BatchHardMiner", {}),
    ("BatchEasyHardMiner", {}),
    ("BatchEasyHardMiner", {"pos_strategy": "hard", "neg_strategy": "hard"}),
    ("BatchEasyHardMiner", {"pos_strategy": "easy", "neg_strategy": "easy"}),
    ("BatchEasyHardMiner", {"pos_strategy": "all", "neg_strategy": "hard"}),
]


def _snr_batch(seed):
    rng = np.random.default_rng(seed)
    n = 16
    x = rng.standard_normal((n, 5)).astype(np.float32)
    rows = rng.choice(n, 3, replace=False)
    for k, r in enumerate(rows):
        x[r] = float(k + 1)          # constant rows: NaN SNR distances
    y = rng.integers(0, 4, n)
    return x, y


def _pairs(out):
    """(anchor, column, same_label_expected) of every pair in a miner's output."""
    out = [t.numpy() for t in out]
    if len(out) == 3:
        return [(out[0], out[1], True), (out[0], out[2], False)]
    return [(out[0], out[1], True), (out[2], out[3], False)]


def _invalid_anchors(out, y):
    bad = set()
    for a, c, same in _pairs(out):
        wrong = (y[a] == y[c]) != same
        if same:
            wrong |= a == c
        bad |= set(a[wrong].tolist())
    return bad


def _multiset(out, drop=()):
    return [Counter((int(i), int(j)) for i, j in zip(a, c) if int(i) not in drop)
            for a, c, _ in _pairs(out)]


@pytest.mark.parametrize("name,cfg", CONFIGS)
def test_nan_distances_eager_pml_and_graph(tmp_path, name, cfg):
    ours = getattr(em.miners, name)(distance=em.distances.SNRDistance(), **cfg)
    pml = getattr(pml_miners, name)(distance=pml_distances.SNRDistance(), **cfg)
    path = str(tmp_path / "g.onnx")
    em.export_onnx(ours, path)
    om = em.OnnxMiner(path, providers=["CPUExecutionProvider"])
    saw_nan = False
    for seed in range(6):
        x, y = _snr_batch(seed)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        saw_nan |= bool(torch.isnan(ours.distance(xt)).any())
        eager = ours(xt, yt)
        assert not _invalid_anchors(eager, y), seed
        # PML picks a masked column when a constant row's distances are all inf (its
        # finfo.max sentinels beat inf): those anchors are left out, the rest must agree
        want = pml(xt, yt)
        bad = _invalid_anchors(want, y)
        assert _multiset(eager, bad) == _multiset(want, bad), seed
        graph = om(x, y)
        if cfg.get("neg_strategy", "semihard") == "semihard":
            # semihard compares d(a, n) with d(a, p): SNR's exact 1.0 between constant
            # rows is a threshold tie there, which the graph's arithmetic may break
            continue
        _same_choices(graph, eager, ours.distance(xt).numpy(), seed)
    assert saw_nan


def _same_choices(graph, eager, mat, seed):
    """The same anchors, and per anchor the same column or one at the same distance
    (exact ties such as SNR's 1.0 between constant rows may be broken either way by the
    graph's own arithmetic): a NaN pick must be a NaN pick."""
    graph = [np.asarray(g) for g in graph]
    eager = [e.numpy() for e in eager]
    assert len(graph) == len(eager)
    step = 3 if len(eager) == 3 else 2      # (a, p, n) or (a1, p, a2, n)
    for k in range(0, len(eager), step):
        anchors = eager[k]
        assert graph[k].tolist() == anchors.tolist(), seed
        for col in range(k + 1, min(k + step, len(eager))):
            want = mat[anchors, eager[col]]
            got = mat[anchors, graph[col]]
            same = (graph[col] == eager[col]) | (np.isnan(want) & np.isnan(got)) | \
                np.isclose(want, got, rtol=1e-5, atol=0.0)
            assert same.all(), (seed, k, col, anchors[~same], eager[col][~same],
                                graph[col][~same], want[~same], got[~same])


def test_multisimilarity_graph_keeps_nan_like_eager(tmp_path):
    # a zero row normalised in float16 gives NaN similarities; PML's sort puts NaN last,
    # so a NaN hardest negative drops that anchor's positives: eager (= PML) and the
    # float16 graph must agree (ONNX Runtime's ReduceMax skips NaN unless told)
    ours = em.miners.MultiSimilarityMiner(epsilon=0.1)
    pml = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    path = str(tmp_path / "ms16.onnx")
    em.export_onnx(ours, path, dtype=torch.float16)
    om = em.OnnxMiner(path, providers=["CPUExecutionProvider"])
    for seed in range(4):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((12, 6)).astype(np.float16)
        x[seed % 12] = 0.0
        y = rng.integers(0, 3, 12)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        assert torch.isnan(ours.distance(xt)).any()
        eager = ours(xt, yt)
        assert _multiset(eager) == _multiset(pml(xt, yt)), seed
        assert _multiset([torch.from_numpy(np.asarray(g)) for g in om(x, y)]) == \
            _multiset(eager), seed


@pytest.mark.parametrize("largest", [False, True])
def test_infinity_and_largest_finite_keep_their_order(largest):
    # +inf vs the largest finite value (float16 overflow): torch's choice, eager and graph
    from exportminers import _ops

    big = 65504.0
    rows = [[float("inf"), big, 1.0], [big, float("inf"), -1.0],
            [-float("inf"), -big, 0.0], [float("nan"), float("inf"), big]]
    values = torch.tensor(rows, dtype=torch.float16)
    mask = torch.tensor([[True, True, False]] * 4)
    want = torch.max(values.masked_fill(~mask, float("-inf")), 1) if largest else \
        torch.min(values.masked_fill(~mask, float("inf")), 1)
    ext, idx, valid = _ops.masked_extreme(values, mask, largest)
    assert idx.tolist() == want[1].tolist()
    assert torch.equal(torch.isnan(ext), torch.isnan(want[0]))
    assert ext[~torch.isnan(ext)].tolist() == want[0][~torch.isnan(want[0])].tolist()
    assert valid.all()
