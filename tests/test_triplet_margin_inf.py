"""TripletMarginMiner with a margin that compares as +inf in the embeddings' dtype (inf
itself, or 1e5 against float16): masked-out pairs must never make triplets. PML indexes
valid triplets only, so it is the oracle."""
from collections import Counter

import numpy as np
import pytest
import torch
from pytorch_metric_learning import distances as pml_d
from pytorch_metric_learning import miners as pml_miners

import exportminers
from exportminers import distances as our_d
from exportminers import miners

DISTS = {"cos": "CosineSimilarity", "l2": "LpDistance", "l2_sq": "LpDistance",
         "dot_raw": "DotProductSimilarity"}
KW = {"cos": {}, "l2": {}, "l2_sq": {"power": 2}, "dot_raw": {"normalize_embeddings": False}}


def _tuples(out):
    return Counter(zip(*[o.tolist() for o in out]))


@pytest.mark.parametrize("margin", [float("inf"), 1e5, 3.5e38, -float("inf")])
@pytest.mark.parametrize("kind", ["all", "hard", "semihard", "easy"])
@pytest.mark.parametrize("dist", sorted(DISTS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_huge_margins_equal_pml(margin, kind, dist, dtype, seed):
    ours = miners.TripletMarginMiner(margin=margin, type_of_triplets=kind,
                                     distance=getattr(our_d, DISTS[dist])(**KW[dist]))
    ref = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets=kind,
                                        distance=getattr(pml_d, DISTS[dist])(**KW[dist]))
    scripted = torch.jit.script(ours)
    for _ in range(2):
        x = torch.randn(13, 5).to(dtype)
        y = torch.randint(0, 3, (13,))
        got = ours(x, y)
        assert _tuples(scripted(x, y)) == _tuples(got)
        assert all(y[i] == y[j] and i != j and y[i] != y[k]
                   for i, j, k in zip(*[t.tolist() for t in got]))
        assert _tuples(got) == _tuples(ref(x, y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_infinite_margin_graph_equals_pml(tmp_path, dtype):
    x = torch.randn(12, 4)
    y = torch.randint(0, 3, (12,))
    miner = miners.TripletMarginMiner(margin=float("inf"), distance=our_d.CosineSimilarity())
    path = exportminers.export_onnx(miner, str(tmp_path / "m.onnx"), embedding_dim=4,
                                    dtype=dtype)
    np_dtype = np.float16 if dtype == torch.float16 else np.float32
    got = exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"])(
        x.numpy().astype(np_dtype), y.numpy())
    ref = pml_miners.TripletMarginMiner(margin=float("inf"), distance=pml_d.CosineSimilarity())
    assert _tuples(got) == _tuples(ref(x.to(dtype), y))


@pytest.mark.parametrize("cap_order", ["hardest", "random"])
def test_capped_infinite_margin_keeps_valid_triplets(cap_order):
    x = torch.randn(12, 4)
    y = torch.randint(0, 3, (12,))
    a, p, n = miners.TripletMarginMiner(margin=float("inf"), max_triplets_per_anchor=5,
                                        cap_order=cap_order)(x, y)
    assert len(a) > 0
    assert all(y[i] == y[j] and i != j and y[i] != y[k]
               for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()))
    per_anchor = Counter(a.tolist())
    for i in range(12):   # every anchor keeps min(5, its triplet count)
        count = int(((y == y[i]).sum() - 1) * (y != y[i]).sum())
        assert per_anchor.get(i, 0) == min(5, count)
