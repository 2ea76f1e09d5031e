"""Offline mining pipeline: overflow, same-id rule, input edge cases and argument checks.

Every test draws fresh random data and checks results against brute-force numpy
(``exportminers.pipeline.reference`` or explicit loops), or checks a clear error.
"""
import json
import os
import socket
import warnings
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exportminers.pipeline import MineConfig, mine
from exportminers.pipeline.cli import main as cli_main
from exportminers.pipeline.engine import ScoreOverflowError, TopKState
from exportminers.pipeline.mine import fit_dtype
from exportminers.pipeline.reference import mine_reference

KW = dict(progress=False, plot=False, device="cpu", block_size=(7, 11), shard_size=14)


def _rows(res):
    return pq.read_table(res.output).to_pylist()


def _cli(args, capsys):
    rc = cli_main([str(a) for a in args] + ["--no-progress", "--no-plot"])
    err = capsys.readouterr().err
    return rc, err


# --------------------------------------------------------------------------- H1 / H2

@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_scores_that_overflow_float16_are_a_clear_error(tmp_path, metric, capsys):
    rng = np.random.default_rng()
    x = (rng.standard_normal((40, 64)) * 100).astype(np.float32)
    y = rng.integers(0, 5, 40)
    with pytest.raises(ValueError, match=r"dtype float16 \(--dtype\).*overflow.*float32"):
        mine(x, y, out_dir=tmp_path / "o", metric=metric, dtype="float16", k=3, **KW)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    rc, err = _cli([tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--metric", metric,
                    "--dtype", "float16", "-o", tmp_path / "o2", "--device", "cpu"], capsys)
    assert rc == 2 and err.startswith("error: dtype float16") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_scores_that_overflow_float32_are_a_clear_error(tmp_path, metric):
    rng = np.random.default_rng()
    x = (rng.standard_normal((20, 8)) * 1e19).astype(np.float32)
    with pytest.raises(ValueError, match="float32.*overflow"):
        mine(x, rng.integers(0, 3, 20), out_dir=tmp_path / "o", metric=metric, k=2, **KW)


def test_default_float16_falls_back_to_float32_and_explicit_float16_refuses():
    cfg = MineConfig(metric="dot")
    scan = SimpleNamespace(max_norm=300.0)  # 300 * 300 = 90000 > 65504 / 2
    inp = SimpleNamespace(qscan=scan, bscan=scan)
    with pytest.warns(RuntimeWarning, match="float32 instead of the default float16"):
        assert fit_dtype(cfg, inp, "float16", given=False)[0] == "float32"
    with pytest.raises(ValueError, match="float16"):
        fit_dtype(cfg, inp, "float16", given=True)
    small = SimpleNamespace(max_norm=100.0)  # 10000: fits
    assert fit_dtype(cfg, SimpleNamespace(qscan=small, bscan=small), "float16", True)[0] == "float16"
    l2 = MineConfig(metric="l2")  # (100 + 100)^2 = 40000 > 32752
    with pytest.raises(ValueError, match="squared distances"):
        fit_dtype(l2, SimpleNamespace(qscan=small, bscan=small), "float16", True)


def test_an_overflowed_score_from_a_block_is_never_merged():
    st = TopKState(2, 3, largest=True)
    st.update(0, 2, np.array([[1.0, -np.inf], [0.5, 0.2]], np.float32),
              np.array([[0, 1], [1, 0]]))  # -inf = empty slot: fine
    with pytest.raises(ScoreOverflowError, match="float32"):
        st.update(0, 2, np.array([[np.inf, 1.0], [0.5, 0.2]], np.float32),
                  np.array([[0, 1], [1, 0]]))
    with pytest.raises(ScoreOverflowError):
        TopKState(1, 2, largest=False).update(0, 1, np.array([[-np.inf, 1]], np.float32),
                                              np.array([[0, 1]]))
    # an excluded query (valid=False) may see anything: it is never reported
    TopKState(1, 2, largest=False).update(0, 1, np.array([[-np.inf, 1]], np.float32),
                                          np.array([[0, 1]]), valid=np.array([False]))


def test_cosine_of_huge_rows_is_exact(tmp_path):
    rng = np.random.default_rng()
    x = (rng.standard_normal((25, 6)) * 1e20).astype(np.float32)  # squares overflow float32
    y = rng.integers(0, 4, 25)
    rows = _rows(mine(x, y, out_dir=tmp_path / "o", metric="cosine", k=3, **KW))
    x64 = x.astype(np.float64)
    xn = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    cos = xn @ xn.T
    for r, row in enumerate(rows):
        cand = [j for j in range(25) if y[j] != y[r]]
        want = sorted(cand, key=lambda j: -cos[r, j])[:3]
        np.testing.assert_allclose(row["neg_scores"], cos[r, want], atol=1e-5)


# --------------------------------------------------------------------------- H3 / M3

def test_parquet_null_labels_keep_int64_exact_and_are_reported(tmp_path):
    rng = np.random.default_rng()
    n = 60
    x = rng.integers(-2, 3, (n, 5)).astype(np.float32)
    y = (2 ** 60 + rng.integers(1, 5, n)).astype(np.int64)  # distinct in int64, equal in float64
    ids = rng.permutation(10 ** 6)[:n].astype(np.int64)
    null = np.zeros(n, bool)
    null[rng.choice(n, 6, replace=False)] = True
    lab = pa.array([None if m else int(v) for v, m in zip(y, null)], pa.int64())
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 5)
    pq.write_table(pa.table({"embedding": emb, "label": lab, "id": pa.array(ids)}),
                   tmp_path / "d.parquet", row_group_size=16)
    res = mine(tmp_path / "d.parquet", out_dir=tmp_path / "o", metric="dot", k=3, **KW)
    rows = _rows(res)
    ex = json.loads((tmp_path / "o" / "excluded.json").read_text())
    assert sorted(ex["queries"]["missing_label"]) == sorted(ids[null].tolist())
    v = ~null
    ref = iter(mine_reference(MineConfig(k=3, metric="dot"), x[v], y[v], ids[v]))
    for r, row in enumerate(rows):
        if null[r]:
            assert row["status"] == "excluded_missing_label" and row["label"] is None
            continue
        b = next(ref)
        assert row["label"] == int(y[r])
        assert row["neg_ids"] == b["neg_ids"] and row["pos_ids"] == b["pos_ids"], r


def test_all_null_first_row_group_of_list_embeddings_is_excluded_not_fatal(tmp_path):
    rng = np.random.default_rng()
    n, d = 40, 4
    x = rng.integers(-2, 3, (n, d)).astype(np.float32)
    y = rng.integers(0, 3, n)
    emb = pa.array([None] * 10 + [list(map(float, r)) for r in x[10:]], pa.list_(pa.float32()))
    pq.write_table(pa.table({"embedding": emb, "label": pa.array(y)}), tmp_path / "f.parquet",
                   row_group_size=10)
    res = mine(tmp_path / "f.parquet", out_dir=tmp_path / "o", metric="dot", k=2, **KW)
    rows = _rows(res)
    assert [r["status"] for r in rows[:10]] == ["excluded_nonfinite"] * 10
    ref = mine_reference(MineConfig(k=2, metric="dot"), x[10:], y[10:], np.arange(10, n))
    for row, b in zip(rows[10:], ref):
        assert row["neg_ids"] == b["neg_ids"] and row["pos_ids"] == b["pos_ids"]


# --------------------------------------------------------------------------- M4 / M5

def test_same_id_bank_row_is_never_a_negative(tmp_path):
    rng = np.random.default_rng()
    nq, nm = 23, 31
    q = rng.integers(-2, 3, (nq, 5)).astype(np.float32)
    m = rng.integers(-2, 3, (nm, 5)).astype(np.float32)
    ql, ml = rng.integers(0, 4, nq), rng.integers(0, 4, nm)
    qid = rng.choice(60, nq, replace=False)
    mid = rng.choice(60, nm, replace=False)  # ids overlap, labels mostly differ
    cfg = dict(k=3, metric="dot", num_positives=2)
    rows = _rows(mine(q, ql, qid, bank=m, bank_labels=ml, bank_ids=mid, out_dir=tmp_path / "o",
                      **cfg, **KW))
    for r, row in enumerate(rows):  # brute force, written out: the documented rule
        c = q[r] @ m.T
        ok = mid != qid[r]
        neg = [j for j in np.lexsort((np.arange(nm), -c)) if ml[j] != ql[r] and ok[j]][:3]
        pos = [j for j in np.lexsort((np.arange(nm), c)) if ml[j] == ql[r] and ok[j]][:2]
        assert row["neg_ids"] == mid[neg].tolist(), r
        assert row["pos_ids"] == mid[pos].tolist(), r
        assert qid[r] not in row["neg_ids"] + row["pos_ids"]


def test_self_mining_never_pairs_a_row_with_itself_even_without_same_id(tmp_path):
    rng = np.random.default_rng()
    n = 30
    x = rng.integers(-2, 3, (n, 4)).astype(np.float32)
    y = rng.integers(0, 3, n)
    ids = rng.integers(0, 12, n)  # duplicates: rows sharing an id become eligible
    cfg = dict(k=3, metric="dot", easiest_positive=True)
    rows = _rows(mine(x, y, ids, out_dir=tmp_path / "o", exclude_same_id=False, **cfg, **KW))
    ref = mine_reference(MineConfig(**cfg), x, y, ids, exclude_same_id=False)
    c = x @ x.T
    for r, (row, b) in enumerate(zip(rows, ref)):
        assert row["neg_ids"] == b["neg_ids"] and row["pos_ids"] == b["pos_ids"], r
        # the easiest positive is never the row itself (which would score |x|^2)
        others = [j for j in range(n) if j != r and y[j] == y[r]]
        if others:
            assert row["easy_pos_score"] == pytest.approx(max(c[r, others]))


def test_duplicate_ids_warn_with_count_and_examples(tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((20, 4)).astype(np.float32)
    ids = np.arange(20)
    ids[[3, 7, 9]] = 5
    with pytest.warns(RuntimeWarning, match=r"1 id\(s\) occur more than once \(4 rows\), e\.g\. \[5\]"):
        mine(x, rng.integers(0, 3, 20), ids, out_dir=tmp_path / "o", k=2, **KW)


# --------------------------------------------------------------------------- M1 / M2

def test_output_and_label_path_mistakes_fail_early_naming_the_option(tmp_path, capsys):
    rng = np.random.default_rng()
    np.save(tmp_path / "x.npy", rng.standard_normal((20, 4)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 20))
    (tmp_path / "afile").write_text("x")
    base = [tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--device", "cpu"]
    rc, err = _cli(base + ["-o", tmp_path / "afile"], capsys)
    assert rc == 2 and "-o/--out" in err and "not a folder" in err
    rc, err = _cli(base + ["-o", tmp_path / "afile" / "sub"], capsys)
    assert rc == 2 and "-o/--out" in err
    rc, err = _cli([tmp_path / "x.npy", "--labels", tmp_path, "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "--labels" in err and "folder" in err
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            rc, err = _cli(base + ["-o", ro / "out"], capsys)
            assert rc == 2 and "-o/--out" in err and "not writable" in err
        finally:
            ro.chmod(0o700)


def _pq(path, x, y):
    path.parent.mkdir(parents=True, exist_ok=True)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    pq.write_table(pa.table({"embedding": emb, "label": pa.array(y)}), path)


def test_folder_reads_every_parquet_file_recursively_and_refuses_mixed_formats(tmp_path):
    rng = np.random.default_rng()
    parts = [(rng.integers(-2, 3, (n, 4)).astype(np.float32), rng.integers(0, 3, n))
             for n in (9, 13, 7)]
    d = tmp_path / "data"
    _pq(d / "a.parquet", *parts[0])
    _pq(d / "b.pq", *parts[1])
    _pq(d / "sub" / "label=1" / "c.parquet", *parts[2])  # nested (Hive-style) folder
    (d / "_SUCCESS").write_text("")
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    rows = _rows(mine(d, out_dir=tmp_path / "o", metric="dot", k=2, **KW))
    assert len(rows) == len(x)
    ref = mine_reference(MineConfig(k=2, metric="dot"), x, y, np.arange(len(x)))
    for row, b in zip(rows, ref):
        assert row["neg_ids"] == b["neg_ids"] and row["pos_ids"] == b["pos_ids"]
    np.save(d / "embeddings.npy", x)
    with pytest.raises(ValueError, match="mixes Parquet files.*embeddings.npy"):
        mine(d, out_dir=tmp_path / "o2", **KW)
    (d / "embeddings.npy").unlink()
    (d / "notes.txt").write_text("hi")
    with pytest.warns(RuntimeWarning, match="notes.txt"):
        mine(d, out_dir=tmp_path / "o3", k=2, **KW)


# --------------------------------------------------------------------------- M6 / L3

def test_ids_and_labels_that_do_not_fit_int64_are_refused(tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((10, 3)).astype(np.float32)
    y = rng.integers(0, 2, 10)
    big = np.arange(10, dtype=np.uint64) + np.uint64(2 ** 63)
    with pytest.raises(ValueError, match=r"ids \(--ids\).*does not fit int64"):
        mine(x, y, big, out_dir=tmp_path / "o", k=2, **KW)
    with pytest.raises(ValueError, match=r"labels \(--labels\).*does not fit int64"):
        mine(x, big, out_dir=tmp_path / "o", k=2, **KW)
    with pytest.raises(ValueError, match="too large to be an exact integer"):
        mine(x, np.full(10, 1e30), out_dir=tmp_path / "o", k=2, **KW)
    # uint64 ids below 2**63 are kept exactly
    ok = rng.choice(2 ** 62, 10, replace=False).astype(np.uint64) + np.uint64(2 ** 62)
    rows = _rows(mine(x, y, ok, out_dir=tmp_path / "o", k=1, overwrite=True, **KW))
    assert [r["query_id"] for r in rows] == [int(v) for v in ok]


# --------------------------------------------------------------------------- M7 / M8 / M10

def test_overwrite_removes_the_previous_runs_outputs(tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((20, 4)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    out = tmp_path / "o"
    kw = {**KW, "plot": True}
    mine(x, y, out_dir=out, k=2, formats=["triplets", "pairs", "ntuples"], **kw)
    assert (out / "pairs.parquet").is_file() and (out / "scores.png").is_file()
    mine(x, y, out_dir=out, k=3, formats=["triplets"], overwrite=True, **{**kw, "plot": False})
    left = sorted(p.name for p in out.iterdir() if not p.name.startswith("_"))
    assert left == ["excluded.json", "mined.parquet", "summary.json", "triplets.parquet"]


def test_missing_matplotlib_skips_the_plot_with_a_warning(tmp_path, monkeypatch):
    import sys
    rng = np.random.default_rng()
    x = rng.standard_normal((20, 4)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib fails
    with pytest.warns(UserWarning, match="scores.png not written: matplotlib"):
        res = mine(x, y, out_dir=tmp_path / "o", k=2, **{**KW, "plot": True})
    assert not (tmp_path / "o" / "scores.png").exists() and "plot" not in res.files
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # plot=False: no warning
        mine(x, y, out_dir=tmp_path / "p", k=2, **{**KW, "plot": False})


def test_num_positives_zero_with_anchor_formats_and_bad_numbers_are_refused(tmp_path, capsys):
    rng = np.random.default_rng()
    x = rng.standard_normal((10, 3)).astype(np.float32)
    y = rng.integers(0, 2, 10)
    for fmt in (["triplets"], ["ntuples", "pairs"]):
        with pytest.raises(ValueError, match=r"num_positives=0 \(--num-positives 0\)"):
            mine(x, y, out_dir=tmp_path / "o", num_positives=0, formats=fmt, **KW)
    mine(x, y, out_dir=tmp_path / "o", num_positives=0, formats=["pairs"], k=2, **KW)
    with pytest.raises(ValueError, match="seed must be below 2\\*\\*64"):
        MineConfig(seed=10 ** 23)
    MineConfig(seed=2 ** 64 - 1)
    for kw, opt in ((dict(threads=-1), "--threads"), (dict(bank_cache_gb=float("nan")),
                                                       "--bank-cache-gb"),
                    (dict(bank_cache_gb=-1.0), "--bank-cache-gb")):
        with pytest.raises(ValueError, match=opt):
            mine(x, y, out_dir=tmp_path / "o2", **{**KW, **kw})
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    rc, err = _cli([tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "--seed", 10 ** 23,
                    "-o", tmp_path / "o3"], capsys)
    assert rc == 2 and "seed" in err and "Traceback" not in err


# --------------------------------------------------------------------------- L1 / L2 / L6

def test_ignored_or_misnamed_arguments_are_errors(tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((12, 3)).astype(np.float32)
    y = rng.integers(0, 2, 12)
    _pq(tmp_path / "d.parquet", x, y)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    with pytest.raises(ValueError, match=r"labels \(--labels\) applies to .npy input only"):
        mine(tmp_path / "d.parquet", tmp_path / "y.npy", out_dir=tmp_path / "o", **KW)
    with pytest.raises(ValueError, match=r"bank_labels \(--bank-labels\) needs bank"):
        mine(x, y, bank_labels=y, out_dir=tmp_path / "o", **KW)
    with pytest.raises(ValueError, match=r"bank \(--bank\).*bank_labels \(--bank-labels\)"):
        mine(x, y, bank=tmp_path / "x.npy", out_dir=tmp_path / "o", **KW)
    np.save(tmp_path / "obj.npy", np.array([[1.0], "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"queries \(input\): cannot read .*obj.npy"):
        mine(tmp_path / "obj.npy", tmp_path / "y.npy", out_dir=tmp_path / "o", **KW)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match=r"bank \(--bank\): cannot read .*bad.parquet"):
        mine(x, y, bank=tmp_path / "bad.parquet", out_dir=tmp_path / "o", **KW)
    # self-mining: each query has n - 1 candidates
    with pytest.raises(ValueError, match="k \\(-k\\) is larger than the bank"):
        mine(x, y, out_dir=tmp_path / "o", k=12, **KW)
    with pytest.warns(RuntimeWarning, match="same label"):
        mine(x, np.zeros(12, int), out_dir=tmp_path / "o4", k=2, **KW)


def test_summary_counts_every_short_query(tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((30, 4)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    y[:4] = 7  # label 7: 4 rows; label 8: a lone row, no positive and few negatives
    y[4] = 8
    k = 10
    res = mine(x, y, out_dir=tmp_path / "o", k=k, max_score=0.0, metric="dot", **KW)
    rows = _rows(res)
    short = sum(len(r["neg_ids"]) < k for r in rows)
    assert res.summary["short_of_negatives"]["count"] == short
    assert res.summary["queries"]["short"] + res.summary["short_of_negatives"][
        "also_no_positive"] == short


# --------------------------------------------------------------------------- M9 (no Ray cluster)

def test_unreachable_ray_address_fails_fast():
    from exportminers.pipeline.ray_engine import check_reachable

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ConnectionError, match="--address"):
        check_reachable(f"127.0.0.1:{port}", timeout=5)
    with pytest.raises(ConnectionError, match="--address"):
        check_reachable(f"ray://127.0.0.1:{port}", timeout=5)
    with pytest.raises(ValueError, match="HOST:PORT"):
        check_reachable("bogus", timeout=5)


def test_damaged_parquet_row_group_is_a_clear_error(tmp_path, capsys):
    # the footer reads fine, a later row group's pages are garbage: the error names the
    # file and the row group, from the library and the CLI alike (no pyarrow traceback)
    rng = np.random.default_rng(20261122)
    n, d = 60, 8
    x = rng.standard_normal((n, d)).astype(np.float32)
    table = pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d),
                      "label": pa.array(rng.integers(0, 4, n))})
    path = tmp_path / "q.parquet"
    pq.write_table(table, path, row_group_size=20, compression="NONE")
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(2).column(0)
    start = col.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start:start + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"cannot read row group 2 of .*q\.parquet \(rows 40\.\.\)"):
        mine(str(path), out_dir=tmp_path / "o", k=2, **KW)
    rc, err = _cli([path, "-o", tmp_path / "o2", "--device", "cpu", "-k", "2"], capsys)
    assert rc == 2 and "cannot read row group 2" in err and "Traceback" not in err


def _engine_pass(q, ql, m, ml, k_neg, k_pos, dtype, overlap, bq=7, bm=11):
    from exportminers.pipeline.engine import BlockRunner, prepare_block, run_pass
    from exportminers.pipeline.graphs import GraphSpec
    from exportminers.pipeline.sources import RowBlock

    npd = np.dtype(dtype)
    runner = BlockRunner(GraphSpec("both", "dot", dtype=dtype), "cpu")

    def blocks(x, lab, size, side):
        out = []
        for s in range(0, len(x), size):
            e = min(len(x), s + size)
            rb = RowBlock(x[s:e], lab[s:e], np.ones(e - s, bool), np.arange(s, e))
            out.append(prepare_block(runner, side, rb, np.ones(e - s, bool), s, size, "dot",
                                     npd, False))
        return out

    return run_pass(runner, blocks(q, ql, bq, "q"), blocks(m, ml, bm, "m"), len(q), k_neg,
                    k_pos, npd, overlap=overlap)


@pytest.mark.parametrize("overlap", [False, True])
def test_run_pass_with_and_without_overlap_equals_brute_force(overlap):
    rng = np.random.default_rng()
    q = rng.integers(-2, 3, (23, 5)).astype(np.float32)
    m = rng.integers(-2, 3, (50, 5)).astype(np.float32)
    ql, ml = rng.integers(0, 3, 23), rng.integers(0, 3, 50)
    res = _engine_pass(q, ql, m, ml, 4, 2, "float32", overlap)
    c = q @ m.T
    rows = np.arange(50)
    for r in range(23):
        neg = rows[ml != ql[r]]
        neg = neg[np.lexsort((neg, -c[r, neg]))][:4]
        pos = rows[ml == ql[r]]
        pos = pos[np.lexsort((pos, c[r, pos]))][:2]
        assert res.neg.i[r, :len(neg)].tolist() == neg.tolist()
        assert res.hpos.i[r, :len(pos)].tolist() == pos.tolist()
        np.testing.assert_array_equal(res.neg.c[r, :len(neg)], c[r, neg])


def test_overflow_in_an_overlapped_merge_reaches_the_caller():
    rng = np.random.default_rng()
    q = np.full((9, 5), 300, np.float32)   # dot products of 450,000: inf in float16
    m = np.full((30, 5), 300, np.float32)
    with pytest.raises(ScoreOverflowError):
        _engine_pass(q, rng.integers(0, 3, 9), m, rng.integers(0, 3, 30), 3, 1, "float16",
                     overlap=True)


@pytest.mark.parametrize("largest", [False, True])
def test_host_positive_sort_key_orders_like_the_floats(largest):
    from exportminers.pipeline.engine import _order_key

    rng = np.random.default_rng()
    v = np.concatenate([(rng.standard_normal(200) * 10.0 ** rng.integers(-30, 30, 200)).astype(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45], np.float32)])
    key = _order_key(v, largest)
    i, j = (a.ravel() for a in np.meshgrid(np.arange(len(v)), np.arange(len(v))))   # every pair
    better = v[i] > v[j] if largest else v[i] < v[j]
    assert np.array_equal(key[i] < key[j], better)
    assert np.array_equal(key[i] == key[j], v[i] == v[j])   # -0.0 and +0.0 tie


def test_positives_auto_picks_the_host_for_small_classes_only(tmp_path):
    from types import SimpleNamespace

    from exportminers.pipeline.mine import HOST_POSITIVE_SHARE, positives_on_host, same_label_pairs

    rng = np.random.default_rng()
    ql, bl = rng.integers(0, 9, 300), rng.integers(0, 12, 500)
    qv, bv = rng.random(300) < 0.9, rng.random(500) < 0.9
    qscan = SimpleNamespace(labels=ql, valid=qv)
    bscan = SimpleNamespace(labels=bl, valid=bv)
    brute = int(sum(((bl == x) & bv).sum() for x in ql[qv]))
    assert same_label_pairs(qscan, bscan) == brute
    inp = SimpleNamespace(qscan=qscan, bscan=bscan)
    share = brute / (qv.sum() * bv.sum())   # about 1/12: graph on both devices
    assert positives_on_host("auto", inp, "cpu") == (share <= HOST_POSITIVE_SHARE["cpu"])
    assert not positives_on_host("graph", inp, "cpu") and positives_on_host("host", inp, "cpu")
    # end to end: many small classes -> host; the summary says which was used
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = np.arange(400) // 2   # 200 classes of 2: share 1/400
    res = mine(x, y, out_dir=tmp_path / "a", k=3, formats=[], **KW)
    assert res.summary["engine"]["positives"] == "host"
    res = mine(x, y % 3, out_dir=tmp_path / "b", k=3, formats=[], **KW)
    assert res.summary["engine"]["positives"] == "graph"


def test_positives_argument_is_checked(tmp_path, capsys):
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(ValueError, match="positives must be"):
        mine(x, np.zeros(10, int), out_dir=tmp_path / "o", positives="gpu", **KW)
    with pytest.raises(ValueError, match="positives must be"):
        mine(x, np.zeros(10, int), out_dir=tmp_path / "o", positives="host ", engine="ray", **KW)


@pytest.mark.parametrize("choice", ["graph", "host"])
def test_cli_positives_option_reaches_the_engine(tmp_path, capsys, choice):
    rng = np.random.default_rng()
    np.save(tmp_path / "x.npy", rng.normal(size=(30, 4)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 30))
    rc, err = _cli([tmp_path / "x.npy", "--labels", tmp_path / "y.npy", "-k", 2, "--device", "cpu",
                    "--positives", choice, "-o", tmp_path / "o"], capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["engine"]["positives"] == choice
