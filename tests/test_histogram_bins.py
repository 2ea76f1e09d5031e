"""UniformHistogramMiner's arithmetic binning equals counting edges (PML's bin rule)."""
import pytest
import torch

from exportminers.miners.uniform_histogram_miner import bin_index, histogram_edges


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_bins", [1, 2, 3, 10, 100, 1000])
def test_bin_equals_number_of_interior_edges_at_or_below(dtype, num_bins):
    g = torch.Generator().manual_seed(num_bins)
    for trial in range(20):
        scale = float(torch.rand(1, generator=g)) * 3
        v = torch.rand(4000, generator=g, dtype=torch.float64) * scale + float(torch.randn(1, generator=g))
        if trial % 4 == 0:
            v = v.round(decimals=1)  # ties, and values sitting exactly on edges
        v = v.to(dtype)
        low, high = v.min(), v.max()
        edges = histogram_edges(low, high, num_bins)
        want = torch.searchsorted(edges[1:num_bins].contiguous(), v, right=True)
        assert torch.equal(bin_index(v, edges, low, high, num_bins), want)


def test_single_point_goes_to_the_last_bin():
    v = torch.full((7,), 0.3)
    low, high = v.min(), v.max()
    assert bin_index(v, histogram_edges(low, high, 5), low, high, 5).tolist() == [4] * 7


def test_edges_match_torch_linspace_ends():
    low, high = torch.tensor(-0.7), torch.tensor(1.9)
    edges = histogram_edges(low, high, 10)
    assert edges[0] == low and edges[-1] == high
    assert torch.allclose(edges, torch.linspace(-0.7, 1.9, 11), atol=1e-6)
