"""TripletMarginMiner: every triplet that violates the margin."""
from typing import List, Optional

import torch
from torch import Tensor

from .. import _ops
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_choice, check_number, check_positive_int
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


def capped_triplet_margin_miner(mat: Tensor, pos: Tensor, neg: Tensor, margin: float,
                                kind: int, is_inverted: bool, k: int,
                                noise: Optional[Tensor]) -> List[Tensor]:
    """TripletMarginMiner with at most ``k`` triplets per anchor (a bounded result).

    Among an anchor's selected triplets, keeps the ``k`` hardest (smallest margin
    ``d(a, n) - d(a, p)``; ties in any order) or, when ``noise`` is given, ``k`` chosen
    uniformly without replacement (those with the largest noise).

    Args:
        mat, pos, neg, margin, kind, is_inverted: as :func:`triplet_margin_miner`.
        k: the cap.
        noise: None (hardest first) or Tensor[N, M, M] uniform [0, 1).

    Returns:
        ``[valid Tensor[N, k] bool, positive Tensor[N, k], negative Tensor[N, k]]``.
    """
    n, m = mat.size(0), mat.size(1)
    exporting = _ops.is_exporting()
    per = n if exporting else max(1, max(n * m, 4194304) // max(1, m * m))
    vals: List[Tensor] = []
    idxs: List[Tensor] = []
    for s in range(0, n, per):
        e = min(n, s + per)
        block = mat[s:e]
        ap = block.unsqueeze(2)
        an = block.unsqueeze(1)
        cond = triplet_condition(ap, an, margin, kind, is_inverted) & \
            lmu.triplet_mask(pos[s:e], neg[s:e])
        if noise is None:
            score = (an - ap) if is_inverted else (ap - an)  # larger = harder
        else:
            score = noise[s:e].to(block.dtype)
        score = score.masked_fill(~cond, float("-inf")).reshape(e - s, m * m)
        pad = torch.full_like(score[:, :1], float("-inf")).expand(e - s, k)
        v, i = torch.topk(torch.cat([score, pad], dim=1), k, dim=1)
        vals.append(v)
        idxs.append(i)
    v = torch.cat(vals, dim=0)
    i = torch.cat(idxs, dim=0).clamp(max=m * m - 1)
    valid = v > float("-inf")
    return [valid, torch.div(i, m, rounding_mode="floor"), i % m]


class TripletMarginMiner(TripletKernelMiner):
    """Triplets whose margin ``d(a, n) - d(a, p)`` is at most ``margin``.

    Args:
        margin: the margin.
        type_of_triplets: ``"all"`` (margin violated), ``"hard"`` (and the negative is no
            farther than the positive), ``"semihard"`` (and the negative is farther), or
            ``"easy"`` (margin not violated).
        max_triplets_per_anchor: None (every selected triplet, PML's behaviour) or a cap
            K: the kernel then returns Tensor[N, K] slots with a validity mask instead of
            an N x M x M mask (see :func:`capped_triplet_margin_miner`).
        cap_order: ``"hardest"`` (keep the K hardest) or ``"random"`` (K uniformly at
            random, reproducible under ``torch.manual_seed`` / a seed).
        **kwargs: :class:`BaseMiner` arguments (``distance=`` ...).

    Kernel: :func:`triplet_margin_miner`, one Tensor[N, M, M] bool mask.

    Example:
        >>> miner = TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
        >>> a, p, n = miner(torch.randn(32, 8), torch.randint(0, 4, (32,)))
    """

    margin: float
    kind: int
    cap: int
    random_cap: bool

    def __init__(self, margin: float = 0.2, type_of_triplets: str = "all",
                 max_triplets_per_anchor: Optional[int] = None, cap_order: str = "hardest",
                 **kwargs):
        super().__init__(**kwargs)
        self.margin = check_number(margin, "margin")
        self.type_of_triplets = check_choice(type_of_triplets, "type_of_triplets", TRIPLET_TYPES)
        self.kind = TRIPLET_TYPES[type_of_triplets]
        self.cap_order = check_choice(cap_order, "cap_order", {"hardest", "random"})
        if max_triplets_per_anchor is None:
            self.cap = 0
            self.layout = [[0, -1, -2, -3]]
        else:
            self.cap = check_positive_int(max_triplets_per_anchor, "max_triplets_per_anchor")
            self.layout = [[0, -1, 1, 2]]
        self.random_cap = self.cap > 0 and cap_order == "random"

    def noise_shape(self, n: int, m: int) -> List[int]:
        return [n, m, m] if self.random_cap else []

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor]) -> List[Tensor]:
        mat = self.distance(embeddings, ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels)
        if self.cap > 0:
            return capped_triplet_margin_miner(mat, pos, neg, self.margin, self.kind,
                                               self.distance.is_inverted, self.cap,
                                               noise if self.random_cap else None)
        return [triplet_margin_miner(mat, pos, neg, self.margin, self.kind,
                                     self.distance.is_inverted)]

    def extra_repr(self) -> str:
        cap = "" if self.cap == 0 else f", max_triplets_per_anchor={self.cap}, cap_order={self.cap_order!r}"
        return f"margin={self.margin:g}, type_of_triplets={self.type_of_triplets!r}{cap}"
