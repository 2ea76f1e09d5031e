"""Index helpers with PML's signatures, and their fixed-shape mask equivalents.

The index helpers (``get_all_pairs_indices`` ...) return data-dependent index tensors
exactly like PML's, so custom miners written against PML run unchanged. As in PML, a
call with ``ref_labels`` omitted (or the very same tensor object as ``labels``) treats
the reference set as the batch itself and excludes self-pairs.

The mask helpers (``pair_masks``, ``triplet_mask``) are what the built-in kernels use:
fixed shapes, scriptable, exportable.
"""
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _ops

# --------------------------------------------------------------------------- masks


def pair_masks(labels: Tensor, ref_labels: Optional[Tensor] = None,
               anchor_ids: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Positive and negative pair masks.

    Args:
        labels: Tensor[N] (anchors).
        ref_labels: Tensor[M], or None for self-mining (then M = N and the diagonal is
            excluded from the positives).
        anchor_ids: Tensor[N] int64 with ``ref_labels``: anchor ``i`` is reference row
            ``anchor_ids[i]`` (a block of a batch mined against the whole batch), so the
            pair ``(i, anchor_ids[i])`` is excluded from the positives; rows that are not
            in the reference set hold -1.

    Returns:
        (pos Tensor[N, M] bool, neg Tensor[N, M] bool)
    """
    if ref_labels is None:
        same = labels.unsqueeze(1) == labels.unsqueeze(0)
        pos = same & ~_ops.diagonal_mask(labels, labels)
    else:
        same = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        pos = same
        if anchor_ids is not None:
            cols = _ops.index_like(ref_labels, 0)
            pos = pos & (anchor_ids.unsqueeze(1) != cols.unsqueeze(0))
    return pos, ~same


def triplet_mask(pos: Tensor, neg: Tensor) -> Tensor:
    """All valid triplets: Tensor[N, M] x Tensor[N, M] -> Tensor[N, M(p), M(n)] bool."""
    return pos.unsqueeze(2) & neg.unsqueeze(1)


def positive_columns(pos: Tensor):
    """Each anchor's positive columns, in column order, padded to the largest count.

    Eager/TorchScript helper for miners that test every (anchor, positive, negative): it
    lets them work on [N, P, M] candidates (P = the most positives of any anchor) instead
    of [N, M, M]. Not for exported kernels (P depends on the data).

    Args:
        pos: Tensor[N, M] bool.

    Returns:
        (cols Tensor[N, P] int64 (padding slots hold 0), valid Tensor[N, P] bool); P may
        be 0.
    """
    n, m = pos.size(0), pos.size(1)
    count = pos.sum(dim=1)
    p = int(count.max()) if n > 0 else 0
    # the r-th positive of a row goes to slot r; non-positives to a spare slot p
    rank = torch.cumsum(pos.to(torch.int64), dim=1) - 1
    slot = torch.where(pos, rank, torch.full_like(rank, p))
    col = torch.arange(m, device=pos.device).unsqueeze(0).expand(n, m)
    cols = torch.zeros((n, p + 1), dtype=torch.int64, device=pos.device)
    cols = cols.scatter(1, slot, col)[:, :p]
    valid = torch.arange(p, device=pos.device).unsqueeze(0) < count.unsqueeze(1)
    return cols, valid


def listed_positives(pos: Tensor, positive_index: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Read a given list of each anchor's positive columns against the positive mask.

    Fixed-shape and exportable: the kernel of graphs exported with
    ``gather_positives=True``, whose caller lists the positives
    (:func:`exportminers.runtime.positives.positive_index` computes the list).

    Args:
        pos: Tensor[N, M] bool, the positive pairs.
        positive_index: Tensor[N, P] int64, each anchor's positive columns in increasing
            order, then -1 padding.

    Returns:
        ``(cols Tensor[N, P] int64 (in [0, M)), valid Tensor[N, P] bool, unmatched
        Tensor[N] int64)``. Each row is read up to its first slot that does not exceed
        the one before (padding, a repeat, a step back); a slot read is valid when its
        column is in range and a positive of the anchor. ``unmatched`` counts the
        anchor's positives without a valid slot: zero everywhere means the valid slots
        are every positive exactly once; anything else is a wrong list (its triplets
        would be missing), which callers must check.
    """
    # one row per anchor: a [1, P] list would broadcast and be checked against every
    # anchor's positives at once
    idx = positive_index + _ops.zeros_int_like(pos[:, :1])
    m_t = _ops.ones_int_like(pos[0]).sum()
    in_range = (idx >= 0) & (idx < m_t)
    cols = torch.where(in_range, idx, _ops.zeros_int_like(idx))
    # the list is read while it increases strictly (from -1 before the first slot): the
    # first padding, repeat or step back ends it, so read columns are distinct
    first = idx[:, :1] * 0
    prev = torch.cat([first - 1, idx[:, :-1]], dim=1)   # Concat: CUDA's Pad has no int64
    ended = torch.cumsum((idx <= prev).to(torch.int64), dim=1) > 0
    valid = in_range & ~ended & torch.gather(pos, 1, cols)
    unmatched = pos.to(torch.int64).sum(1) - valid.to(torch.int64).sum(1)
    return cols, valid, unmatched


# ------------------------------------------------------------- PML index helpers


def get_matches_and_diffs(labels: Tensor, ref_labels: Optional[Tensor] = None):
    """uint8 match / non-match matrices (PML's layout); self-pairs are not matches."""
    is_self = ref_labels is None or ref_labels is labels
    if ref_labels is None:
        ref_labels = labels
    matches = (labels.unsqueeze(1) == ref_labels.unsqueeze(0)).byte()
    diffs = matches ^ 1
    if is_self:
        matches.fill_diagonal_(0)
    return matches, diffs


def get_all_pairs_indices(labels: Tensor, ref_labels: Optional[Tensor] = None):
    """(a1, p, a2, n): every positive pair and every negative pair, row-major."""
    matches, diffs = get_matches_and_diffs(labels, ref_labels)
    a1, p = torch.where(matches)
    a2, n = torch.where(diffs)
    return a1, p, a2, n


def get_all_triplets_indices(labels: Tensor, ref_labels: Optional[Tensor] = None):
    """(a, p, n): every valid triplet, row-major; works past torch.nonzero's int32 limit."""
    matches, diffs = get_matches_and_diffs(labels, ref_labels)
    pieces_a: List[Tensor] = []
    pieces_p: List[Tensor] = []
    pieces_n: List[Tensor] = []
    n_rows, m = matches.shape
    per = max(1, (1 << 30) // max(1, m * m))
    for s in range(0, n_rows, per):
        block = matches[s:s + per].bool().unsqueeze(2) & diffs[s:s + per].bool().unsqueeze(1)
        a, p, n = torch.where(block)
        pieces_a.append(a + s)
        pieces_p.append(p)
        pieces_n.append(n)
    if not pieces_a:
        empty = torch.empty(0, dtype=torch.long, device=labels.device)
        return empty, empty.clone(), empty.clone()
    return torch.cat(pieces_a), torch.cat(pieces_p), torch.cat(pieces_n)


def get_all_triplets_indices_vectorized_method(all_matches: Tensor, all_diffs: Tensor):
    """(a, p, n) of ``all_matches[a, p] * all_diffs[a, n]`` in one pass (PML's name; the
    whole N x M x M product exists at once)."""
    return torch.where(all_matches.unsqueeze(2) * all_diffs.unsqueeze(1))


def get_all_triplets_indices_loop_method(labels: Tensor, all_matches: Tensor,
                                         all_diffs: Tensor):
    """The same triplets as :func:`get_all_triplets_indices_vectorized_method`, one anchor
    row at a time (PML's name and dtypes: anchors in ``labels``' dtype)."""
    matches, diffs = all_matches.bool(), all_diffs.bool()
    rows = torch.where(matches.any(dim=1) & diffs.any(dim=1))[0]
    if len(rows) == 0:
        empty = torch.empty(0, dtype=labels.dtype, device=labels.device)
        return empty, empty.clone(), empty.clone()
    a: List[Tensor] = []
    p: List[Tensor] = []
    n: List[Tensor] = []
    for i in rows.tolist():
        pos = torch.where(matches[i])[0]
        neg = torch.where(diffs[i])[0]
        a.append(torch.full((len(pos) * len(neg),), i, dtype=labels.dtype,
                            device=labels.device))
        p.append(pos.repeat_interleave(len(neg)))
        n.append(neg.repeat(len(pos)))
    return torch.cat(a), torch.cat(p), torch.cat(n)


def convert_to_pos_pairs_with_unique_labels(indices_tuple, labels: Tensor):
    """One positive pair per anchor label: of the pairs ``convert_to_pairs`` gives, the
    first whose anchor has each label, in label order (PML's rule)."""
    a, p, _, _ = convert_to_pairs(indices_tuple, labels)
    if len(a) == 0:
        return a, p
    values = labels[a]
    uniq, inverse = torch.unique(values, sorted=True, return_inverse=True)
    order = torch.arange(len(values), device=values.device)
    first = torch.full((len(uniq),), len(values), dtype=torch.long, device=values.device)
    first = first.scatter_reduce(0, inverse, order, reduce="amin")
    return a[first], p[first]


def not_self_comparisons(a: Tensor, p: Tensor, s: int, e: int, curr_batch_idx: Tensor,
                         ref_size: int, ref_is_subset: bool = False) -> Tensor:
    """Keep-mask of pairs ``(a, p)`` that do not compare a batch row with its own copy in
    a reference memory (PML's cross-batch-memory helper): ``curr_batch_idx`` are the
    memory rows ``s .. e`` holding the current batch (``e <= s``: wrapped around a memory
    of ``ref_size`` rows); ``ref_is_subset`` swaps the roles of ``a`` and ``p``."""
    if ref_is_subset:
        a, p = p, a
    in_batch = (p.unsqueeze(1) == curr_batch_idx).any(dim=1)
    a_c = a[in_batch]
    p_c = p[in_batch] - s
    if e <= s:
        p_c[p_c <= e - s] += ref_size
    keep = in_batch.clone()
    keep[torch.where(in_batch)[0][a_c == p_c]] = False
    return keep | ~in_batch


def remove_self_comparisons(indices_tuple, curr_batch_idx: Tensor, ref_size: int,
                            ref_is_subset: bool = False):
    """``indices_tuple`` without its self-comparisons (see :func:`not_self_comparisons`):
    triplets lose them whole, pairs only from the positive pairs (PML's rule)."""
    if len(indices_tuple) not in (3, 4):
        raise ValueError(f"indices_tuple must hold 3 (triplets) or 4 (pairs) tensors, got "
                         f"{len(indices_tuple)}")
    s, e = curr_batch_idx[0], curr_batch_idx[-1]
    keep = not_self_comparisons(indices_tuple[0], indices_tuple[1], s, e, curr_batch_idx,
                                ref_size, ref_is_subset)
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        return a[keep], p[keep], n[keep]
    a1, p, a2, n = indices_tuple
    return a1[keep], p[keep], a2, n


def convert_to_pairs(indices_tuple, labels: Tensor, ref_labels: Optional[Tensor] = None):
    """Any indices tuple (None, triplets, pairs) -> (a1, p, a2, n)."""
    if indices_tuple is None:
        return get_all_pairs_indices(labels, ref_labels)
    if len(indices_tuple) == 4:
        return tuple(indices_tuple)
    if len(indices_tuple) == 3:
        a, p, n = indices_tuple
        return a, p, a, n
    raise ValueError(
        f"indices_tuple must hold 3 (triplets) or 4 (pairs) tensors, got {len(indices_tuple)}"
    )


def pos_pairs_from_tuple(indices_tuple):
    return indices_tuple[:2]


def neg_pairs_from_tuple(indices_tuple):
    return indices_tuple[2:]


def get_anchors(indices_tuple) -> Tensor:
    if len(indices_tuple) == 3:
        return indices_tuple[0]
    return torch.cat([indices_tuple[0], indices_tuple[2]], dim=0)


def repeat_to_match_size(smaller_set: Tensor, larger_size: int, smaller_size: int) -> Tensor:
    reps = math.ceil(float(larger_size) / float(smaller_size))
    return smaller_set.repeat(reps)[:larger_size]


def matched_size_indices(curr_p_idx: Tensor, curr_n_idx: Tensor):
    n_pos, n_neg = len(curr_p_idx), len(curr_n_idx)
    if n_pos > n_neg:
        return curr_p_idx, repeat_to_match_size(curr_n_idx, n_pos, n_neg)
    return repeat_to_match_size(curr_p_idx, n_neg, n_pos), curr_n_idx


def get_random_triplet_indices(labels: Tensor, ref_labels: Optional[Tensor] = None,
                               t_per_anchor=None, weights: Optional[Tensor] = None):
    """Random triplets, ``t_per_anchor`` per anchor (default: the class size).

    Positives are uniform among the anchor's other same-label references; negatives are
    uniform, or drawn with probability proportional to ``weights[anchor, :]`` (rows whose
    weights over the negatives sum to zero are dropped).
    """
    is_self = ref_labels is None or ref_labels is labels
    ref = labels if ref_labels is None else ref_labels
    device = labels.device
    out_a: List[Tensor] = []
    out_p: List[Tensor] = []
    out_n: List[Tensor] = []
    for label in torch.unique(labels):
        p_inds = torch.where(ref == label)[0]
        a_inds = p_inds if is_self else torch.where(labels == label)[0]
        n_inds = torch.where(ref != label)[0]
        n_a, n_p = len(a_inds), len(p_inds)
        if n_p < (2 if is_self else 1) or len(n_inds) < 1:
            continue
        k = n_p if t_per_anchor is None else int(t_per_anchor)
        anchor_slot = torch.arange(n_a, device=device).repeat_interleave(k)
        if is_self:
            # choose among the n_a - 1 others: draw from [0, n_a - 1) and skip the anchor
            j = torch.randint(0, n_a - 1, (n_a * k,), device=device)
            j = j + (j >= anchor_slot).long()
        else:
            j = torch.randint(0, n_p, (n_a * k,), device=device)
        a = a_inds[anchor_slot]
        p = p_inds[j]
        if weights is not None:
            w = weights[a][:, n_inds]
            if w.dtype in (torch.float16, torch.bfloat16):
                w = w.float()
            keep = torch.where(torch.sum(w, dim=1) > 0)[0]
            if len(keep) == 0:
                continue
            a, p, w = a[keep], p[keep], w[keep]
            n = n_inds[torch.multinomial(w, 1, replacement=True).flatten()]
        else:
            n = n_inds[torch.randint(0, len(n_inds), (len(a),), device=device)]
        out_a.append(a)
        out_p.append(p)
        out_n.append(n)
    if not out_a:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty.clone(), empty.clone()
    return torch.cat(out_a).long(), torch.cat(out_p).long(), torch.cat(out_n).long()


def convert_to_triplets(indices_tuple, labels: Tensor, ref_labels: Optional[Tensor] = None,
                        t_per_anchor=100):
    """Any indices tuple (None, triplets, pairs) -> (a, p, n).

    Pairs become every (a, p, n) whose positive and negative pairs share the anchor.
    """
    if indices_tuple is None:
        if t_per_anchor == "all":
            return get_all_triplets_indices(labels, ref_labels)
        return get_random_triplet_indices(labels, ref_labels, t_per_anchor=t_per_anchor)
    if len(indices_tuple) == 3:
        return tuple(indices_tuple)
    if len(indices_tuple) != 4:
        raise ValueError(
            f"indices_tuple must hold 3 (triplets) or 4 (pairs) tensors, got {len(indices_tuple)}"
        )
    a1, p, a2, n = indices_tuple
    pi, ni = torch.where(a1.unsqueeze(1) == a2)
    return a1[pi], p[pi], n[ni]


def convert_to_weights(indices_tuple, labels: Tensor, dtype, using_ref: bool = False) -> Tensor:
    """Per-sample weights: how often each index appears, divided by the largest count."""
    weights = torch.zeros(labels.shape[0], device=labels.device, dtype=dtype)
    if indices_tuple is None or all(len(x) == 0 for x in indices_tuple):
        return weights + 1
    idx = get_anchors(indices_tuple) if using_ref else torch.cat(list(indices_tuple), dim=0)
    idx, counts = torch.unique(idx, return_counts=True)
    weights[idx] = counts.to(dtype) / torch.max(counts)
    return weights


def logsumexp(x: Tensor, keep_mask: Optional[Tensor] = None, add_one: bool = True, dim: int = 1):
    """Masked, optionally "+1" log-sum-exp over ``dim`` of a 2-D tensor (keepdim)."""
    if keep_mask is not None:
        x = x.masked_fill(~keep_mask, torch.finfo(x.dtype).min)
    if add_one:
        zeros = torch.zeros(x.size(dim - 1), dtype=x.dtype, device=x.device).unsqueeze(dim)
        x = torch.cat([x, zeros], dim=dim)
    out = torch.logsumexp(x, dim=dim, keepdim=True)
    if keep_mask is not None:
        out = out.masked_fill(~torch.any(keep_mask, dim=dim, keepdim=True), 0)
    return out


def meshgrid_from_sizes(x: Tensor, y: Tensor, dim: int = 0):
    a = torch.arange(x.size(dim), device=x.device)
    b = torch.arange(y.size(dim), device=y.device)
    return torch.meshgrid(a, b, indexing="ij")


__all__ = [
    "pair_masks", "triplet_mask", "positive_columns",
    "get_matches_and_diffs", "get_all_pairs_indices", "get_all_triplets_indices",
    "convert_to_pairs", "convert_to_triplets", "get_random_triplet_indices",
    "pos_pairs_from_tuple", "neg_pairs_from_tuple", "get_anchors", "repeat_to_match_size",
    "matched_size_indices", "convert_to_weights", "logsumexp", "meshgrid_from_sizes",
]
