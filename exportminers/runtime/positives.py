"""Each anchor's positive reference columns, listed for ``gather_positives`` graphs (numpy only).

A graph exported with ``export_onnx(..., gather_positives=True)`` tests each anchor's
positives against every negative ([N, P, M] candidates, P = the most positives of any
anchor) instead of every reference column against every other ([N, M, M]). P depends on
the labels, so the graph cannot find it; the caller lists the positives in the
``positive_index`` input and the graph checks the list (its ``unmatched_positives``
output). :class:`exportminers.OnnxMiner` calls :func:`positive_index` itself; raw
ONNX Runtime users call it the same way.

Example:
    >>> positive_index(np.array([0, 1, 0, 0]))          # self-mining
    array([[ 2,  3],
           [-1, -1],
           [ 0,  3],
           [ 0,  2]])
"""
from typing import Optional

import numpy as np


def positive_index(labels, ref_labels=None, anchor_index=None) -> np.ndarray:
    """The ``positive_index`` input of a ``gather_positives`` graph.

    Args:
        labels: [N] integer labels of the anchors (self-mining: of the batch).
        ref_labels: [M] labels of the reference set (``with_ref=True`` graphs), or None:
            self-mining, each anchor's own row is no positive.
        anchor_index: with ``ref_labels=None``, an ``anchor_blocks=True`` graph's
            ``anchor_index``: the anchors are ``labels[anchor_index]`` and each one's own
            row ``anchor_index[i]`` is no positive.

    Returns:
        int64 [N, P], P >= 1: row ``i`` lists, in increasing order, the reference columns
        with anchor ``i``'s label (its own row excluded when self-mining), then -1. P is
        the most positives of any anchor (1 when no anchor has one, a column of -1).
    """
    lab = np.asarray(labels).reshape(-1).astype(np.int64, copy=False)
    if ref_labels is not None and anchor_index is not None:
        raise ValueError("anchor_index: a self-mining (anchor_blocks) argument; with "
                         "ref_labels there is no own row to exclude")
    if anchor_index is not None:
        own: Optional[np.ndarray] = np.asarray(anchor_index).reshape(-1).astype(np.int64,
                                                                                 copy=False)
        if own.size and (own.min() < 0 or own.max() >= lab.shape[0]):
            raise ValueError(f"anchor_index must hold rows of labels (0 to "
                             f"{lab.shape[0] - 1}), got values from {own.min()} to {own.max()}")
        refs, anchors = lab, lab[own]
    elif ref_labels is None:
        refs, anchors, own = lab, lab, np.arange(lab.shape[0], dtype=np.int64)
    else:
        refs = np.asarray(ref_labels).reshape(-1).astype(np.int64, copy=False)
        anchors, own = lab, None
    n, m = anchors.shape[0], refs.shape[0]
    if n == 0 or m == 0:
        return np.full((n, 1), -1, dtype=np.int64)
    # reference columns grouped by label, in column order within a group (stable sort)
    order = np.argsort(refs, kind="stable")
    uniq, start, count = np.unique(refs[order], return_index=True, return_counts=True)
    g = np.minimum(np.searchsorted(uniq, anchors), uniq.shape[0] - 1)
    found = uniq[g] == anchors
    cnt = np.where(found, count[g], 0)
    width = int(cnt.max())
    if width == 0:
        return np.full((n, 1), -1, dtype=np.int64)
    slot = np.arange(width, dtype=np.int64)
    listed = slot[None, :] < cnt[:, None]
    cols = order[np.minimum(start[g][:, None] + slot[None, :], m - 1)]
    cols = np.where(listed, cols, -1)
    if own is not None:
        if width == 1:   # the anchors' own rows only
            return np.full((n, 1), -1, dtype=np.int64)
        # every anchor's own row is in its group exactly once: drop it, keeping the order
        cols = cols[cols != own[:, None]].reshape(n, width - 1)
    return np.ascontiguousarray(cols)
