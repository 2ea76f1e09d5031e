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

    Eager and TorchScript use ``torch.cdist`` (what PML uses, so values match it bit for
    bit). float16/bfloat16 inputs are computed in float32 and rounded once at the end,
    so the expansion ``|x|^2 + |y|^2 - 2 x.y`` never cancels in half precision. The
    exported graph computes the same expansion as ``cdist``'s matmul path explicitly.
    """
    dtype = query_emb.dtype
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
