"""torch.jit.script works for every registry miner and config and equals eager (random
miners: same seed, same output)."""
import pytest
import torch

from harness import (build_registry_miner, make_batch, make_case, registry_arity,
                     registry_params, run_ours)


def call(miner, case):
    out = run_ours(miner, case)
    return out if isinstance(out, tuple) else (out,)


def cases_for(name):
    if name == "MaximumLossMiner":
        return ["typical", "typical_odd", "huge_labels"]  # no ref for pre-gradient miners
    if name == "EmbeddingsAlreadyPackagedAsTriplets":
        return ["typical", "one_class"]  # N multiple of 3 (PML needs it)
    return ["typical", "ref_smaller", "ref_larger", "same_as_ref", "b1", "huge_labels"]


@pytest.mark.parametrize("name,config", registry_params())
def test_script_equals_eager(name, config, seed):
    eager = build_registry_miner(name, config)
    scripted = torch.jit.script(build_registry_miner(name, config))
    for case_name in cases_for(name):
        case = make_case(case_name, salt=(name, str(config)))
        if name == "EmbeddingsAlreadyPackagedAsTriplets":
            k = 3 * (case.x.size(0) // 3)
            case.x, case.y = case.x[:k], case.y[:k]
        torch.manual_seed(seed)
        a = call(eager, case)
        torch.manual_seed(seed)
        b = call(scripted, case)
        assert len(a) == len(b) == registry_arity(name)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype == torch.int64
            assert torch.equal(x, y), f"{name} {config} on {case_name}: scripted != eager"


@pytest.mark.parametrize("name,config", registry_params())
def test_script_empty_batch(name, config):
    scripted = torch.jit.script(build_registry_miner(name, config))
    x = torch.empty(0, 8, dtype=torch.float64)
    y = torch.empty(0, dtype=torch.int64)
    out = scripted(x, y)
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == registry_arity(name)
    for t in out:
        assert t.dtype == torch.int64 and t.numel() == 0


@pytest.mark.parametrize("name,config", registry_params())
def test_script_float32(name, config, seed):
    x, y, _ = make_batch(18, 3, seed=seed, dtype=torch.float32)
    eager = build_registry_miner(name, config)
    scripted = torch.jit.script(build_registry_miner(name, config))
    torch.manual_seed(seed)
    a = eager(x, y)
    torch.manual_seed(seed)
    b = scripted(x, y)
    a = a if isinstance(a, tuple) else (a,)
    b = b if isinstance(b, tuple) else (b,)
    for s, t in zip(a, b):
        assert torch.equal(s, t)


@pytest.mark.parametrize("name", ["TripletMarginMiner", "PairMarginMiner", "MultiSimilarityMiner",
                                  "BatchHardMiner", "HDCMiner"])
def test_script_legacy_and_distance_args(name, seed):
    from harness import our_distance
    case = make_case("typical", salt=name)
    for kw in ({"use_similarity": True}, {"squared_distances": True},
               {"normalize_embeddings": False}, {"distance": our_distance("snr")},
               {"distance": our_distance("l1_sq_raw")}):
        from harness import our_miner_cls
        eager = our_miner_cls(name)(**kw)
        scripted = torch.jit.script(our_miner_cls(name)(**kw))
        for e, s in zip(run_ours(eager, case), run_ours(scripted, case)):
            assert torch.equal(e, s), f"{name} {kw}"


def test_scripted_miner_counts():
    from harness import our_miner_cls
    case = make_case("typical", salt="counts")
    s = torch.jit.script(our_miner_cls("TripletMarginMiner")())
    a, p, n = s(case.x, case.y)
    assert s.num_triplets == len(a)
    s = torch.jit.script(our_miner_cls("PairMarginMiner")())
    a1, p, a2, n = s(case.x, case.y)
    assert s.num_pos_pairs == len(a1) and s.num_neg_pairs == len(a2)
