"""TripletMarginMiner(max_triplets_per_anchor=K): the bounded result, checked against a
brute-force reference (every triplet PML selects, with its margin), eager, TorchScript
and exported. Hardest: each anchor keeps min(K, count) of its selected triplets with the
K smallest margins (ties in any order). Random: min(K, count) distinct selected
triplets, each kept with probability K / count."""
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances as pml_d
from pytorch_metric_learning import miners as pml_miners

import exportminers
from exportminers import distances as our_d
from exportminers import miners
from exportminers.decode import decode
from harness import make_batch

TYPES = ["all", "hard", "semihard", "easy"]


def _selected(x, y, kind, margin, cosine, ref=None, ref_y=None):
    """anchor -> {(p, n): margin} for every triplet PML selects."""
    dist = pml_d.CosineSimilarity() if cosine else pml_d.LpDistance()
    pml = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=kind, distance=dist)
    if ref is None:
        a, p, n = pml(x, y)
        mat = dist(x)
    else:
        a, p, n = pml(x, y, ref.clone(), ref_y.clone())
        mat = dist(x, ref)
    out = defaultdict(dict)
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        m = float(mat[i, j] - mat[i, k]) if cosine else float(mat[i, k] - mat[i, j])
        out[i][(j, k)] = m
    return out


def _check_hardest(out, sel, k, n_anchors):
    got = defaultdict(list)
    for i, j, l in zip(*[t.tolist() for t in out]):
        got[i].append((j, l))
    for i in range(n_anchors):
        chosen = got.get(i, [])
        assert len(chosen) == len(set(chosen)), f"anchor {i}: a triplet twice"
        assert len(chosen) == min(k, len(sel.get(i, {}))), f"anchor {i}: wrong count"
        assert all(c in sel[i] for c in chosen), f"anchor {i}: a triplet PML does not select"
        want = sorted(sel[i].values())[:len(chosen)] if chosen else []
        assert sorted(sel[i][c] for c in chosen) == want, f"anchor {i}: not the hardest"


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("k", [1, 3, 50])
def test_hardest_cap_equals_brute_force(kind, cosine, k, seed):
    margin = 0.3 if kind != "easy" else 0.05
    for trial in range(3):
        x, y, _ = make_batch(17, 4, 6, seed + trial, 0.7, torch.float64)
        ref = ref_y = None
        if trial == 2:
            ref, ref_y, _ = make_batch(11, 4, 6, seed + 99, 0.7, torch.float64)
        sel = _selected(x, y, kind, margin, cosine, ref, ref_y)
        dist = our_d.CosineSimilarity() if cosine else our_d.LpDistance()
        miner = miners.TripletMarginMiner(margin=margin, type_of_triplets=kind, distance=dist,
                                          max_triplets_per_anchor=k)
        args = (x, y) if ref is None else (x, y, ref, ref_y)
        _check_hardest(miner(*args), sel, k, 17)
        _check_hardest(torch.jit.script(miner)(*args), sel, k, 17)


def test_random_cap_picks_valid_distinct_triplets_uniformly():
    x, y, _ = make_batch(10, 2, 4, 3, 0.7, torch.float64)
    sel = _selected(x, y, "all", 0.5, False)
    miner = miners.TripletMarginMiner(margin=0.5, max_triplets_per_anchor=3, cap_order="random")
    torch.manual_seed(0)
    first = miner(x, y)
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(first, miner(x, y)))   # reproducible
    counts = Counter()
    trials = 600
    for _ in range(trials):
        a, p, n = miner(x, y)
        for i in range(10):
            rows = [(j, l) for ii, j, l in zip(a.tolist(), p.tolist(), n.tolist()) if ii == i]
            assert len(rows) == len(set(rows)) == min(3, len(sel[i]))
            assert all(r in sel[i] for r in rows)
        counts.update(zip(a.tolist(), p.tolist(), n.tolist()))
    # each selected triplet of an anchor is kept with probability 3 / count
    from scipy.stats import chisquare
    anchor = max(sel, key=lambda i: len(sel[i]))
    cands = list(sel[anchor])
    assert len(cands) > 3
    obs = [counts[(anchor,) + c] for c in cands]
    assert chisquare(obs).pvalue > 1e-4, obs


@pytest.mark.parametrize("cosine", [False, True], ids=["l2", "cos"])
@pytest.mark.parametrize("kind", ["all", "semihard"])
@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
def test_hardest_cap_graph_equals_brute_force(tmp_path, cosine, kind, with_ref):
    dist = our_d.CosineSimilarity() if cosine else our_d.LpDistance()
    miner = miners.TripletMarginMiner(margin=0.3, type_of_triplets=kind, distance=dist,
                                      max_triplets_per_anchor=4)
    path = exportminers.export_onnx(miner, str(tmp_path / "c.onnx"), embedding_dim=6,
                                    with_ref=with_ref)
    om = exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"])
    for n in (9, 23):
        x, y, _ = make_batch(n, 3, 6, n, 0.7, torch.float32)
        ref = ref_y = None
        if with_ref:
            ref, ref_y, _ = make_batch(n + 4, 3, 6, n + 1, 0.7, torch.float32)
        sel = _selected(x, y, kind, 0.3, cosine, ref, ref_y)
        args = (x.numpy(), y.numpy()) + (() if ref is None else (ref.numpy(), ref_y.numpy()))
        out = [torch.from_numpy(o) for o in om(*args)]
        _check_hardest(out, sel, 4, n)


def test_random_cap_graph_equals_eager_kernel_on_the_same_noise(tmp_path):
    miner = miners.TripletMarginMiner(margin=0.4, max_triplets_per_anchor=3, cap_order="random")
    path = exportminers.export_onnx(miner, str(tmp_path / "r.onnx"), embedding_dim=6)
    om = exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"])
    x, y, _ = make_batch(14, 3, 6, 5, 0.7, torch.float32)
    noise = torch.rand(14, 14, 14, dtype=torch.float64)
    want = decode(miner.kernel(x, y, None, None, noise), miner.layout)
    got = om(x.numpy(), y.numpy(), noise=noise.numpy())
    key = lambda out: Counter(zip(*[np.asarray(t).tolist() for t in out]))  # noqa: E731
    assert len(want[0]) > 0 and key(got) == key(want)
