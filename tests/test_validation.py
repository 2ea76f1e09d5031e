"""Bad input -> ValueError naming the argument (eager and TorchScript); bad constructor
configuration -> ValueError; an empty batch -> empty int64 outputs."""
import math
import re

import pytest
import torch

import exportminers.distances as D
from harness import (build_registry_miner, make_batch, our_miner_cls, registry_arity,
                     registry_params)

NO_REF = {"MaximumLossMiner"}


def batch(n=12, dim=8, seed=0, dtype=torch.float64):
    x, y, _ = make_batch(n, 3, dim, seed=seed, dtype=dtype)
    return x, y


def bad_calls():
    x, y = batch()
    r, ry = batch(9, seed=1)
    nan = x.clone()
    nan[3, 2] = math.nan
    inf = x.clone()
    inf[5, 0] = -math.inf
    rnan = r.clone()
    rnan[0, 0] = math.nan
    return [
        ("emb_1d", (x[:, 0], y), "embeddings", True),
        ("emb_3d", (x.unsqueeze(0), y), "embeddings", True),
        ("emb_int", (x.long(), y), "embeddings", True),
        ("labels_2d", (x, y.unsqueeze(1)), "labels", True),
        ("labels_too_short", (x, y[:-1]), "labels", True),
        ("labels_too_long", (x, torch.cat([y, y[:1]])), "labels", True),
        ("labels_float", (x, y.double()), "labels", True),
        ("labels_bool", (x, y > 0), "labels", True),
        ("emb_nan", (nan, y), "embeddings", True),
        ("emb_inf", (inf, y), "embeddings", True),
        ("ref_width", (x, y, r[:, :5], ry), "ref_emb", False),
        ("ref_without_labels", (x, y, r, None), "ref_labels", False),
        ("ref_labels_without_ref", (x, y, None, ry), "ref_emb", False),
        ("ref_labels_mismatch", (x, y, r, ry[:-2]), "ref_labels", False),
        ("ref_labels_float", (x, y, r, ry.float()), "ref_labels", False),
        ("ref_labels_bool", (x, y, r, ry > 0), "ref_labels", False),
        ("ref_nan", (x, y, rnan, ry), "ref_emb", False),
        ("ref_1d", (x, y, r[:, 0], ry), "ref_emb", False),
    ]


BAD = bad_calls()


@pytest.mark.parametrize("name,config", registry_params())
@pytest.mark.parametrize("bad", BAD, ids=lambda b: b[0])
def test_bad_input_raises_value_error(name, config, bad):
    _, args, arg_name, no_ref = bad
    miner = build_registry_miner(name, config)
    with pytest.raises(ValueError) as err:
        miner(*args)
    if name in NO_REF and not no_ref:
        return  # any ValueError: this miner takes no reference set at all
    assert arg_name in str(err.value), f"message does not name {arg_name}: {err.value}"


@pytest.mark.parametrize("name,config", registry_params())
@pytest.mark.parametrize("bad", [b for b in BAD if b[0] in (
    "emb_3d", "labels_too_short", "labels_float", "emb_nan", "ref_width", "ref_without_labels")],
    ids=lambda b: b[0])
def test_bad_input_scripted(name, config, bad):
    _, args, arg_name, no_ref = bad
    scripted = torch.jit.script(build_registry_miner(name, config))
    with pytest.raises((ValueError, torch.jit.Error)) as err:
        scripted(*args)
    msg = str(err.value)
    assert "ValueError" in msg or isinstance(err.value, ValueError)
    if not (name in NO_REF and not no_ref):
        assert arg_name in msg


@pytest.mark.parametrize("name,config", registry_params())
def test_empty_batch(name, config):
    miner = build_registry_miner(name, config)
    for dtype in (torch.float32, torch.float64):
        x = torch.empty(0, 8, dtype=dtype)
        y = torch.empty(0, dtype=torch.int64)
        out = miner(x, y)
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == registry_arity(name)
        for t in out:
            assert t.dtype == torch.int64 and t.shape == (0,)


@pytest.mark.parametrize("name,config", registry_params(exclude=NO_REF))
def test_empty_query_or_reference(name, config):
    miner = build_registry_miner(name, config)
    x, y = batch(6)
    e, ey = torch.empty(0, 8, dtype=torch.float64), torch.empty(0, dtype=torch.int64)
    for args in ((e, ey, x, y), (x, y, e, ey)):
        out = miner(*args)
        assert len(out) == registry_arity(name)
        for t in out:
            assert t.dtype == torch.int64 and t.dim() == 1
        if name != "EmbeddingsAlreadyPackagedAsTriplets":
            for t in out:
                assert t.numel() == 0


def test_int32_labels_accepted():
    x, y = batch()
    m = our_miner_cls("TripletMarginMiner")()
    a = m(x, y)
    b = m(x, y.int())
    for s, t in zip(a, b):
        assert torch.equal(s, t)


# ------------------------------------------------------------- constructor arguments


def test_bad_type_of_triplets():
    with pytest.raises(ValueError, match="type_of_triplets"):
        our_miner_cls("TripletMarginMiner")(type_of_triplets="hardest")


@pytest.mark.parametrize("pos,neg", [("bogus", "hard"), ("hard", "bogus"),
                                     ("semihard", "semihard"), ("all", "semihard"),
                                     ("semihard", "all")])
def test_bad_batch_easy_hard_strategies(pos, neg):
    with pytest.raises(ValueError, match="strategy|semihard"):
        our_miner_cls("BatchEasyHardMiner")(pos_strategy=pos, neg_strategy=neg)


BAD_DISTANCES = [
    lambda: D.LpDistance(p=1), lambda: D.LpDistance(power=2),
    lambda: D.LpDistance(normalize_embeddings=False), lambda: D.CosineSimilarity(),
    lambda: D.DotProductSimilarity(), lambda: D.SNRDistance(),
]


@pytest.mark.parametrize("name", ["AngularMiner", "DistanceWeightedMiner"])
@pytest.mark.parametrize("make_dist", BAD_DISTANCES)
def test_l2_only_miners_reject_other_distances(name, make_dist):
    with pytest.raises(ValueError, match="distance"):
        our_miner_cls(name)(distance=make_dist())


@pytest.mark.parametrize("name", ["AngularMiner", "DistanceWeightedMiner"])
@pytest.mark.parametrize("legacy", [{"use_similarity": True}, {"squared_distances": True},
                                    {"normalize_embeddings": False}])
def test_l2_only_miners_reject_legacy_non_l2(name, legacy):
    with pytest.raises(ValueError):
        our_miner_cls(name)(**legacy)


@pytest.mark.parametrize("name", ["AngularMiner", "DistanceWeightedMiner"])
def test_l2_only_miners_accept_l2(name):
    our_miner_cls(name)(distance=D.LpDistance(p=2, power=1, normalize_embeddings=True))
    our_miner_cls(name)(normalize_embeddings=True)


def test_distance_and_legacy_args_conflict():
    with pytest.raises(ValueError):
        our_miner_cls("PairMarginMiner")(distance=D.LpDistance(), use_similarity=True)


def test_distance_must_be_ours():
    import pytorch_metric_learning.distances as pml_d
    with pytest.raises(ValueError, match="distance"):
        our_miner_cls("PairMarginMiner")(distance=pml_d.LpDistance())


@pytest.mark.parametrize("kw", [{"output_batch_size": 0}, {"output_batch_size": 4, "num_trials": 0},
                                {"output_batch_size": 2.5}])
def test_max_loss_bad_config(kw):
    from exportminers.losses import TripletMarginLoss
    with pytest.raises(ValueError):
        our_miner_cls("MaximumLossMiner")(loss_function=TripletMarginLoss(), **kw)


def test_max_loss_loss_must_be_callable():
    with pytest.raises(ValueError, match="loss_function"):
        our_miner_cls("MaximumLossMiner")(loss_function=3, output_batch_size=4)


def test_check_finite_off_skips_the_scan():
    x, y = batch()
    x[0, 0] = math.nan
    m = our_miner_cls("PairMarginMiner")(check_finite=False)
    m(x, y)  # no error: the caller opted out


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_finiteness_check_is_exact_when_the_sum_overflows_or_cancels(dtype):
    """The check sums first (a NaN or inf makes the sum non-finite); finite values
    whose sum overflows must still pass, and mixed +inf / -inf (sum NaN), a lone NaN or
    a lone inf must still be reported with their rows, eagerly and in TorchScript."""
    from exportminers.utils.checks import require_finite
    scripted = torch.jit.script(require_finite)
    big = torch.finfo(dtype).max
    ok = torch.full((6, 5), big, dtype=dtype)       # the sum overflows to inf
    ok[1] = -big                                     # and a row that cancels part of it
    for check in (require_finite, scripted):
        check(ok, "embeddings")
        check(torch.zeros(0, 4, dtype=dtype), "embeddings")
        for rows, values in (([2], [math.nan]), ([4], [math.inf]), ([0, 3], [math.inf, -math.inf]),
                             ([5], [-math.inf])):
            bad = ok.clone()
            for r, v in zip(rows, values):
                bad[r, r % 5] = v
            # (a scripted function raises torch.jit.Error with the same message)
            err = ValueError if check is require_finite else torch.jit.Error
            with pytest.raises(err, match=re.escape(
                    f"embeddings contains NaN or inf values (first bad rows: {rows})")):
                check(bad, "embeddings")


@pytest.mark.parametrize("name,config", registry_params())
def test_float16_and_float32_inputs_accepted(name, config, seed):
    from harness import Case, assert_valid_pairs, assert_valid_triplets
    miner = build_registry_miner(name, config)
    for dtype in (torch.float16, torch.float32):
        x, y = batch(12, seed=seed, dtype=dtype)
        torch.manual_seed(seed)
        out = miner(x, y)
        out = out if isinstance(out, tuple) else (out,)
        assert len(out) == registry_arity(name)
        for t in out:
            assert t.dtype == torch.int64 and t.dim() == 1
        if name not in ("MaximumLossMiner", "EmbeddingsAlreadyPackagedAsTriplets"):
            case = Case("half", x, y)
            (assert_valid_triplets if len(out) == 3 else assert_valid_pairs)(out, case, name)


# ---------------------------------------------- found by the input audit (stop 10)

def test_eager_non_tensor_inputs_name_the_argument():
    import numpy as np
    from exportminers import miners
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    m = miners.BatchHardMiner()
    for args, name in (((x, None), "labels"), ((x.numpy(), y.numpy()), "embeddings"),
                       ((x, [0, 1, 0, 1, 0, 1]), "labels"), ((x, y, np.ones((3, 4)), y[:3]),
                                                            "ref_emb")):
        with pytest.raises(ValueError, match=f"^{name} must be a torch.Tensor"):
            m(*args)


def test_numbers_from_numpy_and_0d_tensors_are_accepted():
    import numpy as np
    from exportminers import miners
    assert miners.TripletMarginMiner(margin=np.float32(0.25)).margin == 0.25
    assert miners.TripletMarginMiner(margin=torch.tensor(0.5)).margin == 0.5
    assert miners.AngularMiner(angle=np.int64(30)).angle_degrees == 30
    assert miners.UniformHistogramMiner(num_bins=np.int64(7)).num_bins == 7
    assert miners.MaximumLossMiner(output_batch_size=np.int32(4)).output_batch_size == 4
    for bad in (np.array([1.0, 2.0]), torch.tensor([0.2, 0.3]), True, "0.2"):
        with pytest.raises(ValueError, match="margin"):
            miners.TripletMarginMiner(margin=bad)
    with pytest.raises(ValueError, match="num_bins"):
        miners.UniformHistogramMiner(num_bins=np.float64(3.0))


def test_loss_function_class_instead_of_instance():
    from exportminers import losses, miners
    with pytest.raises(ValueError, match="loss_function must be an instance"):
        miners.MaximumLossMiner(loss_function=losses.TripletMarginLoss)


@pytest.mark.parametrize("opset", [7, 17, 10 ** 6, 18.0, True])
def test_export_unsupported_opset_is_refused(tmp_path, opset):
    import exportminers
    from exportminers import miners
    with pytest.raises(ValueError, match="opset must be an integer from 18"):
        exportminers.export_onnx(miners.BatchHardMiner(), str(tmp_path / "m.onnx"), opset=opset)


def test_onnx_float64_beyond_float32_range_is_refused(tmp_path):
    import numpy as np
    import exportminers
    from exportminers import miners
    path = exportminers.export_onnx(miners.BatchHardMiner(), str(tmp_path / "m.onnx"))
    om = exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((12, 4))
    y = np.arange(12) % 3
    a, p, n = om(x * 1e30, y)                       # large but within float32: fine
    assert len(a) == 12
    big = x.copy()
    big[3] *= 1e300
    with pytest.raises(ValueError, match=r"embeddings has values beyond float32's range.*\[3\]"):
        om(big, y)
    with pytest.raises(ValueError, match="labels is required"):
        om(x, None)


@pytest.mark.parametrize("name", ["BatchHardMiner", "PairMarginMiner", "TripletMarginMiner",
                                  "MaximumLossMiner"])
def test_scripted_miner_called_with_none_stays_usable(name):
    from exportminers import miners
    kw = {"output_batch_size": 4} if name == "MaximumLossMiner" else {}
    eager = getattr(miners, name)(**kw)
    scripted = torch.jit.script(eager)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    for bad, arg in (((x, None), "labels"), ((None, y), "embeddings")):
        with pytest.raises(Exception, match=f"{arg} is required"):
            scripted(*bad)
    for _ in range(3):   # TorchScript once broke here (an internal assert in alias analysis)
        torch.manual_seed(0)
        got = scripted(x, y)
        torch.manual_seed(0)
        want = eager(x, y)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_onnx_noise_values_are_checked(tmp_path):
    import numpy as np
    import exportminers
    from exportminers import miners
    path = exportminers.export_onnx(miners.MaximumLossMiner(output_batch_size=4),
                                    str(tmp_path / "m.onnx"), embedding_dim=4)
    om = exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((12, 4)).astype(np.float32)
    y = np.arange(12) % 3
    shape = om.noise_shape(12, 12)
    for bad in (np.full(shape, np.nan), -np.ones(shape), np.ones(shape)):
        with pytest.raises(ValueError, match=r"noise must hold uniform draws in \[0, 1\)"):
            om(x, y, noise=bad)
    assert len(om(x, y, noise=np.random.default_rng(2).random(shape))) == 4


def test_hdc_external_indices_must_be_1d_integers():
    from exportminers import miners
    labels = torch.tensor([0, 0, 1, 1])
    good = [torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([0, 1]), torch.tensor([2, 3])]
    for i, bad in ((0, torch.tensor([0.9, 1.9])), (3, torch.zeros(2, 2, dtype=torch.long)),
                   (1, torch.tensor([True, False]))):
        t = list(good)
        t[i] = bad
        with pytest.raises(ValueError, match=rf"external_indices_tuple\[{i}\] must be a 1-D "
                                             rf"integer tensor"):
            miners.HDCMiner().set_idx_externally(t, labels)
    miners.HDCMiner().set_idx_externally(good, labels)


@pytest.mark.parametrize("scale,dtype", [(300.0, torch.float16), (1e19, torch.float32)])
def test_uniform_histogram_overflowing_distances_give_valid_pairs(scale, dtype):
    """Finite embeddings whose squared distances overflow: no crash (the bin of an inf
    value was an out-of-range index), only valid pairs."""
    from exportminers import distances, miners
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(16, 4, generator=g) * scale).to(dtype)
    y = torch.randint(0, 3, (16,), generator=g)
    dist = distances.LpDistance(normalize_embeddings=False, power=2)
    assert torch.isinf(dist(x)).any()
    a1, p, a2, n = miners.UniformHistogramMiner(num_bins=5, pos_per_bin=3, neg_per_bin=3,
                                                distance=dist)(x, y)
    assert len(a1) > 0 and len(a2) > 0
    assert all(y[i] == y[j] and i != j for i, j in zip(a1.tolist(), p.tolist()))
    assert all(y[i] != y[j] for i, j in zip(a2.tolist(), n.tolist()))


def test_boolean_flags_must_be_bools(tmp_path):
    import exportminers
    from exportminers import miners
    for kw in ({"normalize_embeddings": "no"}, {"use_similarity": "yes"},
               {"squared_distances": 1}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            miners.TripletMarginMiner(**kw)
    for kw in ({"with_ref": "no"}, {"compact": "yes"}, {"anchor_blocks": 1}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be True or False"):
            exportminers.export_onnx(miners.BatchHardMiner(), str(tmp_path / "m.onnx"), **kw)
    with pytest.raises(ValueError, match="is a folder"):
        exportminers.export_onnx(miners.BatchHardMiner(), str(tmp_path))
    with pytest.raises(ValueError, match="path must be a file path"):
        exportminers.export_onnx(miners.BatchHardMiner(), None)
    with pytest.raises(ValueError, match="dtype"):
        exportminers.export_onnx(miners.BatchHardMiner(), str(tmp_path / "m.onnx"), dtype=[1])


def test_onnx_seed_must_be_a_non_negative_integer(tmp_path):
    import numpy as np
    import exportminers
    from exportminers import miners
    path = exportminers.export_onnx(miners.MaximumLossMiner(output_batch_size=4),
                                    str(tmp_path / "m.onnx"), embedding_dim=4)
    x = np.random.default_rng(1).standard_normal((12, 4)).astype(np.float32)
    y = np.arange(12) % 3
    for bad in ("a", -1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"], seed=bad)
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"])(x, y, seed=bad)
    om = exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"], seed=np.int64(3))
    assert np.array_equal(om(x, y, seed=7), om(x, y, seed=7))


def test_onnx_miner_load_errors_and_provider_string(tmp_path):
    import exportminers
    from exportminers import miners
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="cannot load it as an ONNX model"):
        exportminers.OnnxMiner(str(junk), providers=["CPUExecutionProvider"])
    path = exportminers.export_onnx(miners.BatchHardMiner(), str(tmp_path / "m.onnx"))
    om = exportminers.OnnxMiner(path, providers="CPUExecutionProvider")
    assert om.providers == ["CPUExecutionProvider"]


def test_maximum_loss_miner_loss_function_must_return_a_scalar():
    from exportminers import miners
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    for bad in (lambda e, l, t: None, lambda e, l, t: "high", lambda e, l, t: e.sum(1)):
        with pytest.raises(ValueError, match="loss_function must return one number"):
            miners.MaximumLossMiner(loss_function=bad, output_batch_size=4)(x, y)
    idx = miners.MaximumLossMiner(loss_function=lambda e, l, t: float(e.sum()),
                                  output_batch_size=4)(x, y)
    assert idx.shape == (4,)


def test_maximum_loss_export_problems_are_named(tmp_path):
    from pytorch_metric_learning import losses as pml_losses

    from exportminers import export_onnx
    from exportminers.miners import MaximumLossMiner, TripletMarginMiner

    with_miner = MaximumLossMiner(mining_function=TripletMarginMiner(), output_batch_size=8)
    with pytest.raises(ValueError, match="miner: MaximumLossMiner with a mining_function "
                                         "cannot be exported.*export_torchscript"):
        export_onnx(with_miner, str(tmp_path / "a.onnx"))
    torch.jit.script(with_miner)          # what the message offers instead works
    pml_loss = MaximumLossMiner(loss_function=pml_losses.TripletMarginLoss(), output_batch_size=8)
    with pytest.raises(RuntimeError, match=r"failed \(loss_function pytorch_metric_learning\."
                                           r"losses\..*TripletMarginLoss must compute with fixed"):
        export_onnx(pml_loss, str(tmp_path / "b.onnx"))
    export_onnx(MaximumLossMiner(output_batch_size=8), str(tmp_path / "c.onnx"))
