"""HDCMiner (Hard-Aware Deeply Cascaded embedding): the hardest fraction of pairs."""
from typing import List, Optional

import torch
from torch import Tensor

from .. import _ops
from ..decode import decode
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_number
from .base_miner import PairKernelMiner


def hdc_select(values: Tensor, valid: Tensor, filter_percentage: float, largest: bool) -> Tensor:
    """Keep the ``ceil(filter_percentage * #valid)`` most extreme valid entries.

    Args:
        values: Tensor[L] pair values; valid: Tensor[L] bool.
        largest: keep the largest values (else the smallest).

    Returns:
        Tensor[L] bool. Ties at the cut are broken by position.
    """
    count = valid.sum().to(torch.float64)
    k = torch.ceil(count * filter_percentage).to(torch.int64)
    return _ops.rank_select(values, valid, k, largest)


def hdc_miner(mat: Tensor, pos: Tensor, neg: Tensor, filter_percentage: float,
              is_inverted: bool) -> List[Tensor]:
    """Fixed-shape HDCMiner kernel over all pairs.

    One stable sort of all N*M pair values serves both pools: within the sorted order,
    a pool's rank from the small end is its running count, and from the large end its
    total minus that count.

    Args:
        mat: Tensor[N, M]; pos, neg: Tensor[N, M] bool.

    Returns:
        ``[pos_sel Tensor[N*M] bool, neg_sel Tensor[N*M] bool, row Tensor[N*M],
        col Tensor[N*M]]`` over the pairs in sorted order: the hardest
        ``filter_percentage`` of positive pairs (farthest) and of negative pairs
        (closest), with each pair's row and column. (Flat outputs keep the exported graph
        free of reshapes to a symbolic shape.)
    """
    flat = mat.reshape(-1)
    order = torch.argsort(flat, stable=True)
    m = _ops.ones_int_like(mat[0]).sum()
    pos_s = pos.reshape(-1)[order]
    neg_s = neg.reshape(-1)[order]
    # positives: farthest first (largest distance / smallest similarity)
    pos_sel = _take_from_end(pos_s, filter_percentage, largest=not is_inverted)
    neg_sel = _take_from_end(neg_s, filter_percentage, largest=is_inverted)
    return [pos_sel, neg_sel, torch.div(order, m, rounding_mode="floor"), order % m]


def _take_from_end(pool_sorted: Tensor, filter_percentage: float, largest: bool) -> Tensor:
    """In ascending order, mark the ``ceil(f * count)`` pool members from one end."""
    running = torch.cumsum(pool_sorted.to(torch.int64), 0)
    total = running[-1]
    k = torch.ceil(total.to(torch.float64) * filter_percentage).to(torch.int64)
    if largest:
        return pool_sorted & (running > total - k)
    return pool_sorted & (running <= k)


class HDCMiner(PairKernelMiner):
    """Returns the hardest ``filter_percentage`` of the positive and of the negative pairs.

    The pool of pairs is every pair of the batch, or the pairs given with
    :meth:`set_idx_externally` (e.g. another miner's output). As in PML, an external
    pool is replaced by its filtered subset after each call, until :meth:`reset_idx`.

    Args:
        filter_percentage: fraction of each pool to keep, in [0, 1].
        **kwargs: :class:`BaseMiner` arguments (older ``use_similarity``,
            ``squared_distances`` included).
    """

    filter_percentage: float
    was_set_externally: bool
    a1: Optional[Tensor]
    p: Optional[Tensor]
    a2: Optional[Tensor]
    n: Optional[Tensor]

    def __init__(self, filter_percentage: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.filter_percentage = check_number(filter_percentage, "filter_percentage", 0.0, 1.0)
        self.layout = [[0, 2, 3], [1, 2, 3]]
        self.a1 = None
        self.p = None
        self.a2 = None
        self.n = None
        self.was_set_externally = False

    @torch.jit.export
    def set_idx_externally(self, external_indices_tuple: List[Tensor], labels: Tensor) -> None:
        """Use these pairs (or triplets, split into pairs) as the pool."""
        t = list(external_indices_tuple)
        if len(t) == 3:
            t = [t[0], t[1], t[0], t[2]]
        if len(t) != 4:
            raise ValueError("external_indices_tuple must hold 3 (a, p, n) or 4 (a1, p, a2, n) tensors")
        if t[0].numel() != t[1].numel() or t[2].numel() != t[3].numel():
            raise ValueError("external_indices_tuple holds index tensors of different lengths")
        self.a1 = t[0].to(torch.int64)
        self.p = t[1].to(torch.int64)
        self.a2 = t[2].to(torch.int64)
        self.n = t[3].to(torch.int64)
        self.was_set_externally = True

    @torch.jit.export
    def reset_idx(self) -> None:
        """Go back to mining from every pair of the batch."""
        self.a1 = None
        self.p = None
        self.a2 = None
        self.n = None
        self.was_set_externally = False

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor]) -> List[Tensor]:
        mat = self.distance(embeddings, ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels)
        return hdc_miner(mat, pos, neg, self.filter_percentage, self.distance.is_inverted)

    def mine(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
             ref_labels: Optional[Tensor]) -> List[Tensor]:
        a1, p, a2, n = self.a1, self.p, self.a2, self.n
        if not self.was_set_externally or a1 is None or p is None or a2 is None or n is None:
            nq = embeddings.size(0)
            m = nq if ref_emb is None else ref_emb.size(0)
            if nq == 0 or m == 0:
                return self.empty_outputs(embeddings)
            return decode(self.kernel(embeddings, labels, ref_emb, ref_labels, None), self.layout)
        m = embeddings.size(0) if ref_emb is None else ref_emb.size(0)
        for idx, bound, what in ((a1, embeddings.size(0), "anchor"), (a2, embeddings.size(0), "anchor"),
                                 (p, m, "positive"), (n, m, "negative")):
            if idx.numel() > 0 and (int(idx.max()) >= bound or int(idx.min()) < 0):
                raise ValueError(
                    f"the pairs given to set_idx_externally hold {what} indices outside [0, {bound})")
        a1, p, a2, n = a1.to(embeddings.device), p.to(embeddings.device), a2.to(embeddings.device), n.to(embeddings.device)
        mat = self.distance(embeddings, ref_emb)
        pos_sel = hdc_select(mat[a1, p], a1 >= 0,
                             self.filter_percentage, not self.distance.is_inverted)
        neg_sel = hdc_select(mat[a2, n], a2 >= 0,
                             self.filter_percentage, self.distance.is_inverted)
        out = decode([pos_sel, neg_sel, a1, p, a2, n], [[0, 2, 3], [1, 4, 5]])
        self.a1, self.p, self.a2, self.n = out[0], out[1], out[2], out[3]
        return out

    def extra_repr(self) -> str:
        return f"filter_percentage={self.filter_percentage:g}"
