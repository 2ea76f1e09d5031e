"""Cosine similarity: the dot product of L2-normalised embeddings."""
from .dot_product_similarity import DotProductSimilarity


class CosineSimilarity(DotProductSimilarity):
    """Cosine similarity (``normalize_embeddings`` is always True)."""

    def __init__(self, **kwargs):
        if not kwargs.pop("normalize_embeddings", True):
            raise ValueError("CosineSimilarity always normalizes: normalize_embeddings must be True")
        super().__init__(normalize_embeddings=True, **kwargs)
