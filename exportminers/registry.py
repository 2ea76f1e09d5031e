"""The one list of built-in miners: drives the CLI, export_scripts, benchmarks and tests.

Each entry names the class, how its output is shaped, whether it draws random numbers,
how it may be run (anchor blocks, reference sets, batch-size multiples) and a few
configurations worth exporting and testing (the first is the default).
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List


@dataclass(frozen=True)
class MinerSpec:
    name: str
    output: str  # "triplets" (a, p, n), "pairs" (a1, p, a2, n) or "subset" (indices)
    random: bool = False
    configs: List[Dict[str, Any]] = field(default_factory=lambda: [{}])
    # every anchor row is mined independently of the others, so anchors can be mined in
    # blocks against the whole reference set with identical results
    row_independent: bool = False
    # mines only the batch itself (no ref_emb / ref_labels)
    self_only: bool = False
    # the batch size must be a multiple of this
    batch_multiple: int = 1

    @property
    def cls(self):
        from . import miners
        return getattr(miners, self.name)

    def build(self, **config):
        return self.cls(**config)


MINERS: Dict[str, MinerSpec] = {s.name: s for s in [
    MinerSpec("AngularMiner", "triplets", configs=[{}, {"angle": 35}], row_independent=True),
    MinerSpec("BatchEasyHardMiner", "pairs", configs=[
        {}, {"pos_strategy": "hard", "neg_strategy": "hard"},
        {"pos_strategy": "all", "neg_strategy": "hard"},
        {"pos_strategy": "semihard", "neg_strategy": "easy", "allowed_neg_range": [0.2, 1.5]},
    ], row_independent=True),
    MinerSpec("BatchHardMiner", "triplets", configs=[
        {}, {"allowed_pos_range": [0.2, 1.2], "allowed_neg_range": [0.4, 1.6]},
    ], row_independent=True),
    MinerSpec("DistanceWeightedMiner", "triplets", random=True,
              configs=[{}, {"cutoff": 0.3, "nonzero_loss_cutoff": 1.2}]),
    MinerSpec("EmbeddingsAlreadyPackagedAsTriplets", "triplets", self_only=True,
              batch_multiple=3),
    MinerSpec("HDCMiner", "pairs", configs=[{}, {"filter_percentage": 0.25}]),
    MinerSpec("MaximumLossMiner", "subset", random=True,
              configs=[{"output_batch_size": 16}], self_only=True),
    MinerSpec("MultiSimilarityMiner", "pairs", configs=[{}, {"epsilon": 0.2}],
              row_independent=True),
    MinerSpec("PairMarginMiner", "pairs", configs=[{}, {"pos_margin": 0.5, "neg_margin": 1.0}],
              row_independent=True),
    MinerSpec("TripletMarginMiner", "triplets", configs=[
        {}, {"type_of_triplets": "semihard"}, {"type_of_triplets": "hard", "margin": 0.1},
        {"type_of_triplets": "easy"},
    ], row_independent=True),
    MinerSpec("UniformHistogramMiner", "pairs", random=True,
              configs=[{}, {"num_bins": 10, "pos_per_bin": 5, "neg_per_bin": 5}]),
]}


def get(name: str) -> MinerSpec:
    try:
        return MINERS[name]
    except KeyError:
        raise ValueError(f"unknown miner {name!r}; built-in miners: {sorted(MINERS)}") from None
