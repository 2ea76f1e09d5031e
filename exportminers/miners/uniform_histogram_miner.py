"""UniformHistogramMiner: pairs sampled uniformly across a histogram of their distances."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _ops
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_positive_int
from .base_miner import PairKernelMiner


def histogram_edges(low: Tensor, high: Tensor, num_bins: int) -> Tensor:
    """``torch.linspace(low, high, num_bins + 1)`` for 0-dim tensor ends, as PML's bins.

    Eager and TorchScript call ``torch.linspace`` itself: its CPU kernel rounds by vector
    lanes (the edges depend on the machine's vector width) and its CUDA kernel fuses a
    multiply-add, so no formula reproduces it everywhere, and a value on an edge must fall
    in PML's bin. An exported graph (ONNX has no linspace) uses the scalar formula
    ``low + step * i`` below the middle, ``high - step * (steps - 1 - i)`` above, within an
    ulp or so of torch's edges."""
    steps = num_bins + 1
    if not _ops.is_exporting():
        return torch.linspace(low, high, steps, dtype=low.dtype, device=low.device)
    i = torch.arange(steps, device=low.device).to(low.dtype)
    step = (high - low) / float(max(1, steps - 1))
    half = steps // 2
    return torch.where(i < half, low + step * i, high - step * (float(steps - 1) - i))


def bin_index(values: Tensor, edges: Tensor, low: Tensor, high: Tensor, num_bins: int) -> Tensor:
    """Bin of each value: the number of interior edges ``<= value``.

    The bins have equal width, so the bin is computed arithmetically and then corrected
    by one against the exact edges (rounding can put a value next to an edge on the
    wrong side); no search or sort. All values in one point (``low == high``) fall in
    the last bin, as with the edge count.

    Args:
        values: Tensor[L] in [low, high] (others give some bin, masked by the caller).
        edges: Tensor[num_bins + 1] from :func:`histogram_edges`.
    """
    step = (high - low) / float(num_bins)
    safe_step = torch.where(step > 0, step, torch.ones_like(step))  # step 0: see below
    guess = torch.floor((values - low) / safe_step)
    # inf values (overflowed distances) and inf pool ends give NaN: the last bin, never an
    # out-of-range index
    guess = torch.where(guess != guess, float(num_bins - 1), guess)
    b = guess.clamp(0, num_bins - 1).to(torch.int64)
    b = b + (values >= edges[b + 1]).to(torch.int64) - (values < edges[b]).to(torch.int64)
    b = b.clamp(0, num_bins - 1)
    return torch.where(step > 0, b, num_bins - 1)


def pool_ends(values: Tensor, pool: Tensor) -> Tuple[Tensor, Tensor]:
    """Smallest and largest of ``values`` where ``pool`` holds (+inf / -inf if none)."""
    low = values.masked_fill(~pool, float("inf")).min()
    high = values.masked_fill(~pool, float("-inf")).max()
    return low, high


def _keys(values: Tensor, pos: Tensor, neg: Tensor, ends: List[Tensor],
          num_bins: int) -> Tensor:
    """:func:`pair_keys` of a block; ``ends``: low, high, edges of each pool."""
    bin_p = bin_index(values, ends[2], ends[0], ends[1], num_bins)
    bin_n = bin_index(values, ends[5], ends[3], ends[4], num_bins) + num_bins
    return torch.where(pos, bin_p, torch.where(neg, bin_n, 2 * num_bins))


def pair_keys(mat: Tensor, pos: Tensor, neg: Tensor, num_bins: int,
              block_elements: int = 262144) -> Tensor:
    """Bin key of every pair: its bin among the positive pairs, ``num_bins`` + its bin
    among the negative pairs, or ``2 * num_bins`` (neither). Each pool's bins span its
    [min, max] in ``num_bins`` equal steps, closed on the left, open on the right except
    the last (PML's rule). Tensor[N, M] int64.

    Eager and TorchScript compute the keys in row blocks of about ``block_elements``:
    the dozen temporaries of a block stay in cache, where a dozen passes over N x M
    buffers would not (3-4x faster at N = 4096). An exported graph computes them whole.
    """
    low_p, high_p = pool_ends(mat, pos)
    low_n, high_n = pool_ends(mat, neg)
    ends = [low_p, high_p, histogram_edges(low_p, high_p, num_bins),
            low_n, high_n, histogram_edges(low_n, high_n, num_bins)]
    if _ops.is_exporting():
        return _keys(mat, pos, neg, ends, num_bins)
    out = torch.empty(mat.shape, dtype=torch.int64, device=mat.device)
    rows = max(1, block_elements // max(1, mat.size(1)))
    for s in range(0, mat.size(0), rows):
        out[s:s + rows] = _keys(mat[s:s + rows], pos[s:s + rows], neg[s:s + rows],
                                ends, num_bins)
    return out


def _columns(key: Tensor, row: Tensor, rank: Tensor, bins: Tensor) -> Tensor:
    """Column of member number ``rank`` of bin ``bins[j]`` in row ``row[j, k]`` of
    ``key``: the count of columns where fewer than ``rank + 1`` members lie at or
    before. Tensor[B, K]."""
    hits = (key[row] == bins.reshape(-1, 1, 1)).to(torch.int32)   # [B, K, M]
    before = torch.cumsum(hits, 2) <= rank.unsqueeze(2).to(torch.int32)
    return before.to(torch.int64).sum(2)


def _sample_bins(key: Tensor, counts: Tensor, first_bin: int, u: Tensor,
                 block_elements: int = 4194304) -> List[Tensor]:
    """``K`` uniform draws (with replacement) from the members of each of ``B`` bins.

    Draw ``u`` of a bin with ``c`` members picks its member number ``floor(u * c)`` in
    row-major order: the row comes from the running per-row counts (a binary search
    over N rows; a count over them in an exported graph), the column from a running
    count along that one row. Nothing is sorted; the column search holds ``B * K * M``
    elements in an exported graph, and chunks of about ``block_elements`` in eager and
    TorchScript.

    Args:
        key: Tensor[N, M] from :func:`pair_keys`.
        counts: Tensor[N, B] members of bins ``first_bin ..`` in each row.
        u: Tensor[B, K] float64 uniform [0, 1).

    Returns:
        ``[valid [B, K] bool, row [B, K], column [B, K]]``.
    """
    per_row = counts.transpose(0, 1)                     # [B, N]
    ends = torch.cumsum(per_row, 1)                      # members in rows 0..i
    total = ends[:, -1:]                                 # [B, 1]
    r = torch.floor(u * total.to(torch.float64)).to(torch.int64)
    r = torch.minimum(r, (total - 1).clamp(min=0))       # [B, K]
    last_row = _ops.ones_int_like(per_row[0]).sum() - 1  # N - 1, from data (no Shape)
    if _ops.is_exporting():   # a count over [B, K, N]: no sort, so no shape nodes
        row = (ends.unsqueeze(1) <= r.unsqueeze(2)).to(torch.int64).sum(2)
    else:
        row = torch.searchsorted(ends, r, right=True)
    row = torch.minimum(row, last_row)
    rank = r - (torch.gather(ends, 1, row) - torch.gather(per_row, 1, row))
    bins = _ops.index_like(u, 0) + first_bin             # [B]
    if _ops.is_exporting():
        col = _columns(key, row, rank, bins)
    else:   # bins in chunks of about 2^22 candidate elements
        col = torch.empty_like(row)
        per = max(1, block_elements // max(1, row.size(1) * key.size(1)))
        for s in range(0, row.size(0), per):
            col[s:s + per] = _columns(key, row[s:s + per], rank[s:s + per], bins[s:s + per])
    last_col = _ops.ones_int_like(key[0]).sum() - 1      # M - 1
    return [(total > 0) & (row >= 0), row, torch.minimum(col, last_col)]   # valid: [B, K]


def uniform_histogram_miner(mat: Tensor, pos: Tensor, neg: Tensor, num_bins: int,
                            noise_pos: Tensor, noise_neg: Tensor) -> List[Tensor]:
    """Fixed-shape UniformHistogramMiner kernel.

    Every pair gets a bin key (:func:`pair_keys`); one scatter counts each row's members
    of every bin; ``K`` members are then drawn uniformly with replacement from each
    non-empty bin (:func:`_sample_bins`), a draw ``u`` picking member ``floor(u * count)``
    in row-major order. No sort is involved, so the result cannot depend on how a sort
    orders ties (ONNX Runtime's CUDA TopK does not order them by index).

    Args:
        mat: Tensor[N, M]; pos, neg: Tensor[N, M] bool.
        noise_pos: Tensor[num_bins, pos_per_bin]; noise_neg: Tensor[num_bins, neg_per_bin]
            uniform [0, 1).

    Returns:
        ``[valid, a1, p]`` (each Tensor[num_bins, pos_per_bin]) then ``[valid, a2, n]``
        (each Tensor[num_bins, neg_per_bin]).
    """
    key = pair_keys(mat, pos, neg, num_bins)
    zeros = torch.zeros(2 * num_bins + 1, dtype=torch.int64, device=mat.device)
    counts = _ops.zeros_int_like(key[:, 0]).unsqueeze(1) + zeros   # [N, 2B + 1], no Shape
    counts = counts.scatter_add(1, key, _ops.ones_int_like(key))
    return _sample_bins(key, counts[:, :num_bins], 0, noise_pos) + \
        _sample_bins(key, counts[:, num_bins:2 * num_bins], num_bins, noise_neg)


class UniformHistogramMiner(PairKernelMiner):
    """Bins the positive (and negative) pair distances into ``num_bins`` equal-width bins
    and samples ``pos_per_bin`` (``neg_per_bin``) pairs from each non-empty bin.

    Kernel: :func:`uniform_histogram_miner`; noise of shape
    ``[2, num_bins, max(pos_per_bin, neg_per_bin)]``.
    """

    num_bins: int
    pos_per_bin: int
    neg_per_bin: int

    def __init__(self, num_bins: int = 100, pos_per_bin: int = 10, neg_per_bin: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.num_bins = check_positive_int(num_bins, "num_bins")
        self.pos_per_bin = check_positive_int(pos_per_bin, "pos_per_bin")
        self.neg_per_bin = check_positive_int(neg_per_bin, "neg_per_bin")
        self.add_to_recordable_attributes(list_of_names=["pos_per_bin", "neg_per_bin"])
        self.layout = [[0, 1, 2], [3, 4, 5]]

    def noise_shape(self, n: int, m: int) -> List[int]:
        return [2, self.num_bins, max(self.pos_per_bin, self.neg_per_bin)]

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor]) -> List[Tensor]:
        if noise is None:
            raise ValueError("UniformHistogramMiner.kernel needs noise of shape [2, num_bins, K]")
        mat = self.distance(embeddings, ref_emb)
        if _ops.is_exporting() and mat.dtype == torch.float16:
            # a float16 graph bins in float32 (exact values, float32 edges): ONNX Runtime's
            # CPU EP runs chains of float16 ops in float32 without rounding between them,
            # so float16 edges and bin tests would come out otherwise than torch's
            mat = mat.float()
        pos, neg = lmu.pair_masks(labels, ref_labels)
        return uniform_histogram_miner(mat, pos, neg, self.num_bins,
                                       noise[0, :, :self.pos_per_bin],
                                       noise[1, :, :self.neg_per_bin])

    def extra_repr(self) -> str:
        return (f"num_bins={self.num_bins}, pos_per_bin={self.pos_per_bin}, "
                f"neg_per_bin={self.neg_per_bin}")
