from .base_miner import BaseMiner, BasePostGradientMiner, BasePreGradientMiner
from .pair_margin_miner import PairMarginMiner, pair_margin_miner
from .triplet_margin_miner import TripletMarginMiner, triplet_margin_miner
