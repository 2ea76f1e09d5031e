"""DistanceWeightedMiner: negatives sampled with probability ~ 1 / q(distance)."""
from typing import List, Optional

import torch
from torch import Tensor

from .. import _ops
from ..utils.checks import check_number
from .angular_miner import require_normalized_l2
from .base_miner import TripletKernelMiner


def distance_weights(mat: Tensor, same: Tensor, dim: Tensor, cutoff: float,
                     nonzero_loss_cutoff: float) -> Tensor:
    """Row-normalised negative sampling weights of Sampling Matters (Wu et al., 2017).

    Computed with the same operations and dtype as PML (so the same pairs get exactly
    zero weight); rows without any positive weight are NaN, as in PML.

    Args:
        mat: Tensor[N, M] L2 distances on the unit sphere.
        same: Tensor[N, M] bool, same label (including the anchor itself).
        dim: embedding dimension, a 0-dim float64 tensor (so exports keep it dynamic).

    Returns:
        Tensor[N, M].
    """
    d = dim
    mat = torch.clamp(mat, min=cutoff)
    log_weights = (2.0 - d) * torch.log(mat) - ((d - 3) / 2) * torch.log(1.0 - 0.25 * (mat ** 2.0))
    bad = torch.isinf(log_weights) | torch.isnan(log_weights)
    keep = (~same).to(mat.dtype)
    log_weights = log_weights * keep
    top = log_weights.masked_fill(bad, float("-inf")).max()
    weights = torch.exp(log_weights - top)
    weights = weights * keep * (mat < nonzero_loss_cutoff).to(mat.dtype)
    weights = weights.masked_fill(bad, 0.0)
    return weights / torch.sum(weights, dim=1, keepdim=True)


def sample_from_rows(weights: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling of one column per slot.

    Args:
        weights: Tensor[N, M] non-negative (rows may be all zero).
        u: Tensor[N, K] uniform [0, 1) float64.

    Returns:
        Tensor[N, K] int64 column indices with positive weight (0 for all-zero rows).
    """
    w = weights.to(torch.float64)
    cdf = torch.cumsum(w, dim=1)
    target = u * cdf[:, -1:]
    idx = _ops.searchsorted_rows(cdf, target, True)
    cols = _ops.index_like(weights.transpose(0, 1), 0).unsqueeze(0)
    last = (cols * (w > 0).to(torch.int64)).max(dim=1, keepdim=True)[0]
    return torch.minimum(idx, last)


def nth_true_column(mask: Tensor, r: Tensor) -> Tensor:
    """Column of the ``r``-th (0-based) True entry of each row, without a search or sort.

    Each True entry's rank in its row is its running count - 1; scattering column indices
    to their ranks inverts that, and ``r`` is looked up there. False entries are written
    to the last slot, which no rank below the row's count ever reads (the count is then
    under M, so ranks stop at M - 2).

    Args:
        mask: Tensor[N, M] bool; r: Tensor[N, K] int64, each below its row's count of
            True entries (other values give an arbitrary column).

    Returns:
        Tensor[N, K] int64.
    """
    cum = torch.cumsum(mask.to(torch.int64), dim=1)
    last_col = _ops.ones_int_like(mask[0]).sum() - 1     # M - 1 from data: no Shape node
    cols = _ops.index_like(mask.transpose(0, 1), 0).unsqueeze(0) + _ops.zeros_int_like(cum)
    rank = torch.where(mask, cum - 1, last_col)
    inverse = _ops.zeros_int_like(cum).scatter(1, rank, cols)
    return inverse.gather(1, r)


def distance_weighted_miner(mat: Tensor, labels: Tensor, ref_labels: Tensor, is_self: bool,
                            dim: Tensor, cutoff: float, nonzero_loss_cutoff: float,
                            noise: Tensor) -> List[Tensor]:
    """Fixed-shape DistanceWeightedMiner kernel.

    Each anchor whose class has another reference (self-mining: two members) and which
    has a negative with positive weight gets as many triplets as its class has
    references. A triplet's positive is uniform among the anchor's other same-label
    references; its negative is drawn from :func:`distance_weights`.

    Args:
        mat: Tensor[N, M]; labels: Tensor[N]; ref_labels: Tensor[M].
        is_self: the references are the anchors themselves.
        noise: Tensor[2, N, M] uniform [0, 1) (positive draw, negative draw per slot).

    Returns:
        ``[valid Tensor[N, M] bool, positive Tensor[N, M], negative Tensor[N, M]]``:
        slot (i, s) holds anchor i's s-th triplet.
    """
    same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
    weights = distance_weights(mat, same, dim, cutoff, nonzero_loss_cutoff)
    weights = torch.nan_to_num(weights, nan=0.0)
    row_ok = (weights > 0).any(dim=1)
    class_size = same.sum(dim=1)
    candidates = same
    if is_self:
        candidates = same & ~_ops.diagonal_mask(labels, ref_labels)
    n_cand = candidates.sum(dim=1)
    has_neg = (~same).any(dim=1)
    row_ok = row_ok & (n_cand >= 1) & has_neg
    slots = _ops.index_like(mat.transpose(0, 1), 0).unsqueeze(0)
    valid = (slots < class_size.unsqueeze(1)) & row_ok.unsqueeze(1)
    # positive: the r-th candidate, r uniform in [0, n_cand)
    r = torch.floor(noise[0] * n_cand.unsqueeze(1).to(torch.float64)).to(torch.int64)
    r = torch.minimum(r, (n_cand - 1).clamp(min=0).unsqueeze(1))
    positive = nth_true_column(candidates, r)
    negative = sample_from_rows(weights, noise[1])
    return [valid, positive, negative]


class DistanceWeightedMiner(TripletKernelMiner):
    """Sampling Matters in Deep Embedding Learning (Wu et al., 2017).

    Args:
        cutoff: distances below this are raised to it before weighting.
        nonzero_loss_cutoff: negatives farther than this get zero weight.
        **kwargs: :class:`BaseMiner` arguments; the distance must be L2 on normalised
            embeddings.

    Kernel: :func:`distance_weighted_miner`; randomness from uniform noise of shape
    ``[2, N, M]`` (``torch.rand`` under ``torch.manual_seed`` in eager mode).
    """

    cutoff: float
    nonzero_loss_cutoff: float

    def __init__(self, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4, **kwargs):
        super().__init__(**kwargs)
        require_normalized_l2("DistanceWeightedMiner", self.distance)
        self.cutoff = check_number(cutoff, "cutoff")
        self.nonzero_loss_cutoff = check_number(nonzero_loss_cutoff, "nonzero_loss_cutoff")
        self.add_to_recordable_attributes(list_of_names=["cutoff", "nonzero_loss_cutoff"])
        self.layout = [[0, -1, 1, 2]]

    def noise_shape(self, n: int, m: int) -> List[int]:
        return [2, n, m]

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor]) -> List[Tensor]:
        if noise is None:
            raise ValueError("DistanceWeightedMiner.kernel needs noise of shape [2, N, M]")
        mat = self.distance(embeddings, ref_emb)
        refl = labels if ref_labels is None else ref_labels
        return distance_weighted_miner(mat, labels, refl, ref_labels is None,
                                       _ops.width_of(embeddings), self.cutoff,
                                       self.nonzero_loss_cutoff, noise)

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff:g}, nonzero_loss_cutoff={self.nonzero_loss_cutoff:g}"
