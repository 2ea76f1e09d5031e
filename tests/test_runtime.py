"""The torch-free runtime: numpy decode and checks, OnnxMiner (validation, empty batches,
noise and seeds, anchor chunking, IOBinding/DLPack inputs), a run with torch unimportable,
and (where ONNX Runtime has CUDA) strict GPU placement."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import exportminers
from exportminers import export, registry
from exportminers.decode import decode as decode_torch
from exportminers.runtime import OnnxMiner, checks_np, decode_np, onnx_miner
from exportminers.runtime import metadata as md
from exportminers.verify import as_multisets, eager_tuples, random_batch

import onnx_graph_cache

D = onnx_graph_cache.D
ROW_MINERS = [n for n in ("PairMarginMiner", "TripletMarginMiner", "BatchHardMiner",
                          "BatchEasyHardMiner", "MultiSimilarityMiner")
              if hasattr(exportminers.miners, n)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def graphs():
    """``get(name, with_ref=False, cfg=0)`` -> (miner, path) from the session-wide cache
    (with_ref graphs have a dynamic embedding width)."""

    def get(name, with_ref=False, cfg=0):
        if with_ref and cfg == 0:
            return onnx_graph_cache.ref_graph(name)
        return onnx_graph_cache.graph(name, cfg, with_ref=with_ref)

    return get


def _same(a, b):
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))


# ------------------------------------------------------------------------ decode_np


@pytest.mark.parametrize("shape,layout", [
    ((5, 7), [[0, -1, -2], [1, -1, -2]]),
    ((4, 6, 6), [[0, -1, -2, -3]]),
    ((6,), [[0, -1, 1, 2]]),
    ((3, 4), [[0, 1, 2], [1, -2, 2]]),
])
def test_decode_np_matches_torch_decode(shape, layout):
    rng = np.random.default_rng(0)
    for density in (0.0, 0.3, 1.0):
        outs = [rng.random(shape) < density, rng.random(shape) < 0.5]
        # integer fields: full shape, and broadcast along the last axes
        outs.append(rng.integers(0, 50, shape))
        outs.append(rng.integers(0, 50, shape[:1] + (1,) * (len(shape) - 1)))
        if len(shape) == 1:
            outs[2] = rng.integers(0, 50, shape)
        want = decode_torch([torch.from_numpy(o) for o in outs], layout)
        got = decode_np.decode(outs, layout)
        assert all(g.dtype == np.int64 for g in got)
        assert _same(got, [w.numpy() for w in want])


@pytest.mark.parametrize("shape", [(5,), (4, 6), (3, 4, 5), (1, 3, 1)])
def test_decode_np_reads_every_broadcast_pattern(shape):
    """A field with any subset of size-1 axes is read as if broadcast to the mask
    (brute force: ``np.broadcast_to(field, mask.shape)[mask]``)."""
    rng = np.random.default_rng(len(shape))
    for density in (0.0, 0.4, 1.0):
        mask = rng.random(shape) < density
        for bits in range(2 ** len(shape)):
            fshape = tuple(1 if bits >> k & 1 else s for k, s in enumerate(shape))
            field = rng.integers(-9, 1000, fshape).astype(np.int32)
            layout = [[0, 1] + [-(k + 1) for k in range(len(shape))]]
            got = decode_np.decode([mask, field], layout)
            want = [np.broadcast_to(field, shape)[mask]] + list(np.nonzero(mask))
            assert all(g.dtype == np.int64 for g in got)
            assert _same(got, want), fshape


def test_decode_np_shape_mismatch_and_0d_mask():
    with pytest.raises(ValueError, match="broadcast"):
        decode_np.decode([np.ones((2, 3), bool), np.ones((2, 2), np.int64)], [[0, 1]])
    with pytest.raises(ValueError, match="axis"):
        decode_np.decode([np.ones((), bool)], [[0]])


def test_decode_np_rank_mismatch():
    with pytest.raises(ValueError, match="rank"):
        decode_np.decode([np.ones((2, 2), bool), np.ones(2, np.int64)], [[0, 1]])


# ------------------------------------------------------------------------ checks_np


BAD_INPUTS = [
    ("rank", lambda x, y: (x[0], y), "embeddings"),
    ("n mismatch", lambda x, y: (x, y[:-1]), "labels"),
    ("float labels", lambda x, y: (x, y.astype(np.float32)), "labels"),
    ("bool labels", lambda x, y: (x, y > 0), "labels"),
    ("2-D labels", lambda x, y: (x, y[:, None]), "labels"),
    ("int embeddings", lambda x, y: (x.astype(np.int64), y), "embeddings"),
    ("nan", lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 9, np.nan, x).astype(x.dtype), y), "embeddings"),
    ("inf", lambda x, y: (np.where(np.arange(x.size).reshape(x.shape) == 3, np.inf, x).astype(x.dtype), y), "embeddings"),
]


@pytest.mark.parametrize("what,make,arg", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_checks_np_twin_of_torch_checks(what, make, arg):
    from exportminers.utils.checks import check_inputs
    b = random_batch(6, 4, seed=1)
    x, y = make(b["embeddings"], b["labels"])
    with pytest.raises(ValueError) as np_err:
        checks_np.check_inputs(x, y)
    with pytest.raises(ValueError) as torch_err:
        check_inputs(torch.from_numpy(np.ascontiguousarray(x)),
                     torch.from_numpy(np.ascontiguousarray(y)), None, None)
    assert str(np_err.value).startswith(arg)
    # same message up to dtype spelling (numpy "float32" vs torch "torch.float32")
    assert str(np_err.value) == str(torch_err.value).replace("torch.", "")


def test_checks_np_ref_arguments():
    b = random_batch(6, 4, m=5, seed=2)
    x, y, r, ry = b["embeddings"], b["labels"], b["ref_emb"], b["ref_labels"]
    for args, arg in [((x, y, r, None), "ref_emb"), ((x, y, None, ry), "ref_labels"),
                      ((x, y, r[:, :3], ry), "ref_emb"), ((x, y, r, ry[:2]), "ref_labels"),
                      ((x, y, r.astype(np.float64), ry), "ref_emb"), ((x, y, r[0], ry), "ref_emb")]:
        with pytest.raises(ValueError) as err:
            checks_np.check_inputs(*args)
        assert str(err.value).startswith(arg), str(err.value)
    _, lab, _, rl = checks_np.check_inputs(x, y.astype(np.int32), r, ry.astype(np.uint8))
    assert lab.dtype == np.int64 and rl.dtype == np.int64


# ------------------------------------------------------------------------ OnnxMiner


def test_onnx_miner_basics(graphs):
    miner, path = graphs("PairMarginMiner")
    om = OnnxMiner(path)
    assert om.providers[0] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert om.miner_name == "PairMarginMiner" and om.output_kind == "pairs"
    assert om.embedding_dim == D and not om.with_ref and not om.is_random
    assert "PairMarginMiner" in repr(om)
    b = random_batch(14, D, seed=4)
    out = om(b["embeddings"], b["labels"])
    assert isinstance(out, tuple) and len(out) == 4
    assert all(isinstance(o, np.ndarray) and o.dtype == np.int64 for o in out)
    assert as_multisets(out, "pairs") == as_multisets(eager_tuples(miner, b), "pairs")
    assert om.num_pos_pairs == len(out[0]) and om.num_neg_pairs == len(out[2])
    # float64 / list inputs are accepted and cast, as eager accepts any float dtype
    out64 = om(b["embeddings"].astype(np.float64), b["labels"].tolist())
    assert len(out64) == 4
    raw = om(b["embeddings"], b["labels"], return_raw=True)
    assert [r.shape for r in raw] == [(14, 14), (14, 14)] and raw[0].dtype == np.bool_


@pytest.mark.parametrize("name,with_ref", [("PairMarginMiner", False), ("TripletMarginMiner", True),
                                           ("BatchHardMiner", True)])
def test_empty_batch(graphs, name, with_ref):
    _, path = graphs(name, with_ref)
    om = OnnxMiner(path)
    k = 4 if registry.MINERS[name].output == "pairs" else 3
    e = np.zeros((0, D), np.float32)
    el = np.zeros(0, np.int64)
    full = random_batch(5, D, m=5, seed=0)
    cases = [(e, el)] if not with_ref else [(e, el, full["ref_emb"], full["ref_labels"]),
                                            (full["embeddings"], full["labels"], e, el)]
    for args in cases:
        out = om(*args)
        assert len(out) == k and all(o.shape == (0,) and o.dtype == np.int64 for o in out)
        out = om(*[torch.from_numpy(a) for a in args], device_output=True)
        assert all(isinstance(o, torch.Tensor) and o.numel() == 0 for o in out)
        raw = om(*args, return_raw=True)
        assert len(raw) == len(om.output_names)


def _bad_calls(b, rb):
    x, y = b["embeddings"], b["labels"]
    return [
        ("embeddings", (x[0], y)),
        ("embeddings", (x.astype(np.int32), y)),
        ("embeddings", (np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype(np.float32), y)),
        ("embeddings", (x[:, :5], y)),                      # wrong width for the graph
        ("labels", (x, y[:-1])),
        ("labels", (x, y.astype(np.float32))),
        ("labels", (x, y[:, None])),
        ("ref_emb", (x, y, rb["ref_emb"], rb["ref_labels"])),  # self graph given a ref set
        ("ref_labels", (x, y, None, rb["ref_labels"])),
    ]


def test_bad_inputs_raise_value_error_naming_the_argument(graphs):
    _, path = graphs("TripletMarginMiner")
    om = OnnxMiner(path)
    b = random_batch(9, D, seed=1)
    rb = random_batch(9, D, m=7, seed=2)
    for arg, args in _bad_calls(b, rb):
        with pytest.raises(ValueError) as err:
            om(*args)
        assert str(err.value).startswith(arg), (arg, str(err.value))
        # the IOBinding path (torch tensors) validates the same way
        targs = [None if a is None else torch.from_numpy(np.ascontiguousarray(a)) for a in args]
        with pytest.raises(ValueError) as err:
            om(*targs)
        assert str(err.value).startswith(arg), (arg, str(err.value))


def test_bad_inputs_with_ref_graph(graphs):
    _, path = graphs("TripletMarginMiner", with_ref=True)
    om = OnnxMiner(path)
    b = random_batch(9, D, m=7, seed=1)
    x, y, r, ry = b["embeddings"], b["labels"], b["ref_emb"], b["ref_labels"]
    nan_r = r.copy()
    nan_r[3, 1] = np.inf
    for arg, args in [("ref_emb", (x, y)), ("ref_emb", (x, y, nan_r, ry)),
                      ("ref_emb", (x, y, r[:, :4], ry)), ("ref_labels", (x, y, r, ry[:3])),
                      ("ref_emb", (x, y, r.astype(np.float64), ry))]:
        with pytest.raises(ValueError) as err:
            om(*args)
        assert str(err.value).startswith(arg), str(err.value)


def test_batch_multiple(graphs):
    if not hasattr(exportminers.miners, "EmbeddingsAlreadyPackagedAsTriplets"):
        pytest.skip("EmbeddingsAlreadyPackagedAsTriplets not available yet")
    miner, path = graphs("EmbeddingsAlreadyPackagedAsTriplets")
    om = OnnxMiner(path)
    b = random_batch(10, D)
    with pytest.raises(ValueError, match="multiple of 3") as err:
        om(b["embeddings"], b["labels"])
    with pytest.raises(ValueError) as eager_err:
        miner(torch.from_numpy(b["embeddings"]), torch.from_numpy(b["labels"]))
    assert str(err.value) == str(eager_err.value)
    a, p, n = om(b["embeddings"][:9], b["labels"][:9])
    assert a.tolist() == [0, 3, 6] and p.tolist() == [1, 4, 7] and n.tolist() == [2, 5, 8]


def test_not_an_exportminers_graph(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not an exportminers graph"):
        OnnxMiner(tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="not a file"):
        OnnxMiner(tmp_path / "missing.onnx")


# ------------------------------------------------------------------------ noise and seeds


@pytest.fixture(scope="module")
def random_graph(graphs):
    for name in ("DistanceWeightedMiner", "UniformHistogramMiner"):
        if hasattr(exportminers.miners, name):
            return graphs(name, cfg=len(registry.MINERS[name].configs) - 1)
    pytest.skip("no random miner available")


def test_seeds_reproduce(random_graph):
    miner, path = random_graph
    b = random_batch(16, D, seed=3)
    x, y = b["embeddings"], b["labels"]
    first = OnnxMiner(path, seed=11)
    second = OnnxMiner(path, seed=11)
    r1, r2 = first(x, y), first(x, y)
    assert _same(r1, second(x, y)) and _same(r2, second(x, y))  # same sequence
    assert _same(first(x, y, seed=5), second(x, y, seed=5))     # a call's seed wins
    assert len(first.noise_shape(16, 16)) > 0
    noise = np.random.default_rng(0).random(first.noise_shape(16, 16))
    got = first(x, y, noise=noise)
    assert as_multisets(got, first.output_kind) == \
        as_multisets(eager_tuples(miner, b, noise), first.output_kind)
    with pytest.raises(ValueError, match="noise"):
        first(x, y, noise=noise[..., :-1])


def test_deterministic_graph_rejects_noise(graphs):
    _, path = graphs("PairMarginMiner")
    b = random_batch(6, D)
    with pytest.raises(ValueError, match="noise"):
        OnnxMiner(path)(b["embeddings"], b["labels"], noise=np.zeros(3))


# ------------------------------------------------------------------------ chunking


@pytest.mark.parametrize("name", ROW_MINERS)
def test_chunked_equals_unchunked(graphs, name):
    miner, path = graphs(name, with_ref=True)
    b = random_batch(23, D, m=19, seed=7)
    args = (b["embeddings"], b["labels"], b["ref_emb"], b["ref_labels"])
    whole = OnnxMiner(path)(*args)
    assert as_multisets(whole, registry.MINERS[name].output) == \
        as_multisets(eager_tuples(miner, b), registry.MINERS[name].output)
    for kw in ({"chunk_size": 1}, {"chunk_size": 5}, {"chunk_size": 100},
               {"max_block_elements": 19 * 19 * 3}):
        om = OnnxMiner(path, **kw)
        assert _same(om(*args), whole), kw                       # identical, order included
        targs = [torch.from_numpy(a) for a in args]
        assert _same([t.numpy() for t in om(*targs, device_output=True)], whole), kw


def test_chunking_needs_row_independent_with_ref_graph(graphs, tmp_path):
    _, self_path = graphs("PairMarginMiner")
    with pytest.raises(ValueError, match="with_ref=True"):
        OnnxMiner(self_path, chunk_size=4)
    _, ref_path = graphs("PairMarginMiner", with_ref=True)
    model = onnx.load(ref_path)
    for p in model.metadata_props:
        if p.key == md.ROW_INDEPENDENT:
            p.value = "false"
    onnx.save(model, tmp_path / "global.onnx")
    with pytest.raises(ValueError, match="independently"):
        OnnxMiner(tmp_path / "global.onnx", max_block_elements=100)
    with pytest.raises(ValueError, match="chunk_size"):
        OnnxMiner(ref_path, chunk_size=0)
    with pytest.raises(ValueError, match="not both"):
        OnnxMiner(ref_path, chunk_size=2, max_block_elements=10)
    assert OnnxMiner(ref_path, max_block_elements=1)._rows_per_block(10, 7, D) == 1


ANCHOR_MINERS = sorted(export.ROW_INDEPENDENT)


@pytest.mark.parametrize("name", ANCHOR_MINERS)
def test_anchor_blocks_self_mining(name):
    """anchor_blocks graphs self-mine exactly like eager, whole or in anchor blocks (the
    self-pairs excluded by anchor_index), through numpy and IOBinding alike."""
    kind = registry.MINERS[name].output
    for cfg in range(len(registry.MINERS[name].configs)):
        miner, path = onnx_graph_cache.graph(name, cfg, anchor_blocks=True)
        om = OnnxMiner(path)
        assert om.anchor_blocks and om.chunkable and om.input_names[-1] == "anchor_index"
        batches = [random_batch(23, D, seed=40 + cfg), random_batch(1, D, seed=1),
                   random_batch(2, D, seed=2), random_batch(9, D, num_classes=1, seed=3)]
        for b in batches:
            args = (b["embeddings"], b["labels"])
            whole = om(*args)
            assert as_multisets(whole, kind) == as_multisets(eager_tuples(miner, b), kind), \
                (cfg, len(b["labels"]))
            for kw in ({"chunk_size": 1}, {"chunk_size": 4}, {"max_block_elements": 23 * 23}):
                assert _same(OnnxMiner(path, **kw)(*args), whole), (cfg, kw)
        b = batches[0]
        t = [torch.from_numpy(b["embeddings"]), torch.from_numpy(b["labels"])]
        chunked = OnnxMiner(path, chunk_size=5)
        assert _same([x.numpy() for x in chunked(*t, device_output=True)],
                     om(b["embeddings"], b["labels"]))


def test_anchor_blocks_refused_where_rows_depend_on_each_other(tmp_path):
    with pytest.raises(ValueError, match="anchor_blocks.*independently"):
        export.export_onnx(exportminers.miners.HDCMiner(), tmp_path / "h.onnx", anchor_blocks=True)
    with pytest.raises(ValueError, match="anchor_blocks.*independently"):
        export.export_onnx(exportminers.miners.TripletMarginMiner(
            max_triplets_per_anchor=2, cap_order="random"), tmp_path / "t.onnx", anchor_blocks=True)
    with pytest.raises(ValueError, match="anchor_blocks"):
        export.export_onnx(exportminers.miners.BatchHardMiner(), tmp_path / "b.onnx",
                           anchor_blocks=True, with_ref=True)
    _, path = onnx_graph_cache.graph("BatchHardMiner", anchor_blocks=True)
    b = random_batch(6, D, m=5, seed=0)
    with pytest.raises(ValueError, match="ref_emb"):
        OnnxMiner(path)(b["embeddings"], b["labels"], b["ref_emb"], b["ref_labels"])


def _all_intermediate_sizes(path, feeds):
    """Largest element count among every value the graph computes, by running it with
    every intermediate exposed as an output."""
    model = onnx.load(path)
    have = {o.name for o in model.graph.output}
    for node in model.graph.node:
        for out in node.output:
            if out and out not in have:
                model.graph.output.add().name = out
                have.add(out)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return max(int(np.asarray(v).size) for v in sess.run(None, feeds))


@pytest.mark.parametrize("name,mode", [("TripletMarginMiner", "self"),
                                       ("TripletMarginMiner", "anchors"),
                                       ("AngularMiner", "ref"), ("HDCMiner", "self"),
                                       ("DistanceWeightedMiner", "ref"),
                                       ("UniformHistogramMiner", "self"),
                                       ("BatchHardMiner", "anchors")])
def test_largest_tensors_metadata_bounds_every_intermediate(name, mode):
    """The symbolic largest-tensor shapes in the metadata give exactly the element count
    of the biggest tensor the graph really computes (what the CUDA guard relies on)."""
    _, path = onnx_graph_cache.graph(name, 0, with_ref=mode == "ref",
                                     anchor_blocks=mode == "anchors")
    om = OnnxMiner(path)
    for n, m in ((7, 11), (13, 5)):
        b = random_batch(m if mode == "anchors" else n, D, m=m if mode == "ref" else None, seed=n)
        feeds = {"embeddings": b["embeddings"], "labels": b["labels"]}
        if mode == "ref":
            feeds.update(ref_emb=b["ref_emb"], ref_labels=b["ref_labels"])
        if mode == "anchors":
            feeds["anchor_index"] = np.arange(min(n, m), dtype=np.int64)
            rows = min(n, m)
        else:
            rows, m = n, (m if mode == "ref" else n)
        if om.is_random:
            feeds["noise"] = np.random.default_rng(0).random(om.noise_shape(rows, m))
        assert om.largest_tensor_elements(rows, m, D) == _all_intermediate_sizes(path, feeds)


def test_eval_dim_expressions():
    sizes = {"N": 5, "M": 7, "D": 3}
    assert [md._eval_dim(x, sizes) for x in (4, "N", "2*N", "N**2", "M*N", "N + 1", "M//2")] \
        == [4, 5, 10, 25, 35, 6, 3]
    assert md._eval_dim("s7", sizes) is None and md._eval_dim("N*(", sizes) is None
    assert md._eval_dim("__import__('os')", sizes) is None
    assert md.largest_elements([["N", "M"], ["N", "M", "M"], ["Q"]], sizes) == 245


def test_cuda_size_guard_chunks_or_refuses(monkeypatch):
    """On the CUDA EP no tensor may pass 2^31 - 1 elements: chunkable graphs are mined in
    blocks below it (same result), the rest raise ValueError before running. Simulated
    here with a small limit on the CPU EP."""
    monkeypatch.setattr(onnx_miner, "CUDA_MAX_ELEMENTS", 600)
    b = random_batch(12, D, seed=5)
    args = (b["embeddings"], b["labels"])
    miner, path = onnx_graph_cache.graph("TripletMarginMiner", anchor_blocks=True)
    want = OnnxMiner(path)(*args)
    om = OnnxMiner(path)
    om.on_cuda = True                       # 12 x 12 x 12 = 1728 > 600: blocks of 4 rows
    assert om._rows_per_block(12, 12, D) == 4
    assert _same(om(*args), want)
    with pytest.raises(ValueError, match="return_raw"):
        om(*args, return_raw=True)
    big = random_batch(30, D, seed=6)       # 30 x 30 = 900 > 600 even for one anchor row
    with pytest.raises(ValueError, match="27,000 elements.*one anchor row needs 900 elements: mine smaller batches"):
        om(big["embeddings"], big["labels"])
    _, self_path = onnx_graph_cache.graph("TripletMarginMiner")
    om = OnnxMiner(self_path)
    om.on_cuda = True
    with pytest.raises(ValueError, match="1,728 elements.*anchor_blocks=True"):
        om(*args)
    _, hdc = onnx_graph_cache.graph("HDCMiner")
    om = OnnxMiner(hdc)
    om.on_cuda = True
    # its largest tensors: [N, N] and a fixed 2 x 1,024-bin x 64-lane histogram (131,072)
    monkeypatch.setattr(onnx_miner, "CUDA_MAX_ELEMENTS", 140000)
    small = random_batch(300, D, seed=7)     # 300 x 300 = 90,000 fits
    assert as_multisets(om(small["embeddings"], small["labels"]), "pairs") == \
        as_multisets(OnnxMiner(hdc)(small["embeddings"], small["labels"]), "pairs")
    big = random_batch(400, D, seed=8)       # 400 x 400 = 160,000 does not
    with pytest.raises(ValueError, match="HDCMiner.*mine smaller batches"):
        om(big["embeddings"], big["labels"])


def _count_runs(om):
    """Wrap ``om.session.run`` to count calls; returns the list of anchor counts per run."""
    runs = []
    real = om.session.run

    def counting(names, feeds, *rest):
        runs.append(len(feeds.get("anchor_index", feeds["embeddings"])))
        return real(names, feeds, *rest)

    om.session.run = counting
    return runs


def test_cpu_default_blocks_for_chunkable_graphs(monkeypatch):
    """Off the CUDA EP a chunkable graph called without chunk_size / max_block_elements is
    mined in blocks within CPU_BLOCK_ELEMENTS (shrunk here): the same tuples as eager and
    as one run, in the same order. Explicit chunking wins; return_raw stays one run; a
    dense self-mining graph is never cut."""
    b = random_batch(12, D, seed=15)
    args = (b["embeddings"], b["labels"])
    miner, path = onnx_graph_cache.graph("TripletMarginMiner", anchor_blocks=True)
    one = OnnxMiner(path, chunk_size=12, providers=CPU)(*args)
    assert as_multisets(one, "triplets") == as_multisets(eager_tuples(miner, b), "triplets")
    monkeypatch.setattr(onnx_miner, "CPU_BLOCK_ELEMENTS", 600)   # 12 x 12 x 12 = 1728
    om = OnnxMiner(path, providers=CPU)
    runs = _count_runs(om)
    assert _same(om(*args), one) and runs == [4, 4, 4]
    runs.clear()
    assert len(om(*args, return_raw=True)) == len(om.output_names) and runs == [12]
    om = OnnxMiner(path, chunk_size=6, providers=CPU)
    runs = _count_runs(om)
    assert _same(om(*args), one) and runs == [6, 6]
    om = OnnxMiner(path, max_block_elements=10 ** 6, providers=CPU)
    runs = _count_runs(om)
    assert _same(om(*args), one) and runs == [12]
    _, dense = onnx_graph_cache.graph("TripletMarginMiner")
    om = OnnxMiner(dense, providers=CPU)
    runs = _count_runs(om)
    assert as_multisets(om(*args), "triplets") == as_multisets(one, "triplets") and runs == [12]


def test_cpu_memory_guard(monkeypatch):
    """Off the CUDA EP a call whose largest tensor has more elements than the machine has
    bytes fails before running, with a way out; chunkable graphs are cut below it."""
    assert onnx_miner.physical_memory_bytes() > 2 ** 28    # a real figure on this OS
    monkeypatch.setattr(onnx_miner, "physical_memory_bytes", lambda: 1000)
    b = random_batch(12, D, seed=16)
    args = (b["embeddings"], b["labels"])
    miner, dense = onnx_graph_cache.graph("TripletMarginMiner")
    with pytest.raises(ValueError, match=r"self-mining 12 rows .* 1,728 elements, more than "
                                         r"the 1,000 bytes of memory .*anchor_blocks=True"):
        OnnxMiner(dense, providers=CPU)(*args)
    _, path = onnx_graph_cache.graph("TripletMarginMiner", anchor_blocks=True)
    om = OnnxMiner(path, providers=CPU)
    runs = _count_runs(om)
    got = om(*args)                       # 6 rows x 144 = 864 elements fit
    assert runs == [6, 6]
    assert as_multisets(got, "triplets") == as_multisets(eager_tuples(miner, b), "triplets")
    with pytest.raises(ValueError, match="return_raw"):
        om(*args, return_raw=True)
    om = OnnxMiner(path, chunk_size=12, providers=CPU)   # asked-for blocks past the limit
    runs = _count_runs(om)
    assert _same(om(*args), got) and runs == [6, 6]
    bh_miner, bh = onnx_graph_cache.graph("BatchHardMiner")    # largest tensors [N, N]: fit
    assert as_multisets(OnnxMiner(bh, providers=CPU)(*args), "triplets") == \
        as_multisets(eager_tuples(bh_miner, b), "triplets")
    monkeypatch.setattr(onnx_miner, "physical_memory_bytes", lambda: None)
    assert as_multisets(OnnxMiner(dense, providers=CPU)(*args), "triplets") == as_multisets(got, "triplets")


def test_cpu_default_blocks_respect_tensors_every_run_computes(monkeypatch):
    """A tensor that does not grow with the anchors (here the reference set's [D, M]) is
    computed by every run: the default CPU blocks grow to its size instead of shrinking
    to one row. Inputs that cannot be sliced (an OrtValue) are mined in one run rather
    than refused; with an explicit chunk_size they are refused, naming it."""
    monkeypatch.setattr(onnx_miner, "CPU_BLOCK_ELEMENTS", 1000)
    miner, path = onnx_graph_cache.ref_graph("BatchHardMiner")
    om = OnnxMiner(path, providers=CPU)
    assert ["D", "M"] in om.largest_tensors
    b = random_batch(64, D, m=200, seed=18)     # [D, M] = 1,600 > 1,000; [N, M] = 200 a row
    args = (b["embeddings"], b["labels"], b["ref_emb"], b["ref_labels"])
    assert om._rows_per_block(64, 200, D) == 8
    runs = _count_runs(om)
    got = om(*args)
    assert runs == [8] * 8
    assert as_multisets(got, "triplets") == as_multisets(eager_tuples(miner, b), "triplets")
    if hasattr(ort.OrtValue, "from_dlpack"):
        as_ort = [ort.OrtValue.ortvalue_from_numpy(a) for a in args]
        assert _same(om(*as_ort), got)               # one run through IOBinding
        with pytest.raises(ValueError, match=r"embeddings: mining in anchor blocks \(5 of 64 "
                                             r"rows a run, for chunk_size\).*not OrtValue"):
            OnnxMiner(path, providers=CPU, chunk_size=5)(*as_ort)


def test_largest_tensor_sizes_are_remembered_within_a_bound():
    _, path = onnx_graph_cache.graph("TripletMarginMiner", anchor_blocks=True)
    om = OnnxMiner(path, providers=CPU)
    for n in range(1, 600):
        want = md.largest_elements(om.largest_tensors, {"N": n, "M": 2 * n, "D": D})
        assert om.largest_tensor_elements(n, 2 * n, D) == want >= n * 4 * n * n   # [N, M, M]
        assert om.largest_tensor_elements(n, 2 * n, D) == want   # remembered
        assert len(om._largest_seen) <= 256


def test_memory_limit_reads_the_cgroup(tmp_path):
    """The memory guard's limit: the lowest memory limit on this process's cgroup and its
    parents (v2 memory.max, v1 memory.limit_in_bytes), "max" and v1's huge number
    meaning none."""
    from exportminers.runtime.onnx_miner import _cgroup_limit, physical_memory_bytes
    root, proc = tmp_path / "cg", tmp_path / "cgroup"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "memory.max").write_text("max\n")
    (root / "a" / "memory.max").write_text("1073741824\n")
    proc.write_text("0::/a/b\n")
    assert _cgroup_limit(str(proc), str(root)) == 2 ** 30      # the parent's limit
    (root / "a" / "b" / "memory.max").write_text("536870912\n")
    assert _cgroup_limit(str(proc), str(root)) == 2 ** 29      # the lower one wins
    (root / "memory" / "job").mkdir(parents=True)
    (root / "memory" / "job" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc.write_text("4:memory:/job\n1:cpu:/job\n")
    assert _cgroup_limit(str(proc), str(root)) is None
    (root / "memory" / "memory.limit_in_bytes").write_text("3221225472\n")
    assert _cgroup_limit(str(proc), str(root)) == 3 * 2 ** 30
    assert _cgroup_limit(str(tmp_path / "absent"), str(root)) is None
    total = physical_memory_bytes()
    assert total is not None and total > 2 ** 28


def test_allocation_failure_is_memory_error(monkeypatch):
    """ONNX Runtime failing to allocate becomes a MemoryError saying what to change; any
    other failure passes through as it was."""
    b = random_batch(9, D, seed=17)
    _, dense = onnx_graph_cache.graph("TripletMarginMiner")
    om = OnnxMiner(dense, providers=CPU)

    def fail(text):
        def run(*a, **k):
            raise RuntimeError(text)
        return run

    om.session.run = fail("[ONNXRuntimeError] : 1 : FAIL : bfc_arena.cc:360 Failed to allocate "
                          "memory for requested buffer of size 68719476736")
    with pytest.raises(MemoryError, match=r"TripletMarginMiner graph on 9 anchor rows against "
                                          r"9 references \(largest tensor 729 elements; "
                                          r"Failed to allocate memory for requested buffer of "
                                          r"size 68719476736\); export the miner with "
                                          r"anchor_blocks=True"):
        om(b["embeddings"], b["labels"])
    om.session.run = fail("std::bad_alloc")      # ONNX Runtime without its CPU arena
    with pytest.raises(MemoryError, match="bad_alloc"):
        om(b["embeddings"], b["labels"])
    with pytest.raises(MemoryError, match=r"return_raw=True is one run: mine fewer anchors "
                                          r"per call$"):
        om(b["embeddings"], b["labels"], return_raw=True)
    om.session.run = fail("some other failure")
    with pytest.raises(RuntimeError, match="^some other failure$"):
        om(b["embeddings"], b["labels"])
    _, path = onnx_graph_cache.graph("TripletMarginMiner", anchor_blocks=True)
    om = OnnxMiner(path, providers=CPU)
    om.session.run = fail("CUDA failure 2: out of memory")
    with pytest.raises(MemoryError, match=r"out of memory\); pass a smaller max_block_elements"):
        om(b["embeddings"], b["labels"])
    with pytest.raises(MemoryError, match="drop return_raw to mine in anchor blocks"):
        om(b["embeddings"], b["labels"], return_raw=True)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="RLIMIT_AS: Linux")
def test_real_allocation_failure_is_memory_error(tmp_path):
    """Under a 3 GiB address-space limit, a dense TripletMarginMiner graph at N = 1600
    (4.1e9 one-byte mask elements) cannot allocate: a MemoryError, then the same session
    still mines a small batch."""
    _, dense = onnx_graph_cache.graph("TripletMarginMiner")
    code = textwrap.dedent(f"""
        import resource
        import numpy as np
        from exportminers.runtime import OnnxMiner, onnx_miner
        onnx_miner.physical_memory_bytes = lambda: None   # leave the failure to ONNX Runtime
        om = OnnxMiner({str(dense)!r}, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        x = rng.normal(size=(1600, {D})).astype(np.float32)
        y = rng.integers(0, 200, 1600)
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2 ** 30, resource.RLIM_INFINITY))
        try:
            om(x, y)
        except MemoryError as e:
            print("MEMORYERROR", e)
        small = om(x[:30], y[:30])
        print("SMALL", len(small[0]))
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MEMORYERROR embeddings: ONNX Runtime ran out of memory running this " \
           "TripletMarginMiner graph on 1600 anchor rows" in out.stdout, out.stdout + out.stderr
    assert "anchor_blocks=True" in out.stdout
    assert int(out.stdout.split("SMALL")[1]) > 0


def test_memory_guard_reads_the_rlimits(tmp_path):
    """The guard's limit includes the soft RLIMIT_AS / RLIMIT_DATA (the lower one): under a
    3 GiB address-space limit a dense N = 1600 call (4.1e9 mask elements) is refused
    before running, naming the limit, instead of failing inside ONNX Runtime."""
    _, dense = onnx_graph_cache.graph("TripletMarginMiner")
    code = textwrap.dedent(f"""
        import resource
        import numpy as np
        from exportminers.runtime import OnnxMiner, onnx_miner
        resource.setrlimit(resource.RLIMIT_AS, (3 * 2 ** 30, resource.RLIM_INFINITY))
        resource.setrlimit(resource.RLIMIT_DATA, (5 * 2 ** 29, resource.RLIM_INFINITY))
        print("RLIMIT", onnx_miner._rlimit_bytes())
        resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print("LIMIT", onnx_miner.physical_memory_bytes())
        om = OnnxMiner({str(dense)!r}, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        x = rng.normal(size=(1600, {D})).astype(np.float32)
        y = rng.integers(0, 200, 1600)
        try:
            om(x, y)
        except ValueError as e:
            print("VALUEERROR", e)
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"RLIMIT {5 * 2 ** 29}" in out.stdout, out.stdout
    assert f"LIMIT {3 * 2 ** 30}" in out.stdout, out.stdout
    assert "VALUEERROR embeddings: self-mining 1600 rows makes this TripletMarginMiner graph " \
           "compute a tensor of 4,096,000,000 elements, more than the 3,221,225,472 bytes" \
           in out.stdout, out.stdout
    assert "or its rlimit" in out.stdout and "anchor_blocks=True" in out.stdout


def test_joining_blocks_lets_go_of_each_piece():
    """Anchor blocks are joined into outputs allocated once, each block's piece dropped
    once copied (peak: the output plus one piece, not twice the output), anchor fields
    shifted by their block's start; numpy and torch alike."""
    import gc
    import weakref
    _, path = onnx_graph_cache.graph("TripletMarginMiner", anchor_blocks=True)
    om = OnnxMiner(path, providers=CPU)
    assert om._anchor_fields == [0]
    rng = np.random.default_rng(3)
    for lib in ("numpy", "torch"):
        starts = [0, 4, 9]
        pieces = [[rng.integers(0, 5, k) for _ in range(3)] for k in (3, 0, 5)]
        want = [np.concatenate([p[f] + (s if f == 0 else 0) for s, p in zip(starts, pieces)])
                for f in range(3)]
        if lib == "torch":
            pieces = [[torch.from_numpy(a) for a in p] for p in pieces]
            empty = lambda n, like: torch.empty(n, dtype=like.dtype)   # noqa: E731
        else:
            empty = onnx_miner._np_empty
        refs = [weakref.ref(a) for p in pieces for a in p]
        blocks = [(s, p) for s, p in zip(starts, pieces)]
        del pieces
        got = om._join(blocks, empty)
        gc.collect()
        assert all(r() is None for r in refs), lib
        assert all(np.array_equal(np.asarray(g), w) for g, w in zip(got, want)), lib
        assert all(np.asarray(g).dtype == np.int64 for g in got)


def test_reference_labels_object_identity_warns():
    """PML keys its no-(i, i) rule on ``ref_labels is labels``; a graph cannot see object
    identity, so passing the very labels object to a with_ref graph warns (once per call
    site), a copy does not, and the result is the distinct-reference-set one."""
    import warnings
    miner, path = onnx_graph_cache.graph("TripletMarginMiner", 3, with_ref=True)   # easy
    assert miner.type_of_triplets == "easy"
    om = OnnxMiner(path, providers=CPU)
    b = random_batch(10, D, seed=19)
    x, y = b["embeddings"], b["labels"]
    with pytest.warns(UserWarning, match=r"ref_labels is the labels object itself.*labels\.copy\(\)") as rec:
        same = om(x, y, x, y)
    assert rec[0].filename == __file__       # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # a call refused by validation does not warn
        with pytest.raises(ValueError, match="ref_emb"):
            om(x, y, None, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        copied = om(x, y, x.copy(), y.copy())
        _, self_path = onnx_graph_cache.graph("TripletMarginMiner")
        OnnxMiner(self_path, providers=CPU)(x, y)
    assert _same(same, copied)
    distinct = {"embeddings": x, "labels": y, "ref_emb": x.copy(), "ref_labels": y.copy()}
    assert as_multisets(copied, "triplets") == \
        as_multisets(eager_tuples(miner, distinct), "triplets")
    assert any(int(a) == int(p) for a, p in zip(copied[0], copied[1]))   # (i, i) pairs occur
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    eager_same = [t.numpy() for t in miner(tx, ty, tx, ty)]
    assert not any(int(a) == int(p) for a, p in zip(*eager_same[:2]))    # not in eager's
    if hasattr(ort.OrtValue, "from_dlpack"):
        t = torch.from_numpy(y)
        with pytest.warns(UserWarning, match="ref_labels is the labels object itself") as rec:
            om(torch.from_numpy(x), t, torch.from_numpy(x), t)
        assert rec[0].filename == __file__


def test_row_independence_flags():
    assert export.ROW_INDEPENDENT.isdisjoint({"HDCMiner", "UniformHistogramMiner",
                                              "DistanceWeightedMiner", "MaximumLossMiner"})
    assert export.ROW_INDEPENDENT <= set(registry.MINERS)


# ------------------------------------------------------------------------ IOBinding / DLPack


def test_iobinding_with_torch_tensors(graphs):
    miner, path = graphs("BatchHardMiner", with_ref=True)
    om = OnnxMiner(path)
    b = random_batch(13, D, m=11, seed=8)
    t = [torch.from_numpy(b[k]) for k in ("embeddings", "labels", "ref_emb", "ref_labels")]
    want = miner(*t)
    host = om(*[x.numpy() for x in t])
    assert _same(host, [w.numpy() for w in want])
    # torch inputs: numpy outputs by default, torch tensors with device_output=True
    assert _same(om(*t), host)
    # device embeddings with host labels (bound as CPU inputs)
    assert _same(om(t[0], b["labels"], t[2], b["ref_labels"].tolist()), host)
    assert _same(OnnxMiner(path, chunk_size=4)(t[0], b["labels"], t[2], b["ref_labels"]), host)
    dev = om(t[0].double(), t[1].int(), t[2].double(), t[3], device_output=True)
    assert all(isinstance(d, torch.Tensor) and d.dtype == torch.int64 for d in dev)
    assert _same([d.numpy() for d in dev], host)
    raw = om(*t, return_raw=True)
    assert all(isinstance(r, ort.OrtValue) for r in raw)
    mask, pos, neg = [torch.from_dlpack(r) for r in raw]
    if mask.dtype == torch.uint8:   # onnxruntime 1.26 hands bool tensors to DLPack as uint8
        assert set(mask.tolist()) <= {0, 1}
        mask = mask.bool()
    assert mask.dtype == torch.bool and mask.shape == (13,)
    assert _same(decode_torch([mask, pos, neg], miner.layout), want)


def test_iobinding_with_generic_dlpack_arrays(graphs):
    _, path = graphs("PairMarginMiner")
    om = OnnxMiner(path)
    b = random_batch(10, D, seed=9)
    host = om(b["embeddings"], b["labels"])
    x = ort.OrtValue.ortvalue_from_numpy(b["embeddings"])
    y = ort.OrtValue.ortvalue_from_numpy(b["labels"])
    assert _same(om(x, y), host)
    with pytest.raises(ValueError, match="labels"):
        om(x, ort.OrtValue.ortvalue_from_numpy(b["labels"].astype(np.int32)))
    bad = b["embeddings"].copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        om(ort.OrtValue.ortvalue_from_numpy(bad), y)
    with pytest.raises(ValueError, match="device_output"):
        om(x, y, device_output=True)
    with pytest.raises(ValueError, match="device_output"):
        om(b["embeddings"], b["labels"], device_output=True)


# ------------------------------------------------------------------------ torch-free


def test_runs_without_torch(graphs, tmp_path):
    """Export here, then in a child where ``import torch`` fails: import, run, decode."""
    cases = {"pairs": graphs("PairMarginMiner")}
    if hasattr(exportminers.miners, "DistanceWeightedMiner"):
        cases["random"] = graphs("DistanceWeightedMiner")
    b = random_batch(12, D, seed=12)
    np.savez(tmp_path / "batch.npz", **b)
    expected = {}
    for key, (miner, path) in cases.items():
        noise = None
        if key == "random":
            noise = np.random.default_rng(1).random(OnnxMiner(path).noise_shape(12, 12))
            np.save(tmp_path / "noise.npy", noise)
        expected[key] = [a.tolist() for a in eager_tuples(miner, b, noise)]
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["torch"] = None          # any `import torch` now raises ImportError
        import numpy as np
        import exportminers
        from exportminers import OnnxMiner
        b = np.load({str(tmp_path / 'batch.npz')!r})
        paths = {json.dumps({k: p for k, (m, p) in cases.items()})}
        out = {{}}
        for key, path in paths.items():
            om = OnnxMiner(path, seed=0)
            noise = np.load({str(tmp_path / 'noise.npy')!r}) if key == "random" else None
            res = om(b["embeddings"], b["labels"], noise=noise)
            out[key] = [a.tolist() for a in res]
            om(b["embeddings"], b["labels"])                 # seeded noise path too
            try:
                om(b["embeddings"], b["labels"][:-1])
            except ValueError as e:
                assert str(e).startswith("labels"), e
            else:
                raise AssertionError("no ValueError")
        assert not any(k == "torch" or k.startswith("torch.") for k, v in sys.modules.items()
                       if v is not None)
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    for key in cases:
        kind = "pairs" if key == "pairs" else registry.MINERS["DistanceWeightedMiner"].output
        assert as_multisets(got[key], kind) == as_multisets(expected[key], kind), key


# ------------------------------------------------------------------------ placement
# (the CUDA checks themselves: tests/test_cuda.py)


def test_node_placement_reads_onnx_runtimes_log(graphs):
    from exportminers.runtime import placement as pl
    _, path = graphs("BatchHardMiner")
    placed = pl.node_placement(path, ["CPUExecutionProvider"])
    assert list(placed) == ["CPUExecutionProvider"]
    assert placed["CPUExecutionProvider"]["ops"] is None
    assert placed["CPUExecutionProvider"]["nodes"] >= 10
    assert pl.cpu_nodes(placed, ["X"]) == ["X"]
    log = "\n".join([
        "t [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp] Node placements",
        "t [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed "
        "on [CUDAExecutionProvider].    Number of nodes: 2",
        "t [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp]   MatMul (mm)",
        "t [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp]   TopK (topk)",
        "t [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed "
        "on [CPUExecutionProvider]. Number of nodes: 1",
        "t [V:onnxruntime:, session_state.cc:1 VerifyEachNodeIsAssignedToAnEp]   Shape (s)",
        "t [V:onnxruntime:, other.cc:1 Something]   Gather (g)"])
    placed = pl.parse_placement(log)
    assert placed == {"CUDAExecutionProvider": {"nodes": 2, "ops": ["MatMul", "TopK"]},
                      "CPUExecutionProvider": {"nodes": 1, "ops": ["Shape"]}}
    assert pl.cpu_nodes(placed) == ["Shape"]
    # a strict session names the first provider alone; with the CPU EP it is refused
    sess, why = pl.strict_session(path, "CPUExecutionProvider")
    assert sess is None and "CPU" in why
