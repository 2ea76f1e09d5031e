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


def bin_index(values: Tensor, edges: Tensor, low: Tensor, high: Tensor, num_bins: int) -> Tensor:
    """Bin of each value: the number of interior edges ``<= value``.

    The bins have equal width, so the bin is computed arithmetically and then corrected
    by one against the exact edges (rounding can put a value next to an edge on the
    wrong side); no search or sort. All values in one point (``low == high``) fall in
    the last bin, as with the edge count.

    Args:
        values: Tensor[L] in [low, high] (others give some bin, masked by the caller).
        edges: Tensor[num_bins + 1] from :func:`histogram_edges`.
    """
    step = (high - low) / float(num_bins)
    safe_step = torch.where(step > 0, step, torch.ones_like(step))  # step 0: see below
    guess = torch.floor((values - low) / safe_step)
    b = guess.clamp(0, num_bins - 1).to(torch.int64)
    b = b + (values >= edges[b + 1]).to(torch.int64) - (values < edges[b]).to(torch.int64)
    b = b.clamp(0, num_bins - 1)
    return torch.where(step > 0, b, num_bins - 1)


def pool_bins(flat: Tensor, pool: Tensor, num_bins: int) -> Tensor:
    """Histogram bin of every value of a pool (bins span [min, max] of the pool in
    ``num_bins`` equal steps, closed on the left, open on the right except the last).
    Entries outside the pool get some bin; callers mask them.

    Args:
        flat: Tensor[L] pair values; pool: Tensor[L] bool.
    """
    low = flat.masked_fill(~pool, float("inf")).min()
    high = flat.masked_fill(~pool, float("-inf")).max()
    return bin_index(flat, histogram_edges(low, high, num_bins), low, high, num_bins)


def _sample_bins(order: Tensor, counts: Tensor, offsets: Tensor, u: Tensor, last: Tensor,
                 m: Tensor) -> List[Tensor]:
    """``K`` uniform draws (with replacement) from each bin's members.

    Members of bin ``j`` are ``order[offsets[j] : offsets[j] + counts[j]]``.
    Returns ``[valid [B, K] bool, anchor [B, K], other [B, K]]``.
    """
    c = counts.unsqueeze(1)
    r = torch.floor(u * c.to(torch.float64)).to(torch.int64)
    r = torch.minimum(r, (c - 1).clamp(min=0))
    pick = order[torch.minimum(offsets.unsqueeze(1) + r, last)]
    valid = (c > 0) & (pick >= 0)                        # broadcast to [num_bins, K]
    return [valid, torch.div(pick, m, rounding_mode="floor"), pick % m]


def uniform_histogram_miner(mat: Tensor, pos: Tensor, neg: Tensor, num_bins: int,
                            noise_pos: Tensor, noise_neg: Tensor) -> List[Tensor]:
    """Fixed-shape UniformHistogramMiner kernel.

    Every pair gets a key: its bin among the positive pairs, ``num_bins`` + its bin among
    the negative pairs, or ``2 * num_bins`` (neither). One sort by (key, pair index)
    lays out each bin's members contiguously, in index order; ``K`` members are then
    drawn uniformly with replacement from each non-empty bin. The sort key is unique
    (``key * N*M + index``), so the order does not depend on how the sort breaks ties
    (ONNX Runtime's CUDA TopK does not order ties by index for every length).

    Args:
        mat: Tensor[N, M]; pos, neg: Tensor[N, M] bool.
        noise_pos: Tensor[num_bins, pos_per_bin]; noise_neg: Tensor[num_bins, neg_per_bin]
            uniform [0, 1).

    Returns:
        ``[valid, a1, p]`` (each Tensor[num_bins, pos_per_bin]) then ``[valid, a2, n]``
        (each Tensor[num_bins, neg_per_bin]).
    """
    m = _ops.ones_int_like(mat[0]).sum()  # M from data: no Shape node when exported
    flat = mat.reshape(-1)
    pos_f = pos.reshape(-1)
    neg_f = neg.reshape(-1)
    key = torch.where(pos_f, pool_bins(flat, pos_f, num_bins),
                      torch.where(neg_f, pool_bins(flat, neg_f, num_bins) + num_bins,
                                  2 * num_bins))
    last = _ops.ones_int_like(key).sum() - 1           # N*M - 1, from data (no Shape)
    counts = torch.zeros(2 * num_bins + 1, dtype=torch.int64, device=mat.device)
    counts = counts.scatter_add(0, key, _ops.ones_int_like(key))[:2 * num_bins]
    flat_index = _ops.index_like(key, 0)
    order = torch.argsort(key * (last + 1) + flat_index, stable=True)
    offsets = torch.cumsum(counts, 0) - counts
    return _sample_bins(order, counts[:num_bins], offsets[:num_bins], noise_pos, last, m) + \
        _sample_bins(order, counts[num_bins:], offsets[num_bins:], noise_neg, last, m)


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
