"""Miner outputs plugged into PML losses give PML's loss values; our scriptable
TripletMarginLoss equals PML's TripletMarginLoss."""
import pytest
import torch

import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners

from harness import make_case, our_distance, our_miner_cls, pml_distance, run_ours, run_pml

PLUGS = [
    ("TripletMarginMiner", {"margin": 0.2, "type_of_triplets": "semihard"},
     lambda: pml_losses.TripletMarginLoss(margin=0.2)),
    ("TripletMarginMiner", {"margin": 0.3}, lambda: pml_losses.MultiSimilarityLoss()),
    ("PairMarginMiner", {}, lambda: pml_losses.ContrastiveLoss()),
    ("PairMarginMiner", {"pos_margin": 0.4, "neg_margin": 1.1},
     lambda: pml_losses.MultiSimilarityLoss()),
    ("MultiSimilarityMiner", {"epsilon": 0.1}, lambda: pml_losses.MultiSimilarityLoss()),
    ("MultiSimilarityMiner", {"epsilon": 0.3}, lambda: pml_losses.ContrastiveLoss()),
    ("BatchHardMiner", {}, lambda: pml_losses.TripletMarginLoss(margin=0.1)),
    ("BatchEasyHardMiner", {}, lambda: pml_losses.TripletMarginLoss(margin=0.1)),
    ("BatchEasyHardMiner", {"pos_strategy": "all", "neg_strategy": "hard"},
     lambda: pml_losses.ContrastiveLoss()),
    ("HDCMiner", {"filter_percentage": 0.3}, lambda: pml_losses.ContrastiveLoss()),
    ("AngularMiner", {"angle": 30}, lambda: pml_losses.AngularLoss()),
    ("EmbeddingsAlreadyPackagedAsTriplets", {}, lambda: pml_losses.TripletMarginLoss()),
]


PLUG_CASES = [pytest.param(p, c, id=f"{p[0]}-{p[1]}-{c}") for p in PLUGS
              for c in ("typical", "ref_smaller")
              # PML's packaged-triplets indices ignore the reference set
              if not (p[0] == "EmbeddingsAlreadyPackagedAsTriplets" and c != "typical")]


@pytest.mark.parametrize("plug,case_name", PLUG_CASES)
def test_pml_loss_on_our_miner_output(plug, case_name):
    name, cfg, make_loss = plug
    case = make_case(case_name, salt=(name, str(cfg)))
    ours = run_ours(our_miner_cls(name)(**cfg), case)
    ref = run_pml(getattr(pml_miners, name)(**cfg), case)
    loss = make_loss()
    if case.self_mode:
        lo = loss(case.x, case.y, ours)
        lr = loss(case.x, case.y, ref)
    else:
        lo = loss(case.x, case.y, ours, case.ref, case.ref_y)
        lr = loss(case.x, case.y, ref, case.ref, case.ref_y)
    assert torch.allclose(lo, lr, rtol=1e-10, atol=1e-12), f"{float(lo)} vs PML {float(lr)}"


# ------------------------------------------------------- exportminers.losses.TripletMarginLoss

LOSS_CONFIGS = [{}, {"margin": 0.2}, {"margin": 0.5, "swap": True}, {"smooth_loss": True},
                {"margin": 0.1, "swap": True, "smooth_loss": True}]


def our_loss(**kw):
    from exportminers.losses import TripletMarginLoss
    return TripletMarginLoss(**kw)


@pytest.mark.parametrize("dist", [None, "l2", "dot", "cos", "l2_raw"])
@pytest.mark.parametrize("cfg", LOSS_CONFIGS, ids=str)
@pytest.mark.parametrize("indices", ["none", "triplets", "pairs", "empty"])
def test_triplet_margin_loss_matches_pml(cfg, dist, indices):
    case = make_case("typical", salt=("loss", str(cfg), dist))
    kw_o, kw_p = dict(cfg), dict(cfg)
    if dist is not None:
        kw_o["distance"] = our_distance(dist)
        kw_p["distance"] = pml_distance(dist)
    ours = our_loss(**kw_o)
    pml = pml_losses.TripletMarginLoss(**kw_p)
    if indices == "none":
        tup = None
    elif indices == "triplets":
        tup = pml_miners.TripletMarginMiner(margin=0.3)(case.x, case.y)
    elif indices == "pairs":
        tup = pml_miners.MultiSimilarityMiner(epsilon=0.2)(case.x, case.y)
    else:
        e = torch.empty(0, dtype=torch.long)
        tup = (e, e, e)
    lo = ours(case.x, case.y, None if tup is None else list(tup))
    lr = pml(case.x, case.y, tup)
    assert torch.allclose(lo.double(), lr.double(), rtol=1e-10, atol=1e-12), \
        f"{float(lo)} vs PML {float(lr)}"
    scripted = torch.jit.script(our_loss(**kw_o))
    ls = scripted(case.x, case.y, None if tup is None else list(tup))
    assert torch.allclose(ls, lo, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cfg", LOSS_CONFIGS[:3], ids=str)
def test_triplet_margin_loss_gradients_match_pml(cfg):
    case = make_case("typical", salt=("grad", str(cfg)))
    xo = case.x.clone().requires_grad_(True)
    xp = case.x.clone().requires_grad_(True)
    our_loss(**cfg)(xo, case.y).backward()
    pml_losses.TripletMarginLoss(**cfg)(xp, case.y).backward()
    assert torch.allclose(xo.grad, xp.grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("case_name", ["b1", "one_class", "all_distinct", "huge_labels"])
def test_triplet_margin_loss_edge_batches(case_name):
    case = make_case(case_name, salt="loss_edge")
    lo = our_loss(margin=0.2)(case.x, case.y)
    lr = pml_losses.TripletMarginLoss(margin=0.2)(case.x, case.y)
    assert torch.allclose(lo.double(), lr.double(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw", [{}, {"swap": True}, {"smooth_loss": True}, {"margin": 0.3}])
def test_triplet_margin_loss_with_reference_sets_matches_pml(kw):
    import pytorch_metric_learning.losses as pml_losses

    from exportminers import losses, miners
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        xr, yr = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
        ours, pml = losses.TripletMarginLoss(**kw), pml_losses.TripletMarginLoss(**kw)
        mined = miners.TripletMarginMiner()(x, y, xr, yr)
        for args in ((x, y, None, xr, yr), (x, y, mined, xr, yr), (x, y, None, x, y)):
            assert float(ours(*args)) == pytest.approx(float(pml(*args)), abs=1e-6)
    scripted = torch.jit.script(losses.TripletMarginLoss(**kw))
    assert float(scripted(x, y, None, xr, yr)) == pytest.approx(float(pml(x, y, None, xr, yr)),
                                                               abs=1e-6)


def test_triplet_margin_loss_triplets_per_anchor_matches_pml():
    import pytorch_metric_learning.losses as pml_losses

    from exportminers import losses
    g = torch.Generator().manual_seed(2)
    for seed in range(6):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
        torch.manual_seed(seed)
        ours = losses.TripletMarginLoss(triplets_per_anchor=3)(x, y)
        torch.manual_seed(seed)
        theirs = pml_losses.TripletMarginLoss(triplets_per_anchor=3)(x, y)
        assert float(ours) == pytest.approx(float(theirs), abs=1e-6)
    with pytest.raises(ValueError, match="triplets_per_anchor must be a positive integer"):
        losses.TripletMarginLoss(triplets_per_anchor=0)
    with pytest.raises(ValueError, match="ref_emb and ref_labels go together"):
        losses.TripletMarginLoss()(x, y, None, x, None)
