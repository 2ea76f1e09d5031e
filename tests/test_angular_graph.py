"""AngularMiner's exported graph: its Atan-free, mask-free angle test
(``_graph_angles_exceed``) gives the eager miner's triplets on ONNX Runtime, for
thresholds across the whole range (0, small, typical, near 90 degrees, at and beyond 90,
negative), self and reference graphs, float32 and float16, on batches with exact and
near duplicates (tiny |a - p| and |n - c|, where the rearranged comparison is most
delicate). Differences are allowed only for tuples that flip under a small perturbation
(exportminers.verify)."""
import hashlib

import numpy as np
import pytest
import torch

import exportminers as em
from exportminers import verify
from exportminers.runtime import OnnxMiner

ANGLES = [0.0, 0.5, 15.0, 20.0, 35.0, 45.0, 60.0, 89.5, 90.0, 120.0, -10.0]
_GRAPHS = {}


def _graph(tmp_path_factory, angle, with_ref, dtype):
    key = (angle, with_ref, dtype)
    if key not in _GRAPHS:
        path = tmp_path_factory.mktemp("angular") / f"a{angle}_{int(with_ref)}_{dtype}.onnx"
        miner = em.miners.AngularMiner(angle=angle)
        em.export_onnx(miner, str(path), with_ref=with_ref,
                       dtype=torch.float16 if dtype == "float16" else torch.float32)
        _GRAPHS[key] = (miner, OnnxMiner(str(path), providers=["CPUExecutionProvider"]))
    return _GRAPHS[key]


def _batch(tag, n, d, m, dtype):
    rng = np.random.default_rng(int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16))
    labels = rng.integers(0, max(2, n // 5), n)
    x = rng.standard_normal((n, d))
    # exact duplicates, near duplicates (|a - p| ~ 1e-3) and a point midway between two
    x[1] = x[0]
    x[2] = x[0] + 1e-3 * rng.standard_normal(d)
    labels[1] = labels[2] = labels[0]
    x[3] = (x[4] + x[5]) / 2
    out = {"embeddings": x.astype(dtype), "labels": labels.astype(np.int64)}
    if m is not None:
        r = rng.standard_normal((m, d))
        r[0] = x[0]
        r[1] = x[0] + 1e-3 * rng.standard_normal(d)
        rl = rng.integers(0, max(2, n // 5), m)
        rl[0] = rl[1] = labels[0]
        out["ref_emb"] = r.astype(dtype)
        out["ref_labels"] = rl.astype(np.int64)
    return out


@pytest.mark.parametrize("with_ref", [False, True])
@pytest.mark.parametrize("angle", ANGLES)
def test_graph_equals_eager(tmp_path_factory, angle, with_ref):
    miner, om = _graph(tmp_path_factory, angle, with_ref, "float32")
    for trial, (n, d) in enumerate([(24, 3), (40, 8), (31, 16)]):
        batch = _batch(f"{angle}-{with_ref}-{trial}", n, d, 27 if with_ref else None,
                       np.float32)
        got = om(**batch)
        want = verify.eager_tuples(miner, batch)
        sens = verify.sensitive_tuples(miner, batch, "triplets", verify.PERTURBATION["float32"])
        ok, info = verify.compare(got, want, "triplets", sens)
        assert ok, (angle, with_ref, n, d, info)
        assert verify.valid_tuples(got, "triplets", batch)
        if angle >= 90.0:
            assert len(got[0]) == 0
        if angle < 0.0:   # every valid triplet
            y = batch["labels"]
            ry = batch.get("ref_labels", y)
            pos = (y[:, None] == ry[None, :])
            if not with_ref:
                np.fill_diagonal(pos, False)
            neg = y[:, None] != ry[None, :]
            assert len(got[0]) == int((pos.sum(1) * neg.sum(1)).sum())


@pytest.mark.parametrize("angle", [20.0, 45.0])
def test_float16_graph_equals_eager(tmp_path_factory, angle):
    miner, om = _graph(tmp_path_factory, angle, False, "float16")
    for trial in range(3):
        batch = _batch(f"half-{angle}-{trial}", 36, 8, None, np.float16)
        got = om(**batch)
        want = verify.eager_tuples(miner, batch)
        sens = verify.sensitive_tuples(miner, batch, "triplets", verify.PERTURBATION["float16"])
        ok, info = verify.compare(got, want, "triplets", sens)
        assert ok, (angle, trial, info)


def test_graph_has_one_float_cube():
    """The exported test builds one float64 [N, M, M] tensor and compares it: no
    square root, division or mask cube over all triplets (memory and speed)."""
    import onnx
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/a.onnx"
        em.export_onnx(em.miners.AngularMiner(), path)
        ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("Sqrt") == 1     # |a - p| (an [N, M] term)
    assert ops[-1] == "Less"          # the cube's only comparison is the output


@pytest.mark.parametrize("angle", [0.0, 20.0, 90.0])
def test_graph_ranks_and_no_shape_nodes(tmp_path, angle):
    """Only one Sub and the Less compute rank-3 tensors (shape inference), and
    edge thresholds add no shape computation (strict CUDA placement needs none)."""
    import onnx
    from onnx import shape_inference

    from exportminers import export

    path = str(tmp_path / "a.onnx")
    em.export_onnx(em.miners.AngularMiner(angle=angle), path, embedding_dim=4)
    model = onnx.load(path)
    assert not {n.op_type for n in model.graph.node} & export.SHAPE_OPS
    for inp in model.graph.input:
        for dim in inp.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.Clear()
                dim.dim_value = 7
    inferred = shape_inference.infer_shapes(model)
    rank = {v.name: len(v.type.tensor_type.shape.dim)
            for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    cube_ops = [n.op_type for n in inferred.graph.node
                if any(rank.get(o) == 3 for o in n.output)]
    # (Unsqueeze makes rank-3 views of [N, M] terms, no cube)
    assert [op for op in cube_ops if op != "Unsqueeze"] == ["Sub", "Less"], cube_ops
