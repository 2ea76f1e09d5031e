"""Offline mining pipeline: inputs (npy, Parquet, shards), bad rows, errors, CLI."""
import argparse
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exportminers.pipeline import mine
from exportminers.pipeline.cli import add_parser, main

D = 6


def _data(seed=0, n=40, labels=4):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, labels, n)


def _mine(src, out, *a, **kw):
    kw = {"k": 3, "progress": False, "plot": False, "formats": [], "block_size": (8, 16),
          "device": "cpu", **kw}
    res = mine(src, *a, out_dir=out, **kw)
    return res, pq.read_table(res.output).to_pylist()


def _strip(rows):
    return [(r["query_id"], r["neg_ids"], r["pos_ids"], r["status"]) for r in rows]


def _write_parquet(path, x, y, ids=None, row_group_size=7, fixed=True):
    t = pa.list_(pa.float32(), D) if fixed else pa.list_(pa.float32())
    cols = {"embedding": pa.array(list(x), type=t), "label": pa.array(y)}
    if ids is not None:
        cols["id"] = pa.array(ids)
    pq.write_table(pa.table(cols), path, row_group_size=row_group_size)


def test_npy_mmap_parquet_and_shards_agree(tmp_path):
    x, y = _data()
    ids = np.arange(len(x)) * 10 + 3
    _, ref = _mine(x, tmp_path / "arr", y, ids)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "i.npy", ids)
    _, a = _mine(str(tmp_path / "x.npy"), tmp_path / "npy", str(tmp_path / "y.npy"),
                 str(tmp_path / "i.npy"))
    _write_parquet(tmp_path / "one.parquet", x, y, ids)
    _, b = _mine(str(tmp_path / "one.parquet"), tmp_path / "pq")
    shards = tmp_path / "shards"
    shards.mkdir()
    for j, s in enumerate(range(0, len(x), 15)):
        _write_parquet(shards / f"part-{j}.parquet", x[s:s + 15], y[s:s + 15], ids[s:s + 15],
                       row_group_size=4, fixed=bool(j % 2))
    _, c = _mine(str(shards), tmp_path / "sh")
    folder = tmp_path / "npyfolder"
    folder.mkdir()
    np.save(folder / "embeddings.npy", x)
    np.save(folder / "labels.npy", y)
    np.save(folder / "ids.npy", ids)
    _, d = _mine(str(folder), tmp_path / "fo")
    assert _strip(a) == _strip(ref) == _strip(b) == _strip(c) == _strip(d)
    assert a[0]["query_id"] == 3


def test_bad_rows_are_reported_and_excluded(tmp_path):
    x, y = _data(1)
    x[3, 2] = np.nan
    x[7, 0] = np.inf
    yf = y.astype(np.float64)
    yf[11] = np.nan  # missing label
    res, rows = _mine(x, tmp_path / "o", yf)
    by_status = {r["query_index"]: r["status"] for r in rows}
    assert by_status[3] == by_status[7] == "excluded_nonfinite"
    assert by_status[11] == "excluded_missing_label"
    assert len(rows) == len(x)  # every query exactly once, none silently lost
    assert rows[11]["label"] is None
    bad = {3, 7, 11}
    for r in rows:  # excluded rows never appear as negatives or positives
        assert not bad & set(r["neg_ids"]) and not bad & set(r["pos_ids"])
    ex = json.loads(res.files["excluded"].read_text())
    assert ex["queries"] == {"nonfinite_embedding": [3, 7], "missing_label": [11]}
    assert res.summary["excluded"]["queries"]["nonfinite_embedding"]["count"] == 2
    # same result as mining the clean subset (ids = original rows)
    keep = np.array(sorted(set(range(len(x))) - bad))
    _, clean = _mine(x[keep], tmp_path / "c", y[keep], keep)
    assert _strip([r for r in rows if r["query_index"] in set(keep.tolist())]) == _strip(clean)


def test_parquet_null_embedding_and_label(tmp_path):
    x, y = _data(2, n=20)
    emb = pa.array([None if i == 4 else list(v) for i, v in enumerate(x)], type=pa.list_(pa.float32()))
    lab = pa.array([None if i == 9 else int(v) for i, v in enumerate(y)], type=pa.int64())
    pq.write_table(pa.table({"embedding": emb, "label": lab}), tmp_path / "d.parquet", row_group_size=6)
    _, rows = _mine(str(tmp_path / "d.parquet"), tmp_path / "o")
    assert rows[4]["status"] == "excluded_nonfinite" and rows[9]["status"] == "excluded_missing_label"


def test_query_vs_bank_bad_bank_rows(tmp_path):
    q, ql = _data(3, n=12)
    m, ml = _data(4, n=30)
    m[5] = np.nan
    res, rows = _mine(q, tmp_path / "o", ql, bank=m, bank_labels=ml)
    assert all(5 not in r["neg_ids"] + r["pos_ids"] for r in rows)
    assert json.loads(res.files["excluded"].read_text())["bank"]["nonfinite_embedding"] == [5]


@pytest.mark.parametrize("kwargs, match", [
    (dict(bank=np.zeros((10, D + 1), np.float32), bank_labels=np.zeros(10, int)), "widths differ"),
    (dict(k=41), "larger than the bank"),
    (dict(k=38, range_min=3), "larger than the bank"),
    (dict(num_positives=100), "num_positives"),
    (dict(block_size=(65536, 65536)), "2\\*\\*31"),
    (dict(sampling="random", k=2), "range_max"),
    (dict(metric="l2", perc_pos=0.9), "similarity metric"),
    (dict(range_min=5, range_max=6, k=3), "range_max"),
    (dict(min_score=0.5, max_score=0.1), "min_score"),
    (dict(formats=["csv"]), "unknown format"),
    (dict(strategy="nope"), "strategy"),
    (dict(k=0), "k must be"),
    (dict(device="tpu"), "device"),
])
def test_bad_arguments_raise_clear_errors(tmp_path, kwargs, match):
    x, y = _data(5)
    with pytest.raises(ValueError, match=match):
        _mine(x, tmp_path / "o", y, **kwargs)


def test_random_window_longer_than_bank(tmp_path):
    x, y = _data(5, n=20)
    _, rows = _mine(x, tmp_path / "o", y, sampling="random", range_max=100, k=3)
    assert all(len(r["neg_ids"]) == 3 for r in rows)


def test_bad_inputs_raise_clear_errors(tmp_path):
    x, y = _data(6)
    with pytest.raises(ValueError, match="empty"):
        _mine(np.zeros((0, D), np.float32), tmp_path / "a", np.zeros(0, int))
    with pytest.raises(ValueError, match="labels .* 40 entries"):
        _mine(x, tmp_path / "b", y[:-1])
    with pytest.raises(ValueError, match="integers"):
        _mine(x, tmp_path / "c", y + 0.5)
    with pytest.raises(ValueError, match="2-D"):
        _mine(x[0], tmp_path / "d", y[:1])
    with pytest.raises(ValueError, match="bank: every row is excluded"):
        _mine(x[:5], tmp_path / "e", y[:5], bank=np.full((4, D), np.nan, np.float32),
              bank_labels=np.zeros(4, int), k=1)
    with pytest.raises(ValueError, match="does not exist"):
        _mine(str(tmp_path / "missing.npy"), tmp_path / "f", y)


def test_rerun_with_other_config_needs_overwrite(tmp_path):
    x, y = _data(7)
    _mine(x, tmp_path, y)
    with pytest.raises(ValueError, match="overwrite"):
        _mine(x, tmp_path, y, k=4)
    _, rows = _mine(x, tmp_path, y, k=4, overwrite=True)
    assert max(len(r["neg_ids"]) for r in rows) == 4
    x2 = x.copy()
    x2[0, 0] += 1  # same shape, other data: not resumable
    with pytest.raises(ValueError, match="overwrite"):
        _mine(x2, tmp_path, y, k=4)


def test_cli_npy_and_help(tmp_path, capsys):
    x, y = _data(8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    rc = main([str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "-o",
               str(tmp_path / "out"), "-k", "4", "--strategy", "multisimilarity",
               "--format", "triplets,pairs", "--no-progress", "--block-size", "8x16",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "mined 40 of 40 queries" in out and "triplets.parquet" in out
    assert (tmp_path / "out" / "pairs.parquet").is_file()
    rc = main([str(tmp_path / "x.npy"), "-o", str(tmp_path / "o2"), "--no-progress"])
    assert rc == 2 and "labels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--demo" in capsys.readouterr().out


def test_cli_subcommand_demo(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="exportminers")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["mine", "--demo", "-o", str(tmp_path / "demo"), "-k", "5",
                              "--no-progress", "--device", "cpu"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "mined 1,797 of 1,797 queries against themselves" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["queries"]["ok"] == 1797
    assert (tmp_path / "demo" / "scores.png").is_file()
