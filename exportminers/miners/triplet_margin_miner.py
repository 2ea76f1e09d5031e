"""TripletMarginMiner: every triplet that violates the margin."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _ops
from ..distances import LpDistance, SNRDistance
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_choice, check_number, check_positive_int
from .base_miner import DenseTripletKernelMiner
from .stats import triplet_means

TRIPLET_TYPES = {"all": 0, "hard": 1, "semihard": 2, "easy": 3}


def triplet_condition(tm: Tensor, margin: float, kind: int) -> Tensor:
    """PML's test on triplet margins ``d(a, n) - d(a, p)`` (similarities: ``s(a, p) - s(a, n)``).

    ``kind``: 0 all, 1 hard, 2 semihard, 3 easy (see :data:`TRIPLET_TYPES`).
    """
    if kind == 3:
        return tm > margin
    cond = tm <= margin
    if kind == 1:
        cond = cond & (tm <= 0)
    elif kind == 2:
        cond = cond & (tm > 0)
    return cond


def compares_as_inf(margin: float, dtype: torch.dtype) -> bool:
    """``margin`` rounds to +inf when compared with values of ``dtype`` (e.g. 1e5 in
    float16): the first value that rounds up past each format's largest finite one."""
    if dtype == torch.float16:
        return margin >= 65520.0                      # 65504 + half an ulp
    if dtype == torch.bfloat16:
        return margin >= 3.3961775292304256e38        # 2^128 - 2^119
    if dtype == torch.float32:
        return margin >= 3.4028235677973366e38        # 2^128 - 2^103
    return margin == float("inf")


def masked_pair_values(ap_vals: Tensor, pos: Tensor, an_vals: Tensor, neg: Tensor, kind: int,
                       is_inverted: bool, margin: float = 0.0):
    """Anchor-positive and anchor-negative values with the pair masks folded in.

    Non-positive (non-negative) entries become +-inf such that every triplet using one
    gets the margin +inf (-inf for ``"easy"``), which no condition accepts. (A margin
    that compares as +inf in the values' dtype would accept +inf: then they become NaN,
    which fails every comparison.) Valid triplets' margins are computed exactly as
    before. This replaces two N x P x M boolean ANDs with N x P and N x M fills.

    Args:
        ap_vals, pos: Tensor[N, P] positive-candidate values and validity.
        an_vals, neg: Tensor[N, M] negative-candidate values and validity.

    Returns:
        (ap Tensor[N, P, 1], an Tensor[N, 1, M])
    """
    if kind != 3 and compares_as_inf(margin, an_vals.dtype):
        # an infinite margin accepts an infinite triplet margin: masked entries are NaN
        # instead, which no comparison accepts
        nan = float("nan")
        return ap_vals.masked_fill(~pos, nan).unsqueeze(2), \
            an_vals.masked_fill(~neg, nan).unsqueeze(1)
    big = float("-inf") if kind == 3 else float("inf")
    if is_inverted:   # margin = ap - an
        ap = ap_vals.masked_fill(~pos, big)
        an = an_vals.masked_fill(~neg, -big)
    else:             # margin = an - ap
        ap = ap_vals.masked_fill(~pos, -big)
        an = an_vals.masked_fill(~neg, big)
    return ap.unsqueeze(2), an.unsqueeze(1)


def triplet_margins(ap: Tensor, an: Tensor, is_inverted: bool) -> Tensor:
    return ap - an if is_inverted else an - ap


def margin_thresholds(ap: Tensor, margin: float) -> Tensor:
    """For each value ``ap >= 0``, the largest ``t`` such that ``fl(x - ap) <= margin``
    exactly when ``x <= t`` (floating-point subtraction is monotone in ``x``).

    Requires ``ap >= 0`` (or +-inf) and ``margin >= 0``: then ``t0 = fl(ap + margin)`` is
    at least ``margin``, the spacing of floats at ``t0`` is at least that at ``margin``,
    and the answer lies within two or three representable steps of ``t0``; four
    ``nextafter`` steps each way find it. (Near zero, where floats are denser than at
    ``margin``, no fixed number of steps would do; callers use subtraction there.)
    +-inf map to themselves. Exported graphs (float32 only) step with
    :func:`~exportminers._ops.next_float`'s float64 emulation of ``nextafter``.
    """
    t = ap + margin
    for _ in range(4):
        t = torch.where((t - ap) > margin, _ops.next_float(t, False), t)
    for _ in range(4):
        up = _ops.next_float(t, True)
        t = torch.where((up - ap) <= margin, up, t)
    return t


def triplet_thresholds(ap: Tensor, margin: float, kind: int) -> Tensor:
    """:func:`margin_thresholds` for a triplet type. The types that accept
    ``fl(an - ap) <= margin`` (all, hard, semihard) cap a ``+inf`` threshold (an
    overflowed ``d(a, p)``) at the largest finite value: ``an <= +inf`` would accept
    ``an = +inf`` too, an overflowed or masked-out negative, where PML's ``an - ap`` is
    NaN and fails. ("easy" tests ``an > t``, which ``+inf`` already fails.)"""
    t = margin_thresholds(ap, margin)
    if kind != 3:
        t = torch.where(t == float("inf"), _ops.next_float(t, False), t)
    return t


def _select(ap: Tensor, an: Tensor, thr: Tensor, kind: int) -> Tensor:
    """PML's triplet test for distances, comparisons only: ``fl(an - ap) <= margin`` is
    ``an <= thr`` (:func:`triplet_thresholds`), and the sign of ``fl(an - ap)`` is the
    sign of ``an - ap``. ``ap`` [b, M, 1], ``an`` [b, 1, M], ``thr`` [b, M, 1]; returns
    [b, M, M] bool (semihard holds one more cube while it runs, no float cube).
    """
    if kind == 0:
        return an <= thr
    if kind == 1:      # and an - ap <= 0, i.e. an <= ap
        return an <= torch.minimum(thr, ap)
    if kind == 2:      # and an > ap
        out = an <= thr
        out.bitwise_and_(an > ap)
        return out
    return an > thr


def triplet_margin_miner(mat: Tensor, pos: Tensor, neg: Tensor, margin: float, kind: int,
                         is_inverted: bool, nonnegative: bool = False) -> Tensor:
    """Fixed-shape TripletMarginMiner kernel: :func:`triplet_margin_candidates` with every
    reference column as a positive candidate.

    Args:
        mat: Tensor[N, M] distances (or similarities if ``is_inverted``).
        pos: Tensor[N, M] bool, positive pairs.
        neg: Tensor[N, M] bool, negative pairs.
        margin: the margin.
        kind: 0 all, 1 hard, 2 semihard, 3 easy.
        is_inverted: ``mat`` holds similarities.
        nonnegative: ``mat`` holds distances that are never negative (L_p, SNR).

    Returns:
        Tensor[N, M(positive), M(negative)] bool: the selected triplets.

    For non-negative distances and a non-negative margin (eager/TorchScript in float32/64,
    exported graphs in float32) no per-triplet float is computed: the margin test becomes
    one comparison of the anchor-negative value with an exact per-pair threshold
    (:func:`margin_thresholds`), written straight into the mask. Otherwise (similarities,
    negative margins, half precision, float64 graphs) the margins are computed (in row
    blocks, eagerly) and compared; both give PML's result exactly. The miner's
    forward decodes anchor blocks, so the whole mask never exists at once.
    """
    return triplet_margin_candidates(mat, pos, mat, neg, margin, kind, is_inverted, nonnegative)


def triplet_margin_candidates(ap_vals: Tensor, pos: Tensor, an_vals: Tensor, neg: Tensor,
                              margin: float, kind: int, is_inverted: bool,
                              nonnegative: bool = False) -> Tensor:
    """The triplet test over P positive candidates and M negative candidates per anchor.

    Args:
        ap_vals, pos: Tensor[N, P] anchor-positive values and validity.
        an_vals, neg: Tensor[N, M] anchor-negative values and validity.
        margin, kind, is_inverted, nonnegative: as :func:`triplet_margin_miner`.

    Returns:
        Tensor[N, P, M] bool.
    """
    n, p, m = ap_vals.size(0), ap_vals.size(1), an_vals.size(1)
    ap, an = masked_pair_values(ap_vals, pos, an_vals, neg, kind, is_inverted, margin)
    exporting = _ops.is_exporting()
    # the threshold needs nextafter: eagerly any float32/64; exported, float32 only
    # (emulated, see _ops.next_float)
    exact_dtype = an_vals.dtype == torch.float32 or (
        not exporting and an_vals.dtype == torch.float64)
    if nonnegative and not is_inverted and margin >= 0 and exact_dtype:
        # thresholds on [N, P]: ONNX Runtime's CPU kernels loop element by element over
        # a trailing axis of size 1 (30x slower on [N, P, 1])
        thr = triplet_thresholds(ap.squeeze(2), margin, kind).unsqueeze(2)
        return _select(ap, an, thr, kind)
    if exporting:
        return triplet_condition(triplet_margins(ap, an, is_inverted), margin, kind)
    out = torch.empty((n, p, m), dtype=torch.bool, device=an_vals.device)
    # rows per block: a block's float margins stay within max(N*M, 2^22) elements
    per = max(1, max(n * m, 4194304) // max(1, p * m))
    for s in range(0, n, per):
        e = min(n, s + per)
        out[s:e] = triplet_condition(triplet_margins(ap[s:e], an[s:e], is_inverted), margin, kind)
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
    ap, an = masked_pair_values(mat, pos, mat, neg, kind, is_inverted, margin)
    if _ops.is_exporting():   # one block; sizes from data (no Python ints of N or M)
        v, i = _capped_block(ap, an, noise, margin, kind, is_inverted, k)
    else:
        n, m = mat.size(0), mat.size(1)
        per = max(1, max(n * m, 4194304) // max(1, m * m))
        vals: List[Tensor] = []
        idxs: List[Tensor] = []
        for s in range(0, n, per):
            e = min(n, s + per)
            v, i = _capped_block(ap[s:e], an[s:e], None if noise is None else noise[s:e],
                                 margin, kind, is_inverted, k)
            vals.append(v)
            idxs.append(i)
        v = torch.cat(vals, dim=0)
        i = torch.cat(idxs, dim=0)
    m_t = _ops.ones_int_like(mat[0]).sum()              # M, from data
    i = torch.minimum(i, m_t * m_t - 1)                  # padding slots (invalid anyway)
    valid = v > float("-inf")
    return [valid, torch.div(i, m_t, rounding_mode="floor"), i % m_t]


def _capped_block(ap: Tensor, an: Tensor, noise: Optional[Tensor], margin: float, kind: int,
                  is_inverted: bool, k: int) -> Tuple[Tensor, Tensor]:
    """Scores and flat (p * M + n) indices of the ``k`` best selected triplets of each
    anchor in a block (``-inf`` scores for empty slots)."""
    tm = triplet_margins(ap, an, is_inverted)
    cond = triplet_condition(tm, margin, kind)
    score = -tm if noise is None else noise.to(tm.dtype)   # larger = chosen first
    score = score.masked_fill(~cond, float("-inf")).flatten(1)   # [b, M * M]
    pad = torch.full_like(score[:, :1], float("-inf")).repeat(1, k)   # k empty slots
    return torch.topk(torch.cat([score, pad], dim=1), k, dim=1)


class TripletMarginMiner(DenseTripletKernelMiner):
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

    Kernel: :func:`triplet_margin_miner`, one Tensor[N, M, M] bool mask (or the capped
    slots).

    Example:
        >>> miner = TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
        >>> a, p, n = miner(torch.randn(32, 8), torch.randint(0, 4, (32,)))
    """

    margin: float
    kind: int
    cap: int
    random_cap: bool
    nonnegative: bool
    avg_triplet_margin: float
    pos_pair_dist: float
    neg_pair_dist: float

    def constructor_overrides(self):
        """Constructor arguments stored otherwise (the cap is ``cap``, 0 for none)."""
        return {"max_triplets_per_anchor": self.cap if self.cap > 0 else None}

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
        # L_p and SNR distances (with a positive power) are never negative
        self.nonnegative = isinstance(self.distance, (LpDistance, SNRDistance)) \
            and self.distance.power > 0
        self.reset_miner_stats()
        self.add_to_recordable_attributes(name="margin")
        self.add_to_recordable_attributes(
            list_of_names=["avg_triplet_margin", "pos_pair_dist", "neg_pair_dist"], is_stat=True)

    def reset_miner_stats(self) -> None:
        self.avg_triplet_margin = 0.0
        self.pos_pair_dist = 0.0
        self.neg_pair_dist = 0.0

    def record_stats(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                     ref_labels: Optional[Tensor], out: List[Tensor]) -> None:
        """PML's: mean d(a, p), mean d(a, n) and mean margin over every triplet the
        labels allow (before the margin test; NaN if there is none)."""
        pos, neg = lmu.pair_masks(labels, ref_labels)
        ap, an = triplet_means(self.distance(embeddings, ref_emb), pos, neg)
        self.pos_pair_dist = ap
        self.neg_pair_dist = an
        self.avg_triplet_margin = ap - an if self.distance.is_inverted else an - ap

    def noise_shape(self, n: int, m: int) -> List[int]:
        return [n, m, m] if self.random_cap else []

    def block_state(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                    ref_labels: Optional[Tensor],
                    anchor_ids: Optional[Tensor] = None) -> Tuple[List[Tensor], List[Tensor]]:
        mat = self.distance(embeddings, ref_emb)
        pos, neg = lmu.pair_masks(labels, ref_labels, anchor_ids)
        return [mat, pos, neg], []

    def block_kernel(self, rows: List[Tensor], shared: List[Tensor],
                     noise: Optional[Tensor]) -> List[Tensor]:
        mat, pos, neg = rows[0], rows[1], rows[2]
        if self.cap > 0:
            return capped_triplet_margin_miner(mat, pos, neg, self.margin, self.kind,
                                               self.distance.is_inverted, self.cap,
                                               noise if self.random_cap else None)
        return [triplet_margin_miner(mat, pos, neg, self.margin, self.kind,
                                     self.distance.is_inverted, self.nonnegative)]

    def positive_mask(self, rows: List[Tensor]) -> Optional[Tensor]:
        # the capped result picks among all of an anchor's triplets: dense blocks
        return None if self.cap > 0 else rows[1]

    def gathers_positives(self) -> bool:
        return self.cap == 0

    def gather_dtypes(self) -> List[torch.dtype]:
        # float16: ONNX Runtime's CPU EP computes the dense graph's float16 margins from
        # unrounded float32 distances, while the gathered d(a, p) (GatherElements has a
        # float16 kernel) is rounded: exact ties would flip. Not exported until both
        # sides round alike.
        return [torch.float32]

    def positive_block(self, rows: List[Tensor], shared: List[Tensor], cols: Tensor,
                       valid: Tensor, start: int, stop: int) -> Tensor:
        mat = rows[0][start:stop]
        return triplet_margin_candidates(torch.gather(mat, 1, cols), valid, mat,
                                         rows[2][start:stop], self.margin, self.kind,
                                         self.distance.is_inverted, self.nonnegative)

    def extra_repr(self) -> str:
        cap = "" if self.cap == 0 else f", max_triplets_per_anchor={self.cap}, cap_order={self.cap_order!r}"
        return f"margin={self.margin:g}, type_of_triplets={self.type_of_triplets!r}{cap}"
