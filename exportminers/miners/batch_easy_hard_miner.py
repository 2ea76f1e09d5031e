"""BatchEasyHardMiner: per anchor, one positive and one negative chosen by strategy."""
from typing import List, Optional, Tuple

from torch import Tensor

from .. import _ops
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_choice
from .base_miner import PairKernelMiner
from .stats import EASY_HARD_STATS, EasyHardStats

# strategy codes used by the kernel (TorchScript has no global constants)
STRATEGIES = {"hard": 0, "semihard": 1, "easy": 2, "all": 3}


def _pick(mat: Tensor, cand: Tensor, use_max: bool, val_range: Optional[Tuple[float, float]],
          semihard_threshold: Optional[Tensor]):
    """Masked per-row max/min with PML's semihard and range exclusions.

    Returns (extreme Tensor[N], index Tensor[N], valid Tensor[N] bool).
    """
    if semihard_threshold is not None:
        thr = semihard_threshold.unsqueeze(1)
        cand = cand & ~(mat >= thr if use_max else mat <= thr)
    if val_range is not None:
        cand = cand & ~((mat > val_range[1]) | (mat < val_range[0]))
    return _ops.masked_extreme(mat, cand, use_max)


def batch_easy_hard_miner(mat: Tensor, pos: Tensor, neg: Tensor, pos_strategy: int,
                          neg_strategy: int, is_inverted: bool,
                          allowed_pos_range: Optional[Tuple[float, float]],
                          allowed_neg_range: Optional[Tuple[float, float]]) -> List[Tensor]:
    """Fixed-shape BatchEasyHardMiner kernel.

    Args:
        mat: Tensor[N, M] distances (similarities if ``is_inverted``).
        pos, neg: Tensor[N, M] bool pair masks.
        pos_strategy, neg_strategy: 0 hard, 1 semihard, 2 easy, 3 all.
        allowed_pos_range, allowed_neg_range: inclusive (low, high) value ranges or None.

    Returns:
        ``[pos_sel, pos_idx, neg_sel, neg_idx]``: for a strategy other than "all",
        ``sel`` is Tensor[N] bool (anchor kept) and ``idx`` Tensor[N] int64 (chosen
        column); for "all", ``sel`` is the Tensor[N, M] pair mask and ``idx`` a dummy
        Tensor[N] of zeros. When neither strategy is "all", an anchor is kept only if it
        has both a positive and a negative, as in PML.
    """
    # "hard" positives are the farthest: max for distances, min for similarities
    pos_max = (pos_strategy <= 1) != is_inverted
    # "hard"/"semihard" negatives are the closest: min for distances
    neg_max = (neg_strategy > 1) != is_inverted
    pos_val = mat[:, 0] * 0.0
    neg_val = mat[:, 0] * 0.0
    pos_idx = _ops.zeros_int_like(mat[:, 0])
    neg_idx = _ops.zeros_int_like(mat[:, 0])
    pos_ok = pos.any(dim=1)
    neg_ok = neg.any(dim=1)
    if pos_strategy == 1 and neg_strategy != 3:
        neg_val, neg_idx, neg_ok = _pick(mat, neg, neg_max, allowed_neg_range, None)
        pos_val, pos_idx, pos_ok = _pick(mat, pos, pos_max, allowed_pos_range, neg_val)
    elif neg_strategy == 1 and pos_strategy != 3:
        pos_val, pos_idx, pos_ok = _pick(mat, pos, pos_max, allowed_pos_range, None)
        neg_val, neg_idx, neg_ok = _pick(mat, neg, neg_max, allowed_neg_range, pos_val)
    else:
        if pos_strategy != 3:
            pos_val, pos_idx, pos_ok = _pick(mat, pos, pos_max, allowed_pos_range, None)
        if neg_strategy != 3:
            neg_val, neg_idx, neg_ok = _pick(mat, neg, neg_max, allowed_neg_range, None)
    if pos_strategy != 3 and neg_strategy != 3:
        keep = pos_ok & neg_ok
        return [keep, pos_idx, keep, neg_idx]
    pos_sel = pos if pos_strategy == 3 else pos_ok
    neg_sel = neg if neg_strategy == 3 else neg_ok
    return [pos_sel, pos_idx, neg_sel, neg_idx]


def _check_range(value, name: str) -> Optional[Tuple[float, float]]:
    if value is None:
        return None
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be None or a (low, high) pair of numbers, got {value!r}") from None
    if low > high:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return (low, high)


class BatchEasyHardMiner(EasyHardStats, PairKernelMiner):
    """Per anchor, the positive and negative chosen by ``pos_strategy`` / ``neg_strategy``.

    Args:
        pos_strategy: ``"hard"`` (farthest positive), ``"semihard"`` (farthest positive
            still closer than the chosen negative), ``"easy"`` (closest) or ``"all"``.
        neg_strategy: ``"hard"`` (closest negative), ``"semihard"`` (closest negative
            farther than the chosen positive), ``"easy"`` (farthest) or ``"all"``.
        allowed_pos_range, allowed_neg_range: only pairs whose value lies in
            ``[low, high]`` are candidates.
        **kwargs: :class:`BaseMiner` arguments.

    Kernel: :func:`batch_easy_hard_miner` (per-anchor indices plus validity flags, or
    N x M masks for "all").
    """

    HARD = "hard"
    SEMIHARD = "semihard"
    EASY = "easy"
    ALL = "all"

    pos_code: int
    neg_code: int
    allowed_pos_range: Optional[Tuple[float, float]]
    allowed_neg_range: Optional[Tuple[float, float]]

    def __init__(self, pos_strategy: str = "easy", neg_strategy: str = "semihard",
                 allowed_pos_range=None, allowed_neg_range=None, **kwargs):
        super().__init__(**kwargs)
        check_choice(pos_strategy, "pos_strategy", STRATEGIES)
        check_choice(neg_strategy, "neg_strategy", STRATEGIES)
        if pos_strategy == neg_strategy == "semihard":
            raise ValueError('pos_strategy and neg_strategy cannot both be "semihard"')
        if {pos_strategy, neg_strategy} == {"semihard", "all"}:
            raise ValueError('"semihard" cannot be used in combination with "all"')
        self.pos_strategy = pos_strategy
        self.neg_strategy = neg_strategy
        self.pos_code = STRATEGIES[pos_strategy]
        self.neg_code = STRATEGIES[neg_strategy]
        self.allowed_pos_range = _check_range(allowed_pos_range, "allowed_pos_range")
        self.allowed_neg_range = _check_range(allowed_neg_range, "allowed_neg_range")
        pos_part = [0, -1, -2] if self.pos_code == 3 else [0, -1, 1]
        neg_part = [2, -1, -2] if self.neg_code == 3 else [2, -1, 3]
        self.layout = [pos_part, neg_part]
        self.reset_miner_stats()
        self.add_to_recordable_attributes(list_of_names=EASY_HARD_STATS, is_stat=True)

    def record_stats(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                     ref_labels: Optional[Tensor], out: List[Tensor]) -> None:
        mat = self.distance(embeddings, ref_emb)
        self.set_easy_hard_stats(mat[out[0], out[1]], mat[out[2], out[3]],
                                 self.distance.is_inverted,
                                 self.pos_code != 3 and self.neg_code != 3)

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor],
               anchor_ids: Optional[Tensor] = None) -> List[Tensor]:
        mat = self.distance(embeddings, ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels, anchor_ids)
        return batch_easy_hard_miner(mat, pos, neg, self.pos_code, self.neg_code,
                                     self.distance.is_inverted, self.allowed_pos_range,
                                     self.allowed_neg_range)

    def extra_repr(self) -> str:
        return (f"pos_strategy={self.pos_strategy!r}, neg_strategy={self.neg_strategy!r}, "
                f"allowed_pos_range={self.allowed_pos_range}, "
                f"allowed_neg_range={self.allowed_neg_range}")
