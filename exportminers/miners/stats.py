"""PML's per-call miner statistics (``collect_stats=True``), computed without indexing
by masks: means over all pairs or triplets are weighted sums over the N x M matrix.

Only eager and TorchScript calls record them (they are Python floats on the module);
exported graphs never contain them.
"""
from typing import List, Tuple

import torch
from torch import Tensor


def masked_mean(values: Tensor, mask: Tensor, empty: float) -> float:
    """Mean of ``values`` where ``mask`` holds (float64 sums); ``empty`` if none."""
    count = mask.sum()
    if int(count) == 0:
        return empty
    total = torch.where(mask, values.to(torch.float64), torch.zeros_like(values, dtype=torch.float64))
    return float(total.sum() / count.to(torch.float64))


def triplet_means(mat: Tensor, pos: Tensor, neg: Tensor) -> Tuple[float, float]:
    """Means of d(a, p) and of d(a, n) over every triplet (a, p, n) of the masks
    (NaN without triplets, as ``torch.mean`` of nothing). A pair (a, p) occurs in as
    many triplets as ``a`` has negatives, and (a, n) in as many as ``a`` has positives.
    """
    m64 = mat.to(torch.float64)
    zero = torch.zeros_like(m64)
    n_pos = pos.to(torch.float64).sum(1, keepdim=True)
    n_neg = neg.to(torch.float64).sum(1, keepdim=True)
    total = (n_pos * n_neg).sum()
    if float(total) == 0.0:
        return float("nan"), float("nan")
    # only anchors with triplets (an inf value times a zero count would give NaN)
    ap = (torch.where(pos & (n_neg > 0), m64, zero) * n_neg).sum() / total
    an = (torch.where(neg & (n_pos > 0), m64, zero) * n_pos).sum() / total
    return float(ap), float(an)


EASY_HARD_STATS = ["easiest_triplet", "hardest_triplet", "easiest_pos_pair",
                   "hardest_pos_pair", "easiest_neg_pair", "hardest_neg_pair"]


def extremes(values: Tensor, smallest_first: bool) -> Tuple[float, float]:
    """``(min, max)`` of a non-empty tensor, or ``(max, min)`` if not ``smallest_first``."""
    lo = float(values.min())
    hi = float(values.max())
    return (lo, hi) if smallest_first else (hi, lo)


def easy_hard_stats(pos_dists: Tensor, neg_dists: Tensor, inverted: bool,
                    with_triplets: bool) -> List[float]:
    """BatchEasyHardMiner's statistics of the chosen pairs (0 where PML sets none):
    ``[easiest_triplet, hardest_triplet, easiest_pos_pair, hardest_pos_pair,
    easiest_neg_pair, hardest_neg_pair]``. Easy means a small distance (a large
    similarity) for positives and triplets ``d(a, p) - d(a, n)``, a large distance for
    negatives."""
    out = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    small_easy = not inverted
    if with_triplets and pos_dists.numel() > 0 and neg_dists.numel() > 0:
        e, h = extremes(pos_dists - neg_dists, small_easy)
        out[0] = e
        out[1] = h
    if pos_dists.numel() > 0:
        e, h = extremes(pos_dists, small_easy)
        out[2] = e
        out[3] = h
    if neg_dists.numel() > 0:
        e, h = extremes(neg_dists, not small_easy)
        out[4] = e
        out[5] = h
    return out


class EasyHardStats:
    """Mixin of BatchEasyHardMiner and BatchHardMiner: their statistics (PML's names)."""

    easiest_triplet: float
    hardest_triplet: float
    easiest_pos_pair: float
    hardest_pos_pair: float
    easiest_neg_pair: float
    hardest_neg_pair: float

    def reset_miner_stats(self) -> None:
        self.easiest_triplet = 0.0
        self.hardest_triplet = 0.0
        self.easiest_pos_pair = 0.0
        self.hardest_pos_pair = 0.0
        self.easiest_neg_pair = 0.0
        self.hardest_neg_pair = 0.0

    def set_easy_hard_stats(self, pos_dists: Tensor, neg_dists: Tensor, inverted: bool,
                            with_triplets: bool) -> None:
        """Set them from the chosen pairs' values (:func:`easy_hard_stats`)."""
        s = easy_hard_stats(pos_dists, neg_dists, inverted, with_triplets)
        self.easiest_triplet = s[0]
        self.hardest_triplet = s[1]
        self.easiest_pos_pair = s[2]
        self.hardest_pos_pair = s[3]
        self.easiest_neg_pair = s[4]
        self.hardest_neg_pair = s[5]
