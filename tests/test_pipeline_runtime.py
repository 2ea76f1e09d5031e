"""Offline mining pipeline: resume after a kill, torch-free runtime, shipped graphs."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest

from exportminers.pipeline import graphs
from exportminers.pipeline.mine import STOP_ENV

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from exportminers.pipeline import mine
    x = np.load(sys.argv[1]); y = np.load(sys.argv[2])
    mine(x, y, out_dir=sys.argv[3], k=3, strategy="semihard", margin=0.5,
         block_size=(8, 32), shard_size=16, progress=False, plot=False,
         formats=["triplets"], device="cpu")
""")


def _env(**extra):
    env = dict(os.environ)
    env.pop(STOP_ENV, None)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _data(tmp_path, n=100):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.normal(size=(n, 8)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 5, n))
    return str(tmp_path / "x.npy"), str(tmp_path / "y.npy")


def _run(args, **env):
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], env=_env(**env),
                          capture_output=True, text=True, timeout=120)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    x, y = _data(tmp_path)
    full, part = tmp_path / "full", tmp_path / "part"
    r = _run([x, y, str(full)])
    assert r.returncode == 0, r.stderr
    r = _run([x, y, str(part)], **{STOP_ENV: "3"})
    assert r.returncode == 75, r.stderr  # killed after 3 of 7 shards
    done = sorted(p.name for p in (part / "_shards").glob("*.parquet"))
    assert done == [f"part-0000{i}.parquet" for i in range(3)]
    assert not (part / "mined.parquet").exists()
    (part / "_shards" / "part-00003.parquet.tmp").write_bytes(b"half-written")  # torn write
    stamp = (part / "_shards" / "part-00000.parquet").stat().st_mtime_ns
    r = _run([x, y, str(part)])
    assert r.returncode == 0, r.stderr
    assert (part / "_shards" / "part-00000.parquet").stat().st_mtime_ns == stamp  # skipped
    a = pq.read_table(full / "mined.parquet")
    b = pq.read_table(part / "mined.parquet")
    assert a.equals(b)
    assert b.column("query_index").to_pylist() == list(range(100))  # each query once
    assert pq.read_table(full / "triplets.parquet").equals(pq.read_table(part / "triplets.parquet"))
    assert not list((part / "_shards").glob("*.tmp"))


def test_mining_runs_without_torch(tmp_path):
    """The mining path imports onnxruntime, numpy and pyarrow only, on the shipped graphs."""
    x, y = _data(tmp_path, n=30)
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # `import torch` now raises ImportError
        sys.argv = ["exportminers.pipeline", {x!r}, "--labels", {y!r}, "-o", {str(tmp_path / "o")!r},
                    "--no-progress", "--device", "cpu", "-k", "3", "--strategy", "multisimilarity",
                    "--format", "triplets,ntuples,pairs"]
        from exportminers.pipeline.cli import main
        rc = main()
        assert rc == 0, rc
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxscript", "sklearn")
                     and sys.modules[m] is not None)
        assert not bad, bad
        print("TORCH-FREE OK")
    """)
    empty_cache = tmp_path / "cache"  # nothing cached: only the shipped graphs can serve
    r = subprocess.run([sys.executable, "-c", code], env=_env(EXPORTMINERS_CACHE=str(empty_cache)),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "TORCH-FREE OK" in r.stdout, r.stdout + r.stderr
    assert not empty_cache.exists()
    assert (tmp_path / "o" / "mined.parquet").is_file()


def test_every_graph_is_shipped_and_shape_free():
    for spec in graphs.all_specs():
        path = graphs.graph_path(spec, allow_export=False)
        assert path.parent == graphs.PACKAGE_GRAPH_DIR, spec
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        graphs.check_graph_ops(model)
        ops = {n.op_type for n in model.graph.node}
        assert not ops & {"Shape", "Gather", "Concat", "Expand", "Slice", "Reshape", "NonZero",
                          "Loop", "If", "Range", "ConstantOfShape"}, (spec, ops)
        assert path.stat().st_size < 16_000
        names = {i.name for i in model.graph.input}
        assert ("k_neg" in names) == spec.has_neg and ("k_pos" in names) == spec.has_pos
        assert ("k_epos" in names) == spec.easy
        # an unmasked negatives graph compares no labels: the engine drops them on the host
        assert ("q_label" in names) == spec.label_mask and ("Equal" in ops) == spec.label_mask
        assert ("neg_lo" in names) == spec.band


def test_fresh_export_matches_shipped_graph(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    spec = graphs.GraphSpec("both", "l2", band=True, easy=True)
    fresh = graphs.export_graph(spec, tmp_path / spec.filename)
    shipped = graphs.graph_path(spec, allow_export=False)
    rng = np.random.default_rng(0)
    bq, bm, d = 6, 40, 5
    feeds = {"q": rng.integers(-2, 3, (bq, d)).astype(np.float32), "q_label": rng.integers(0, 3, bq),
             "m": rng.integers(-2, 3, (bm, d)).astype(np.float32),
             "m_label": rng.integers(0, 3, bm),
             "neg_lo": np.full(bq, -3.5, np.float32), "neg_hi": np.full(bq, -1.5, np.float32),
             "k_neg": np.array([9]), "k_pos": np.array([4]), "k_epos": np.array([2])}
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)
            for p in (fresh, shipped)]
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
    neg_c, neg_i = outs[0][:2]
    assert neg_c.shape == (bq, 9)
    ok = np.isfinite(neg_c)
    assert np.all((neg_c[ok] >= -3.5) & (neg_c[ok] <= -1.5))


def test_float16_graph_close_to_float32(tmp_path):
    """float16 (the CUDA default) runs the same pipeline; results agree up to rounding."""
    from exportminers.pipeline import mine

    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    y = rng.integers(0, 5, 50)
    kw = dict(k=3, progress=False, plot=False, formats=[], device="cpu", block_size=(16, 32))
    a = pq.read_table(mine(x, y, out_dir=tmp_path / "a", dtype="float32", **kw).output).to_pylist()
    b = pq.read_table(mine(x, y, out_dir=tmp_path / "b", dtype="float16", **kw).output).to_pylist()
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra["neg_scores"], rb["neg_scores"], atol=2e-3)
    same = np.mean([ra["neg_ids"] == rb["neg_ids"] for ra, rb in zip(a, b)])
    assert same > 0.8


def test_block_size_guard():
    from exportminers.pipeline.engine import check_block_sizes

    check_block_sizes(4096, 262144)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        check_block_sizes(4096, 1048576)
    with pytest.raises(ValueError, match="block_q"):
        check_block_sizes(0, 10)


def test_only_negatives_graphs_leave_the_label_mask_out():
    assert not graphs.GraphSpec("neg", "dot", label_mask=False).label_mask
    for kind in ("pos", "both"):
        with pytest.raises(ValueError, match="label mask"):
            graphs.GraphSpec(kind, "dot", label_mask=False)
