"""PairMarginMiner: positive pairs beyond pos_margin, negative pairs within neg_margin."""
from typing import List, Optional, Tuple

from torch import Tensor

from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_number
from .base_miner import PairKernelMiner
from .stats import masked_mean


def pair_margin_miner(mat: Tensor, pos: Tensor, neg: Tensor, pos_margin: float,
                      neg_margin: float, is_inverted: bool) -> Tuple[Tensor, Tensor]:
    """Fixed-shape PairMarginMiner kernel.

    Args:
        mat: Tensor[N, M] distances (similarities if ``is_inverted``).
        pos, neg: Tensor[N, M] bool pair masks.

    Returns:
        (Tensor[N, M] bool selected positives, Tensor[N, M] bool selected negatives)
    """
    if is_inverted:
        return pos & (mat < pos_margin), neg & (mat > neg_margin)
    return pos & (mat > pos_margin), neg & (mat < neg_margin)


class PairMarginMiner(PairKernelMiner):
    """Positive pairs farther than ``pos_margin`` and negative pairs closer than
    ``neg_margin`` (for similarities: less / more similar).

    Args:
        pos_margin: threshold for positive pairs.
        neg_margin: threshold for negative pairs.
        **kwargs: :class:`BaseMiner` arguments.

    Kernel: :func:`pair_margin_miner`, two Tensor[N, M] bool masks.
    """

    pos_margin: float
    neg_margin: float
    pos_pair_dist: float
    neg_pair_dist: float

    def __init__(self, pos_margin: float = 0.2, neg_margin: float = 0.8, **kwargs):
        super().__init__(**kwargs)
        self.pos_margin = check_number(pos_margin, "pos_margin")
        self.neg_margin = check_number(neg_margin, "neg_margin")
        self.layout = [[0, -1, -2], [1, -1, -2]]
        self.reset_miner_stats()
        self.add_to_recordable_attributes(list_of_names=["pos_margin", "neg_margin"])
        self.add_to_recordable_attributes(list_of_names=["pos_pair_dist", "neg_pair_dist"],
                                          is_stat=True)

    def reset_miner_stats(self) -> None:
        self.pos_pair_dist = 0.0
        self.neg_pair_dist = 0.0

    def record_stats(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                     ref_labels: Optional[Tensor], out: List[Tensor]) -> None:
        """PML's: mean value of every positive and of every negative pair (0 if none)."""
        mat = self.distance(embeddings, ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels)
        self.pos_pair_dist = masked_mean(mat, pos, 0.0)
        self.neg_pair_dist = masked_mean(mat, neg, 0.0)

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor],
               anchor_ids: Optional[Tensor] = None) -> List[Tensor]:
        mat = self.distance(embeddings, ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels, anchor_ids)
        p, n = pair_margin_miner(mat, pos, neg, self.pos_margin, self.neg_margin,
                                 self.distance.is_inverted)
        return [p, n]

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin:g}, neg_margin={self.neg_margin:g}"
