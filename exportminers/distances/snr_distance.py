"""Signal-to-noise-ratio distance."""
from typing import List

import torch
from torch import Tensor

from .. import _ops
from .base_distance import BaseDistance


def snr_distance_matrix(query_emb: Tensor, ref_emb: Tensor) -> Tensor:
    """var(q_i - r_j) / var(q_i) for every pair; Tensor[N, D] x Tensor[M, D] -> Tensor[N, M].

    The N x M x D difference tensor is built in row blocks so memory stays
    O(block x M x D) in eager mode.
    """
    anchor_var = torch.var(query_emb, dim=1)
    n, m, d = query_emb.size(0), ref_emb.size(0), query_emb.size(1)
    if _ops.is_exporting() or n == 0:
        pair_var = torch.var(query_emb.unsqueeze(1) - ref_emb, dim=2)
    else:
        per = max(1, (1 << 24) // max(1, m * d))
        blocks: List[Tensor] = []
        for s in range(0, n, per):
            blocks.append(torch.var(query_emb[s:s + per].unsqueeze(1) - ref_emb, dim=2))
        pair_var = torch.cat(blocks, dim=0)
    return pair_var / anchor_var.unsqueeze(1)


class SNRDistance(BaseDistance):
    """SNR distance (not inverted)."""

    def __init__(self, **kwargs):
        if kwargs.pop("is_inverted", False):
            raise ValueError("SNRDistance is a distance: is_inverted must be False")
        super().__init__(is_inverted=False, **kwargs)

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor, is_self: bool) -> Tensor:
        return snr_distance_matrix(query_emb, ref_emb)

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return torch.var(query_emb - ref_emb, dim=1) / torch.var(query_emb, dim=1)
