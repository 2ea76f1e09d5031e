"""MultiSimilarityMiner: pairs harder than the hardest pair of the other kind, +- epsilon."""
from typing import List, Optional, Tuple

from torch import Tensor

from .. import _ops
from ..distances import BaseDistance, CosineSimilarity
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_number
from .base_miner import PairKernelMiner


def multi_similarity_miner(mat: Tensor, pos: Tensor, neg: Tensor, epsilon: float,
                           is_inverted: bool) -> Tuple[Tensor, Tensor]:
    """Fixed-shape MultiSimilarityMiner kernel.

    For similarities: a positive pair is kept if ``sim - epsilon`` is below the anchor's
    most similar negative; a negative pair if ``sim + epsilon`` is above the anchor's
    least similar positive (mirrored for distances).

    Args:
        mat: Tensor[N, M]; pos, neg: Tensor[N, M] bool.

    Returns:
        (Tensor[N, M] bool positives, Tensor[N, M] bool negatives)
    """
    # NaN values (e.g. a zero row normalised in float16): PML sorts each row, NaN last, and
    # reads the hardest pair at the row's end or start: the smallest value skips NaN, the
    # largest is NaN if the row has one (no pair then compares true against it)
    not_nan = mat == mat
    if is_inverted:
        hardest_neg = _ops.masked_extreme_value(mat, neg, True)    # -inf if none
        hardest_pos = _ops.masked_extreme_value(mat, pos & not_nan, False)   # +inf if none
        keep_pos = pos & (mat - epsilon < hardest_neg.unsqueeze(1))
        keep_neg = neg & (mat + epsilon > hardest_pos.unsqueeze(1))
    else:
        hardest_neg = _ops.masked_extreme_value(mat, neg & not_nan, False)
        hardest_pos = _ops.masked_extreme_value(mat, pos, True)
        keep_pos = pos & (mat + epsilon > hardest_neg.unsqueeze(1))
        keep_neg = neg & (mat - epsilon < hardest_pos.unsqueeze(1))
    return keep_pos, keep_neg


class MultiSimilarityMiner(PairKernelMiner):
    """Multi-Similarity mining (Wang et al., 2019). Default distance: cosine similarity.

    Args:
        epsilon: the margin added to the hardest pair of the other kind.
        **kwargs: :class:`BaseMiner` arguments.

    Kernel: :func:`multi_similarity_miner`, two Tensor[N, M] bool masks.
    """

    epsilon: float

    def __init__(self, epsilon: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = check_number(epsilon, "epsilon")
        self.add_to_recordable_attributes(name="epsilon")
        self.layout = [[0, -1, -2], [1, -1, -2]]

    def get_default_distance(self) -> BaseDistance:
        return CosineSimilarity()

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor],
               anchor_ids: Optional[Tensor] = None) -> List[Tensor]:
        mat = self.distance(embeddings, ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels, anchor_ids)
        p, n = multi_similarity_miner(mat, pos, neg, self.epsilon, self.distance.is_inverted)
        return [p, n]

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon:g}"
