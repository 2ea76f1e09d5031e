"""PML's identity rule for reference sets: ``ref_labels is labels`` means the reference
rows are the batch's own rows, so no row is its own positive.

- ``miner(x, y, x, y)`` (the batch itself as reference) equals ``miner(x, y)``, as in PML;
- ``miner(x, y, x2, y)`` (the batch's labels object, other embeddings) drops the
  diagonal pairs, as PML's ``get_matches_and_diffs`` does;
- ``miner(x, y, x.clone(), y.clone())`` keeps them (a distinct reference set).
Compared with PML 2.9.0 on fresh random batches, eager and TorchScript."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import exportminers.miners as em
import pytorch_metric_learning.miners as pm
from exportminers.miners import BaseMiner
from exportminers.utils import loss_and_miner_utils as lmu

DETERMINISTIC = [
    ("TripletMarginMiner", dict(margin=2.5)),
    ("TripletMarginMiner", dict(margin=0.3, type_of_triplets="semihard")),
    ("PairMarginMiner", dict(pos_margin=0.5, neg_margin=1.0)),
    ("BatchHardMiner", {}),
    ("BatchEasyHardMiner", {}),
    ("BatchEasyHardMiner", dict(pos_strategy="easy", neg_strategy="semihard")),
    ("MultiSimilarityMiner", dict(epsilon=0.2)),
    ("AngularMiner", dict(angle=30)),
]


def _pairs_or_triplets(out):
    if len(out) == 3:
        return sorted(zip(*(t.tolist() for t in out)))
    return (sorted(zip(out[0].tolist(), out[1].tolist())),
            sorted(zip(out[2].tolist(), out[3].tolist())))


def _batches(seed, n=9, d=4):
    g = torch.Generator().manual_seed(seed)
    for _ in range(6):
        yield (torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g),
               torch.randn(n, d, generator=g))


def _pml(name, kw, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _pairs_or_triplets(getattr(pm, name)(**kw)(*args))


@pytest.mark.parametrize("name,kw", DETERMINISTIC, ids=lambda v: str(v))
def test_batch_itself_as_reference_is_self_mining(name, kw):
    ours = getattr(em, name)(**kw)
    scripted = torch.jit.script(getattr(em, name)(**kw))
    for x, y, _ in _batches(1):
        want = _pml(name, kw, x, y, x, y)
        assert want == _pml(name, kw, x, y)
        assert _pairs_or_triplets(ours(x, y, x, y)) == want
        assert _pairs_or_triplets(scripted(x, y, x, y)) == want


@pytest.mark.parametrize("name,kw", [c for c in DETERMINISTIC if c[0] != "MultiSimilarityMiner"],
                         ids=lambda v: str(v))
def test_batch_labels_with_other_embeddings_drop_self_pairs(name, kw):
    ours = getattr(em, name)(**kw)
    scripted = torch.jit.script(getattr(em, name)(**kw))
    for x, y, x2 in _batches(2):
        want = _pml(name, kw, x, y, x2, y)
        assert _pairs_or_triplets(ours(x, y, x2, y)) == want
        assert _pairs_or_triplets(scripted(x, y, x2, y)) == want
        # a copy of the labels is a distinct reference set: diagonal pairs come back
        assert _pairs_or_triplets(ours(x, y, x2, y.clone())) == _pml(name, kw, x, y, x2,
                                                                     y.clone())


def test_multi_similarity_batch_labels_with_other_embeddings():
    """PML lists (i, i) both as a positive and as a negative pair here (its diagonal is
    dropped from the label pairs but not from the sorted values); exportminers drops
    self-pairs from both, as in self-mining. Checked against a brute force of the rule
    (cosine similarity): positive (i, j) if s_ij - eps < the largest negative s of i,
    negative (i, k) if s_ik + eps > the smallest positive s of i."""
    eps = 0.2
    miner = em.MultiSimilarityMiner(epsilon=eps)
    for x, y, x2 in _batches(3):
        got = _pairs_or_triplets(miner(x, y, x2, y))
        pml_out = pm.MultiSimilarityMiner(epsilon=eps)(x, y, x2, y)
        assert bool((pml_out[0] == pml_out[1]).any())  # PML's quirk, still there
        s = F.normalize(x) @ F.normalize(x2).T
        pos_pairs, neg_pairs = [], []
        for i in range(len(y)):
            pos = [j for j in range(len(y)) if j != i and y[j] == y[i]]
            neg = [k for k in range(len(y)) if y[k] != y[i]]
            if not pos or not neg:
                continue
            max_neg = max(float(s[i, k]) for k in neg)
            min_pos = min(float(s[i, j]) for j in pos)
            pos_pairs += [(i, j) for j in pos if float(s[i, j]) - eps < max_neg]
            neg_pairs += [(i, k) for k in neg if float(s[i, k]) + eps > min_pos]
        assert got == (sorted(pos_pairs), sorted(neg_pairs))


@pytest.mark.parametrize("name", ["DistanceWeightedMiner", "UniformHistogramMiner"])
def test_random_miners_never_pair_a_row_with_itself(name):
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        x = F.normalize(torch.randn(12, 4, generator=g))
        x2 = F.normalize(torch.randn(12, 4, generator=g))
        y = torch.randint(0, 3, (12,), generator=g)
        for ref in (x, x2):
            out = getattr(em, name)()(x, y, ref, y)
            assert not bool((out[0] == out[1]).any()), "a row paired with itself"
            torch.manual_seed(0)
            a = getattr(em, name)()(x, y, x, y)
            torch.manual_seed(0)
            b = getattr(em, name)()(x, y)
            assert all(torch.equal(u, v) for u, v in zip(a, b))  # = self-mining, same draws


def _custom_triplets(base, helpers):
    """The seed doc's kind of custom miner, on ``base`` with ``helpers`` (an lmu module)."""
    class Custom(base):
        def mine(self, embeddings, labels, ref_emb, ref_labels):
            mat = self.distance(embeddings, ref_emb)
            a, p, n = helpers.get_all_triplets_indices(labels, ref_labels)
            keep = mat[a, n] - mat[a, p] <= 1.0
            return a[keep], p[keep], n[keep]
    return Custom()


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16])
def test_custom_miner_keeps_label_identity(dtype):
    """The custom miner sees ``ref_labels is labels`` whatever the label dtype (int32
    labels used to be converted twice, into two objects, and kept self-pairs)."""
    import pytorch_metric_learning.utils.loss_and_miner_utils as pml_lmu
    from pytorch_metric_learning.miners import BaseMiner as PMLBase

    for x, y, x2 in _batches(5, n=10):
        y = y.to(dtype)
        for args in ((x, y), (x, y, x, y), (x, y, x2, y), (x, y, x2, y.clone())):
            got = _pairs_or_triplets(_custom_triplets(BaseMiner, lmu)(*args))
            want = _pairs_or_triplets(_custom_triplets(PMLBase, pml_lmu)(*args))
            assert got == want, len(args)
