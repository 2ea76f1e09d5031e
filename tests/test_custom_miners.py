"""The seed doc's custom miners ("How to write custom mining functions") run unchanged
with exportminers imports and return what the same code returns on PML imports."""
import textwrap

import pytest
import torch

from harness import DISTANCES, make_case, our_distance, pml_distance

# The two examples from the seed doc, verbatim except for the import lines, which are
# filled in with either library.
SEED_SOURCE = '''
{imports}

class ExamplePairMiner(BaseMiner):
    def __init__(self, margin=0.1, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        a1, p, a2, n = lmu.get_all_pairs_indices(labels, ref_labels)
        pos_pairs = mat[a1, p]
        neg_pairs = mat[a2, n]
        pos_mask = (
            pos_pairs < self.margin
            if self.distance.is_inverted
            else pos_pairs > self.margin
        )
        neg_mask = (
            neg_pairs > self.margin
            if self.distance.is_inverted
            else neg_pairs < self.margin
        )
        return a1[pos_mask], p[pos_mask], a2[neg_mask], n[neg_mask]


class ExampleTripletMiner(BaseMiner):
    def __init__(self, margin=0.1, **kwargs):
        super().__init__(**kwargs)
        self.margin = margin

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        mat = self.distance(embeddings, ref_emb)
        a, p, n = lmu.get_all_triplets_indices(labels, ref_labels)
        pos_pairs = mat[a, p]
        neg_pairs = mat[a, n]
        triplet_margin = pos_pairs - neg_pairs if self.distance.is_inverted else neg_pairs - pos_pairs
        triplet_mask = triplet_margin <= self.margin
        return a[triplet_mask], p[triplet_mask], n[triplet_mask]
'''

OURS_IMPORTS = """
from exportminers.miners import BaseMiner
from exportminers.utils import loss_and_miner_utils as lmu
"""
PML_IMPORTS = """
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
"""


def load(imports):
    ns = {}
    exec(compile(SEED_SOURCE.format(imports=textwrap.dedent(imports)), "<seed>", "exec"), ns)
    return ns


OURS = load(OURS_IMPORTS)
PML = load(PML_IMPORTS)


def call(miner, case, pml):
    if case.self_mode:
        return miner(case.x, case.y)
    ref, ry = (case.ref.clone(), case.ref_y.clone()) if pml else (case.ref, case.ref_y)
    return miner(case.x, case.y, ref, ry)


@pytest.mark.parametrize("cls", ["ExamplePairMiner", "ExampleTripletMiner"])
@pytest.mark.parametrize("dist", [None, "l2", "l1_sq_raw", "dot", "cos", "snr"])
@pytest.mark.parametrize("case_name", ["typical", "ref_smaller", "ref_larger", "same_as_ref",
                                       "b1", "one_class", "all_distinct", "huge_labels"])
def test_custom_miner_matches_pml(cls, dist, case_name):
    case = make_case(case_name, salt=(cls, dist))
    margin = 0.5 if dist is None or DISTANCES[dist][0] == "LpDistance" else 0.3
    kw_o = {"margin": margin}
    kw_p = {"margin": margin}
    if dist is not None:
        kw_o["distance"] = our_distance(dist)
        kw_p["distance"] = pml_distance(dist)
    ours = OURS[cls](**kw_o)
    pml = PML[cls](**kw_p)
    out = call(ours, case, False)
    ref = call(pml, case, True)
    assert len(out) == len(ref)
    # same code, same helpers: same tensors in the same order
    for o, r in zip(out, ref):
        assert o.dtype == torch.int64
        assert torch.equal(o, r.long())
    if len(out) == 3:
        assert ours.num_triplets == pml.num_triplets
    else:
        assert ours.num_pos_pairs == pml.num_pos_pairs
        assert ours.num_neg_pairs == pml.num_neg_pairs


def test_custom_miner_seed_usage():
    # the seed doc's usage snippet
    miner = OURS["ExamplePairMiner"]()
    embeddings = torch.randn(128, 512)
    labels = torch.randint(0, 10, size=(128,))
    a1, p, a2, n = miner(embeddings, labels)
    assert len(a1) == len(p) and len(a2) == len(n)
    ref_emb = torch.randn(32, 512)
    ref_labels = torch.randint(0, 10, size=(32,))
    a1, p, a2, n = miner(embeddings, labels, ref_emb, ref_labels)
    assert bool((p < 32).all()) and bool((n < 32).all())
    assert bool((a1 < 128).all()) and bool((a2 < 128).all())


def test_custom_miner_legacy_args():
    case = make_case("typical", salt="legacy")
    import pytorch_metric_learning.distances as pml_d
    ours = OURS["ExampleTripletMiner"](margin=0.2, normalize_embeddings=False)
    pml = PML["ExampleTripletMiner"](margin=0.2,
                                     distance=pml_d.LpDistance(normalize_embeddings=False))
    for o, r in zip(call(ours, case, False), call(pml, case, True)):
        assert torch.equal(o, r)


def test_custom_miner_validates_input():
    m = OURS["ExamplePairMiner"]()
    with pytest.raises(ValueError, match="labels"):
        m(torch.randn(5, 3), torch.zeros(4, dtype=torch.long))
