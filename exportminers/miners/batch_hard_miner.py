"""BatchHardMiner: per anchor, the farthest positive and the closest negative."""
from typing import List, Optional, Tuple

from torch import Tensor

from ..utils import loss_and_miner_utils as lmu
from .base_miner import TripletKernelMiner
from .batch_easy_hard_miner import _check_range, batch_easy_hard_miner
from .stats import EASY_HARD_STATS, EasyHardStats


def batch_hard_miner(mat: Tensor, pos: Tensor, neg: Tensor, is_inverted: bool,
                     allowed_pos_range: Optional[Tuple[float, float]] = None,
                     allowed_neg_range: Optional[Tuple[float, float]] = None) -> List[Tensor]:
    """Fixed-shape BatchHardMiner kernel.

    Args:
        mat: Tensor[N, M]; pos, neg: Tensor[N, M] bool.
        allowed_pos_range, allowed_neg_range: only pairs with values in [low, high] are
            candidates (as BatchEasyHardMiner's).

    Returns:
        ``[keep Tensor[N] bool, pos_idx Tensor[N] int64, neg_idx Tensor[N] int64]``.
    """
    keep, pos_idx, _, neg_idx = batch_easy_hard_miner(mat, pos, neg, 0, 0, is_inverted,
                                                      allowed_pos_range, allowed_neg_range)
    return [keep, pos_idx, neg_idx]


class BatchHardMiner(EasyHardStats, TripletKernelMiner):
    """In Defense of the Triplet Loss (Hermans et al.): one triplet per anchor, with its
    hardest positive and hardest negative. Anchors lacking either are dropped.

    Args:
        allowed_pos_range, allowed_neg_range: only pairs whose value lies in
            ``[low, high]`` are candidates (PML passes them on to BatchEasyHardMiner).
        **kwargs: :class:`BaseMiner` arguments, including the older ``use_similarity``
            and ``squared_distances``.

    Kernel: :func:`batch_hard_miner`.
    """

    allowed_pos_range: Optional[Tuple[float, float]]
    allowed_neg_range: Optional[Tuple[float, float]]

    def __init__(self, allowed_pos_range=None, allowed_neg_range=None, **kwargs):
        super().__init__(**kwargs)
        self.allowed_pos_range = _check_range(allowed_pos_range, "allowed_pos_range")
        self.allowed_neg_range = _check_range(allowed_neg_range, "allowed_neg_range")
        self.layout = [[0, -1, 1, 2]]
        self.reset_miner_stats()
        self.add_to_recordable_attributes(list_of_names=EASY_HARD_STATS, is_stat=True)

    def record_stats(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                     ref_labels: Optional[Tensor], out: List[Tensor]) -> None:
        mat = self.distance(embeddings, ref_emb)
        self.set_easy_hard_stats(mat[out[0], out[1]], mat[out[0], out[2]],
                                 self.distance.is_inverted, True)

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor],
               anchor_ids: Optional[Tensor] = None) -> List[Tensor]:
        mat = self.distance(embeddings, ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels, anchor_ids)
        return batch_hard_miner(mat, pos, neg, self.distance.is_inverted,
                                self.allowed_pos_range, self.allowed_neg_range)
