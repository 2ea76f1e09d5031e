"""Miners: PML's miners as fixed-shape, scriptable, exportable modules."""
from .base_miner import BaseMiner, BasePostGradientMiner, BasePreGradientMiner
from .pair_margin_miner import PairMarginMiner, pair_margin_miner
from .triplet_margin_miner import TripletMarginMiner, triplet_margin_miner
from .batch_easy_hard_miner import BatchEasyHardMiner, batch_easy_hard_miner
from .batch_hard_miner import BatchHardMiner, batch_hard_miner
from .multi_similarity_miner import MultiSimilarityMiner, multi_similarity_miner
from .embeddings_already_packaged_as_triplets import EmbeddingsAlreadyPackagedAsTriplets, packaged_triplets
from .hdc_miner import HDCMiner, hdc_miner
from .angular_miner import AngularMiner, angular_miner
from .distance_weighted_miner import DistanceWeightedMiner, distance_weighted_miner
from .uniform_histogram_miner import UniformHistogramMiner, uniform_histogram_miner
from .maximum_loss_miner import MaximumLossMiner

__all__ = [
    "BaseMiner", "BasePostGradientMiner", "BasePreGradientMiner",
    "AngularMiner", "BatchEasyHardMiner", "BatchHardMiner", "DistanceWeightedMiner",
    "EmbeddingsAlreadyPackagedAsTriplets", "HDCMiner", "MaximumLossMiner",
    "MultiSimilarityMiner", "PairMarginMiner", "TripletMarginMiner", "UniformHistogramMiner",
]
