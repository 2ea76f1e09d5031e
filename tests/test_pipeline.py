"""Offline mining pipeline: the block engine equals a brute-force numpy reference."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from exportminers.pipeline import MineConfig, mine
from exportminers.pipeline.reference import mine_reference

# Integer-valued embeddings: every dot product / squared distance is exact in float32,
# so the engine and the reference see identical scores and many exact ties.
N_SELF, N_Q, N_M, D = 45, 37, 53, 5


def _int_data(seed, n, labels=5):
    rng = np.random.default_rng(seed)
    return rng.integers(-2, 3, (n, D)).astype(np.float32), rng.integers(0, labels, n)


CONFIGS = {
    "hardest": dict(k=3, metric="dot"),
    "score_window": dict(k=4, metric="dot", min_score=-1.5, max_score=3.5),
    "semihard": dict(k=3, metric="dot", strategy="semihard", margin=3.5),
    "multisimilarity": dict(k=3, metric="dot", strategy="multisimilarity", epsilon=2.5),
    "margin_pos": dict(k=3, metric="dot", margin_pos=1.5, num_positives=2),
    "perc_pos": dict(k=3, metric="dot", perc_pos=0.5),
    "rank_window": dict(k=3, metric="dot", range_min=2, range_max=9),
    "random": dict(k=4, metric="dot", range_min=1, range_max=12, sampling="random", seed=3),
    "easiest_ref": dict(k=2, metric="dot", margin_pos=0.5, positive_ref="easiest",
                        num_positives=3, easiest_positive=True),
    "l2_hardest": dict(k=3, metric="l2", easiest_positive=True),
    "l2_semihard": dict(k=3, metric="l2", strategy="semihard", margin=1.1),
    "l2_scores": dict(k=3, metric="l2", min_score=1.7, max_score=3.1),
    "l2_margin_pos": dict(k=3, metric="l2", margin_pos=0.2, positive_ref="easiest"),
    "l2_ms_random": dict(k=2, metric="l2", strategy="multisimilarity", epsilon=0.6,
                         range_max=6, sampling="random", seed=11),
}
BLOCKS = [(7, 11), (16, 64), (64, 64)]


def _run(tmp_path, q, ql, qid=None, m=None, ml=None, mid=None, blocks=(7, 11), **cfg):
    # positives="host_masked": positives on the host, label mask still in the graph
    import importlib

    mine_mod = importlib.import_module("exportminers.pipeline.mine")   # the module, not mine()
    saved = dict(mine_mod.UNMASKED_MAX_K)
    if cfg.get("positives") == "host_masked":
        cfg["positives"] = "host"
        mine_mod.UNMASKED_MAX_K["cpu"] = 0
    try:
        res = mine(q, ql, qid, bank=m, bank_labels=ml, bank_ids=mid, out_dir=tmp_path / "out",
                   block_size=blocks, shard_size=blocks[0] * 2, progress=False, plot=False,
                   formats=[], device="cpu", **cfg)
    finally:
        mine_mod.UNMASKED_MAX_K.update(saved)
    return res, pq.read_table(res.output).to_pylist()


def _compare(rows, ref, cfg):
    assert len(rows) == len(ref)
    for i, (a, b) in enumerate(zip(rows, ref)):
        assert a["query_index"] == i
        for key in ("neg_ids", "neg_ranks", "pos_ids", "num_candidates"):
            assert a[key] == b[key], (i, key, a, b)
        np.testing.assert_allclose(a["neg_scores"], b["neg_scores"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a["pos_scores"], b["pos_scores"], rtol=1e-6, atol=1e-6)
        if cfg.easiest_positive:
            assert a["easy_pos_id"] == b["easy_pos_id"]
        want = "ok" if len(b["neg_ids"]) == cfg.k else "short"
        if (cfg.num_positives or cfg.needs_positive) and not b["pos_ids"] and b["easy_pos_id"] is None:
            want = "no_positive"
        assert a["status"] == want, (i, a, b)


# positives from the block graph's masked passes, or from same-label pairs on the host
# with the negatives' label mask on the host too (small classes) or in the graph
POSITIVES = ["graph", "host", "host_masked"]


@pytest.mark.parametrize("positives", POSITIVES)
@pytest.mark.parametrize("blocks", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_self_mining_equals_reference(tmp_path, name, blocks, positives):
    x, y = _int_data(0, N_SELF)
    _, rows = _run(tmp_path, x, y, blocks=blocks, positives=positives, **CONFIGS[name])
    cfg = MineConfig(**CONFIGS[name])
    _compare(rows, mine_reference(cfg, x, y, np.arange(N_SELF)), cfg)


@pytest.mark.parametrize("positives", POSITIVES)
@pytest.mark.parametrize("blocks", BLOCKS[:2], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_query_vs_bank_equals_reference(tmp_path, name, blocks, positives):
    q, ql = _int_data(1, N_Q)
    m, ml = _int_data(2, N_M)
    qid = 1000 + np.arange(N_Q)
    mid = 1000 + np.arange(N_M)  # overlapping ids: bank row i is query i (never its positive)
    _, rows = _run(tmp_path, q, ql, qid, m, ml, mid, blocks=blocks, positives=positives,
                   **CONFIGS[name])
    cfg = MineConfig(**CONFIGS[name])
    ref = mine_reference(cfg, q, ql, qid, m, ml, mid, exclude_same_id=True)
    _compare(rows, ref, cfg)
    assert rows[0]["query_id"] == 1000


def test_query_vs_bank_default_ids_do_not_exclude(tmp_path):
    q, ql = _int_data(1, N_Q)
    m, ml = _int_data(2, N_M)
    cfg = MineConfig(k=3, metric="dot", num_positives=4)
    _, rows = _run(tmp_path, q, ql, None, m, ml, None, k=3, metric="dot", num_positives=4)
    ref = mine_reference(cfg, q, ql, np.arange(N_Q), m, ml, np.arange(N_M), exclude_same_id=False)
    _compare(rows, ref, cfg)


@pytest.mark.parametrize("positives", POSITIVES)
@pytest.mark.parametrize("strategy", ["hardest", "semihard", "multisimilarity"])
def test_cosine_continuous_data(tmp_path, strategy, positives):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = rng.integers(0, 4, 60)
    kw = dict(k=4, metric="cosine", strategy=strategy, margin=0.3, epsilon=0.05)
    _, rows = _run(tmp_path, x, y, blocks=(9, 13), positives=positives, **kw)
    cfg = MineConfig(**kw)
    ref = mine_reference(cfg, x, y, np.arange(60))
    for a, b in zip(rows, ref):
        assert a["neg_ids"] == b["neg_ids"] and a["pos_ids"] == b["pos_ids"]
        np.testing.assert_allclose(a["neg_scores"], b["neg_scores"], atol=1e-5)


def test_random_sampling_is_reproducible_and_block_independent(tmp_path):
    x, y = _int_data(3, 80, labels=3)
    kw = dict(k=3, metric="dot", range_max=20, sampling="random", seed=7)
    _, a = _run(tmp_path / "a", x, y, blocks=(5, 9), **kw)
    _, b = _run(tmp_path / "b", x, y, blocks=(32, 80), **kw)
    _, c = _run(tmp_path / "c", x, y, blocks=(5, 9), **{**kw, "seed": 8})
    assert [r["neg_ids"] for r in a] == [r["neg_ids"] for r in b]
    assert [r["neg_ids"] for r in a] != [r["neg_ids"] for r in c]
    ranks = np.concatenate([r["neg_ranks"] for r in a])
    assert ranks.max() > 10  # draws reach deep into the window


def test_flat_formats_match_per_query_table(tmp_path):
    x, y = _int_data(4, 40)
    res = mine(x, y, out_dir=tmp_path, k=3, metric="dot", progress=False, plot=True,
               formats=["triplets", "ntuples", "pairs"], num_positives=2)
    rows = pq.read_table(res.output).to_pylist()
    trip = pq.read_table(res.files["triplets"]).to_pylist()
    want = [(r["query_id"], r["pos_ids"][0], n) for r in rows if r["pos_ids"] for n in r["neg_ids"]]
    assert [(t["anchor_id"], t["positive_id"], t["negative_id"]) for t in trip] == want
    nt = pq.read_table(res.files["ntuples"]).to_pylist()
    full = [r for r in rows if r["pos_ids"] and len(r["neg_ids"]) == 3]
    assert [(t["anchor_id"], t["negative_3_id"]) for t in nt] == [(r["query_id"], r["neg_ids"][2]) for r in full]
    pairs = pq.read_table(res.files["pairs"])
    assert pairs.num_rows == sum(len(r["pos_ids"]) + len(r["neg_ids"]) for r in rows)
    assert set(pairs.column("label").to_pylist()) == {0, 1}
    assert res.files["plot"].stat().st_size > 1000
    summary = json.loads(res.files["summary"].read_text())
    assert summary["queries"]["total"] == 40
    assert summary["scores"]["negatives"]["count"] == sum(len(r["neg_ids"]) for r in rows)


def test_short_and_no_positive_are_reported(tmp_path):
    x, y = _int_data(5, 30, labels=3)
    y[0] = 99  # a label nobody else has: no positive
    res, rows = _run(tmp_path, x, y, k=3, metric="dot", strategy="semihard", margin=0.5)
    assert rows[0]["status"] == "no_positive" and rows[0]["neg_ids"] == []
    s = res.summary
    assert s["no_positive"]["count"] >= 1 and 0 in s["no_positive"]["example_query_ids"]
    # every query with fewer than k negatives counts, also one whose status is no_positive
    assert s["short_of_negatives"]["count"] == sum(len(r["neg_ids"]) < 3 for r in rows)
    assert s["short_of_negatives"]["also_no_positive"] == sum(
        len(r["neg_ids"]) < 3 and r["status"] == "no_positive" for r in rows)
    assert s["queries"]["short"] == sum(r["status"] == "short" for r in rows)
    assert "why" in s["short_of_negatives"]


@pytest.mark.parametrize("blocks", [(5, 10), (4, 7), (3, 3), (16, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
def test_masked_rows_never_reach_short_queries(tmp_path, metric, blocks):
    # Queries short of negatives expose every masked slot: padding rows and a NaN row.
    # (L2 once turned +inf into a finite distance through ONNX Clip, so the NaN row came
    # back as a negative scored 1.8e19, or a padding row crashed the merge.)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 8)).astype(np.float32)
    x[3] = np.nan
    y = np.array([0] * 9 + [1])
    _, rows = _run(tmp_path, x, y, blocks=blocks, k=3, metric=metric)
    valid = [i for i in range(10) if i != 3]
    for r in rows:
        assert all(np.isfinite(r["neg_scores"])) and all(np.isfinite(r["pos_scores"]))
        assert 3 not in r["neg_ids"] and 3 not in r["pos_ids"]
    assert rows[3]["status"] == "excluded_nonfinite"
    for i in valid[:-1]:
        assert rows[i]["neg_ids"] == [9] and rows[i]["status"] == "short", rows[i]
    xs = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
    cand = [i for i in valid if i != 9]
    if metric == "l2":
        order = sorted(cand, key=lambda j: (np.linalg.norm(xs[9] - xs[j]), j))
    else:
        order = sorted(cand, key=lambda j: (-float(xs[9] @ xs[j]), j))
    assert rows[9]["neg_ids"] == order[:3]


@pytest.mark.filterwarnings("ignore:bank.*occur more than once")
@pytest.mark.parametrize("positives", POSITIVES)
@pytest.mark.parametrize("blocks", [(6, 2), (5, 3), (7, 11), (64, 64)], ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("name", ["hardest", "margin_pos", "easiest_ref", "random", "l2_hardest",
                                  "rank_window"])
def test_host_side_exclusions_equal_reference(tmp_path, name, blocks, positives):
    """Excluded bank rows, repeated ids and bank blocks narrower than k are handled on
    the host (left out of the block, extra candidates then dropped): still exact."""
    rng = np.random.default_rng()
    q, ql = _int_data(int(rng.integers(1 << 30)), 30, labels=4)
    m, ml = _int_data(int(rng.integers(1 << 30)), 40, labels=4)
    qid = 1000 + np.arange(30)
    mid = 1000 + rng.integers(0, 12, 40)   # up to several bank rows per query id
    mid[10:13] = 1003                      # at least one id three times in one block
    bad = np.zeros(40, bool)
    bad[[4, 5, 6, 7, 9]] = True            # a whole 2- or 3-row block, and a lone row
    m[bad] = np.nan
    _, rows = _run(tmp_path, q, ql, qid, m, ml, mid, blocks=blocks, exclude_same_id=True,
                   positives=positives, **CONFIGS[name])
    cfg = MineConfig(**CONFIGS[name])
    ref = mine_reference(cfg, q, ql, qid, m[~bad], ml[~bad], mid[~bad], exclude_same_id=True)
    _compare(rows, ref, cfg)


@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_padding_column_never_displaces_a_lone_row(tmp_path, metric):
    """A bank block with one usable row gets a padding column (zeros, closeness 0 for
    dot): with k = 1 it must not win that block's TopK and hide the real row."""
    q = np.array([[1, 0], [2, 1]], np.float32)
    m = np.array([[-1, 0], [np.nan, 0], [-2, 0], [-3, 0]], np.float32)
    if metric == "l2":   # the padding row (the origin) is closer than any real row
        m = np.array([[5, 0], [np.nan, 0], [6, 0], [7, 0]], np.float32)
    _, rows = _run(tmp_path, q, np.zeros(2, np.int64), None, m, np.ones(4, np.int64), None,
                   blocks=(2, 2), k=1, metric=metric)
    assert [r["neg_ids"] for r in rows] == [[0], [0]]


@pytest.mark.parametrize("name", ["hardest", "easiest_ref", "margin_pos", "l2_hardest"])
def test_host_positives_in_small_groups_of_pairs_equal_reference(tmp_path, name, monkeypatch):
    """Host positives take the query rows in groups that hold at most _PAIR_BUDGET
    same-label pairs (one query alone may exceed it)."""
    from exportminers.pipeline import engine

    monkeypatch.setattr(engine, "_PAIR_BUDGET", 5)
    x, y = _int_data(int(np.random.default_rng().integers(1 << 30)), N_SELF, labels=3)
    _, rows = _run(tmp_path, x, y, blocks=(16, 64), positives="host", **CONFIGS[name])
    cfg = MineConfig(**CONFIGS[name])
    _compare(rows, mine_reference(cfg, x, y, np.arange(N_SELF)), cfg)


def test_topk_asks_for_extra_candidates_only_for_ids_in_the_block(tmp_path, monkeypatch):
    """Same-id exclusion: a TopK asks for k plus the most bank columns one of the query
    block's ids has in the bank block, not the block's largest id group."""
    from exportminers.pipeline import engine

    asked = []
    run = engine.BlockRunner.run

    def spy(self, feeds):
        asked.append(int(np.asarray(feeds["k_neg"].numpy())[0]))
        return run(self, feeds)

    monkeypatch.setattr(engine.BlockRunner, "run", spy)
    q, ql = _int_data(1, 8)
    m, ml = _int_data(2, 40)
    mid = np.full(40, 7)                 # one id on every bank row
    mid[:20] = 100 + np.arange(20)
    qid = 1000 + np.arange(8)            # no query has a bank id ...
    _run(tmp_path / "a", q, ql, qid, m, ml, mid, blocks=(8, 20), k=3, metric="dot",
         exclude_same_id=True, positives="graph")
    assert asked and set(asked) == {3}
    asked.clear()
    qid[5] = 7                           # ... then one has the 20-row id of block 2
    _run(tmp_path / "b", q, ql, qid, m, ml, mid, blocks=(8, 20), k=3, metric="dot",
         exclude_same_id=True, positives="graph")
    assert asked == [3, 20]              # k + 20 > 20 columns: the whole block


@pytest.mark.parametrize("positives", POSITIVES)
@pytest.mark.parametrize("name", ["semihard", "margin_pos", "l2_semihard"])
def test_two_pass_without_bank_cache_equals_reference(tmp_path, name, positives):
    """Two-pass strategies with the bank streamed again for each pass (no cache); with
    host positives the first pass moves nothing to the device."""
    x, y = _int_data(int(np.random.default_rng().integers(1 << 30)), N_SELF)
    _, rows = _run(tmp_path, x, y, blocks=(7, 11), positives=positives, bank_cache_gb=0,
                   **CONFIGS[name])
    cfg = MineConfig(**CONFIGS[name])
    _compare(rows, mine_reference(cfg, x, y, np.arange(N_SELF)), cfg)
