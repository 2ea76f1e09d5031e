"""A scriptable triplet margin loss with PML's defaults and values."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distances import BaseDistance, LpDistance
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_number, check_positive_int


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
        triplets_per_anchor: ``"all"`` (PML's default) or how many random triplets per
            anchor to use when no ``indices_tuple`` is given (eager only, as PML's
            ``convert_to_triplets``).
        distance: default L2 on normalised embeddings.

    Call: ``loss(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``;
    ``indices_tuple`` is ``(a, p, n)`` or ``(a1, p, a2, n)``; None means every valid
    triplet. With ``ref_emb`` / ``ref_labels``, positives and negatives index them.
    """

    margin: float
    swap: bool
    smooth_loss: bool
    t_per_anchor: int

    def __init__(self, margin: float = 0.05, swap: bool = False, smooth_loss: bool = False,
                 triplets_per_anchor="all", distance: Optional[BaseDistance] = None):
        super().__init__()
        self.margin = check_number(margin, "margin")
        self.swap = bool(swap)
        self.smooth_loss = bool(smooth_loss)
        if triplets_per_anchor == "all":
            self.t_per_anchor = -1
        else:
            self.t_per_anchor = check_positive_int(triplets_per_anchor, "triplets_per_anchor")
        self.distance = LpDistance() if distance is None else distance

    @torch.jit.unused
    def random_triplets(self, labels: Tensor, ref_labels: Optional[Tensor]) -> List[Tensor]:
        a, p, n = lmu.get_random_triplet_indices(labels, ref_labels,
                                                 t_per_anchor=self.t_per_anchor)
        return [a, p, n]

    def forward(self, embeddings: Tensor, labels: Tensor,
                indices_tuple: Optional[List[Tensor]] = None, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tensor:
        if (ref_emb is None) != (ref_labels is None):
            raise ValueError("ref_emb and ref_labels go together; pass both or neither")
        if ref_labels is labels and ref_emb is embeddings:   # PML: the batch itself
            ref_emb, ref_labels = None, None
        mat = self.distance(embeddings, ref_emb)
        if indices_tuple is None and self.t_per_anchor > 0:
            t = self.random_triplets(labels, ref_labels)
            return triplet_margin_loss(mat, t[0], t[1], t[2], self.margin,
                                       self.distance.is_inverted, self.swap, self.smooth_loss)
        if indices_tuple is None and not self.swap:
            pos, neg = lmu.pair_masks(labels, ref_labels)
            return dense_triplet_margin_loss(mat, pos, neg, self.margin,
                                             self.distance.is_inverted, self.smooth_loss)
        if indices_tuple is None:
            pos, neg = lmu.pair_masks(labels, ref_labels)
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
        tpa = "all" if self.t_per_anchor < 0 else self.t_per_anchor
        return (f"margin={self.margin:g}, swap={self.swap}, smooth_loss={self.smooth_loss}, "
                f"triplets_per_anchor={tpa}")
