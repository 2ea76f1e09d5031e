"""The registry of built-in miners agrees with exportminers.miners.__all__ and the contract."""
import inspect

import pytest
import torch

import exportminers.miners as miners
from exportminers import registry
from exportminers.registry import MINERS

from harness import build_registry_miner, make_batch

CONTRACT_MINERS = {
    "AngularMiner", "BatchEasyHardMiner", "BatchHardMiner", "DistanceWeightedMiner",
    "EmbeddingsAlreadyPackagedAsTriplets", "HDCMiner", "MaximumLossMiner",
    "MultiSimilarityMiner", "PairMarginMiner", "TripletMarginMiner", "UniformHistogramMiner",
}
BASES = {"BaseMiner", "BasePostGradientMiner", "BasePreGradientMiner"}
RANDOM = {"DistanceWeightedMiner", "UniformHistogramMiner", "MaximumLossMiner"}


def builtin_miner_classes():
    out = set()
    for name in miners.__all__:
        obj = getattr(miners, name)
        if inspect.isclass(obj) and issubclass(obj, miners.BaseMiner) and name not in BASES:
            out.add(name)
    return out


def test_all_lists_the_contract_names():
    assert set(miners.__all__) >= CONTRACT_MINERS | BASES
    for name in miners.__all__:
        assert hasattr(miners, name)


def test_registry_equals_all():
    assert set(MINERS) == builtin_miner_classes() == CONTRACT_MINERS


def test_registry_entries():
    for name, spec in MINERS.items():
        assert spec.name == name
        assert spec.cls is getattr(miners, name)
        assert spec.output in ("triplets", "pairs", "subset")
        assert spec.random == (name in RANDOM)
        assert len(spec.configs) >= 1


def test_registry_get():
    assert registry.get("HDCMiner") is MINERS["HDCMiner"]
    with pytest.raises(ValueError, match="NoSuchMiner"):
        registry.get("NoSuchMiner")


@pytest.mark.parametrize("name", sorted(CONTRACT_MINERS))
def test_every_registry_config_builds_as_is(name):
    # the CLI, export_scripts and benchmarks build registry entries with spec.build(**config)
    for cfg in MINERS[name].configs:
        MINERS[name].build(**cfg)


@pytest.mark.parametrize("name", sorted(CONTRACT_MINERS))
def test_output_kind_and_random_flag_match_behaviour(name):
    spec = MINERS[name]
    x, y, _ = make_batch(24, 4, seed=3)
    miner = build_registry_miner(name, spec.configs[0])
    outs = []
    for s in (1, 2, 3):
        torch.manual_seed(s)
        o = miner(x, y)
        outs.append(o if isinstance(o, tuple) else (o,))
    arity = {"triplets": 3, "pairs": 4, "subset": 1}[spec.output]
    assert len(outs[0]) == arity
    same = all(all(torch.equal(a, b) for a, b in zip(outs[0], o)) for o in outs[1:])
    assert same != spec.random
