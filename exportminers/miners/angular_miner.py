"""AngularMiner: triplets whose angle at the negative exceeds a threshold."""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _ops
from ..distances import BaseDistance, LpDistance
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_number
from .base_miner import DenseTripletKernelMiner


ANGLE_STATS = ["average_angle", "average_angle_above_threshold",
               "average_angle_below_threshold", "min_angle", "max_angle", "std_of_angle"]


def require_normalized_l2(miner_name: str, distance: BaseDistance) -> None:
    """AngularMiner and DistanceWeightedMiner are defined for L2 on the unit sphere."""
    if not (isinstance(distance, LpDistance) and distance.p == 2 and distance.power == 1
            and distance.normalize_embeddings):
        raise ValueError(
            f"{miner_name} requires distance=LpDistance(p=2, power=1, normalize_embeddings=True), "
            f"got {distance!r}")


def angular_terms(anchors: Tensor, refs: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
    """Gram-matrix terms of the angle test (float64).

    Returns:
        ``([g, c_sq, ap, a_sum], [h, ne_sq, r_sum])``: per-anchor tensors (first axis N:
        ``a.r`` [N, M], ``|c|^2`` [N, M], ``|a - p + eps|`` [N, M] in the input dtype,
        ``sum(a)`` [N]) and shared ones (``r.r`` [M, M], ``|r + eps|^2`` [M], ``sum(r)`` [M]).
    """
    a = anchors.to(torch.float64)
    r = refs.to(torch.float64)
    eps = _ops.f64(1e-6, a)   # a float64 tensor: exported exactly (see _ops.f64)
    d = _ops.width_of(a)
    a_sq = (a * a).sum(1)
    r_sq = (r * r).sum(1)
    a_sum = a.sum(1)
    r_sum = r.sum(1)
    g = a @ r.transpose(0, 1)            # [N, M] a_i . r_j
    h = r @ r.transpose(0, 1)            # [M, M] r_j . r_k
    # |a - p + eps|^2
    ap_sq = a_sq.unsqueeze(1) + r_sq.unsqueeze(0) + d * eps * eps - 2.0 * g \
        + 2.0 * eps * (a_sum.unsqueeze(1) - r_sum.unsqueeze(0))
    ap = ap_sq.clamp(min=0.0).sqrt().to(anchors.dtype)               # [N, M]
    c_sq = (a_sq.unsqueeze(1) + r_sq.unsqueeze(0) + 2.0 * g) / 4.0      # |c_ij|^2
    ne_sq = r_sq + 2.0 * eps * r_sum + d * eps * eps                   # |r_k + eps|^2
    return [g, c_sq, ap, a_sum], [h, ne_sq, r_sum]


def _ordered(bits: int, width: int) -> int:
    """Float bit pattern (as an unsigned int) -> an int in the float's order (+-0 -> 0)."""
    sign = 1 << (width - 1)
    return -(bits & (sign - 1)) if bits & sign else bits


def _from_ordered(key: int, width: int) -> int:
    return key if key >= 0 else (-key) | (1 << (width - 1))


_FLOAT_BITS = {torch.float16: (torch.int16, 16), torch.float32: (torch.int32, 32),
               torch.float64: (torch.int64, 64)}


def atan_cut(angle: float, dtype: torch.dtype) -> float:
    """The largest ``r`` of ``dtype`` with ``torch.atan(r) > angle`` False.

    ``atan`` is non-decreasing, so ``torch.atan(r) > angle`` (computed in ``dtype``, as
    the eager kernel does) holds exactly for ``r > atan_cut(angle, dtype)``; the exported
    graph compares with the cut-off instead (ONNX Runtime's CUDA EP has no ``Atan``
    kernel). Found by bisection over the floats of ``dtype`` in order; +inf if the test
    holds for no number, -inf if it holds for every number (then ``r > cut`` misses
    ``r = -inf`` alone; the kernel's ratios are never negative).
    """
    int_dtype, width = _FLOAT_BITS[dtype]
    mask = (1 << width) - 1

    def to_float(key: int) -> torch.Tensor:
        bits = _from_ordered(key, width)
        if bits >= 1 << (width - 1):
            bits -= 1 << width            # as the signed int of that width
        return torch.tensor([bits], dtype=int_dtype).view(dtype)

    def holds(key: int) -> bool:
        return bool((torch.atan(to_float(key)) > angle)[0])

    inf_key = _ordered(int(torch.tensor([float("inf")], dtype=dtype).view(int_dtype)[0]) & mask,
                       width)
    lo, hi = -inf_key, inf_key
    if holds(lo):
        return float("-inf")
    if not holds(hi):
        return float("inf")
    while hi - lo > 1:            # holds(lo) is False, holds(hi) is True
        mid = (lo + hi) // 2
        if holds(mid):
            hi = mid
        else:
            lo = mid
    return float(to_float(lo)[0])


def atan_cuts(angle: float) -> List[float]:
    """:func:`atan_cut` for float16, float32 and float64."""
    return [atan_cut(angle, dt) for dt in (torch.float16, torch.float32, torch.float64)]


def _pick_cut(cuts: List[float], dtype: torch.dtype) -> float:
    if dtype == torch.float16:
        return cuts[0]
    if dtype == torch.float32:
        return cuts[1]
    return cuts[2]


def angular_block(rows: List[Tensor], shared: List[Tensor], pos: Tensor, neg: Tensor,
                  angle: float, cuts: List[float]) -> Tensor:
    """Angle test for the anchors in ``rows`` (see :func:`angular_terms`).

    Returns:
        Tensor[N, M(positive), M(negative)] bool.
    """
    g, c_sq, ap, a_sum = rows[0], rows[1], rows[2], rows[3]
    h, ne_sq, r_sum = shared[0], shared[1], shared[2]
    if _ops.is_exporting():
        return _angles_exceed(g, c_sq, ap, a_sum, h.unsqueeze(0), ne_sq,
                              r_sum.view(1, -1, 1), angle, cuts) & lmu.triplet_mask(pos, neg)
    n_rows, m = g.size(0), g.size(1)
    out = torch.empty((n_rows, m, m), dtype=torch.bool, device=g.device)
    # rows per block: each of a block's few float64 temporaries stays within
    # max(N*M, 2^21) elements
    per = max(1, max(n_rows * m, 2097152) // max(1, m * m))
    for s in range(0, n_rows, per):
        e = min(n_rows, s + per)
        out[s:e] = _angles_exceed(g[s:e], c_sq[s:e], ap[s:e], a_sum[s:e], h.unsqueeze(0),
                                  ne_sq, r_sum.view(1, -1, 1), angle, cuts) & \
            lmu.triplet_mask(pos[s:e], neg[s:e])
    return out


def angular_miner(anchors: Tensor, refs: Tensor, pos: Tensor, neg: Tensor, angle: float,
                  cuts: Optional[List[float]] = None) -> Tensor:
    """Fixed-shape AngularMiner kernel.

    For each triplet (a, p, n) with c = (a + p) / 2, the angle is
    ``atan(|a - p| / (2 |n - c|))`` (norms as ``torch.nn.functional.pairwise_distance``,
    eps included, on the embeddings as given, like PML). Norms of all N x M x M triplets
    are expanded into dot products (Gram matrices, float64, :func:`angular_terms`), so no
    per-triplet embedding copies are made; the final ratio and arctangent are taken in
    the input dtype, as PML does.

    Args:
        anchors: Tensor[N, D]; refs: Tensor[M, D] (positives and negatives).
        pos, neg: Tensor[N, M] bool pair masks.
        angle: threshold in radians.
        cuts: :func:`atan_cuts` of ``angle`` (computed if not given).

    Returns:
        Tensor[N, M(positive), M(negative)] bool.
    """
    rows, shared = angular_terms(anchors, refs)
    return angular_block(rows, shared, pos, neg, angle,
                         atan_cuts(angle) if cuts is None else cuts)


def _angle_ratio(g: Tensor, c_sq: Tensor, ap: Tensor, a_sum: Tensor, h_pn: Tensor,
                 ne_sq: Tensor, p_sum: Tensor) -> Tensor:
    """``|a - p| / (2 |n - c|)`` for a block of anchors and P positive candidates each
    (input dtype; the angle is its arctangent).

    Args:
        g: [b, M] a.r; c_sq, ap: [b, P] per (anchor, positive); a_sum: [b];
        h_pn: [1 or b, P, M] positive . negative; ne_sq: [M]; p_sum: [1 or b, P, 1].

    Returns:
        Tensor[b, P, M].
    """
    eps = _ops.f64(1e-6, g)
    # |n - c + eps|^2 = |n + eps|^2 + |c|^2 - ((n + eps) . a + (n + eps) . p)
    nc_sq = ne_sq.view(1, 1, -1) + c_sq.unsqueeze(2) - g.unsqueeze(1) - h_pn \
        - eps * (a_sum.view(-1, 1, 1) + p_sum)
    nc = nc_sq.clamp(min=0.0).sqrt().to(ap.dtype)                  # [b, M(p), M(n)]
    return ap.unsqueeze(2) / (2 * nc)


def _angles_exceed(g: Tensor, c_sq: Tensor, ap: Tensor, a_sum: Tensor, h_pn: Tensor,
                   ne_sq: Tensor, p_sum: Tensor, angle: float, cuts: List[float]) -> Tensor:
    """Angle test for a block of anchors and P positive candidates each (arguments as
    :func:`_angle_ratio`). Returns Tensor[b, P, M] bool."""
    ratio = _angle_ratio(g, c_sq, ap, a_sum, h_pn, ne_sq, p_sum)
    if _ops.is_exporting():   # the same test without Atan (no CUDA kernel in ONNX Runtime)
        return ratio > _pick_cut(cuts, ratio.dtype)
    return torch.atan(ratio) > angle


def angle_sums(rows: List[Tensor], shared: List[Tensor], pos: Tensor, neg: Tensor,
               angle: float) -> List[float]:
    """Sums over every triplet the masks allow of its angle (radians, as the kernel
    computes it), in anchor blocks: ``[count, sum, sum of squares, min, max,
    count above angle, sum above angle]`` (float64 accumulation)."""
    g, c_sq, ap, a_sum = rows[0], rows[1], rows[2], rows[3]
    h, ne_sq, r_sum = shared[0], shared[1], shared[2]
    n_rows, m = g.size(0), g.size(1)
    acc = [0.0, 0.0, 0.0, float("inf"), float("-inf"), 0.0, 0.0]
    per = max(1, max(n_rows * m, 2097152) // max(1, m * m))
    for s in range(0, n_rows, per):
        e = min(n_rows, s + per)
        t = torch.atan(_angle_ratio(g[s:e], c_sq[s:e], ap[s:e], a_sum[s:e], h.unsqueeze(0),
                                    ne_sq, r_sum.view(1, -1, 1))).to(torch.float64)
        mask = lmu.triplet_mask(pos[s:e], neg[s:e])
        zero = torch.zeros_like(t)
        above = mask & (t > angle)
        acc[0] += float(mask.sum())
        acc[1] += float(torch.where(mask, t, zero).sum())
        acc[2] += float(torch.where(mask, t * t, zero).sum())
        acc[3] = min(acc[3], float(t.masked_fill(~mask, float("inf")).min()))
        acc[4] = max(acc[4], float(t.masked_fill(~mask, float("-inf")).max()))
        acc[5] += float(above.sum())
        acc[6] += float(torch.where(above, t, zero).sum())
    return acc


class AngularMiner(DenseTripletKernelMiner):
    """Triplets forming an angle greater than ``angle`` degrees, as defined in the
    angular loss paper (Wang et al., 2017). Requires L2 on normalised embeddings.

    Args:
        angle: threshold in degrees.

    Kernel: :func:`angular_miner`, one Tensor[N, M, M] bool mask.
    """

    angle: float
    cuts: List[float]
    average_angle: float
    average_angle_above_threshold: float
    average_angle_below_threshold: float
    min_angle: float
    max_angle: float
    std_of_angle: float

    def __init__(self, angle: float = 20, **kwargs):
        super().__init__(**kwargs)
        require_normalized_l2("AngularMiner", self.distance)
        self.angle_degrees = check_number(angle, "angle")
        self.angle = math.radians(self.angle_degrees)
        self.cuts = atan_cuts(self.angle)   # the exported graph's Atan-free test
        self.layout = [[0, -1, -2, -3]]
        self.reset_miner_stats()
        self.add_to_recordable_attributes(name="angle")
        self.add_to_recordable_attributes(list_of_names=ANGLE_STATS, is_stat=True)

    def reset_miner_stats(self) -> None:
        self.average_angle = 0.0
        self.average_angle_above_threshold = 0.0
        self.average_angle_below_threshold = 0.0
        self.min_angle = 0.0
        self.max_angle = 0.0
        self.std_of_angle = 0.0

    def record_stats(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                     ref_labels: Optional[Tensor], out: List[Tensor]) -> None:
        """PML's, in degrees, over every triplet the labels allow: mean, min, max and
        standard deviation of the angle, and the means above and below ``angle`` (each
        set only when it has values)."""
        rows, shared = angular_terms(embeddings, embeddings if ref_emb is None else ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels)
        c = angle_sums(rows, shared, pos, neg, self.angle)
        deg = 180.0 / math.pi
        if c[0] > 0:
            mean = c[1] / c[0]
            self.average_angle = mean * deg
            self.min_angle = c[3] * deg
            self.max_angle = c[4] * deg
            var = (c[2] - c[1] * mean) / (c[0] - 1) if c[0] > 1 else float("nan")
            self.std_of_angle = math.sqrt(max(var, 0.0)) * deg if c[0] > 1 else var
        if c[5] > 0:
            self.average_angle_above_threshold = c[6] / c[5] * deg
        if c[0] - c[5] > 0:
            self.average_angle_below_threshold = (c[1] - c[6]) / (c[0] - c[5]) * deg

    def block_state(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                    ref_labels: Optional[Tensor],
                    anchor_ids: Optional[Tensor] = None) -> Tuple[List[Tensor], List[Tensor]]:
        refs = embeddings if ref_emb is None else ref_emb
        pos, neg = lmu.pair_masks(labels, ref_labels, anchor_ids)
        rows, shared = angular_terms(embeddings, refs)
        return rows + [pos, neg], shared

    def block_kernel(self, rows: List[Tensor], shared: List[Tensor],
                     noise: Optional[Tensor]) -> List[Tensor]:
        return [angular_block(rows[:4], shared, rows[4], rows[5], self.angle, self.cuts)]

    def positive_mask(self, rows: List[Tensor]) -> Optional[Tensor]:
        return rows[4]

    def positive_budget(self) -> int:
        return 4194304   # its [b, P, M] temporaries are float64

    def positive_block(self, rows: List[Tensor], shared: List[Tensor], cols: Tensor,
                       valid: Tensor, start: int, stop: int) -> Tensor:
        # per-(anchor, positive) terms gathered to the candidates: same operations as
        # the dense kernel, so the same angles
        g, c_sq, ap = rows[0][start:stop], rows[1][start:stop], rows[2][start:stop]
        a_sum, neg = rows[3][start:stop], rows[5][start:stop]
        h, ne_sq, r_sum = shared[0], shared[1], shared[2]
        mask = _angles_exceed(g, torch.gather(c_sq, 1, cols), torch.gather(ap, 1, cols),
                              a_sum, h[cols], ne_sq, r_sum[cols].unsqueeze(2), self.angle,
                              self.cuts)
        return mask & valid.unsqueeze(2) & neg.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"angle={self.angle_degrees:g}"
