"""TripletMarginMiner: every triplet that violates the margin."""
from typing import List, Optional

import torch
from torch import Tensor

from .. import _ops
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_choice, check_number
from .base_miner import TripletKernelMiner

TRIPLET_TYPES = {"all": 0, "hard": 1, "semihard": 2, "easy": 3}



def triplet_condition(ap: Tensor, an: Tensor, margin: float, kind: int, is_inverted: bool) -> Tensor:
    """PML's triplet test on broadcast anchor-positive / anchor-negative values.

    ``kind``: 0 all, 1 hard, 2 semihard, 3 easy (see :data:`TRIPLET_TYPES`).
    """
    tm = ap - an if is_inverted else an - ap
    if kind == 3:
        return tm > margin
    cond = tm <= margin
    if kind == 1:
        cond = cond & (tm <= 0)
    elif kind == 2:
        cond = cond & (tm > 0)
    return cond


def triplet_margin_miner(mat: Tensor, pos: Tensor, neg: Tensor, margin: float, kind: int,
                         is_inverted: bool) -> Tensor:
    """Fixed-shape TripletMarginMiner kernel.

    Args:
        mat: Tensor[N, M] distances (or similarities if ``is_inverted``).
        pos: Tensor[N, M] bool, positive pairs.
        neg: Tensor[N, M] bool, negative pairs.
        margin: the margin.
        kind: 0 all, 1 hard, 2 semihard, 3 easy.
        is_inverted: ``mat`` holds similarities.

    Returns:
        Tensor[N, M(positive), M(negative)] bool: the selected triplets.

    In eager/TorchScript the margins are computed in row blocks so that only the boolean
    result is N x M x M; an exported graph computes one block (its anchor block).
    """
    n, m = mat.size(0), mat.size(1)
    if _ops.is_exporting():
        cond = triplet_condition(mat.unsqueeze(2), mat.unsqueeze(1), margin, kind, is_inverted)
        return cond & lmu.triplet_mask(pos, neg)
    out = torch.empty((n, m, m), dtype=torch.bool, device=mat.device)
    # rows per block: a block's float margins stay within max(N*M, 2^22) elements
    per = max(1, max(n * m, 4194304) // max(1, m * m))
    for s in range(0, n, per):
        e = min(n, s + per)
        block = mat[s:e]
        cond = triplet_condition(block.unsqueeze(2), block.unsqueeze(1), margin, kind, is_inverted)
        out[s:e] = cond & lmu.triplet_mask(pos[s:e], neg[s:e])
    return out


class TripletMarginMiner(TripletKernelMiner):
    """Triplets whose margin ``d(a, n) - d(a, p)`` is at most ``margin``.

    Args:
        margin: the margin.
        type_of_triplets: ``"all"`` (margin violated), ``"hard"`` (and the negative is no
            farther than the positive), ``"semihard"`` (and the negative is farther), or
            ``"easy"`` (margin not violated).
        **kwargs: :class:`BaseMiner` arguments (``distance=`` ...).

    Kernel: :func:`triplet_margin_miner`, one Tensor[N, M, M] bool mask.

    Example:
        >>> miner = TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
        >>> a, p, n = miner(torch.randn(32, 8), torch.randint(0, 4, (32,)))
    """

    margin: float
    kind: int

    def __init__(self, margin: float = 0.2, type_of_triplets: str = "all", **kwargs):
        super().__init__(**kwargs)
        self.margin = check_number(margin, "margin")
        self.type_of_triplets = check_choice(type_of_triplets, "type_of_triplets", TRIPLET_TYPES)
        self.kind = TRIPLET_TYPES[type_of_triplets]
        self.layout = [[0, -1, -2, -3]]

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor]) -> List[Tensor]:
        mat = self.distance(embeddings, ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels)
        return [triplet_margin_miner(mat, pos, neg, self.margin, self.kind,
                                     self.distance.is_inverted)]

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}, type_of_triplets={self.type_of_triplets!r}"
