"""Random miners: every tuple is one PML could return, the deterministic parts of the
output (per-anchor counts, per-bin counts) equal PML's, reproducible under
torch.manual_seed, and the sampling distribution matches PML's (chi-square / KS tests with
fixed seeds, so they are deterministic; threshold p > 1e-3)."""
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import pytorch_metric_learning.miners.distance_weighted_miner as pml_dwm

from harness import (EDGE_NAMES, Case, assert_valid_pairs, assert_valid_triplets,
                     check_output_format, distance_matrix, make_batch, make_case,
                     our_miner_cls, run_ours, run_pml)

P_MIN = 1e-3
CASES = ["typical", "ref_smaller", "ref_larger", "same_as_ref"]


def pooled_chisquare(groups):
    """groups: list of (observed counts, expected probabilities) over each group's cells.

    Cells with zero probability must have zero counts. Returns the p-value of the pooled
    statistic with sum(cells - 1) degrees of freedom.
    """
    stat, dof = 0.0, 0
    for obs, prob in groups:
        obs = np.asarray(obs, dtype=np.float64)
        prob = np.asarray(prob, dtype=np.float64)
        assert np.all(obs[prob == 0] == 0), "a zero-probability candidate was drawn"
        keep = prob > 0
        obs, prob = obs[keep], prob[keep]
        total = obs.sum()
        if total == 0 or len(obs) < 2:
            continue
        exp = total * prob / prob.sum()
        stat += float(((obs - exp) ** 2 / exp).sum())
        dof += len(obs) - 1
    assert dof > 0
    return float(stats.chi2.sf(stat, dof)), dof


def same_output(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------- DistanceWeightedMiner


def pml_dw_weights(case, monkeypatch, **kw):
    """PML's normalised sampling weights (N x M) for the case, captured from its mine()."""
    captured = {}
    original = pml_dwm.lmu.get_random_triplet_indices

    def capture(labels, ref_labels=None, t_per_anchor=None, weights=None):
        captured["w"] = weights.clone()
        return original(labels, ref_labels=ref_labels, t_per_anchor=t_per_anchor,
                        weights=weights)

    monkeypatch.setattr(pml_dwm.lmu, "get_random_triplet_indices", capture)
    out = run_pml(pml_miners.DistanceWeightedMiner(**kw), case)
    monkeypatch.setattr(pml_dwm.lmu, "get_random_triplet_indices", original)
    return captured["w"], out


DW_CONFIGS = [{}, {"cutoff": 0.3, "nonzero_loss_cutoff": 1.2}, {"cutoff": 0.7}]


@pytest.mark.parametrize("case_name", CASES + EDGE_NAMES)
@pytest.mark.parametrize("cfg", DW_CONFIGS, ids=str)
def test_distance_weighted_tuples_pml_could_return(case_name, cfg, monkeypatch, seed):
    case = make_case(case_name, salt=("dw", str(cfg)), dim=4, spread=0.9)
    weights, ref = pml_dw_weights(case, monkeypatch, **cfg)
    miner = our_miner_cls("DistanceWeightedMiner")(**cfg)
    for trial in range(3):
        out = run_ours(miner, case)
        check_output_format(out, 3)
        assert_valid_triplets(out, case, f"DW {cfg} {case.name}")
        a, p, n = out
        # every negative has a non-zero PML weight
        if len(a):
            assert bool((weights[a, n] > 0).all()), "drew a negative PML gives zero weight"
        # per-anchor counts are deterministic in PML: k = (reference) class size per anchor,
        # anchors whose negatives all have zero weight are dropped
        assert Counter(a.tolist()) == Counter(ref[0].tolist())
        assert miner.num_triplets == len(a)


def test_distance_weighted_reproducible(seed):
    case = make_case("typical", salt="dw_repro", dim=4, spread=0.9)
    miner = our_miner_cls("DistanceWeightedMiner")()
    torch.manual_seed(seed)
    a = run_ours(miner, case)
    torch.manual_seed(seed)
    b = run_ours(miner, case)
    assert same_output(a, b)
    c = run_ours(miner, case)
    assert not same_output(a, c), "two draws without reseeding were identical"


def assert_scripted_same_under_seed(name, case, seed, **config):
    """Eager and scripted miners draw the same tuples under the same torch seed."""
    miner = our_miner_cls(name)(**config)
    scripted = torch.jit.script(our_miner_cls(name)(**config))
    torch.manual_seed(seed)
    a = run_ours(miner, case)
    torch.manual_seed(seed)
    b = run_ours(scripted, case)
    assert same_output(a, b)


def test_distance_weighted_scripted_same_seed_same_output(seed):
    case = make_case("ref_smaller", salt="dw_script", dim=4, spread=0.9)
    assert_scripted_same_under_seed("DistanceWeightedMiner", case, seed)


@pytest.mark.parametrize("case_name", ["typical", "ref_smaller"])
@pytest.mark.parametrize("cfg", DW_CONFIGS[:2], ids=str)
def test_distance_weighted_distribution(case_name, cfg, monkeypatch):
    # small fixed batch; many draws
    case = make_case(case_name, salt=("dw_dist", str(cfg)), dim=4, spread=0.9)
    if case.self_mode:
        case = Case(case.name, case.x[:12], case.y[:12])
    weights, _ = pml_dw_weights(case, monkeypatch, **cfg)
    miner = our_miner_cls("DistanceWeightedMiner")(**cfg)
    n_rows, m = weights.shape
    neg_counts = np.zeros((n_rows, m))
    pos_counts = np.zeros((n_rows, m))
    torch.manual_seed(1234)
    for _ in range(250):
        a, p, n = run_ours(miner, case)
        np.add.at(neg_counts, (a.numpy(), n.numpy()), 1)
        np.add.at(pos_counts, (a.numpy(), p.numpy()), 1)
    ref_y = case.y if case.self_mode else case.ref_y
    neg_groups, pos_groups = [], []
    w = torch.nan_to_num(weights, nan=0.0).numpy()
    for i in range(n_rows):
        neg_mask = (ref_y != case.y[i]).numpy()
        neg_groups.append((neg_counts[i], np.where(neg_mask, w[i], 0.0)))
        pos_mask = (ref_y == case.y[i]).numpy().copy()
        if case.self_mode:
            pos_mask[i] = False
        pos_groups.append((pos_counts[i], pos_mask.astype(np.float64)))
    p_neg, dof = pooled_chisquare(neg_groups)
    assert p_neg > P_MIN, f"negative distribution differs from PML's weights (p={p_neg}, dof={dof})"
    p_pos, dof = pooled_chisquare(pos_groups)
    assert p_pos > P_MIN, f"positives not uniform among same-class references (p={p_pos})"


# ---------------------------------------------------------------- UniformHistogramMiner


def pml_bins(vals, num_bins):
    return torch.linspace(torch.min(vals), torch.max(vals), steps=num_bins + 1,
                          dtype=vals.dtype)


def bin_of(vals, bins):
    """PML's bin for each value: [s, e) except the last bin, which is [s, e]."""
    out = torch.full(vals.shape, -1, dtype=torch.int64)
    last = len(bins) - 2
    for i in range(len(bins) - 1):
        s, e = bins[i], bins[i + 1]
        cond = (s <= vals) & ((vals < e) if i != last else (vals <= e))
        out[cond & (out < 0)] = i
    return out


def all_pairs(case):
    import pytorch_metric_learning.utils.loss_and_miner_utils as pml_lmu
    if case.self_mode:
        return pml_lmu.get_all_pairs_indices(case.y)
    return pml_lmu.get_all_pairs_indices(case.y, case.ref_y)


UH_CONFIGS = [{}, {"num_bins": 10, "pos_per_bin": 5, "neg_per_bin": 5},
              {"num_bins": 3, "pos_per_bin": 1, "neg_per_bin": 7}]


@pytest.mark.parametrize("case_name", CASES + EDGE_NAMES)
@pytest.mark.parametrize("cfg", UH_CONFIGS, ids=str)
def test_uniform_histogram_tuples_and_bin_counts(case_name, cfg, seed):
    import pytorch_metric_learning.distances as pml_d
    case = make_case(case_name, salt=("uh", str(cfg)))
    mat = distance_matrix(pml_d.LpDistance(), case)
    a1, p, a2, n = all_pairs(case)
    ref = run_pml(pml_miners.UniformHistogramMiner(**cfg), case)
    miner = our_miner_cls("UniformHistogramMiner")(**cfg)
    num_bins = cfg.get("num_bins", 100)
    for trial in range(2):
        out = run_ours(miner, case)
        check_output_format(out, 4)
        assert_valid_pairs(out, case, f"UH {cfg} {case.name}")
        for (ia, io), (ca, co) in (((0, 1), (a1, p)), ((2, 3), (a2, n))):
            if len(ca) == 0:
                assert len(out[ia]) == 0
                continue
            vals = mat[ca, co]
            bins = pml_bins(vals, num_bins)
            ours_bins = Counter(bin_of(mat[out[ia], out[io]], bins).tolist())
            ref_bins = Counter(bin_of(mat[ref[ia], ref[io]], bins).tolist())
            assert -1 not in ours_bins
            assert ours_bins == ref_bins, "per-bin counts differ from PML's"
        assert miner.num_pos_pairs == len(out[0]) and miner.num_neg_pairs == len(out[2])


def test_uniform_histogram_reproducible(seed):
    case = make_case("typical", salt="uh_repro")
    miner = our_miner_cls("UniformHistogramMiner")(num_bins=10, pos_per_bin=5, neg_per_bin=5)
    torch.manual_seed(seed)
    a = run_ours(miner, case)
    torch.manual_seed(seed)
    b = run_ours(miner, case)
    assert same_output(a, b)
    assert not same_output(a, run_ours(miner, case))


def test_uniform_histogram_scripted_same_seed_same_output(seed):
    case = make_case("ref_larger", salt="uh_script")
    assert_scripted_same_under_seed("UniformHistogramMiner", case, seed,
                                    num_bins=10, pos_per_bin=5, neg_per_bin=5)


@pytest.mark.parametrize("case_name", ["typical", "ref_smaller"])
def test_uniform_histogram_within_bin_uniform(case_name):
    import pytorch_metric_learning.distances as pml_d
    case = make_case(case_name, salt="uh_dist")
    if case.self_mode:
        case = Case(case.name, case.x[:10], case.y[:10])
    cfg = {"num_bins": 5, "pos_per_bin": 4, "neg_per_bin": 4}
    miner = our_miner_cls("UniformHistogramMiner")(**cfg)
    mat = distance_matrix(pml_d.LpDistance(), case)
    a1, p, a2, n = all_pairs(case)
    candidates = []
    for ca, co in ((a1, p), (a2, n)):
        vals = mat[ca, co]
        candidates.append((list(zip(ca.tolist(), co.tolist())),
                           bin_of(vals, pml_bins(vals, 5)).tolist()))
    counts = [Counter(), Counter()]
    torch.manual_seed(99)
    for _ in range(300):
        out = run_ours(miner, case)
        counts[0].update(zip(out[0].tolist(), out[1].tolist()))
        counts[1].update(zip(out[2].tolist(), out[3].tolist()))
    groups = []
    for (pairs, bins), cnt in zip(candidates, counts):
        assert set(cnt) <= set(pairs)
        for b in set(bins):
            members = [pr for pr, bb in zip(pairs, bins) if bb == b]
            groups.append(([cnt[pr] for pr in members], [1.0] * len(members)))
    pval, dof = pooled_chisquare(groups)
    assert pval > P_MIN, f"within-bin choice not uniform (p={pval}, dof={dof})"


# --------------------------------------------------------------------- MaximumLossMiner


def our_loss():
    from exportminers.losses import TripletMarginLoss
    return TripletMarginLoss()


def make_max_loss(batch_size=8, num_trials=5, with_miner=False):
    kw = {}
    if with_miner:
        kw["mining_function"] = our_miner_cls("TripletMarginMiner")(margin=0.2)
    return our_miner_cls("MaximumLossMiner")(loss_function=our_loss(), num_trials=num_trials,
                                             output_batch_size=batch_size, **kw)


@pytest.mark.parametrize("with_miner", [False, True])
def test_max_loss_output_format(with_miner, seed):
    x, y, _ = make_batch(20, 4, seed=seed)
    miner = make_max_loss(8, 5, with_miner)
    out = miner(x, y)
    assert isinstance(out, torch.Tensor) or len(out) == 1
    idx = out if isinstance(out, torch.Tensor) else out[0]
    assert idx.dtype == torch.int64 and idx.dim() == 1 and len(idx) == 8
    assert int(idx.min()) >= 0 and int(idx.max()) < 20


def test_max_loss_reproducible_and_scripted(seed):
    x, y, _ = make_batch(20, 4, seed=seed)
    miner = make_max_loss(8, 5, True)
    torch.manual_seed(seed)
    a = miner(x, y)
    torch.manual_seed(seed)
    b = miner(x, y)
    assert torch.equal(a, b)
    scripted = torch.jit.script(make_max_loss(8, 5, True))
    torch.manual_seed(seed)
    c = scripted(x, y)
    assert torch.equal(a, c)


def _pml_loss_of(x, y, idx, with_miner):
    e, l = x[idx], y[idx]
    tup = pml_miners.TripletMarginMiner(margin=0.2)(e, l) if with_miner else None
    return float(pml_losses.TripletMarginLoss()(e, l, tup))


def _reference_max_loss(x, y, k, trials, with_miner):
    """The older PML MaximumLossMiner (the seed doc's API): ``num_trials`` subsets of
    ``torch.randint`` indices, the one with the largest loss wins."""
    subsets = torch.randint(0, len(x), size=(trials, k))
    losses = [_pml_loss_of(x, y, s, with_miner) for s in subsets]
    return subsets[int(np.argmax(losses))]


@pytest.mark.parametrize("with_miner", [False, True])
def test_max_loss_distribution_matches_reference(with_miner):
    x, y, _ = make_batch(16, 3, dim=4, seed=7, spread=1.0)
    miner = make_max_loss(6, 4, with_miner)
    torch.manual_seed(5)
    ours = [miner(x, y) for _ in range(300)]
    torch.manual_seed(6)
    ref = [_reference_max_loss(x, y, 6, 4, with_miner) for _ in range(300)]
    # the winning subset's loss (under PML's loss) is distributed alike
    ol = [_pml_loss_of(x, y, s, with_miner) for s in ours]
    rl = [_pml_loss_of(x, y, s, with_miner) for s in ref]
    ks = stats.ks_2samp(ol, rl)
    assert ks.pvalue > P_MIN, f"winning loss distribution differs (KS p={ks.pvalue})"
    # how often each sample is picked
    oc = np.bincount(torch.cat(ours).numpy(), minlength=16)
    rc = np.bincount(torch.cat(ref).numpy(), minlength=16)
    chi = stats.chi2_contingency(np.stack([oc, rc]) + 0.0)
    assert chi.pvalue > P_MIN, f"per-sample inclusion differs (p={chi.pvalue})"
    # number of distinct indices per subset (sampling with / without replacement)
    ou = Counter(len(set(s.tolist())) for s in ours)
    ru = Counter(len(set(s.tolist())) for s in ref)
    keys = sorted(set(ou) | set(ru))
    table = np.array([[ou[k] for k in keys], [ru[k] for k in keys]], dtype=np.float64)
    if len(keys) > 1:
        chi = stats.chi2_contingency(table)
        assert chi.pvalue > P_MIN, f"distinct-index counts differ: ours {ou}, ref {ru}"
    else:
        assert ou == ru


def test_max_loss_picks_a_maximum_loss_subset():
    # one trial: the subset is uniform; with many trials the winning loss is never below
    # the single-trial median far more often than chance allows
    x, y, _ = make_batch(16, 3, dim=4, seed=11, spread=1.0)
    one = make_max_loss(6, 1)
    many = make_max_loss(6, 8)
    torch.manual_seed(3)
    l1 = [_pml_loss_of(x, y, one(x, y), False) for _ in range(200)]
    lm = [_pml_loss_of(x, y, many(x, y), False) for _ in range(200)]
    assert np.mean(lm) > np.mean(l1)
    assert np.median(lm) >= np.percentile(l1, 70)


def test_nth_true_column_brute_force():
    """DistanceWeightedMiner's positive draw: the r-th True column of each row, found by
    inverting the running count (no search, no sort), equals a brute-force lookup."""
    import importlib
    dw = importlib.import_module("exportminers.miners.distance_weighted_miner")
    g = torch.Generator().manual_seed(11)
    for _ in range(200):
        n, m = torch.randint(1, 20, (2,), generator=g).tolist()
        mask = torch.rand(n, m, generator=g) < torch.rand(1, generator=g)
        count = mask.sum(1)
        r = (torch.rand(n, 7, generator=g) * count.unsqueeze(1)).floor().long()
        r = torch.minimum(r, (count - 1).clamp(min=0).unsqueeze(1))
        got = dw.nth_true_column(mask, r)
        for i in range(n):
            cols = torch.nonzero(mask[i]).flatten()
            if len(cols):
                assert torch.equal(got[i], cols[r[i]])
