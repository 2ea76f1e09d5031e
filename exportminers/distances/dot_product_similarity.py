"""Dot-product similarity matrix."""
import torch
from torch import Tensor

from .base_distance import BaseDistance


def dot_product_matrix(query_emb: Tensor, ref_emb: Tensor) -> Tensor:
    """Tensor[N, D] x Tensor[M, D] -> Tensor[N, M] of dot products."""
    return torch.matmul(query_emb, ref_emb.transpose(-1, -2))


class DotProductSimilarity(BaseDistance):
    """Dot product; a similarity (``is_inverted`` is True)."""

    def __init__(self, **kwargs):
        if not kwargs.pop("is_inverted", True):
            raise ValueError("DotProductSimilarity is a similarity: is_inverted must be True")
        super().__init__(is_inverted=True, **kwargs)

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor, is_self: bool) -> Tensor:
        return dot_product_matrix(query_emb, ref_emb)

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        return torch.sum(query_emb * ref_emb, dim=1)
