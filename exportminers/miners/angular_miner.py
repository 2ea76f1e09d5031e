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


def _rounding_boundary(cut: float, dtype: torch.dtype) -> float:
    """The real number above which a value rounds (to nearest) to a ``dtype`` number
    greater than ``cut``: the midpoint between ``cut`` and the next number up."""
    if math.isinf(cut):
        return cut
    c = torch.tensor([cut], dtype=dtype)
    nxt = torch.nextafter(c, torch.tensor([float("inf")], dtype=dtype))
    return (float(c[0]) + float(nxt[0])) / 2.0


def atan_cuts(angle: float) -> List[float]:
    """:func:`atan_cut` for float16, float32 and float64, then the rounding boundaries
    above those cut-offs (for tests on unrounded ratios, see :func:`_graph_angles_exceed`)."""
    dts = (torch.float16, torch.float32, torch.float64)
    cuts = [atan_cut(angle, dt) for dt in dts]
    return cuts + [_rounding_boundary(c, dt) for c, dt in zip(cuts, dts)]


def _pick_cut(cuts: List[float], dtype: torch.dtype, boundary: bool = False) -> float:
    k = 3 if boundary else 0
    if dtype == torch.float16:
        return cuts[k]
    if dtype == torch.float32:
        return cuts[k + 1]
    return cuts[k + 2]


def angular_block(rows: List[Tensor], shared: List[Tensor], pos: Tensor, neg: Tensor,
                  angle: float, cuts: List[float]) -> Tensor:
    """Angle test for the anchors in ``rows`` (see :func:`angular_terms`).

    Returns:
        Tensor[N, M(positive), M(negative)] bool.
    """
    g, c_sq, ap, a_sum = rows[0], rows[1], rows[2], rows[3]
    h, ne_sq, r_sum = shared[0], shared[1], shared[2]
    if _ops.is_exporting():
        cut = _pick_cut(cuts, ap.dtype)
        if cut >= 0.0:
            # the graph's ratio is not rounded to the input dtype: compare it with the
            # boundary above which the eager, rounded ratio exceeds the cut-off
            return _graph_angles_exceed(g, c_sq, ap, a_sum, h, ne_sq, r_sum, pos, neg,
                                        _pick_cut(cuts, ap.dtype, True))
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


def angular_gathered_block(rows: List[Tensor], shared: List[Tensor], neg: Tensor,
                           cols: Tensor, valid: Tensor, angle: float,
                           cuts: List[float]) -> Tensor:
    """The exported angle test (:func:`angular_block`'s graph arithmetic) over listed
    positives: ``cols`` [N, P] (``valid`` [N, P]) against every negative.

    Returns:
        Tensor[N, P, M] bool.
    """
    g, c_sq, ap, a_sum = rows[0], rows[1], rows[2], rows[3]
    h, ne_sq, r_sum = shared[0], shared[1], shared[2]
    cut = _pick_cut(cuts, ap.dtype)
    if cut >= 0.0:
        return _graph_angles_exceed(g, c_sq, ap, a_sum, h, ne_sq, r_sum, valid, neg,
                                    _pick_cut(cuts, ap.dtype, True), cols)
    return _angles_exceed(g, torch.gather(c_sq, 1, cols), torch.gather(ap, 1, cols), a_sum,
                          h[cols], ne_sq, r_sum[cols].unsqueeze(2), angle, cuts) \
        & (valid.unsqueeze(2) & neg.unsqueeze(1))


def _graph_angles_exceed(g: Tensor, c_sq: Tensor, ap: Tensor, a_sum: Tensor, h: Tensor,
                         ne_sq: Tensor, r_sum: Tensor, pos: Tensor, neg: Tensor,
                         cut: float, cols: Optional[Tensor] = None) -> Tensor:
    """The exported graph's angle test for a cut-off ``cut >= 0`` (see :func:`atan_cut`),
    with one float64 [N, M, M] temporary and one bool result.

    ``ap / (2 |n - c|) > cut`` with ``ap > 0`` is ``|n - c|^2 < T = ap^2 / (4 cut^2)``
    (``T = inf`` for ``cut = 0``, ``-inf`` for ``cut = inf``; ``ap = 0`` never passes), and ``|n - c + eps|^2``
    splits into per-(anchor, positive), per-(positive, negative) and per-(anchor,
    negative) terms, so the test is ``(|n + eps|^2 - p.n) - a.n < T - (|c|^2 - eps
    (sum(a) + sum(p)))``: one broadcast subtraction and one comparison over the cube.
    Masked pairs enter as infinities (a non-positive: right side -inf; a non-negative:
    ``a.n = -inf``), so no mask cube is built. The comparison is the eager test up to the
    rounding of its last input-dtype steps (ties at the threshold; graphs are checked with
    a perturbation tolerance, :mod:`exportminers.verify`).

    Args:
        g: [N, M] a.r; c_sq: [N, M] |c|^2; ap: [N, M] |a - p + eps| (input dtype);
            a_sum: [N]; h: [M, M] r.r; ne_sq: [M] |r + eps|^2; r_sum: [M];
            pos, neg: [N, M] bool.
        cols: None, or Tensor[N, P] listed positive columns (``pos`` is then their
            validity, [N, P]): the same test, elementwise the same arithmetic, over
            [N, P, M] candidates (``gather_positives`` graphs).

    Returns:
        Tensor[N, M(positive) or P, M(negative)] bool.
    """
    eps = _ops.f64(1e-6, g)
    ap64 = ap.to(torch.float64)
    inf = _ops.f64(float("inf"), g)
    # (0-d bounds broadcast below: expand_as would add Shape nodes to the graph)
    if math.isinf(cut):      # the angle test holds for no ratio
        bound = -inf
    elif cut > 0.0:
        bound = ap64 * ap64 / _ops.f64(4.0 * cut * cut, g)
    else:
        bound = inf
    right = bound - (c_sq - eps * (a_sum.unsqueeze(1) + r_sum.unsqueeze(0)))
    right = torch.where(ap64 > 0.0, right, -inf)                          # [N, M(p)]
    left_pn = ne_sq.unsqueeze(0) - h                                      # [M(p), M(n)]
    if cols is not None:
        right = torch.gather(right, 1, cols)                              # [N, P]
        left_pn = left_pn[cols]                                           # [N, P, M(n)]
    else:
        left_pn = left_pn.unsqueeze(0)
    right = torch.where(pos, right, -inf)
    g_neg = torch.where(neg, g, -inf)                                     # [N, M(n)]
    return (left_pn - g_neg.unsqueeze(1)) < right.unsqueeze(2)


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


# ---------------------------------------------------------------------------------
# Eager/TorchScript exactness: the float64 Gram ratio decides every triplet whose
# decision it proves; the rest are recomputed with PML's own operations.
# ---------------------------------------------------------------------------------


def _dtype_consts(dtype: torch.dtype) -> Tuple[float, float, float, float, float]:
    """``(unit roundoff, smallest subnormal, and the same two for the norm's
    accumulation, largest magnitude of |a| + |p| + |n| kept clear of overflow)``."""
    if dtype == torch.float16:   # pairwise_distance accumulates half in float32
        return 2.0 ** -11, 2.0 ** -24, 2.0 ** -24, 2.0 ** -149, 65504.0 / 8.0
    if dtype == torch.bfloat16:  # the accumulation's precision is taken as bfloat16's own
        return (2.0 ** -8, 2.0 ** -133, 2.0 ** -8, 2.0 ** -133,
                math.sqrt(3.4028234663852886e38) / 8.0)
    if dtype == torch.float32:
        return (2.0 ** -24, 2.0 ** -149, 2.0 ** -24, 2.0 ** -149,
                math.sqrt(3.4028234663852886e38) / 8.0)
    return 2.0 ** -53, 5e-324, 2.0 ** -53, 5e-324, math.sqrt(1.7976931348623157e308) / 8.0


def _ratio_thresholds(angle: float, u: float, den: float) -> Tuple[float, float]:
    """``(t_lo, t_hi)``: PML's test ``atan(r) > angle`` (atan within 1 ulp of the input
    dtype, angle rounded to it) is False for every ``r < t_lo`` and True for every
    ``r > t_hi`` (r >= 0). Margins of 8 ulps of the angle plus 4 subnormals."""
    slack = 8.0 * u * abs(angle) + 4.0 * den + 64.0 * 2.0 ** -53 * abs(angle)
    hi_angle = angle + slack
    lo_angle = angle - slack
    half_pi = math.pi / 2
    if hi_angle >= half_pi:
        t_hi = math.inf
    elif hi_angle < 0.0:
        t_hi = -math.inf
    else:
        t_hi = math.tan(hi_angle) * (1.0 + 1e-12)
    if lo_angle <= 0.0:
        t_lo = -math.inf
    elif lo_angle >= half_pi:
        t_lo = math.inf
    else:
        t_lo = math.tan(lo_angle) * (1.0 - 1e-12)
    return t_lo, t_hi


def _exact_angles(anchors: Tensor, refs: Tensor, ai: Tensor, pi: Tensor, ni: Tensor,
                  angle: float) -> Tensor:
    """PML's own computation, bit for bit: ``atan(|a - p| / (2 |n - c|)) > angle`` with
    ``c = (a + p) / 2`` and ``torch.nn.functional.pairwise_distance`` in the input dtype."""
    a = anchors[ai]
    p = refs[pi]
    n = refs[ni]
    centers = (a + p) / 2
    ap_dist = torch.nn.functional.pairwise_distance(a, p, 2.0)
    nc_dist = torch.nn.functional.pairwise_distance(n, centers, 2.0)
    return torch.atan(ap_dist / (2 * nc_dist)) > angle


def _exact_block(g: Tensor, c_sq: Tensor, a_sum: Tensor, h_pn: Tensor, ne_sq: Tensor,
                 p_sum: Tensor, ap_sq: Tensor, a_nrm: Tensor, p_nrm: Tensor, r_nrm: Tensor,
                 anchors: Tensor, refs: Tensor, cols: Tensor, live: Tensor,
                 angle: float) -> Tensor:
    """Eager/TorchScript angle test of anchors ``anchors`` ([b, D]) against positive
    candidates ``cols`` [b, P] and every negative, equal to PML's.

    Args:
        g, c_sq, a_sum, h_pn, ne_sq, p_sum: as :func:`_angle_ratio` (c_sq [b, P]).
        ap_sq: [b, P] float64 ``|a - p + eps|^2`` (Gram); a_nrm [b], p_nrm [b, P],
            r_nrm [M]: float64 norms; refs: Tensor[M, D] (input dtype).
        live: [b, P, M] bool, the triplets to decide (others come back False).

    The float64 Gram ratio brackets PML's ratio: the true ``|a - p + eps|`` lies within
    ``sqrt(ap_sq -+ E)`` where ``E = 4 (D + 16) 2^-53 (|a| + |p| + eps sqrt(D))^2`` bounds
    the expansion's rounding (each Gram term's sum of |products| times gamma_D, plus the
    combining additions); likewise ``|n - c + eps|`` with ``(|n| + (|a| + |p|) / 2 +
    eps sqrt(D))^2``. PML's input-dtype result lies within ``4 ((4 u + (D + 2) u_acc) |t| + 2 u
    (eps sqrt(D) + |c|) + floor)`` of the true norm ``|t|`` (u the dtype's unit roundoff,
    u_acc the norm accumulation's, float32 for half: the elementwise subtraction, eps
    addition and centre, the sum of D squares, the square root, the final rounding;
    floor covers subnormals), and its quotient within 8 u more. Triplets
    whose bracket lies above or below the threshold's ratio bounds (see
    :func:`_ratio_thresholds`) are decided by it; the rest, and any near overflow, are
    recomputed with PML's operations (:func:`_exact_angles`) in chunks.
    """
    gram_slack = 4.0   # times the float64 Gram expansion's worst-case rounding error
    pml_slack = 4.0    # times the worst-case rounding error of PML's input-dtype arithmetic
    dtype = anchors.dtype
    u, den, u_acc, den_acc, big = _dtype_consts(dtype)
    d = float(anchors.size(1))
    eps = 1e-6
    s_d = eps * math.sqrt(d)
    gram = gram_slack * (d + 16.0) * 2.0 ** -53
    # elementwise ops (2 u), sum of D squares and sqrt ((D/2 + 2) u_acc), rounding (u)
    rel = pml_slack * (4.0 * u + (d + 2.0) * u_acc)
    floor = 4.0 * math.sqrt(d) * den + math.sqrt(d * den_acc)
    t_lo, t_hi = _ratio_thresholds(angle, u, den)
    e64 = _ops.f64(eps, g)
    # |a - p + eps|: [b, P]
    m_ap = a_nrm.unsqueeze(1) + p_nrm + s_d
    e_ap = gram * m_ap * m_ap
    l_ap = (ap_sq - e_ap).clamp(min=0.0).sqrt()
    u_ap = (ap_sq + e_ap).sqrt()
    lo_ap = (l_ap - rel * u_ap - pml_slack * (2.0 * u * s_d + floor)).clamp(min=0.0)
    hi_ap = u_ap * (1.0 + rel) + pml_slack * (2.0 * u * s_d + floor)
    # |n - c + eps|: [b, P, M]
    s_c = (a_nrm.unsqueeze(1) + p_nrm) / 2.0
    nc_sq = ne_sq.view(1, 1, -1) + c_sq.unsqueeze(2) - g.unsqueeze(1) - h_pn \
        - e64 * (a_sum.view(-1, 1, 1) + p_sum)
    m_nc = r_nrm.view(1, 1, -1) + (s_c + s_d).unsqueeze(2)
    over = m_nc >= big / 2.0          # |a| + |p| + |n| may near the dtype's range
    e_nc = gram * m_nc * m_nc
    l_nc = (nc_sq - e_nc).clamp(min=0.0).sqrt()
    u_nc = (nc_sq + e_nc).sqrt()
    del nc_sq, e_nc, m_nc
    pad = (pml_slack * (2.0 * u * (s_d + s_c) + floor)).unsqueeze(2)
    lo_nc = (l_nc - rel * u_nc - pad).clamp(min=0.0)
    hi_nc = u_nc * (1.0 + rel) + pad
    del l_nc, u_nc
    q = 8.0 * u + 64.0 * 2.0 ** -53
    lo = lo_ap.unsqueeze(2) / (2.0 * hi_nc) * (1.0 - q) - den
    hi = hi_ap.unsqueeze(2) / (2.0 * lo_nc) * (1.0 + q) + den
    del lo_nc, hi_nc
    sure = (lo > t_hi) & (lo_ap > 0.0).unsqueeze(2)
    unsure = ~(sure | (hi < t_lo)) | over
    del lo, hi
    out = sure & ~over & live
    unsure = unsure & live
    idx = unsure.nonzero()
    k = idx.size(0)
    if k > 0:
        per = max(1, 1048576 // max(1, anchors.size(1)))
        for s in range(0, k, per):
            e = min(k, s + per)
            ib = idx[s:e]
            pi = cols[ib[:, 0], ib[:, 1]]
            sel = _exact_angles(anchors, refs, ib[:, 0], pi, ib[:, 2], angle)
            out[ib[:, 0], ib[:, 1], ib[:, 2]] = sel
    return out


def exact_terms(anchors: Tensor, refs: Tensor, g: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
    """Eager-only extras for :func:`_exact_block`: ``([ap_sq, a_nrm, anchors], [r_nrm,
    refs])`` (``ap_sq`` the float64 ``|a - p + eps|^2`` of :func:`angular_terms`)."""
    a = anchors.to(torch.float64)
    r = refs.to(torch.float64)
    eps = _ops.f64(1e-6, a)
    d = _ops.width_of(a)
    a_sq = (a * a).sum(1)
    r_sq = (r * r).sum(1)
    ap_sq = a_sq.unsqueeze(1) + r_sq.unsqueeze(0) + d * eps * eps - 2.0 * g \
        + 2.0 * eps * (a.sum(1).unsqueeze(1) - r.sum(1).unsqueeze(0))
    return [ap_sq, a_sq.sqrt(), anchors], [r_sq.sqrt(), refs]


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

    def constructor_overrides(self):
        """Constructor arguments stored otherwise (``angle`` is kept in radians)."""
        return {"angle": self.angle_degrees}

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
        m = embeddings.size(0) if ref_emb is None else ref_emb.size(0)
        if embeddings.size(0) == 0 or m == 0:   # nothing mined: the statistics stay at 0
            return
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
        if _ops.is_exporting():
            return rows + [pos, neg], shared
        # eager/TorchScript: what the exact recheck needs (rows[6:], shared[3:])
        extra_rows, extra_shared = exact_terms(embeddings, refs, rows[0])
        return rows + [pos, neg] + extra_rows, shared + extra_shared

    def block_kernel(self, rows: List[Tensor], shared: List[Tensor],
                     noise: Optional[Tensor]) -> List[Tensor]:
        if _ops.is_exporting() or len(rows) < 9:
            return [angular_block(rows[:4], shared[:3], rows[4], rows[5], self.angle,
                                  self.cuts)]
        # eager dense kernel: the exact test over every (positive, negative) column
        n_rows, m = rows[0].size(0), rows[0].size(1)
        cols = torch.arange(m, device=rows[0].device).unsqueeze(0).expand(n_rows, m)
        out = torch.empty((n_rows, m, m), dtype=torch.bool, device=rows[0].device)
        per = max(1, 2097152 // max(1, m * m))
        for s in range(0, n_rows, per):
            e = min(n_rows, s + per)
            valid = torch.ones((e - s, m), dtype=torch.bool, device=rows[0].device)
            out[s:e] = self.positive_block(rows, shared, cols[s:e], valid, s, e) & \
                rows[4][s:e].unsqueeze(2)
        return [out]

    def positive_mask(self, rows: List[Tensor]) -> Optional[Tensor]:
        return rows[4]

    def gathers_positives(self) -> bool:
        return True

    def gathered_block(self, rows: List[Tensor], shared: List[Tensor], cols: Tensor,
                       valid: Tensor) -> Tensor:
        if len(rows) < 9:   # exporting: the graph's test, as the dense graph's
            return angular_gathered_block(rows[:4], shared[:3], rows[5], cols, valid,
                                          self.angle, self.cuts)
        return self.positive_block(rows, shared, cols, valid, 0, rows[0].size(0))

    def positive_budget(self) -> int:
        return 4194304   # its [b, P, M] temporaries are float64

    def positive_block(self, rows: List[Tensor], shared: List[Tensor], cols: Tensor,
                       valid: Tensor, start: int, stop: int) -> Tensor:
        # per-(anchor, positive) terms gathered to the candidates: the Gram ratio decides
        # what it proves, PML's own operations the rest (see _exact_block)
        g, c_sq = rows[0][start:stop], rows[1][start:stop]
        a_sum, neg = rows[3][start:stop], rows[5][start:stop]
        ap_sq, a_nrm, anchors = rows[6][start:stop], rows[7][start:stop], rows[8][start:stop]
        h, ne_sq, r_sum, r_nrm, refs = shared[0], shared[1], shared[2], shared[3], shared[4]
        live = valid.unsqueeze(2) & neg.unsqueeze(1)
        return _exact_block(g, torch.gather(c_sq, 1, cols), a_sum, h[cols], ne_sq,
                            r_sum[cols].unsqueeze(2), torch.gather(ap_sq, 1, cols), a_nrm,
                            r_nrm[cols], r_nrm, anchors, refs, cols, live, self.angle)

    def extra_repr(self) -> str:
        return f"angle={self.angle_degrees:g}"
