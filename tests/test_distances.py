"""Distances equal PML's (float64, every option), are scriptable, and are stable in float16."""
import pytest
import torch

import exportminers.distances as D
import pytorch_metric_learning.distances as pml_d

from harness import DISTANCES, make_batch, our_distance, pml_distance

NAMES = list(DISTANCES)


def data(seed, n=17, m=11, dim=8, dtype=torch.float64):
    x, _, c = make_batch(n, 4, dim, seed=seed, dtype=dtype)
    r, _, _ = make_batch(m, 4, dim, seed=seed + 1, dtype=dtype, centers=c)
    return x, r


def off_diagonal(mat):
    return mat[~torch.eye(mat.size(0), dtype=torch.bool)]


@pytest.mark.parametrize("name", NAMES)
def test_matrix_matches_pml(name, seed):
    x, r = data(seed)
    ours, pml = our_distance(name), pml_distance(name)
    a, b = ours(x, r), pml(x, r)
    assert a.shape == (17, 11) and a.dtype == torch.float64
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    s, t = ours(x), pml(x)
    assert s.shape == (17, 17)
    assert torch.allclose(off_diagonal(s), off_diagonal(t), rtol=1e-12, atol=1e-12)
    if DISTANCES[name][0] == "LpDistance":
        assert torch.all(torch.diagonal(s) == 0), "self-distance diagonal must be exactly 0"
    else:
        assert torch.allclose(torch.diagonal(s), torch.diagonal(t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_attributes_match_pml(name):
    ours, pml = our_distance(name), pml_distance(name)
    assert ours.is_inverted == pml.is_inverted
    assert ours.normalize_embeddings == pml.normalize_embeddings
    assert float(ours.p) == float(pml.p) and float(ours.power) == float(pml.power)


@pytest.mark.parametrize("name", NAMES)
def test_pairwise_and_helpers_match_pml(name, seed):
    x, r = data(seed, n=11, m=11)
    ours, pml = our_distance(name), pml_distance(name)
    assert torch.allclose(ours.pairwise_distance(x, r), pml.pairwise_distance(x, r),
                          rtol=1e-12, atol=1e-12)
    mat = pml(x, r)
    for fn in ("smallest_dist", "largest_dist"):
        v1, i1 = getattr(ours, fn)(mat, dim=1)
        v2, i2 = getattr(pml, fn)(mat, dim=1)
        assert torch.equal(v1, v2) and torch.equal(i1, i2)
    assert torch.equal(ours.margin(mat, mat.T), pml.margin(mat, mat.T))
    assert torch.allclose(ours.normalize(x), pml.normalize(x))
    assert torch.allclose(ours.maybe_normalize(x), pml.maybe_normalize(x))
    assert torch.allclose(ours.get_norm(x), pml.get_norm(x))


@pytest.mark.parametrize("name", NAMES)
def test_scripted_equals_eager(name, seed):
    x, r = data(seed)
    ours = our_distance(name)
    scripted = torch.jit.script(our_distance(name))
    assert torch.equal(scripted(x, r), ours(x, r))
    assert torch.equal(scripted(x), ours(x))


@pytest.mark.parametrize("name", NAMES)
def test_empty_inputs(name):
    ours = our_distance(name)
    e = torch.empty(0, 8, dtype=torch.float64)
    x, _ = data(0, n=5)
    assert ours(e).shape == (0, 0)
    assert ours(e, x).shape == (0, 5)
    assert ours(x, e).shape == (5, 0)


def test_rank_is_checked():
    with pytest.raises(ValueError):
        D.LpDistance()(torch.randn(3))
    with pytest.raises(ValueError):
        D.LpDistance()(torch.randn(3, 2), torch.randn(2, 2, 2))


def test_constructor_errors():
    with pytest.raises(ValueError):
        D.LpDistance(is_inverted=True)
    with pytest.raises(ValueError):
        D.DotProductSimilarity(is_inverted=False)
    with pytest.raises(ValueError):
        D.CosineSimilarity(normalize_embeddings=False)
    with pytest.raises(ValueError):
        D.SNRDistance(is_inverted=True)


# ---------------------------------------------------------------------------- float16


@pytest.mark.parametrize("name", ["l2", "l2_raw", "l2_sq", "l1", "l1_sq_raw"])
def test_float16_lp_equals_pml_bit_for_bit(name, seed):
    """Eager float16 L_p is PML's: F.pairwise_distance of every pair (eps included)."""
    x, r = data(seed, n=40, m=23, dim=64)
    x, r = x.half(), r.half()
    ours, ref = our_distance(name), pml_distance(name)
    for got, want in ((ours(x), ref(x)), (ours(x, r), ref(x, r)),
                      (torch.jit.script(ours)(x, r), ref(x, r))):
        assert got.dtype == torch.float16
        assert torch.equal(got, want)


def test_float16_lp_blocks_do_not_change_values(seed):
    from exportminers.distances.lp_distance import pairwise_matrix
    x, r = data(seed, n=17, m=11, dim=8)
    x, r = x.half(), r.half()
    whole = pairwise_matrix(x, r, 2.0, block_elements=17 * 11 * 8)
    for block in (1, 8, 88, 89, 1000):
        assert torch.equal(pairwise_matrix(x, r, 2.0, block_elements=block), whole)


@pytest.mark.parametrize("name", ["l2", "l2_raw", "l2_sq", "l1"])
def test_float16_lp_export_path_stable(name, seed, monkeypatch):
    """The exported graph's float16 L_p: computed in float32, rounded once, zero diagonal."""
    from exportminers import _ops
    monkeypatch.setattr(_ops, "is_exporting", lambda: True)
    x, r = data(seed, n=40, m=23, dim=64)
    ours = our_distance(name)
    ref_self = pml_distance(name)(x)           # float64 reference
    ref_cross = pml_distance(name)(x, r)
    h = ours(x.half())
    assert h.dtype == torch.float16
    assert torch.all(torch.diagonal(h) == 0), "float16 self-distance diagonal must be exactly 0"
    scale = float(ref_self.abs().max())
    assert torch.allclose(h.double(), ref_self, rtol=5e-3, atol=5e-3 * scale)
    hc = ours(x.half(), r.half())
    assert hc.dtype == torch.float16
    assert torch.allclose(hc.double(), ref_cross, rtol=5e-3, atol=5e-3 * scale)
    assert torch.isfinite(h).all() and (h >= 0).all()


def test_float16_near_duplicates_do_not_cancel(seed, monkeypatch):
    # |x|^2 + |y|^2 - 2 x.y cancels catastrophically in half precision for close points;
    # the exported graph's distance must stay near the float64 value (and never NaN)
    from exportminers import _ops
    monkeypatch.setattr(_ops, "is_exporting", lambda: True)
    base = torch.randn(1, 128, dtype=torch.float64) * 30
    x = torch.cat([base, base + 0.25 * torch.randn(5, 128, dtype=torch.float64)])
    x = x.half().double()  # the reference sees the same (half-representable) inputs
    ours = D.LpDistance(normalize_embeddings=False)
    ref = pml_d.LpDistance(normalize_embeddings=False)(x)
    h = ours(x.half())
    assert torch.isfinite(h).all()
    assert torch.all(torch.diagonal(h) == 0)
    assert torch.allclose(h.double(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["dot", "cos", "dot_raw"])
def test_float16_similarities(name, seed):
    x, r = data(seed, n=20, m=9, dim=32)
    ours = our_distance(name)
    ref = pml_distance(name)(x, r)
    h = ours(x.half(), r.half())
    assert h.dtype == torch.float16
    scale = float(ref.abs().max())
    assert torch.allclose(h.double(), ref, rtol=1e-2, atol=1e-2 * scale)


def test_distance_input_errors_name_the_argument():
    x = torch.randn(4, 5)
    cases = [((x, torch.randn(3, 6)), "ref_emb has embedding size 6 but query_emb has 5"),
             ((x, torch.randn(2, 3, 5)), "ref_emb must be a 2D tensor"),
             ((torch.randn(5),), "query_emb must be a 2D tensor"),
             ((x.numpy(),), "query_emb must be a torch.Tensor")]
    for cls in (D.LpDistance, D.CosineSimilarity, D.DotProductSimilarity, D.SNRDistance):
        for args, msg in cases:
            with pytest.raises(ValueError, match=msg):
                cls()(*args)


@pytest.mark.parametrize("name, kw", [("LpDistance", {}), ("CosineSimilarity", {}),
                                      ("DotProductSimilarity", {"normalize_embeddings": False}),
                                      ("LpDistance", {"p": 1, "normalize_embeddings": False}),
                                      ("SNRDistance", {})])
def test_collect_stats_records_pmls_norm_statistics(name, kw):
    import pytorch_metric_learning.distances as pml_d

    import exportminers.distances as ed
    import exportminers.miners as em
    g = torch.Generator().manual_seed(3)
    x, r = 3 * torch.randn(8, 4, generator=g), 2 * torch.randn(5, 4, generator=g)
    ours, theirs = getattr(ed, name)(collect_stats=True, **kw), getattr(pml_d, name)(
        collect_stats=True, **kw)
    assert ours._record_these == theirs._record_these
    assert ours._record_these_stats == theirs._record_these_stats
    for args in ((x,), (x, r)):
        ours(*args)
        theirs(*args)
        for k in theirs._record_these_stats:
            assert getattr(ours, k) == pytest.approx(getattr(theirs, k), rel=1e-6), k
    scripted = torch.jit.script(em.TripletMarginMiner(distance=getattr(ed, name)(
        collect_stats=True, **kw)))
    scripted(x, torch.arange(8) % 2, r, torch.arange(5) % 2)
    assert scripted.distance.initial_avg_ref_norm == pytest.approx(theirs.initial_avg_ref_norm,
                                                                   rel=1e-6)
    assert getattr(ed, name)(**kw)._record_these_stats == []
