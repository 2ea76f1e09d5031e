"""HDCMiner's exported selection (an exact radix select over exponent and significand,
its exponent level spread over 64 counter lanes) picks exactly what the eager selection
(torch.kthvalue cut-offs, ties in row-major order) picks, on values that stress it:
ties, zeros, negatives, subnormals, huge and infinite values, both dtypes."""
import pytest
import torch

from exportminers.miners.hdc_miner import _kth_select, _radix_select


def _values(kind: str, n: int, m: int, dtype, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, m, generator=g, dtype=torch.float64)
    if kind == "ties":          # few distinct values: many pairs equal to the cut-off
        x = torch.randint(0, 4, (n, m), generator=g).to(torch.float64) * 0.25
    elif kind == "wide":        # exponents from 2^-140 (subnormal in float32) to 2^120
        e = torch.randint(-140, 120, (n, m), generator=g).to(torch.float64)
        x = x.sign() * torch.pow(2.0, e) * (1 + torch.rand(n, m, generator=g, dtype=torch.float64))
    elif kind == "special":     # zeros, +-inf, one exponent for most (the contended bin)
        x = 1.0 + torch.rand(n, m, generator=g, dtype=torch.float64)
        r = torch.rand(n, m, generator=g)
        x = torch.where(r < 0.1, torch.zeros_like(x), x)
        x = torch.where((r > 0.9) & (r < 0.95), torch.full_like(x, float("inf")), x)
        x = torch.where(r >= 0.95, torch.full_like(x, -float("inf")), x)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "ties", "wide", "special"])
@pytest.mark.parametrize("seed", range(4))
def test_radix_select_equals_the_kthvalue_selection(dtype, kind, seed):
    g = torch.Generator().manual_seed(seed)
    n, m = 23, 31
    mat = _values(kind, n, m, dtype, g)
    r = torch.rand(n, m, generator=g)
    pos, neg = r < 0.3, r > 0.45
    for inverted in (False, True):
        flip = neg if inverted else pos
        for k in [(0, 0), (1, 1), (int(pos.sum()) // 3, int(neg.sum()) // 2),
                  (int(pos.sum()), int(neg.sum()))]:
            kt = torch.tensor(k, dtype=torch.int64)
            want = _kth_select(mat, pos, neg, flip, kt, inverted)
            got = _radix_select(mat, pos, neg, flip, kt)
            for w, x in zip(want, got):
                assert torch.equal(w, x), (kind, inverted, k)
            assert [int(x.sum()) for x in got] == list(k)


@pytest.mark.parametrize("dtype, lo, hi", [
    (torch.float16, 0.1, 2.0),       # unit-scale distances in a float16 graph
    (torch.float32, 0.1, 2.0),
    (torch.float32, 600.0, 5000.0),  # L_p distances of unnormalised embeddings
    (torch.float64, 1e-30, 1e30),
])
def test_lanes_spread_values_of_any_magnitude_and_dtype(dtype, lo, hi):
    # the point of the lanes: pairs that share an exponent bin use many counters
    from exportminers.miners.hdc_miner import _lane

    g = torch.Generator().manual_seed(0)
    x = torch.exp(torch.empty(4000, dtype=torch.float64).uniform_(
        float(torch.tensor(lo).log()), float(torch.tensor(hi).log()), generator=g))
    a = x.to(dtype).to(torch.float64)
    e = torch.floor(torch.log2(a))
    lane = _lane(a, e)
    assert bool(((lane >= 0) & (lane <= 63) & (lane == lane.floor())).all())
    assert len(torch.unique(lane)) >= 48
    special = torch.tensor([0.0, float("inf"), float("nan"), 2.0 ** -140], dtype=torch.float64)
    e_special = torch.tensor([-126.0, 129.0, 130.0, -126.0], dtype=torch.float64)
    assert _lane(special, e_special).tolist() == [0.0, 63.0, 0.0, 0.0]
