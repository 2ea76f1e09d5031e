"""UniformHistogramMiner: pairs sampled uniformly across a histogram of their distances."""
from typing import List, Optional

import torch
from torch import Tensor

from .. import _ops
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_positive_int
from .base_miner import PairKernelMiner


def histogram_edges(low: Tensor, high: Tensor, num_bins: int) -> Tensor:
    """``torch.linspace(low, high, num_bins + 1)`` for 0-dim tensor ends (no ``.item()``)."""
    steps = num_bins + 1
    i = torch.arange(steps, device=low.device).to(low.dtype)
    step = (high - low) / float(max(1, steps - 1))
    half = steps // 2
    return torch.where(i < half, low + step * i, high - step * (float(steps - 1) - i))


def uniform_histogram_side(values: Tensor, sel: Tensor, num_bins: int, u: Tensor) -> List[Tensor]:
    """Sample ``K`` pairs per non-empty bin, uniformly with replacement.

    Args:
        values: Tensor[N, M] pair values; sel: Tensor[N, M] bool, the pool.
        u: Tensor[num_bins, K] uniform [0, 1).

    Returns:
        ``[valid Tensor[num_bins, K] bool, anchor Tensor[num_bins, K], other Tensor[num_bins, K]]``.
        Bins span [min, max] of the pool in ``num_bins`` equal steps, each closed on the
        left and open on the right except the last.
    """
    m = _ops.ones_int_like(values[0]).sum()  # M from data: no Shape node when exported
    flat = values.reshape(-1)
    pool = sel.reshape(-1)
    low = flat.masked_fill(~pool, float("inf")).min()
    high = flat.masked_fill(~pool, float("-inf")).max()
    edges = histogram_edges(low, high, num_bins)
    interior = edges[1:num_bins].unsqueeze(0)
    bins = _ops.searchsorted_rows(interior, flat.unsqueeze(0), True).reshape(-1)
    bins = torch.where(pool, bins, num_bins)
    counts = torch.zeros(num_bins + 1, dtype=torch.int64, device=values.device)
    counts = counts.scatter_add(0, bins, _ops.ones_int_like(bins))[:num_bins]
    order = torch.argsort(bins, stable=True)
    offsets = torch.cumsum(counts, 0) - counts
    c = counts.unsqueeze(1)
    r = torch.floor(u * c.to(torch.float64)).to(torch.int64)
    r = torch.minimum(r, (c - 1).clamp(min=0))
    last = _ops.ones_int_like(bins).sum() - 1           # N*M - 1, from data (no Shape)
    pick = order[torch.minimum(offsets.unsqueeze(1) + r, last)]
    valid = (c > 0) & (pick >= 0)                        # broadcast to [num_bins, K]
    return [valid, torch.div(pick, m, rounding_mode="floor"), pick % m]


def uniform_histogram_miner(mat: Tensor, pos: Tensor, neg: Tensor, num_bins: int,
                            noise_pos: Tensor, noise_neg: Tensor) -> List[Tensor]:
    """Fixed-shape UniformHistogramMiner kernel: :func:`uniform_histogram_side` for the
    positive pairs and for the negative pairs (six outputs)."""
    return uniform_histogram_side(mat, pos, num_bins, noise_pos) + \
        uniform_histogram_side(mat, neg, num_bins, noise_neg)


class UniformHistogramMiner(PairKernelMiner):
    """Bins the positive (and negative) pair distances into ``num_bins`` equal-width bins
    and samples ``pos_per_bin`` (``neg_per_bin``) pairs from each non-empty bin.

    Kernel: :func:`uniform_histogram_miner`; noise of shape
    ``[2, num_bins, max(pos_per_bin, neg_per_bin)]``.
    """

    num_bins: int
    pos_per_bin: int
    neg_per_bin: int

    def __init__(self, num_bins: int = 100, pos_per_bin: int = 10, neg_per_bin: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.num_bins = check_positive_int(num_bins, "num_bins")
        self.pos_per_bin = check_positive_int(pos_per_bin, "pos_per_bin")
        self.neg_per_bin = check_positive_int(neg_per_bin, "neg_per_bin")
        self.layout = [[0, 1, 2], [3, 4, 5]]

    def noise_shape(self, n: int, m: int) -> List[int]:
        return [2, self.num_bins, max(self.pos_per_bin, self.neg_per_bin)]

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor]) -> List[Tensor]:
        if noise is None:
            raise ValueError("UniformHistogramMiner.kernel needs noise of shape [2, num_bins, K]")
        mat = self.distance(embeddings, ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels)
        return uniform_histogram_miner(mat, pos, neg, self.num_bins,
                                       noise[0, :, :self.pos_per_bin],
                                       noise[1, :, :self.neg_per_bin])

    def extra_repr(self) -> str:
        return (f"num_bins={self.num_bins}, pos_per_bin={self.pos_per_bin}, "
                f"neg_per_bin={self.neg_per_bin}")
