"""ONNX export: every registry miner and configuration exports once and runs on ONNX
Runtime (CPU) at several batch sizes with the eager miner's tuples.

Graphs are exported once per (miner, config, variant) and cached for the session, as in
torchvision's ONNX tests (export at one input size, run at others). Comparisons go
through :func:`exportminers.verify.verify_graph`: deterministic miners must match eager
exactly except tuples whose decision flips under a 1e-4 relative input perturbation;
random miners get the same noise as eager.
"""
import json

import numpy as np
import onnx
import pytest
import torch

import exportminers
from exportminers import export, registry
from exportminers.runtime import OnnxMiner
from exportminers.runtime import metadata as md
from exportminers.verify import compare, eager_tuples, random_batch, sensitive_tuples, verify_graph

import onnx_graph_cache

D = onnx_graph_cache.D
AVAILABLE = [n for n in registry.MINERS if hasattr(exportminers.miners, n)]
CASES = [pytest.param(n, i, id=f"{n}-{i}")
         for n in AVAILABLE for i in range(len(registry.MINERS[n].configs))]
FIRST = [pytest.param(n, id=n) for n in AVAILABLE]
REF_MINERS = [pytest.param(n, id=n) for n in AVAILABLE if n not in export.SELF_ONLY]
HALF_MINERS = [n for n in ("TripletMarginMiner", "PairMarginMiner") if n in AVAILABLE]
# Graphs that must stay free of shape-computing nodes (GPU_FACTS.md: strict CUDA placement).
# The other one sorts (DistanceWeighted): ONNX has no Sort, so a stable full-length TopK
# stands in, and its k is the axis length (Shape -> Gather); nothing else. (HDC selects
# its cut-offs with a radix select and UniformHistogram draws by counting: no TopK.)
SORTING = {"DistanceWeightedMiner"}
SHAPE_FREE = [n for n in AVAILABLE if n not in SORTING]

@pytest.fixture(scope="session")
def graphs():
    """``get(name, cfg, with_ref=False, dtype=float32, embedding_dim=D, compact=False)``
    -> (miner, path), from the session-wide export cache."""

    def get(name, cfg=0, **kwargs):
        return onnx_graph_cache.graph(name, cfg, **kwargs)

    return get


def _assert_verified(report):
    assert report["ok"], json.dumps(report["runs"], indent=1)


def _dims(value_info):
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# ------------------------------------------------------------------------ parity


@pytest.mark.parametrize("name,cfg", CASES)
def test_parity_self(graphs, name, cfg):
    miner, path = graphs(name, cfg)
    counts = export.op_types(path)
    assert not export.FORBIDDEN_OPS.intersection(counts), counts
    _assert_verified(verify_graph(miner, path, sizes=(12, 20), seed=cfg))


def _ref_graph(name):
    """with_ref graph with a dynamic embedding width."""
    return onnx_graph_cache.ref_graph(name)


@pytest.mark.parametrize("name", REF_MINERS)
def test_parity_with_ref(graphs, name):
    miner, path = _ref_graph(name)
    model = onnx.load(path)
    assert [i.name for i in model.graph.input][:4] == ["embeddings", "labels", "ref_emb", "ref_labels"]
    assert _dims(model.graph.input[2])[0] == "M"
    # anchor count differs from the reference count, and both differ from the export's
    _assert_verified(verify_graph(miner, path, sizes=(12, 20), ref_sizes=(17, 7), seed=3))


@pytest.mark.parametrize("name", sorted(export.SELF_ONLY & set(AVAILABLE)))
def test_self_only_miners_reject_with_ref(name, tmp_path):
    miner = export.build_miner(name, registry.MINERS[name].configs[0])
    with pytest.raises(ValueError, match="with_ref"):
        export.export_onnx(miner, tmp_path / "x.onnx", with_ref=True)


@pytest.mark.parametrize("name", HALF_MINERS)
def test_float16(graphs, name):
    miner, path = graphs(name, 0, dtype=torch.float16)
    model = onnx.load(path)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert OnnxMiner(path).dtype == np.float16
    _assert_verified(verify_graph(miner, path, sizes=(12, 20), seed=5))


@pytest.mark.parametrize("name", FIRST)
def test_dynamic_embedding_dim(graphs, name):
    """embedding_dim=None keeps D dynamic (checked on the with_ref graph where there is one)."""
    with_ref = name not in export.SELF_ONLY
    miner, path = graphs(name, 0, with_ref=with_ref, embedding_dim=None)
    assert _dims(onnx.load(path).graph.input[0]) == ["N", "D"]
    om = OnnxMiner(path, seed=0)
    for d in (5, 11):
        batch = random_batch(12, d, m=10 if with_ref else None, seed=d)
        args = [batch[k] for k in ("embeddings", "labels", "ref_emb", "ref_labels") if k in batch]
        noise = None
        if om.is_random:
            noise = np.random.default_rng(d).random(om.noise_shape(12, 10 if with_ref else 12))
        got = om(*args, noise=noise)
        got = [got] if isinstance(got, np.ndarray) else list(got)
        want = eager_tuples(miner, batch, noise)
        ok, info = compare(got, want, om.output_kind)
        if not ok:
            ok, info = compare(got, want, om.output_kind,
                               sensitive_tuples(miner, batch, om.output_kind, 1e-4, noise))
        assert ok, (d, info)


# ------------------------------------------------------------------------ graph content


@pytest.mark.parametrize("mode", ["self", "ref", "anchors"])
@pytest.mark.parametrize("name", SHAPE_FREE)
def test_no_shape_nodes(graphs, name, mode):
    """Graphs of the non-sorting miners compute no shapes (strict CUDA placement)."""
    if mode == "ref" and name in export.SELF_ONLY:
        return
    if mode == "anchors" and name not in export.ROW_INDEPENDENT:
        return
    for cfg in range(len(registry.MINERS[name].configs)):
        _, path = graphs(name, cfg, with_ref=mode == "ref", anchor_blocks=mode == "anchors")
        counts = export.op_types(path)
        assert not export.SHAPE_OPS.intersection(counts), (cfg, counts)
        assert "Expand" not in counts, (cfg, counts)


@pytest.mark.parametrize("name", sorted(SORTING & set(AVAILABLE)))
def test_sorting_miners_compute_shapes_only_for_topk_k(graphs, name):
    """The only shape computation left: each full-length TopK's k (Shape -> Gather)."""
    _, path = graphs(name, 0)
    g = onnx.load(path).graph
    users = {}
    for node in g.node:
        for i, name_in in enumerate(node.input):
            users.setdefault(name_in, []).append((node, i))
    shapes = [n for n in g.node if n.op_type in export.SHAPE_OPS]
    assert shapes
    assert "Expand" not in export.op_types(path)
    for node in shapes:
        assert node.op_type == "Shape", node.op_type
        (gather, _), = users[node.output[0]]
        assert gather.op_type == "Gather", gather.op_type
        for user, slot in users[gather.output[0]]:
            assert user.op_type == "TopK" and slot == 1, (user.op_type, slot)


@pytest.mark.parametrize("name", FIRST)
def test_metadata(graphs, name):
    miner, path = graphs(name, 0)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    meta = md.decode(props)
    assert meta[md.VERSION] == exportminers.__version__
    assert meta[md.MINER] == name
    assert meta[md.LAYOUT] == [list(p) for p in miner.layout]
    assert meta[md.INPUTS] == [i.name for i in model.graph.input]
    assert meta[md.OUTPUTS] == [o.name for o in model.graph.output]
    assert meta[md.OUTPUT_KIND] == registry.MINERS[name].output
    assert meta[md.WITH_REF] is False and meta[md.DTYPE] == "float32"
    assert meta[md.EMBEDDING_DIM] == D
    for key, value in registry.MINERS[name].configs[0].items():
        assert meta[md.CONFIG][key] == value, key
    assert "distance" in meta[md.CONFIG] or name == "EmbeddingsAlreadyPackagedAsTriplets"
    assert _dims(model.graph.input[0])[0] == "N"
    assert _dims(model.graph.input[1]) == ["N"]
    if registry.MINERS[name].random:
        noise = model.graph.input[-1]
        assert noise.name == "noise"
        assert noise.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE
        assert _dims(noise) == meta[md.NOISE_SHAPE]
        assert meta[md.NOISE_SHAPE] == export.noise_spec(miner, False)
    else:
        assert meta[md.NOISE_SHAPE] == []
    assert export.read_metadata(path)[md.MINER] == name


@pytest.mark.parametrize("name", [n for n in ("PairMarginMiner", "BatchHardMiner",
                                            "BatchEasyHardMiner") if n in AVAILABLE])
def test_compact(graphs, name):   # BatchEasyHard: a1 and a2 are one tensor in the kernel
    miner, path = graphs(name, 0, compact=True)
    assert "NonZero" in export.op_types(path)
    model = onnx.load(path)
    assert json.loads({p.key: p.value for p in model.metadata_props}[md.COMPACT]) is True
    om = OnnxMiner(path)
    for n in (9, 16):
        batch = random_batch(n, D, seed=n)
        got = om(batch["embeddings"], batch["labels"])
        want = eager_tuples(miner, batch)
        ok, info = compare(got, want, om.output_kind)
        if not ok:
            ok, info = compare(got, want, om.output_kind,
                               sensitive_tuples(miner, batch, om.output_kind, 1e-4))
        assert ok, info


def test_forbidden_ops_are_detected():
    """The walker sees nodes inside subgraphs and functions too."""
    inner = onnx.helper.make_graph([onnx.helper.make_node("NonZero", ["c"], ["z"])], "g", [], [])
    node = onnx.helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "m", [], []))
    assert export.op_types(model) == {"If": 1, "NonZero": 2}


# ------------------------------------------------------------------------ argument checks


def test_export_argument_checks(tmp_path):
    miner = exportminers.miners.PairMarginMiner()
    with pytest.raises(ValueError, match="dtype"):
        export.export_onnx(miner, tmp_path / "a.onnx", dtype=torch.float64)
    with pytest.raises(ValueError, match="embedding_dim"):
        export.export_onnx(miner, tmp_path / "a.onnx", embedding_dim=0)
    with pytest.raises(ValueError, match="opset"):
        export.export_onnx(miner, tmp_path / "a.onnx", opset="18")

    class Custom(exportminers.miners.BaseMiner):
        def mine(self, embeddings, labels, ref_emb, ref_labels):
            return exportminers.utils.loss_and_miner_utils.get_all_triplets_indices(labels)

    with pytest.raises(ValueError, match="kernel"):
        export.export_onnx(Custom(), tmp_path / "a.onnx")
    assert not (tmp_path / "a.onnx").exists()


def test_export_returns_path_and_opset(tmp_path):
    miner = exportminers.miners.PairMarginMiner()
    out = export.export_onnx(miner, tmp_path / "sub" / "pm.onnx", embedding_dim=4, opset=18)
    assert out == str(tmp_path / "sub" / "pm.onnx")
    model = onnx.load(out)
    assert [o.version for o in model.opset_import if o.domain == ""] == [18]


# The exporter writes a Python float that multiplies a float64 tensor as a float32
# constant; kernels pass such values as float64 tensors (_ops.f64). The one float32-rounded
# float64 constant allowed: ln 2 from the exporter's own log2 lowering (HDC's radix select
# corrects the exponent it derives from log2 and never needs it exact).
_EXPORTER_LOG2 = 0.6931471824645996
# Exact by design, and float32-representable: next_float's float64 step constants.
_EXACT_F32 = {2.0 ** -24 + 2.0 ** -40, 2.0 ** -149, 2.0 ** 128}


@pytest.mark.parametrize("mode", ["self", "ref"])
@pytest.mark.parametrize("name", AVAILABLE)
def test_float64_constants_are_not_float32_rounded(graphs, name, mode):
    if mode == "ref" and name in export.SELF_ONLY:
        return
    from onnx import numpy_helper
    for cfg in range(len(registry.MINERS[name].configs)):
        _, path = graphs(name, cfg, with_ref=mode == "ref")
        g = onnx.load(path).graph
        values = [numpy_helper.to_array(i) for i in g.initializer]
        values += [numpy_helper.to_array(a.t) for n in g.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"]
        for v in values:
            if v.dtype != np.float64:
                continue
            for x in map(float, v.ravel()[:64]):
                suspicious = np.isfinite(x) and float(np.float32(x)) == x and len(repr(x)) > 12
                assert not suspicious or x == _EXPORTER_LOG2 or x in _EXACT_F32, (cfg, x)
