"""Scriptable losses (for MaximumLossMiner in TorchScript and exported graphs)."""
from .triplet_margin_loss import TripletMarginLoss, dense_triplet_margin_loss, triplet_margin_loss

__all__ = ["TripletMarginLoss", "triplet_margin_loss", "dense_triplet_margin_loss"]
