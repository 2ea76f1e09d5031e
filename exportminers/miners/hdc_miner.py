"""HDCMiner (Hard-Aware Deeply Cascaded embedding): the hardest fraction of pairs."""
from typing import List, Optional, Tuple

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

    Each pool keeps its ``ceil(filter_percentage * size)`` hardest pairs: the positives
    with the largest distance (smallest similarity), the negatives with the smallest
    distance (largest similarity). A pair is kept if it is strictly harder than the
    pool's cut-off value, or equal to it and early enough in row-major order (NaN counts
    as the largest value, as in ``torch.topk``; -0.0 equals 0.0).

    No sort: eagerly (and in TorchScript) the cut-off is a ``torch.kthvalue`` of each
    pool; when exporting it is found by an exact radix select over each value's exponent
    and significand (:func:`_radix_select`), a few ``scatter_add`` histograms of all
    pairs, so the graph has no ``TopK`` and computes no shapes.

    Args:
        mat: Tensor[N, M] distances or similarities; pos, neg: Tensor[N, M] bool, disjoint.

    Returns:
        ``[pos_sel Tensor[N, M] bool, neg_sel Tensor[N, M] bool]``.
    """
    # "harder" is "smaller key": flip the order in the pool whose largest values win
    flip = neg if is_inverted else pos
    # float64 sums: exact, and ONNX Runtime sums floats much faster than int64
    counts = torch.stack([pos.to(torch.float64).sum(), neg.to(torch.float64).sum()])
    # as PML: ceil(f * size) in float64; f as a float64 tensor, or the exported graph
    # would hold float32(f) (290 * float32(0.3) = 87.0000035 -> 88, not 87): _ops.f64
    k = torch.ceil(counts * _ops.f64(filter_percentage, counts)).to(torch.int64)
    if _ops.is_exporting():
        return _radix_select(mat, pos, neg, flip, k)
    return _kth_select(mat, pos, neg, flip, k, is_inverted)


def _kth_select(mat: Tensor, pos: Tensor, neg: Tensor, flip: Tensor, k: Tensor,
                is_inverted: bool) -> List[Tensor]:
    """Eager/TorchScript variant of :func:`_radix_select`, the same selection: each pool's
    cut-off is a ``torch.kthvalue`` of its values. (With NaN, whose order comparisons
    cannot tell, it runs the radix select.)"""
    if bool(torch.isnan(mat).any()):
        return _radix_select(mat, pos, neg, flip, k)
    out: List[Tensor] = []
    for i, pool in enumerate([pos, neg]):
        kk = int(k[i])
        if kk == 0:
            out.append(torch.zeros_like(pool))
            continue
        values = torch.masked_select(mat, pool)
        largest = (i == 0) != is_inverted   # positives: the largest distances
        if largest:
            cut = torch.kthvalue(values, values.numel() - kk + 1).values
            better = pool & (mat > cut)
        else:
            cut = torch.kthvalue(values, kk).values
            better = pool & (mat < cut)
        ties = pool & (mat == cut)
        rank = torch.cumsum(ties.reshape(-1).to(torch.int64), 0).reshape(ties.shape)
        out.append(better | (ties & (rank <= kk - better.sum())))
    return out


def _radix_select(mat: Tensor, pos: Tensor, neg: Tensor, flip: Tensor,
                  k: Tensor) -> List[Tensor]:
    """Export variant of :func:`_kth_select`: an exact radix select of both cut-offs.

    The key of a value is ``(group, significand)``: the group holds the sign (with the
    pool's direction) and the exponent ``e = floor(log2 |x|)``, the significand is
    ``|x| * 2^(p - e)`` (p = 23 for float32 and float16 values, 52 for float64), an
    integer; reversed groups take ``2^(p+1)`` minus it. Digit by digit, a histogram
    (``scatter_add`` into 2 x 2^bits bins) of the pairs of each pool still equal to its
    cut-off in the digits so far tells the cut-off's digit (where the running count
    reaches the rank still wanted) and how many pairs lie below it.

    ONNX has no bitcast before opset 26, so ``e`` comes from ``log2`` in float64. For
    float32 values that is exact except possibly at exact powers of two, where it may be
    one too small; ``e`` stays non-decreasing in ``|x|``, so the groups stay ordered, and
    ``2^(e+1)`` lands at the top of group ``e`` with significand ``2^(p+1)``. Within the
    cut-off's group one scale (a power of two) serves every value, so the significand is
    computed for that group only. float64 values (``torch.export`` of the kernel; the
    ONNX export takes float32/float16) get ``e`` normalised per value.
    """
    f64 = mat.dtype == torch.float64
    p, emin, emax = (52, -1022, 1023) if f64 else (23, -126, 127)
    # digits, counts and masks in float32 where that is exact (float32/float16 values)
    wt = torch.float64 if f64 else torch.float32
    x = mat.to(torch.float64)
    if f64:
        a = x.abs()
        e = torch.floor(torch.log2(a)).clamp(emin, emax)
        m = a * torch.pow(2.0, -e)
        up = m >= 2.0
        e = torch.where(up, e + 1.0, e)
        m = torch.where(up, m * 0.5, m)
        down = (m < 1.0) & (e > emin)
        e = torch.where(down, e - 1.0, e)
        m = torch.where(down, m * 2.0, m)
        finite = a < float("inf")
        # inf, then NaN, above every finite exponent
        e = torch.where(finite, e, (x != x).to(torch.float64) + float(emax + 1))
        m = torch.where(finite, m, 1.0)
    else:
        # inf -> 2^(emax+2), NaN -> 2^(emax+3): finite float64 values above every float32
        x = torch.where(x != x, float(2.0 ** (emax + 3)),
                        x.clamp(-float(2.0 ** (emax + 2)), float(2.0 ** (emax + 2))))
        a = x.abs()
        m = a   # scaled per group below
        # 0 and subnormals: emin
        e = torch.floor(torch.log2(a)).clamp(emin, emax + 3).to(torch.float32)
    reverse = (x < 0) != flip
    h_off = float(emax + 3 - emin + 1)
    g = e - float(emin)
    group = torch.where(reverse, (h_off - 1.0) - g, h_off + g)
    group_bits = 13 if f64 else 10        # bits of 2 * h_off

    pos_f = pos.to(wt)
    other = 1.0 - pos_f                    # bins: positives first, then the rest
    want = k                               # Tensor[2] int64: rank of the cut-off still wanted
    match = pos | neg
    kept = match & False
    cut, want, kept, match = _radix_level(group, group_bits, match, kept, want, pos_f, other,
                                          _lane(a, e).to(wt))

    # the cut-off group's significands: one scale (and direction) per pool
    cut_rev = cut < h_off
    cut_e = torch.where(cut_rev, (h_off - 1.0) - cut, cut - h_off) + float(emin)
    one = float(1 << (p + 1))
    if f64:
        low = m * float(1 << p)
    else:
        scale = torch.pow(2.0, float(p) - cut_e.to(torch.float64))
        pos_d = pos.to(torch.float64)
        low = m * (pos_d * scale[0] + (1.0 - pos_d) * scale[1])   # exact: one term is 0
        low = low.clamp(0.0, one).to(torch.float32)                 # integers <= 2^24
    low = torch.where(_pick(cut_rev, pos_f), one - low, low).clamp(0.0, one)
    low_bits = p + 2
    n_chunks = (low_bits + 13) // 14
    width = (low_bits + n_chunks - 1) // n_chunks
    top = low_bits
    above: Optional[Tensor] = None        # floor(low / 2^top)
    while top > 0:
        shift = max(0, top - width)
        q = torch.floor(low * (1.0 / float(1 << shift))) if shift > 0 else low
        d = q if above is None else q - above * float(1 << (top - shift))
        _, want, kept, match = _radix_level(d, top - shift, match, kept, want, pos_f, other)
        above = q
        top = shift
    # `match`: equal to the cut-off; keep the first `want` of each pool in row-major order
    pos_ok = _row_major_cumsum((match & pos).to(torch.int64)) <= want[0]
    neg_ok = _row_major_cumsum((match & neg).to(torch.int64)) <= want[1]
    return [pos & (kept | (match & pos_ok)), neg & (kept | (match & neg_ok))]


def _lane(a: Tensor, e: Tensor) -> Tensor:
    """Float integers in [0, 64): the top 6 bits of each value's significand.

    The exponent level's histogram adds each pair into one of 64 counters of its bin
    (summed after the scatter, so the counts are the same): nearly every pair shares one
    exponent bin, and ONNX Runtime's CUDA scatter-add serialises on a contended bin
    (148 ms at N = 256 and 19.5 s at 1024 on an H100, where the later levels, whose bins
    spread the pairs, take 5 ms). The significand's leading bits spread any magnitude and
    float16 values alike. ``a``: |values| (float64), ``e``: their exponent groups; zeros,
    subnormals and NaN take lane 0, infinities lane 63."""
    frac = a * torch.pow(2.0, -e.to(torch.float64))          # [1, 2) for normal values
    frac = torch.where(frac == frac, frac, 1.0)              # NaN (inf * 0) -> lane 0
    return torch.floor((frac - 1.0) * 64.0).clamp(0.0, 63.0)


def _pick(per_pool: Tensor, pos_f: Tensor) -> Tensor:
    """Tensor[2] bool -> Tensor[N, M] bool: the positives' entry on positives, else the
    other's (no ``Where``: it has no bool kernel in ONNX Runtime's CPU provider)."""
    v = per_pool.to(pos_f.dtype)
    return (v[1] + pos_f * (v[0] - v[1])) > 0.5


def _radix_level(d: Tensor, bits: int, match: Tensor, kept: Tensor, want: Tensor,
                 pos_f: Tensor, other: Tensor, lane: Optional[Tensor] = None
                 ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One radix digit: ``d`` Tensor[N, M] float integers in [0, 2^bits). ``lane``
    (float integers in [0, 64), optional) spreads each bin's count over 64 counters.

    Returns the cut-off's digit per pool (Tensor[2], ``d``'s dtype), the rank still wanted
    among the pairs that also match it, and the updated ``kept`` / ``match`` masks.
    """
    size = 1 << bits
    bins = d + other * float(size)
    lanes = 1 if lane is None else 64
    if lane is not None:
        bins = bins * 64.0 + lane
    hist = torch.zeros(2 * size * lanes, dtype=torch.int64, device=d.device)
    hist = hist.scatter_add(0, bins.to(torch.int64).reshape(-1),
                            match.to(torch.int64).reshape(-1))
    if lanes > 1:
        hist = hist.reshape(2 * size, lanes).sum(1)
    cum = torch.cumsum(hist.reshape(2, size), 1)
    before = cum < want.unsqueeze(1)
    cut = before.to(d.dtype).sum(1)   # float sums: exact here, and fast in ONNX Runtime
    want = want - torch.where(before, cum, cum * 0).amax(1)
    here = cut[1] + pos_f * (cut[0] - cut[1])
    kept = kept | (match & (d < here))
    match = match & (d == here)
    return cut, want, kept, match


def _row_major_cumsum(x: Tensor) -> Tensor:
    """``x.reshape(-1).cumsum(0).reshape(x.shape)`` for Tensor[N, M] int64, without a
    reshape to a symbolic shape."""
    run = torch.cumsum(x, 1)
    rows = run[:, -1]
    return run + (torch.cumsum(rows, 0) - rows).unsqueeze(1)


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
        self.add_to_recordable_attributes(name="filter_percentage")
        self.layout = [[0, -1, -2], [1, -1, -2]]
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
        for i, x in enumerate(t):
            if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.is_floating_point() \
                    or x.is_complex() or x.dtype == torch.bool:
                raise ValueError(
                    f"external_indices_tuple[{i}] must be a 1-D integer tensor of indices, got "
                    + (f"shape {list(x.shape)} dtype {x.dtype}" if isinstance(x, torch.Tensor)
                       else type(x).__name__))
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
