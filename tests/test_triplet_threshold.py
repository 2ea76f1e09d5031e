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


# ------------------------------------------------------------------ AngularMiner's atan cut


@pytest.mark.parametrize("degrees", [20, 35, 45, 0.0, -10, 60, 89.9, 90, 120, -95])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_atan_cut_equals_the_atan_test(degrees, dtype):
    """``r > atan_cut(angle)`` is exactly ``torch.atan(r) > angle`` in that dtype: on the
    4,001 floats around the cut-off, on random ratios of every magnitude, and at the
    special values (the exported AngularMiner graph has no Atan: ONNX Runtime's CUDA EP
    lacks the kernel)."""
    import math

    from exportminers.miners.angular_miner import atan_cut
    angle = math.radians(degrees)
    cut = atan_cut(angle, dtype)
    g = torch.Generator().manual_seed(int(degrees * 10) % 1000)
    rand = torch.exp(torch.randn(20000, generator=g, dtype=torch.float64) * 4).to(dtype)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-30, -1.0],
                           dtype=torch.float64).to(dtype)
    ratios = [rand, -rand, special]
    if math.isfinite(cut):
        around = torch.full((4001,), cut, dtype=dtype)
        up, down = torch.tensor(float("inf"), dtype=dtype), torch.tensor(float("-inf"), dtype=dtype)
        x = torch.tensor([cut], dtype=dtype)
        steps = [x]
        for _ in range(2000):
            steps.append(torch.nextafter(steps[-1], up))
        x2 = [x]
        for _ in range(2000):
            x2.append(torch.nextafter(x2[-1], down))
        around = torch.cat(x2[::-1] + steps[1:])
        ratios.append(around)
    for r in ratios:
        if cut == float("-inf"):   # the test holds for every number; -inf > -inf is False
            r = r[r != float("-inf")]   # (the kernel's ratios are never negative)
        assert torch.equal(torch.atan(r) > angle, r > cut), (degrees, dtype)
