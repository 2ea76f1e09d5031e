"""TorchScript export: every registry miner scripts, saves, loads with torch.jit.load and
returns the eager results; load_torchscript turns script errors back into ValueError."""
import pytest
import torch

import exportminers
from exportminers import export, registry
from exportminers.verify import as_multisets, random_batch

AVAILABLE = [n for n in registry.MINERS if hasattr(exportminers.miners, n)]


def _tensors(batch):
    return [torch.from_numpy(batch[k]) for k in ("embeddings", "labels", "ref_emb", "ref_labels")
            if k in batch]


def _as_list(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


@pytest.mark.parametrize("name", AVAILABLE)
def test_round_trip(name, tmp_path):
    spec = registry.MINERS[name]
    miner = export.build_miner(name, spec.configs[-1])
    path = tmp_path / f"{name}.pt"
    scripted = export_ts = export.export_torchscript(miner, path)
    assert isinstance(export_ts, torch.jit.ScriptModule)
    loaded = torch.jit.load(str(path))
    wrapped = exportminers.load_torchscript(path)
    batch = random_batch(12, 6, m=None if name in export.SELF_ONLY else 10, seed=1)
    args = _tensors(batch)
    results = []
    for module in (miner, scripted, loaded, wrapped):
        torch.manual_seed(0)
        results.append(_as_list(module(*args)))
    if spec.random:
        # same seed, same generator calls: identical draws in eager and TorchScript
        for r in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(r, results[0]))
    else:
        want = as_multisets([t.numpy() for t in results[0]], spec.output)
        for r in results[1:]:
            assert as_multisets([t.numpy() for t in r], spec.output) == want
    if spec.output == "triplets":
        assert wrapped.num_triplets == len(results[3][0])


@pytest.mark.parametrize("name", [n for n in ("TripletMarginMiner", "PairMarginMiner",
                                              "BatchHardMiner") if n in AVAILABLE])
def test_load_torchscript_raises_value_error(name, tmp_path):
    miner = export.build_miner(name, registry.MINERS[name].configs[0])
    export.export_torchscript(miner, tmp_path / "m.pt")
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    wrapped = exportminers.load_torchscript(tmp_path / "m.pt")
    x = torch.randn(6, 4)
    y = torch.randint(0, 3, (6,))
    nan = x.clone()
    nan[2, 0] = float("nan")
    bad = [(x, y[:5]), (x[0], y), (x, y.float()), (nan, y), (x, y, torch.randn(5, 3), y[:5])]
    for args in bad:
        with pytest.raises(ValueError) as eager_err:
            miner(*args)
        with pytest.raises(torch.jit.Error):
            loaded(*args)
        with pytest.raises(ValueError) as ts_err:
            wrapped(*args)
        # TorchScript formats a dtype as its enum number ("got dtype 6"): compare the rest
        assert str(ts_err.value).split(" dtype ")[0] == str(eager_err.value).split(" dtype ")[0]
    # other errors pass through unchanged
    with pytest.raises(Exception) as err:
        wrapped(x)
    assert not isinstance(err.value, ValueError)


def test_export_torchscript_reports_unscriptable(tmp_path):
    class Custom(exportminers.miners.BaseMiner):
        def mine(self, embeddings, labels, ref_emb, ref_labels):
            return {i: i for i in range(3)}  # not scriptable

    with pytest.raises(RuntimeError, match="scripting Custom failed"):
        export.export_torchscript(Custom(), tmp_path / "c.pt")
