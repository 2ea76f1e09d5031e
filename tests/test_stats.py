"""collect_stats=True: the statistics PML 2.9.0 records, compared with PML itself on
fresh inputs (eager and TorchScript), plus PML's record-keeper name lists."""
import math

import pytest
import torch
from pytorch_metric_learning import miners as pml_miners

from exportminers import miners
from harness import EDGE_NAMES, make_case, our_distance, pml_distance, run_ours, run_pml

EASY_HARD = ["easiest_triplet", "hardest_triplet", "easiest_pos_pair", "hardest_pos_pair",
             "easiest_neg_pair", "hardest_neg_pair"]
ANGLES = ["average_angle", "average_angle_above_threshold", "average_angle_below_threshold",
          "min_angle", "max_angle", "std_of_angle"]

# (miner, config, stat names, distances to try)
SPECS = [
    ("TripletMarginMiner", {}, ["avg_triplet_margin", "pos_pair_dist", "neg_pair_dist"],
     ["l2", "cos", "l1_sq_raw", "snr"]),
    ("TripletMarginMiner", {"type_of_triplets": "semihard", "margin": 0.1},
     ["avg_triplet_margin", "pos_pair_dist", "neg_pair_dist"], ["l2", "dot_raw"]),
    ("PairMarginMiner", {}, ["pos_pair_dist", "neg_pair_dist"], ["l2", "cos", "l2_sq"]),
    ("BatchHardMiner", {}, EASY_HARD, ["l2", "cos", "l1"]),
    ("BatchEasyHardMiner", {}, EASY_HARD, ["l2", "cos"]),
    ("BatchEasyHardMiner", {"pos_strategy": "hard", "neg_strategy": "hard"}, EASY_HARD,
     ["l2", "cos"]),
    ("BatchEasyHardMiner", {"pos_strategy": "all", "neg_strategy": "hard"}, EASY_HARD,
     ["l2", "cos"]),
    ("BatchEasyHardMiner", {"pos_strategy": "easy", "neg_strategy": "all"}, EASY_HARD, ["l2"]),
    ("BatchEasyHardMiner", {"pos_strategy": "all", "neg_strategy": "all"}, EASY_HARD, ["l2"]),
    ("BatchEasyHardMiner", {"pos_strategy": "semihard", "neg_strategy": "hard",
                            "allowed_neg_range": [0.3, 1.6]}, EASY_HARD, ["l2"]),
    ("AngularMiner", {}, ANGLES, [None]),
    ("AngularMiner", {"angle": 35}, ANGLES, [None]),
]


def _same(ours: float, ref, rel: float, abs_: float) -> bool:
    ref = float(ref)
    if math.isnan(ref) or math.isnan(ours):
        return math.isnan(ref) and math.isnan(ours)
    return math.isclose(ours, ref, rel_tol=rel, abs_tol=abs_)


def _build(name, cfg, dist):
    kw = dict(cfg, collect_stats=True)
    ours = getattr(miners, name)(**kw, **({} if dist is None else {"distance": our_distance(dist)}))
    ref = getattr(pml_miners, name)(**kw, **({} if dist is None else {"distance": pml_distance(dist)}))
    return ours, ref


@pytest.mark.parametrize("case_name", EDGE_NAMES + ["same_as_ref"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_stats_equal_pml(spec, case_name, seed):
    name, cfg, stats, dists = spec
    # angles: float32 atan of ratios that ours rounds from float64 Gram terms
    rel, abs_ = (1e-4, 1e-4) if name == "AngularMiner" else (1e-5, 1e-6)
    for dist in dists:
        ours, ref = _build(name, cfg, dist)
        scripted = torch.jit.script(ours)
        for trial in range(2):
            case = make_case(case_name, salt=(name, str(cfg), dist, seed, trial),
                             dtype=torch.float32)
            run_pml(ref, case)
            run_ours(ours, case)
            run_ours(scripted, case)
            for s in stats:
                want = getattr(ref, s)
                assert _same(getattr(ours, s), want, rel, abs_), (s, dist, getattr(ours, s), want)
                assert _same(getattr(scripted, s), want, rel, abs_), (s, dist, "scripted")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s[0]}-{s[1]}")
def test_record_keeper_lists_equal_pml(spec):
    name, cfg, _, dists = spec
    ours, ref = _build(name, cfg, dists[0])
    assert ours._record_these_stats == ref._record_these_stats
    assert ours._record_these == getattr(ref, "_record_these", [])
    plain = getattr(miners, name)(**cfg)
    assert plain._record_these_stats == []


@pytest.mark.parametrize("name", ["MultiSimilarityMiner", "DistanceWeightedMiner", "HDCMiner",
                                  "UniformHistogramMiner"])
def test_settings_lists_equal_pml(name):
    assert getattr(miners, name)()._record_these == getattr(pml_miners, name)()._record_these


def test_stats_follow_each_call_and_reset():
    x, y = torch.randn(30, 8), torch.randint(0, 3, (30,))
    ours = miners.PairMarginMiner(collect_stats=True)
    ours(x, y)
    first = ours.pos_pair_dist
    ours(x + 1.0, y)                 # another batch, other statistics
    assert ours.pos_pair_dist != first
    ours(x, torch.arange(30))        # no positive pair: PML's 0
    assert ours.pos_pair_dist == 0
    off = miners.PairMarginMiner()
    off(x, y)
    assert off.pos_pair_dist == 0.0  # not computed without collect_stats


def test_custom_miner_registers_and_resets_its_own_stats():
    class Custom(miners.BaseMiner):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.add_to_recordable_attributes(name="mean_dist", is_stat=True)

        def mine(self, embeddings, labels, ref_emb, ref_labels):
            if float(embeddings.sum()) > 0:
                self.mean_dist = float(self.distance(embeddings, ref_emb).mean())
            from exportminers.utils import loss_and_miner_utils as lmu
            return lmu.get_all_pairs_indices(labels, ref_labels)

    m = Custom(collect_stats=True)
    assert "mean_dist" in m._record_these_stats and m.mean_dist == 0
    x = torch.rand(6, 4) + 0.1
    m(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert m.mean_dist > 0
    m(-x, torch.tensor([0, 0, 1, 1, 2, 2]))   # not set this call: back to 0, as PML
    assert m.mean_dist == 0
    assert "mean_dist" not in Custom()._record_these_stats
