"""The exact per-pair threshold that replaces per-triplet margins in TripletMarginMiner."""
import pytest
import torch

from exportminers.miners.triplet_margin_miner import margin_thresholds


def _values(dtype, g):
    # non-negative values (distances) over many magnitudes, plus edge cases
    scales = torch.tensor([1e-30, 1e-8, 1e-3, 0.5, 1.0, 2.0, 3.0, 1e3, 1e8], dtype=torch.float64)
    v = torch.rand(4000, generator=g, dtype=torch.float64) * scales[torch.randint(0, 9, (4000,), generator=g)]
    special = torch.tensor([0.0, 1.0, 2.0, 0.2, 0.1, 0.3, 1e-45, 0.1 + 0.2, 4.0, 0.25],
                           dtype=torch.float64)
    return torch.cat([v, special]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("margin", [0.2, 0.0, 1e-9, 0.1 + 0.2, 3.7, 1e6, 0.25, 2.0 ** -20])
def test_threshold_is_the_exact_boundary(dtype, margin):
    g = torch.Generator().manual_seed(7)
    ap = _values(dtype, g)
    t = margin_thresholds(ap, margin)
    up = torch.nextafter(t, torch.full_like(t, float("inf")))
    assert bool(((t - ap) <= margin).all()), "t itself must pass"
    assert bool(((up - ap) > margin).all()), "the next float above t must fail"


def test_threshold_keeps_infinities():
    ap = torch.tensor([float("inf"), float("-inf")])
    t = margin_thresholds(ap, 0.2)
    assert t[0] == float("inf") and t[1] == float("-inf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_comparison_equals_subtraction(dtype):
    # the decision an <= t(ap) equals fl(an - ap) <= margin on values near the boundary
    g = torch.Generator().manual_seed(3)
    ap = torch.rand(300, generator=g, dtype=torch.float64).to(dtype) * 2
    margin = 0.2
    t = margin_thresholds(ap, margin)
    inf = torch.full_like(t, float("inf"))
    near = [t, torch.nextafter(t, inf), torch.nextafter(t, -inf),
            ap + margin, torch.nextafter(ap + margin, inf), torch.nextafter(ap + margin, -inf)]
    for an in near:
        assert torch.equal(an <= t, (an - ap) <= margin)
