"""Distances with PML's constructor arguments, scriptable and exportable."""
from .base_distance import BaseDistance
from .cosine_similarity import CosineSimilarity
from .dot_product_similarity import DotProductSimilarity, dot_product_matrix
from .lp_distance import LpDistance, lp_distance_matrix
from .snr_distance import SNRDistance, snr_distance_matrix

__all__ = [
    "BaseDistance", "LpDistance", "CosineSimilarity", "DotProductSimilarity", "SNRDistance",
    "lp_distance_matrix", "dot_product_matrix", "snr_distance_matrix",
]
