"""Deterministic miners == PML 2.9.0 over every option (multisets; tie-aware where PML
picks one of several tied candidates)."""
import itertools

import pytest
import torch

import pytorch_metric_learning.miners as pml_miners
import pytorch_metric_learning.utils.loss_and_miner_utils as pml_lmu

from harness import (DISTANCES, EDGE_NAMES, MinerCase, assert_same_multiset,
                     assert_same_pairs_global_tie_aware, assert_same_pairs_tie_aware, check_against_pml, check_output_format,
                     distance_matrix, legacy_to_pml_distance, make_case, our_distance,
                     our_miner_cls, pml_distance, pml_miner_cls, run_ours, run_pml)

ALL_DISTANCES = list(DISTANCES)
MAIN_CASES = ["typical", "ref_smaller"]
EDGES = EDGE_NAMES + ["same_as_ref"]


def mk(name, arity, kw_ours=None, kw_pml=None, dist=None, tie_aware=False, label=""):
    """MinerCase for a miner built with the same kwargs (and distance) on both sides."""
    kw_ours = dict(kw_ours or {})
    kw_pml = dict(kw_ours if kw_pml is None else kw_pml)

    def ours():
        kw = dict(kw_ours)
        if dist is not None:
            kw["distance"] = our_distance(dist)
        return our_miner_cls(name)(**kw)

    def pml():
        kw = dict(kw_pml)
        if dist is not None:
            kw["distance"] = pml_distance(dist)
        return getattr(pml_miners, name)(**kw)

    return MinerCase(name, ours, pml, arity, tie_aware=tie_aware,
                     label=label or f"{kw_ours}, {dist}")


def pair_values(dist_name, case):
    """PML's matrix values at every positive and negative pair of the case."""
    mat = distance_matrix(pml_distance(dist_name), case)
    ref_y = case.y if case.self_mode else case.ref_y
    a1, p, a2, n = pml_lmu.get_all_pairs_indices(case.y, case.y if case.self_mode else ref_y)
    return mat, mat[a1, p], mat[a2, n]


def sorted_value(vals, q, default):
    """The element of ``vals`` at quantile ``q`` (an actual value: exercises ``<``/``<=``)."""
    if vals.numel() == 0:
        return default
    s = torch.sort(vals).values
    return float(s[min(len(s) - 1, int(q * len(s)))])


# ------------------------------------------------------------------ TripletMarginMiner

TRIPLET_TYPES = ["all", "hard", "semihard", "easy"]


@pytest.mark.parametrize("case_name", MAIN_CASES)
@pytest.mark.parametrize("dist", ALL_DISTANCES)
@pytest.mark.parametrize("ttype", TRIPLET_TYPES)
@pytest.mark.parametrize("margin", [0.2, 0.0, "exact"])
def test_triplet_margin_options(ttype, dist, case_name, margin):
    case = make_case(case_name, salt=(ttype, dist))
    if margin == "exact":
        # a margin equal to an actual d(a,n) - d(a,p): the <= / > boundary
        mat = distance_matrix(pml_distance(dist), case)
        ry = case.y if case.self_mode else case.ref_y
        a, p, n = pml_lmu.get_all_triplets_indices(case.y, case.y if case.self_mode else ry)
        tm = mat[a, p] - mat[a, n] if DISTANCES[dist][0] != "LpDistance" and \
            DISTANCES[dist][0] != "SNRDistance" else mat[a, n] - mat[a, p]
        margin = sorted_value(tm, 0.5, 0.2)
    check_against_pml(mk("TripletMarginMiner", 3, {"margin": margin, "type_of_triplets": ttype},
                         dist=dist), case, check_script=False)


@pytest.mark.parametrize("case_name", EDGES)
@pytest.mark.parametrize("ttype", TRIPLET_TYPES)
def test_triplet_margin_edges(case_name, ttype):
    check_against_pml(mk("TripletMarginMiner", 3, {"type_of_triplets": ttype}),
                      make_case(case_name, salt=ttype), check_script=(ttype == "semihard"))


# --------------------------------------------------------------------- PairMarginMiner


@pytest.mark.parametrize("case_name", MAIN_CASES + ["same_as_ref"])
@pytest.mark.parametrize("dist", ALL_DISTANCES)
@pytest.mark.parametrize("margins", ["default", "wide", "exact"])
def test_pair_margin_options(dist, case_name, margins):
    case = make_case(case_name, salt=(dist, margins))
    if margins == "default":
        kw = {}
    elif margins == "wide":
        kw = {"pos_margin": 0.5, "neg_margin": 1.0}
    else:
        _, pos, neg = pair_values(dist, case)
        kw = {"pos_margin": sorted_value(pos, 0.5, 0.2), "neg_margin": sorted_value(neg, 0.3, 0.8)}
    check_against_pml(mk("PairMarginMiner", 4, kw, dist=dist), case, check_script=False)


@pytest.mark.parametrize("case_name", EDGES)
def test_pair_margin_edges(case_name):
    check_against_pml(mk("PairMarginMiner", 4, {"pos_margin": 0.3, "neg_margin": 0.9}),
                      make_case(case_name), check_script=case_name in ("typical", "ref_smaller"))


# ---------------------------------------------------------------- MultiSimilarityMiner


@pytest.mark.parametrize("case_name", MAIN_CASES + ["same_as_ref"])
@pytest.mark.parametrize("dist", [None] + ALL_DISTANCES)
@pytest.mark.parametrize("epsilon", [0.1, 0.0, 0.2, 0.5])
def test_multi_similarity_options(epsilon, dist, case_name):
    check_against_pml(mk("MultiSimilarityMiner", 4, {"epsilon": epsilon}, dist=dist),
                      make_case(case_name, salt=(epsilon, dist)), check_script=False)


@pytest.mark.parametrize("case_name", EDGES)
def test_multi_similarity_edges(case_name):
    check_against_pml(mk("MultiSimilarityMiner", 4, {}), make_case(case_name),
                      check_script=case_name in ("typical", "ref_smaller"))


# ---------------------------------------------------------- BatchEasyHard / BatchHard

STRATEGIES = ["hard", "semihard", "easy", "all"]
VALID_STRATEGY_PAIRS = [
    (p, n) for p, n in itertools.product(STRATEGIES, STRATEGIES)
    if not (p == n == "semihard") and not ("semihard" in (p, n) and "all" in (p, n))
]
assert len(VALID_STRATEGY_PAIRS) == 13


@pytest.mark.parametrize("case_name", MAIN_CASES)
@pytest.mark.parametrize("dist", ["l2", "dot", "l1_sq_raw", "snr"])
@pytest.mark.parametrize("ranges", [False, True])
@pytest.mark.parametrize("strategies", VALID_STRATEGY_PAIRS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_batch_easy_hard_options(strategies, ranges, dist, case_name):
    case = make_case(case_name, salt=(strategies, ranges, dist))
    kw = {"pos_strategy": strategies[0], "neg_strategy": strategies[1]}
    if ranges:
        # ranges whose ends are actual values (inclusive boundaries)
        _, pos, neg = pair_values(dist, case)
        kw["allowed_pos_range"] = (sorted_value(pos, 0.15, 0.0), sorted_value(pos, 0.85, 2.0))
        kw["allowed_neg_range"] = (sorted_value(neg, 0.15, 0.0), sorted_value(neg, 0.85, 2.0))
    check_against_pml(mk("BatchEasyHardMiner", 4, kw, dist=dist, tie_aware=True), case,
                      check_script=False)


@pytest.mark.parametrize("case_name", EDGES)
@pytest.mark.parametrize("strategies", [("easy", "semihard"), ("hard", "hard"), ("all", "easy"),
                                        ("semihard", "hard"), ("all", "all")],
                         ids=lambda s: f"{s[0]}-{s[1]}")
def test_batch_easy_hard_edges(strategies, case_name):
    kw = {"pos_strategy": strategies[0], "neg_strategy": strategies[1]}
    check_against_pml(mk("BatchEasyHardMiner", 4, kw, tie_aware=True),
                      make_case(case_name, salt=strategies),
                      check_script=case_name in ("typical", "ref_smaller"))


def test_batch_easy_hard_defaults_match_pml():
    m = our_miner_cls("BatchEasyHardMiner")()
    assert m.pos_strategy == "easy" and m.neg_strategy == "semihard"
    assert m.allowed_pos_range is None and m.allowed_neg_range is None


@pytest.mark.parametrize("case_name", MAIN_CASES)
@pytest.mark.parametrize("dist", ALL_DISTANCES)
def test_batch_hard_distances(dist, case_name):
    check_against_pml(mk("BatchHardMiner", 3, {}, dist=dist, tie_aware=True),
                      make_case(case_name, salt=dist), check_script=False)


@pytest.mark.parametrize("case_name", MAIN_CASES)
@pytest.mark.parametrize("dist", ["l2", "dot", "snr"])
def test_batch_hard_allowed_ranges(dist, case_name):
    """PML's BatchHardMiner passes allowed_pos_range / allowed_neg_range on to
    BatchEasyHardMiner; range ends are actual values (inclusive boundaries)."""
    case = make_case(case_name, salt=("bh-ranges", dist))
    _, pos, neg = pair_values(dist, case)
    kw = {"allowed_pos_range": (sorted_value(pos, 0.15, 0.0), sorted_value(pos, 0.85, 2.0)),
          "allowed_neg_range": (sorted_value(neg, 0.15, 0.0), sorted_value(neg, 0.85, 2.0))}
    check_against_pml(mk("BatchHardMiner", 3, kw, dist=dist, tie_aware=True), case,
                      check_script=case_name == "typical")


@pytest.mark.parametrize("case_name", EDGES)
def test_batch_hard_edges(case_name):
    check_against_pml(mk("BatchHardMiner", 3, {}, tie_aware=True), make_case(case_name),
                      check_script=case_name in ("typical", "ref_smaller"))


def test_batch_hard_ties_accept_any_candidate():
    # duplicated embeddings: several positives / negatives at the same distance
    base = make_case("typical", salt="ties")
    x = torch.cat([base.x[:6], base.x[:6]])
    y = torch.cat([base.y[:6], base.y[:6]])
    from harness import Case
    case = Case("duplicates", x, y)
    check_against_pml(mk("BatchHardMiner", 3, {}, tie_aware=True), case)
    check_against_pml(mk("BatchEasyHardMiner", 4, {"pos_strategy": "hard",
                                                   "neg_strategy": "easy"}, tie_aware=True), case)


# --------------------------------------------------------------------------- HDCMiner


@pytest.mark.parametrize("case_name", MAIN_CASES + ["same_as_ref"])
@pytest.mark.parametrize("dist", ["l2", "dot", "cos", "l2_sq", "snr"])
@pytest.mark.parametrize("pct", [0.5, 0.25, 0.1, 0.7, 1.0])
def test_hdc_options(pct, dist, case_name):
    check_against_pml(mk("HDCMiner", 4, {"filter_percentage": pct}, dist=dist, tie_aware="global"),
                      make_case(case_name, salt=(pct, dist)), check_script=False)


@pytest.mark.parametrize("case_name", EDGES)
def test_hdc_edges(case_name):
    check_against_pml(mk("HDCMiner", 4, {}, tie_aware="global"), make_case(case_name),
                      check_script=case_name in ("typical", "ref_smaller"))


def _ten_pos_pairs_case():
    # 5 classes x 2: 10 positive pairs, 80 negative pairs; f * count is a whole number in
    # float64 for f = 0.7, 0.1, 0.3 (7.0, 1.0, 3.0, ...), so PML keeps exactly that many;
    # a multiplier rounded to float32 (0.1 -> 0.10000000149) would tip ceil() past it
    from harness import Case, make_batch
    x, y, _ = make_batch(10, 5, 8, seed=123)
    return Case("ten_pos_pairs", x, y)


@pytest.mark.parametrize("pct", [0.7, 0.1, 0.3])
def test_hdc_keeps_ceil_of_float_product(pct):
    case = _ten_pos_pairs_case()
    check_against_pml(mk("HDCMiner", 4, {"filter_percentage": pct}, tie_aware="global"), case)


def test_hdc_exported_keeps_ceil_of_float_product(tmp_path):
    # the exporter writes a Python-float multiplier as a float32 constant even on a
    # float64 tensor: 10 * float32(0.1) = 1.0000000149 would keep 2 positives (PML: 1)
    pytest.importorskip("onnxruntime")
    from exportminers import OnnxMiner, export_onnx
    case = _ten_pos_pairs_case()
    path = export_onnx(our_miner_cls("HDCMiner")(filter_percentage=0.1),
                       tmp_path / "hdc.onnx", embedding_dim=case.x.size(1))
    out = OnnxMiner(path, providers=["CPUExecutionProvider"])(
        case.x.float().numpy(), case.y.numpy())
    ref = run_pml(pml_miners.HDCMiner(filter_percentage=0.1), case)
    assert [len(t) for t in out] == [len(t) for t in ref] == [1, 1, 8, 8]


def _feed_external(source, case, pml_hdc, our_hdc):
    if case.self_mode:
        pml_hdc.set_idx_externally(source, case.y)
        our_hdc.set_idx_externally(source, case.y)
    else:
        pml_hdc.set_idx_externally(source, case.y)
        our_hdc.set_idx_externally(source, case.y)


@pytest.mark.parametrize("case_name", MAIN_CASES)
@pytest.mark.parametrize("source", ["multisimilarity", "triplets"])
@pytest.mark.parametrize("pct", [0.25, 0.5])
def test_hdc_set_idx_externally(source, case_name, pct):
    case = make_case(case_name, salt=(source, pct))
    if source == "multisimilarity":
        ext = run_pml(pml_miners.MultiSimilarityMiner(epsilon=0.4), case)
    else:
        ext = run_pml(pml_miners.TripletMarginMiner(margin=0.3), case)
    assert len(ext[0]) > 0 and len(ext[-1]) > 0
    pml_hdc = pml_miners.HDCMiner(filter_percentage=pct)
    our_hdc = our_miner_cls("HDCMiner")(filter_percentage=pct)
    _feed_external(ext, case, pml_hdc, our_hdc)
    ref = run_pml(pml_hdc, case)
    out = run_ours(our_hdc, case)
    check_output_format(out, 4)
    mat = distance_matrix(pml_hdc.distance, case)
    ext_pool = ext if len(ext) == 4 else (ext[0], ext[1], ext[0], ext[2])
    assert_same_pairs_global_tie_aware(out, ref, mat, case, ext_pool, f"HDC external {source}")
    # external pairs: every returned pair is one of the external ones
    ext_pairs = ext if len(ext) == 4 else (ext[0], ext[1], ext[0], ext[2])
    pos = set(zip(ext_pairs[0].tolist(), ext_pairs[1].tolist()))
    neg = set(zip(ext_pairs[2].tolist(), ext_pairs[3].tolist()))
    assert set(zip(out[0].tolist(), out[1].tolist())) <= pos
    assert set(zip(out[2].tolist(), out[3].tolist())) <= neg


def test_hdc_set_idx_externally_scripted():
    case = make_case("typical", salt="hdc_script")
    ext = run_pml(pml_miners.MultiSimilarityMiner(epsilon=0.1), case)
    ours = our_miner_cls("HDCMiner")(filter_percentage=0.25)
    scripted = torch.jit.script(our_miner_cls("HDCMiner")(filter_percentage=0.25))
    ours.set_idx_externally(ext, case.y)
    scripted.set_idx_externally(ext, case.y)
    a = run_ours(ours, case)
    b = run_ours(scripted, case)
    for s, e in zip(a, b):
        assert torch.equal(s, e)


def test_hdc_external_second_call_matches_pml():
    # PML filters the stored external pairs in place: a second call cascades
    case = make_case("typical", salt="cascade")
    ext = run_pml(pml_miners.MultiSimilarityMiner(epsilon=0.1), case)
    pml_hdc = pml_miners.HDCMiner(filter_percentage=0.5)
    our_hdc = our_miner_cls("HDCMiner")(filter_percentage=0.5)
    _feed_external(ext, case, pml_hdc, our_hdc)
    run_pml(pml_hdc, case)
    run_ours(our_hdc, case)
    ref = run_pml(pml_hdc, case)
    out = run_ours(our_hdc, case)
    mat = distance_matrix(pml_hdc.distance, case)
    assert_same_pairs_global_tie_aware(out, ref, mat, case, None, "HDC external, second call")


def test_hdc_reset_idx():
    case = make_case("typical", salt="reset")
    ext = run_pml(pml_miners.TripletMarginMiner(margin=0.1, type_of_triplets="hard"), case)
    our_hdc = our_miner_cls("HDCMiner")(filter_percentage=0.5)
    our_hdc.set_idx_externally(ext, case.y)
    run_ours(our_hdc, case)
    our_hdc.reset_idx()
    out = run_ours(our_hdc, case)
    ref = run_pml(pml_miners.HDCMiner(filter_percentage=0.5), case)
    mat = distance_matrix(pml_miners.HDCMiner().distance, case)
    assert_same_pairs_global_tie_aware(out, ref, mat, case, run_pml(
        pml_miners.HDCMiner(filter_percentage=1.0), case), "HDC after reset_idx")


# ------------------------------------------------------------------------ AngularMiner


@pytest.mark.parametrize("case_name", MAIN_CASES + ["same_as_ref"])
@pytest.mark.parametrize("angle", [20, 35, 45, 10])
def test_angular_options(angle, case_name):
    check_against_pml(mk("AngularMiner", 3, {"angle": angle}), make_case(case_name, salt=angle),
                      check_script=False)


@pytest.mark.parametrize("case_name", EDGES)
def test_angular_edges(case_name):
    check_against_pml(mk("AngularMiner", 3, {"angle": 30}), make_case(case_name),
                      check_script=case_name in ("typical", "ref_smaller"))


def test_angular_explicit_default_distance():
    from harness import our_distance
    case = make_case("typical", salt="angular_dist")
    mc = MinerCase("AngularMiner",
                   lambda: our_miner_cls("AngularMiner")(angle=25, distance=our_distance("l2")),
                   lambda: pml_miners.AngularMiner(angle=25), 3)
    check_against_pml(mc, case, check_script=False)


# ------------------------------------------------------- EmbeddingsAlreadyPackagedAsTriplets


@pytest.mark.parametrize("n", [3, 6, 12, 30])
def test_already_packaged_triplets(n):
    from harness import Case, make_batch
    x, y, _ = make_batch(n, 3, seed=n)
    check_against_pml(MinerCase("EmbeddingsAlreadyPackagedAsTriplets",
                                lambda: our_miner_cls("EmbeddingsAlreadyPackagedAsTriplets")(),
                                lambda: pml_miners.EmbeddingsAlreadyPackagedAsTriplets(), 3),
                      Case(f"n{n}", x, y), check_script=(n == 12))


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_already_packaged_incomplete_triplet(n):
    # PML's output assertion fails when N is not a multiple of 3; ours either rejects the
    # batch with a ValueError or returns only complete triplets
    from harness import make_batch
    x, y, _ = make_batch(n, 2, seed=n)
    miner = our_miner_cls("EmbeddingsAlreadyPackagedAsTriplets")()
    try:
        a, p, nn = miner(x, y)
    except ValueError:
        return
    k = n // 3
    assert torch.equal(a, torch.arange(0, 3 * k, 3))
    assert torch.equal(p, torch.arange(1, 3 * k, 3))
    assert torch.equal(nn, torch.arange(2, 3 * k, 3))


# ---------------------------------------------------------------------- legacy arguments

LEGACY = [
    {"normalize_embeddings": False},
    {"normalize_embeddings": True},
    {"use_similarity": True},
    {"use_similarity": True, "normalize_embeddings": False},
    {"squared_distances": True},
    {"squared_distances": True, "normalize_embeddings": False},
]
LEGACY_MINERS = [
    ("TripletMarginMiner", 3, {"margin": 0.1}, "l2", False),
    ("PairMarginMiner", 4, {}, "l2", False),
    ("BatchHardMiner", 3, {}, "l2", True),
    ("BatchEasyHardMiner", 4, {"pos_strategy": "hard", "neg_strategy": "semihard"}, "l2", True),
    ("HDCMiner", 4, {"filter_percentage": 0.3}, "l2", True),
    ("MultiSimilarityMiner", 4, {}, "cos", False),
]


@pytest.mark.parametrize("case_name", MAIN_CASES)
@pytest.mark.parametrize("legacy", LEGACY, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
@pytest.mark.parametrize("miner_spec", LEGACY_MINERS, ids=lambda s: s[0])
def test_legacy_arguments(miner_spec, legacy, case_name):
    name, arity, kw, default, tie = miner_spec
    pml_dist = legacy_to_pml_distance(default, **legacy)

    def ours():
        return our_miner_cls(name)(**kw, **legacy)

    def pml():
        return getattr(pml_miners, name)(**kw, distance=legacy_to_pml_distance(default, **legacy))

    mc = MinerCase(name, ours, pml, arity, tie_aware=tie, label=str(legacy))
    check_against_pml(mc, make_case(case_name, salt=(name, str(legacy))), check_script=False)
    m = ours()
    assert type(m.distance).__name__ in ("LpDistance", "DotProductSimilarity", "CosineSimilarity")
    assert m.distance.is_inverted == pml_dist.is_inverted
    assert m.distance.normalize_embeddings == pml_dist.normalize_embeddings
    assert float(m.distance.power) == float(pml_dist.power)
    assert float(m.distance.p) == float(pml_dist.p)


@pytest.mark.parametrize("dist", ["cos", "dot"])
def test_multi_similarity_nan_similarities_match_pml(dist, seed):
    """Zero rows normalised in float16 give NaN similarities (0/0). PML sorts each row
    (NaN last) and reads the hardest pairs at its ends; the kernel must agree."""
    from collections import Counter
    ours = our_miner_cls("MultiSimilarityMiner")(distance=our_distance(dist))
    ref = pml_miner_cls("MultiSimilarityMiner")(distance=pml_distance(dist))
    g = torch.Generator().manual_seed(seed)
    checked = 0
    for _ in range(60):
        n = int(torch.randint(3, 20, (1,), generator=g))
        x = torch.randn(n, 4, generator=g)
        x[torch.rand(n, generator=g) < 0.25] = 0
        y = torch.randint(0, 3, (n,), generator=g)
        x = x.half()
        if not torch.isnan(ours.distance(x)).any():
            continue
        checked += 1
        got, want = ours(x, y), ref(x, y)
        assert Counter(zip(got[0].tolist(), got[1].tolist())) == \
            Counter(zip(want[0].tolist(), want[1].tolist()))
        assert Counter(zip(got[2].tolist(), got[3].tolist())) == \
            Counter(zip(want[2].tolist(), want[3].tolist()))
    assert checked > 10
