"""loss_and_miner_utils: PML's index helpers (same results, same order) and the
fixed-shape masks (vs brute force)."""
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

import pytorch_metric_learning.utils.loss_and_miner_utils as pml_lmu
from exportminers.utils import loss_and_miner_utils as lmu

from harness import make_case

CASES = ["b1", "b2_same", "one_class", "all_distinct", "huge_labels", "negative_labels",
         "typical", "ref_smaller", "ref_larger", "ref_one_class", "same_as_ref"]


def labels_of(case_name):
    c = make_case(case_name, salt="lmu")
    return c.y, (None if c.self_mode else c.ref_y)


def eq_tuple(a, b):
    assert len(a) == len(b)
    for s, t in zip(a, b):
        assert torch.equal(s.long(), t.long())


@pytest.mark.parametrize("case_name", CASES)
def test_get_all_pairs_indices(case_name):
    y, ry = labels_of(case_name)
    eq_tuple(lmu.get_all_pairs_indices(y, ry), pml_lmu.get_all_pairs_indices(y, ry))
    if ry is None:
        # ref_labels given as the very same object: self-pairs excluded, as in PML
        eq_tuple(lmu.get_all_pairs_indices(y, y), pml_lmu.get_all_pairs_indices(y, y))
        # a copy: nothing excluded
        eq_tuple(lmu.get_all_pairs_indices(y, y.clone()),
                 pml_lmu.get_all_pairs_indices(y, y.clone()))


@pytest.mark.parametrize("case_name", CASES)
def test_get_all_triplets_indices(case_name):
    y, ry = labels_of(case_name)
    eq_tuple(lmu.get_all_triplets_indices(y, ry), pml_lmu.get_all_triplets_indices(y, ry))
    out = lmu.get_all_triplets_indices(y, ry)
    assert all(t.dtype == torch.int64 for t in out)


def test_get_all_triplets_indices_empty():
    y = torch.empty(0, dtype=torch.long)
    a, p, n = lmu.get_all_triplets_indices(y)
    assert a.numel() == p.numel() == n.numel() == 0


@pytest.mark.parametrize("case_name", CASES)
def test_pair_and_triplet_masks_brute_force(case_name):
    y, ry = labels_of(case_name)
    pos, neg = lmu.pair_masks(y, ry)
    ref = y if ry is None else ry
    n, m = len(y), len(ref)
    assert pos.shape == neg.shape == (n, m) and pos.dtype == neg.dtype == torch.bool
    for i in range(n):
        for j in range(m):
            same = int(y[i]) == int(ref[j])
            assert bool(pos[i, j]) == (same and not (ry is None and i == j))
            assert bool(neg[i, j]) == (not same)
    t = lmu.triplet_mask(pos, neg)
    assert t.shape == (n, m, m)
    brute = set()
    for i in range(n):
        for j in range(m):
            for k in range(m):
                if pos[i, j] and neg[i, k]:
                    brute.add((i, j, k))
    assert set(map(tuple, torch.nonzero(t).tolist())) == brute
    a, p, nn = pml_lmu.get_all_triplets_indices(y, ry)
    assert set(zip(a.tolist(), p.tolist(), nn.tolist())) == brute


@pytest.mark.parametrize("case_name", ["typical", "ref_smaller"])
def test_convert_to_pairs(case_name):
    y, ry = labels_of(case_name)
    eq_tuple(lmu.convert_to_pairs(None, y, ry), pml_lmu.convert_to_pairs(None, y, ry))
    trip = pml_lmu.get_all_triplets_indices(y, ry)
    eq_tuple(lmu.convert_to_pairs(trip, y, ry), pml_lmu.convert_to_pairs(trip, y, ry))
    pairs = pml_lmu.get_all_pairs_indices(y, ry)
    eq_tuple(lmu.convert_to_pairs(pairs, y, ry), pml_lmu.convert_to_pairs(pairs, y, ry))


@pytest.mark.parametrize("case_name", ["typical", "ref_smaller", "b1", "one_class"])
def test_convert_to_triplets(case_name):
    y, ry = labels_of(case_name)
    eq_tuple(lmu.convert_to_triplets(None, y, ry, t_per_anchor="all"),
             pml_lmu.convert_to_triplets(None, y, ry, t_per_anchor="all"))
    trip = pml_lmu.get_all_triplets_indices(y, ry)
    eq_tuple(lmu.convert_to_triplets(trip, y, ry), pml_lmu.convert_to_triplets(trip, y, ry))
    # pairs from a miner: keep a subset so that anchors repeat unevenly
    a1, p, a2, n = pml_lmu.get_all_pairs_indices(y, ry)
    sub = (a1[::2], p[::2], a2[::3], n[::3])
    eq_tuple(lmu.convert_to_triplets(sub, y, ry), pml_lmu.convert_to_triplets(sub, y, ry))


def test_helpers_match_pml():
    y, _ = labels_of("typical")
    a1, p, a2, n = pml_lmu.get_all_pairs_indices(y)
    eq_tuple(lmu.pos_pairs_from_tuple((a1, p, a2, n)), pml_lmu.pos_pairs_from_tuple((a1, p, a2, n)))
    eq_tuple(lmu.neg_pairs_from_tuple((a1, p, a2, n)), pml_lmu.neg_pairs_from_tuple((a1, p, a2, n)))
    assert torch.equal(lmu.get_anchors((a1, p, a2, n)), pml_lmu.get_anchors((a1, p, a2, n)))
    for larger, smaller in ((10, 3), (9, 3), (5, 5)):
        s = torch.arange(smaller)
        assert torch.equal(lmu.repeat_to_match_size(s, larger, smaller),
                           pml_lmu.repeat_to_match_size(s, larger, smaller))
    eq_tuple(lmu.matched_size_indices(torch.arange(7), torch.arange(3)),
             pml_lmu.matched_size_indices(torch.arange(7), torch.arange(3)))
    for dtype in (torch.float32, torch.float64):
        w1 = lmu.convert_to_weights((a1[:9], p[:9], a2[:4], n[:4]), y, dtype)
        w2 = pml_lmu.convert_to_weights((a1[:9], p[:9], a2[:4], n[:4]), y, dtype)
        assert torch.allclose(w1, w2)
        assert torch.equal(lmu.convert_to_weights(None, y, dtype),
                           pml_lmu.convert_to_weights(None, y, dtype))
    x = torch.randn(6, 5, dtype=torch.float64)
    mask = torch.rand(6, 5) > 0.4
    mask[2] = False
    for keep in (None, mask):
        for add_one in (True, False):
            assert torch.allclose(lmu.logsumexp(x, keep, add_one), pml_lmu.logsumexp(x, keep, add_one))
    eq_tuple(lmu.meshgrid_from_sizes(x, x[:3]), pml_lmu.meshgrid_from_sizes(x, x[:3]))


# ---------------------------------------------------------- get_random_triplet_indices


@pytest.mark.parametrize("case_name", CASES)
@pytest.mark.parametrize("t_per_anchor", [None, 1, 5])
def test_random_triplets_valid_and_counts(case_name, t_per_anchor, seed):
    y, ry = labels_of(case_name)
    a, p, n = lmu.get_random_triplet_indices(y, ry, t_per_anchor=t_per_anchor)
    ra, rp, rn = pml_lmu.get_random_triplet_indices(y, ry, t_per_anchor=t_per_anchor)
    assert a.dtype == p.dtype == n.dtype == torch.int64
    assert Counter(a.tolist()) == Counter(ra.tolist()), "per-anchor counts differ from PML"
    ref = y if ry is None else ry
    for i, j, k in zip(a.tolist(), p.tolist(), n.tolist()):
        assert int(y[i]) == int(ref[j]) and int(y[i]) != int(ref[k])
        if ry is None:
            assert i != j


def test_random_triplets_weighted_valid(seed):
    y, ry = labels_of("typical")
    w = torch.rand(len(y), len(y), dtype=torch.float64)
    w[:, 3] = 0  # never drawn
    w[5] = 0     # anchor 5 has no weight: dropped
    a, p, n = lmu.get_random_triplet_indices(y, weights=w)
    ra, _, _ = pml_lmu.get_random_triplet_indices(y, weights=w)
    assert Counter(a.tolist()) == Counter(ra.tolist())
    assert 3 not in n.tolist() and 5 not in a.tolist()


def pooled_p(obs_rows, prob_rows):
    stat, dof = 0.0, 0
    for obs, prob in zip(obs_rows, prob_rows):
        obs, prob = np.asarray(obs, float), np.asarray(prob, float)
        assert np.all(obs[prob == 0] == 0)
        k = prob > 0
        obs, prob = obs[k], prob[k]
        if obs.sum() == 0 or len(obs) < 2:
            continue
        exp = obs.sum() * prob / prob.sum()
        stat += float(((obs - exp) ** 2 / exp).sum())
        dof += len(obs) - 1
    return float(stats.chi2.sf(stat, dof))


@pytest.mark.parametrize("case_name", ["typical", "ref_smaller"])
@pytest.mark.parametrize("weighted", [False, True])
def test_random_triplets_distribution(case_name, weighted):
    y, ry = labels_of(case_name)
    y = y[:12]
    ref = y if ry is None else ry
    g = torch.Generator().manual_seed(0)
    w = torch.rand(len(y), len(ref), generator=g, dtype=torch.float64) if weighted else None
    pos_c = np.zeros((len(y), len(ref)))
    neg_c = np.zeros((len(y), len(ref)))
    torch.manual_seed(42)
    for _ in range(300):
        a, p, n = lmu.get_random_triplet_indices(y, ry, t_per_anchor=4, weights=w)
        np.add.at(pos_c, (a.numpy(), p.numpy()), 1)
        np.add.at(neg_c, (a.numpy(), n.numpy()), 1)
    pos_prob, neg_prob = [], []
    for i in range(len(y)):
        same = (ref == y[i]).numpy().astype(float)
        if ry is None:
            same[i] = 0
        pos_prob.append(same)
        negm = (ref != y[i]).numpy().astype(float)
        neg_prob.append(negm * (w[i].numpy() if weighted else 1.0))
    assert pooled_p(pos_c, pos_prob) > 1e-3
    assert pooled_p(neg_c, neg_prob) > 1e-3


def test_random_triplets_reproducible(seed):
    y, _ = labels_of("typical")
    torch.manual_seed(seed)
    a = lmu.get_random_triplet_indices(y, t_per_anchor=3)
    torch.manual_seed(seed)
    b = lmu.get_random_triplet_indices(y, t_per_anchor=3)
    eq_tuple(a, b)


def test_positive_columns_lists_each_rows_positives_in_order():
    g = torch.Generator().manual_seed(4)
    pos = torch.rand(9, 13, generator=g) < 0.3
    pos[2] = False                      # a row without positives
    cols, valid = lmu.positive_columns(pos)
    assert cols.shape == valid.shape == (9, int(pos.sum(1).max()))
    for i in range(9):
        want = torch.nonzero(pos[i]).flatten().tolist()
        assert cols[i][valid[i]].tolist() == want
        assert int(valid[i].sum()) == len(want)


def test_positive_columns_of_no_positives_is_empty():
    cols, valid = lmu.positive_columns(torch.zeros(4, 5, dtype=torch.bool))
    assert cols.shape == valid.shape == (4, 0)


@pytest.mark.parametrize("seed", range(4))
def test_pair_masks_anchor_ids_brute_force(seed):
    """anchor_ids: anchor i is reference row anchor_ids[i] (-1: not in the reference set);
    that one pair is no positive, everything else is plain label comparison."""
    g = torch.Generator().manual_seed(seed)
    ry = torch.randint(0, 3, (11,), generator=g)
    ids = torch.randperm(11, generator=g)[:6]
    ids[0] = -1
    y = torch.where(ids >= 0, ry[ids.clamp(min=0)], torch.randint(0, 3, (6,), generator=g))
    pos, neg = lmu.pair_masks(y, ry, ids)
    for i in range(6):
        for j in range(11):
            same = int(y[i]) == int(ry[j])
            assert bool(pos[i, j]) == (same and int(ids[i]) != j)
            assert bool(neg[i, j]) == (not same)
    # a block of the batch with its row ids is self-mining restricted to those rows
    rows = ids[1:]
    bpos, bneg = lmu.pair_masks(ry[rows], ry, rows)
    spos, sneg = lmu.pair_masks(ry)
    assert torch.equal(bpos, spos[rows]) and torch.equal(bneg, sneg[rows])


# ------------------------------------------- the rest of PML's lmu (cross-batch memory)

def test_more_pml_helpers_match_pml():
    import pytorch_metric_learning.utils.loss_and_miner_utils as pml_lmu

    from exportminers.utils import loss_and_miner_utils as ours
    g = torch.Generator().manual_seed(0)
    for t in range(60):
        n = int(torch.randint(0, 12, (1,), generator=g))
        m = int(torch.randint(1, 12, (1,), generator=g))
        y = torch.randint(0, 3, (n,), generator=g)
        ry = torch.randint(0, 3, (m,), generator=g)
        if t % 3 == 0:
            y = y.to(torch.int32)
        mt, df = pml_lmu.get_matches_and_diffs(y, ry)
        for got, want in ((ours.get_all_triplets_indices_vectorized_method(mt, df),
                           pml_lmu.get_all_triplets_indices_vectorized_method(mt, df)),
                          (ours.get_all_triplets_indices_loop_method(y, mt, df),
                           pml_lmu.get_all_triplets_indices_loop_method(y, mt, df))):
            assert all(torch.equal(u, v) and u.dtype == v.dtype for u, v in zip(got, want)), t
        tup = pml_lmu.get_all_pairs_indices(y) if t % 2 else pml_lmu.get_all_triplets_indices(y)
        assert all(torch.equal(u, v) for u, v in zip(
            ours.convert_to_pos_pairs_with_unique_labels(tup, y),
            pml_lmu.convert_to_pos_pairs_with_unique_labels(tup, y))), t
        ref_size, bs = 20, max(n, 1)
        idx = (torch.arange(bs) + int(torch.randint(0, ref_size, (1,), generator=g))) % ref_size
        a = torch.randint(0, bs, (30,), generator=g)
        p = torch.randint(0, ref_size, (30,), generator=g)
        neg = torch.randint(0, ref_size, (30,), generator=g)
        for subset in (False, True):
            for tup in ((a, p, neg), (a, p, a.clone(), neg)):
                got = ours.remove_self_comparisons(tuple(v.clone() for v in tup), idx, ref_size,
                                                   subset)
                want = pml_lmu.remove_self_comparisons(tuple(v.clone() for v in tup), idx,
                                                       ref_size, subset)
                assert all(torch.equal(u, v) for u, v in zip(got, want)), t
    with pytest.raises(ValueError, match="indices_tuple must hold 3"):
        ours.remove_self_comparisons((a, p), idx, 20)
