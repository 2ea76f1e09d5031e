"""A scriptable triplet margin loss with PML's defaults and values."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distances import BaseDistance, LpDistance
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_number


def triplet_margin_loss(mat: Tensor, a: Tensor, p: Tensor, n: Tensor, margin: float,
                        is_inverted: bool, swap: bool, smooth_loss: bool) -> Tensor:
    """Mean of the non-zero per-triplet losses ``relu(d(a,p) - d(a,n) + margin)``.

    Args:
        mat: Tensor[N, M]; a, p, n: Tensor[T] int64 triplets.

    Returns:
        0-dim tensor (0 when no triplet has a positive loss), as PML's
        TripletMarginLoss with its default AvgNonZeroReducer.
    """
    ap = mat[a, p]
    an = mat[a, n]
    if swap:
        pn = mat[p, n]
        an = torch.maximum(an, pn) if is_inverted else torch.minimum(an, pn)
    viol = (an - ap if is_inverted else ap - an) + margin
    losses = F.softplus(viol) if smooth_loss else F.relu(viol)
    count = (losses > 0).sum()
    return torch.where(count > 0, losses.sum() / count.clamp(min=1).to(losses.dtype),
                       losses.sum() * 0.0)


def dense_triplet_margin_loss(mat: Tensor, pos: Tensor, neg: Tensor, margin: float,
                              is_inverted: bool, smooth_loss: bool) -> Tensor:
    """:func:`triplet_margin_loss` over every valid triplet, fixed-shape (no index lists).

    Args:
        mat: Tensor[N, M]; pos, neg: Tensor[N, M] bool.
    """
    ap = mat.unsqueeze(2)
    an = mat.unsqueeze(1)
    viol = (an - ap if is_inverted else ap - an) + margin
    losses = F.softplus(viol) if smooth_loss else F.relu(viol)
    losses = losses * lmu.triplet_mask(pos, neg).to(losses.dtype)
    count = (losses > 0).sum()
    return torch.where(count > 0, losses.sum() / count.clamp(min=1).to(losses.dtype),
                       losses.sum() * 0.0)


class TripletMarginLoss(torch.nn.Module):
    """Triplet margin loss, scriptable, equal to PML's ``TripletMarginLoss`` with the
    default reducer.

    Args:
        margin: the margin (PML default 0.05).
        swap: use the positive-negative distance when it is harder.
        smooth_loss: softplus instead of relu.
        distance: default L2 on normalised embeddings.

    Call: ``loss(embeddings, labels, indices_tuple=None)``; ``indices_tuple`` is
    ``(a, p, n)`` or ``(a1, p, a2, n)``; None means every valid triplet.
    """

    margin: float
    swap: bool
    smooth_loss: bool

    def __init__(self, margin: float = 0.05, swap: bool = False, smooth_loss: bool = False,
                 distance: Optional[BaseDistance] = None):
        super().__init__()
        self.margin = check_number(margin, "margin")
        self.swap = bool(swap)
        self.smooth_loss = bool(smooth_loss)
        self.distance = LpDistance() if distance is None else distance

    def forward(self, embeddings: Tensor, labels: Tensor,
                indices_tuple: Optional[List[Tensor]] = None) -> Tensor:
        mat = self.distance(embeddings, None)
        if indices_tuple is None and not self.swap:
            pos, neg = lmu.pair_masks(labels, None)
            return dense_triplet_margin_loss(mat, pos, neg, self.margin,
                                             self.distance.is_inverted, self.smooth_loss)
        if indices_tuple is None:
            pos, neg = lmu.pair_masks(labels, None)
            t = torch.nonzero(lmu.triplet_mask(pos, neg))
            a, p, n = t[:, 0], t[:, 1], t[:, 2]
        elif len(indices_tuple) == 3:
            a, p, n = indices_tuple[0], indices_tuple[1], indices_tuple[2]
        elif len(indices_tuple) == 4:
            same = torch.nonzero(indices_tuple[0].unsqueeze(1) == indices_tuple[2].unsqueeze(0))
            a = indices_tuple[0][same[:, 0]]
            p = indices_tuple[1][same[:, 0]]
            n = indices_tuple[3][same[:, 1]]
        else:
            raise ValueError("indices_tuple must hold 3 (a, p, n) or 4 (a1, p, a2, n) tensors")
        return triplet_margin_loss(mat, a, p, n, self.margin, self.distance.is_inverted,
                                   self.swap, self.smooth_loss)

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}, swap={self.swap}, smooth_loss={self.smooth_loss}"
