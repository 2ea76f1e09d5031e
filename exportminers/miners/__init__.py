from .base_miner import BaseMiner, BasePostGradientMiner, BasePreGradientMiner
from .pair_margin_miner import PairMarginMiner, pair_margin_miner
from .triplet_margin_miner import TripletMarginMiner, triplet_margin_miner
from .batch_easy_hard_miner import BatchEasyHardMiner, batch_easy_hard_miner
from .batch_hard_miner import BatchHardMiner, batch_hard_miner
from .multi_similarity_miner import MultiSimilarityMiner, multi_similarity_miner
from .embeddings_already_packaged_as_triplets import EmbeddingsAlreadyPackagedAsTriplets, packaged_triplets
from .hdc_miner import HDCMiner, hdc_miner
from .angular_miner import AngularMiner, angular_miner
