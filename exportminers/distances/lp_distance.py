"""L_p distance matrix."""
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ops
from .base_distance import BaseDistance


def lp_distance_matrix(query_emb: Tensor, ref_emb: Tensor, p: float, is_self: bool) -> Tensor:
    """L_p distances between every query and every reference row.

    Args:
        query_emb: Tensor[N, D].
        ref_emb: Tensor[M, D].
        p: the norm's order.
        is_self: ``ref_emb`` is ``query_emb``; the diagonal is then exactly zero.

    Returns:
        Tensor[N, M] in the inputs' dtype.

    Eager and TorchScript do what PML does, so values match it bit for bit:
    ``torch.cdist``, and for float16 (where PML avoids ``cdist``)
    ``F.pairwise_distance`` of every pair, eps included, in row blocks
    (:func:`pairwise_matrix`). The exported graph (and bfloat16) computes in float32
    and rounds once at the end, so the expansion ``|x|^2 + |y|^2 - 2 x.y`` never
    cancels in half precision; it computes that expansion as ``cdist``'s matmul path
    does, explicitly.
    """
    dtype = query_emb.dtype
    if dtype == torch.float16 and not _ops.is_exporting():
        return pairwise_matrix(query_emb, ref_emb, p)
    half = dtype == torch.float16 or dtype == torch.bfloat16
    q = query_emb.float() if half else query_emb
    r = ref_emb.float() if half else ref_emb
    if _ops.is_exporting():
        if p == 2.0:
            qn = (q * q).sum(dim=1, keepdim=True)
            rn = (r * r).sum(dim=1, keepdim=True)
            sq = (q * -2.0) @ r.transpose(0, 1) + qn + rn.transpose(0, 1)
            mat = sq.clamp(min=0.0).sqrt()
        else:
            diff = (q.unsqueeze(1) - r.unsqueeze(0)).abs()
            mat = (diff ** p).sum(dim=2) ** (1.0 / p)
    else:
        mat = torch.cdist(q, r, p=p)
    if is_self:
        mat = mat.masked_fill(_ops.diagonal_mask(q, r), 0.0)
    return mat.to(dtype) if half else mat


def pairwise_matrix(query_emb: Tensor, ref_emb: Tensor, p: float,
                    block_elements: int = 16777216) -> Tensor:
    """``F.pairwise_distance`` (eps 1e-6 included) of every query row with every
    reference row, in the inputs' dtype: PML's float16 matrix, bit for bit, computed
    in query blocks of about ``block_elements`` pair elements. Tensor[N, M]."""
    n, m, d = query_emb.size(0), ref_emb.size(0), query_emb.size(1)
    out = torch.empty((n, m), dtype=query_emb.dtype, device=query_emb.device)
    rows = max(1, block_elements // max(1, m * d))
    for s in range(0, n, rows):
        e = min(n, s + rows)
        q = query_emb[s:e].unsqueeze(1).expand(e - s, m, d).reshape(-1, d)
        r = ref_emb.unsqueeze(0).expand(e - s, m, d).reshape(-1, d)
        out[s:e] = F.pairwise_distance(q, r, p=p).reshape(e - s, m)
    return out


class LpDistance(BaseDistance):
    """L_p distance; see :func:`lp_distance_matrix`. Not inverted."""

    def __init__(self, **kwargs):
        if kwargs.get("is_inverted", False):
            raise ValueError("LpDistance is a distance: is_inverted must be False")
        kwargs.pop("is_inverted", None)
        super().__init__(is_inverted=False, **kwargs)

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor, is_self: bool) -> Tensor:
        return lp_distance_matrix(query_emb, ref_emb, self.p, is_self)

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return F.pairwise_distance(query_emb, ref_emb, p=self.p)
