"""Offline mining pipeline: input folders (links, file names in errors), output folders
that overlap the inputs, damaged resume state, column checks and block-size independence."""
import json
import os
import re
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exportminers.pipeline import mine
from exportminers.pipeline.cli import main as cli_main
from exportminers.pipeline.mine import STOP_ENV
from exportminers.pipeline.config import MineConfig
from exportminers.pipeline.reference import mine_reference

D = 5


def _data(seed=0, n=40, labels=4, first_id=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, labels, n),
            np.arange(n, dtype=np.int64) + first_id)


def _write(path, x, y, ids=None, emb=None):
    cols = {"embedding": emb if emb is not None else
            pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D), "label": pa.array(y)}
    if ids is not None:
        cols["id"] = pa.array(ids)
    pq.write_table(pa.table(cols), path, row_group_size=9)


def _mine(src, out, *a, **kw):
    kw = {"k": 3, "progress": False, "plot": False, "formats": [], "block_size": (8, 16),
          "device": "cpu", **kw}
    res = mine(src, *a, out_dir=out, **kw)
    return res, pq.read_table(res.output).to_pylist()


def _key(rows):
    return [(r["query_id"], r["neg_ids"], r["pos_ids"], r["status"]) for r in rows]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_linked_subfolder_is_read(tmp_path):
    """A linked subfolder's files are read (as pyarrow does): none of its rows dropped."""
    xa, ya, ia = _data(0, 25)
    xb, yb, ib = _data(1, 35, first_id=100)
    (tmp_path / "ds").mkdir()
    (tmp_path / "real").mkdir()
    _write(tmp_path / "ds" / "a.parquet", xa, ya, ia)
    _write(tmp_path / "real" / "b.parquet", xb, yb, ib)
    os.symlink(tmp_path / "real", tmp_path / "ds" / "more")
    res, rows = _mine(str(tmp_path / "ds"), tmp_path / "out")
    assert res.summary["queries"]["total"] == 60
    x, y, ids = np.concatenate([xa, xb]), np.concatenate([ya, yb]), np.concatenate([ia, ib])
    _, want = _mine(x, tmp_path / "arr", y, ids)
    assert _key(rows) == _key(want)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_folder_reached_twice_through_links_is_refused(tmp_path):
    x, y, ids = _data(0, 20)
    (tmp_path / "ds").mkdir()
    _write(tmp_path / "ds" / "a.parquet", x, y, ids)
    os.symlink(tmp_path / "ds", tmp_path / "ds" / "loop")
    with pytest.raises(ValueError, match=r"queries \(input\): folder .*loop.* read twice"):
        _mine(str(tmp_path / "ds"), tmp_path / "out")


def test_folder_errors_name_the_file(tmp_path):
    d = tmp_path / "f"
    d.mkdir()
    for j in range(3):
        x, y, ids = _data(j, 10, first_id=10 * j)
        _write(d / f"part-{j}.parquet", x, y, ids)
    x, y, ids = _data(9, 10, first_id=90)
    _write(d / "part-3.parquet", x, y.astype(str), ids)
    with pytest.raises(ValueError, match=r"part-3\.parquet: label column 'label'"):
        _mine(str(d), tmp_path / "out")
    x4 = np.random.default_rng(4).normal(size=(10, 4)).astype(np.float32)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x4.ravel()), 4)
    _write(d / "part-3.parquet", None, y, ids, emb=emb)
    with pytest.raises(ValueError, match=r"part-3\.parquet: embedding width 4 differs from 5"):
        _mine(str(d), tmp_path / "out")


@pytest.mark.parametrize("values, kind", [
    (pa.array([[{"x": 1.0}]] * 6), "struct"),
    (pa.array([["0.5"] * D] * 6), "string"),
    (pa.array([[[1.0]] * D] * 6), "list"),
    (pa.array([[np.datetime64("2020-01-01", "us")] * D] * 6), "timestamp"),
])
def test_embedding_list_of_non_numbers_is_refused(tmp_path, values, kind):
    p = tmp_path / "e.parquet"
    pq.write_table(pa.table({"embedding": values, "label": pa.array(np.arange(6) % 2)}), p)
    with pytest.raises(ValueError, match=rf"e\.parquet: column 'embedding' \(--embedding-column\)"
                                         rf" must be a list of floats .*got a list of {kind}"):
        _mine(str(p), tmp_path / "out", k=1)


def test_integer_embedding_lists_are_read(tmp_path):
    x = np.random.default_rng(0).integers(-3, 4, size=(12, D))
    y = np.arange(12) % 3
    p = tmp_path / "e.parquet"
    _write(p, None, y, emb=pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D))
    _, rows = _mine(str(p), tmp_path / "out", metric="dot")
    _, want = _mine(x.astype(np.float32), tmp_path / "arr", y, metric="dot")
    assert _key(rows) == _key(want)


def test_id_column_named_explicitly_must_exist(tmp_path):
    x, y, ids = _data(0, 20)
    p = tmp_path / "e.parquet"
    _write(p, x, y, ids * 7)
    with pytest.raises(ValueError, match=r"e\.parquet has no id column 'doc_id' \(--id-column"):
        _mine(str(p), tmp_path / "out", id_column="doc_id")
    _, rows = _mine(str(p), tmp_path / "out2", id_column="id")  # the default, named: read
    assert [r["query_id"] for r in rows] == (ids * 7).tolist()
    _write(tmp_path / "noid.parquet", x, y)
    _, rows = _mine(str(tmp_path / "noid.parquet"), tmp_path / "out3")  # default: row numbers
    assert [r["query_id"] for r in rows] == list(range(20))


def test_out_dir_that_would_replace_an_input_is_refused(tmp_path):
    x, y, ids = _data(0, 30)
    d = tmp_path / "d"
    d.mkdir()
    for name in ("triplets.parquet", "mined.parquet", "pairs.parquet"):
        _write(d / name, x, y, ids)
        before = (d / name).read_bytes()
        with pytest.raises(ValueError, match=rf"out_dir \(-o/--out\): the input .*{name}"):
            _mine(str(d / name), d, formats=["triplets"], overwrite=True)
        assert (d / name).read_bytes() == before
    np.save(tmp_path / "x.npy", x)
    np.save(d / "mined.parquet.npy", y)  # a differently named input next to the outputs: fine
    _mine(str(tmp_path / "x.npy"), d / "sub", str(d / "mined.parquet.npy"))


def test_out_dir_inside_input_folder_is_refused(tmp_path):
    x, y, ids = _data(0, 30)
    s = tmp_path / "shards"
    s.mkdir()
    _write(s / "a.parquet", x, y, ids)
    for out in (s, s / "mined", s / "x" / "y"):
        with pytest.raises(ValueError, match=r"out_dir \(-o/--out\): .* input folder"):
            _mine(str(s), out)
    # a subfolder whose name starts with '_' is skipped by the folder scan: allowed, rerunnable
    _, a = _mine(str(s), s / "_mined")
    _, b = _mine(str(s), s / "_mined")
    assert _key(a) == _key(b)
    with pytest.raises(ValueError, match=r"queries \(input\).*bank \(--bank\)|input folder"):
        _mine(x, s / "m2", y, ids, bank=str(s))


def test_overwrite_without_an_earlier_run_deletes_nothing(tmp_path):
    x, y, ids = _data(0, 30)
    out = tmp_path / "out"
    out.mkdir()
    keep = {"summary.json": b"{}", "scores.png": b"png", "notes.txt": b"mine"}
    for name, data in keep.items():
        (out / name).write_bytes(data)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    res, _ = _mine(str(tmp_path / "x.npy"), out, str(tmp_path / "y.npy"), overwrite=True,
                   plot=False)
    assert (out / "notes.txt").read_bytes() == b"mine"
    assert (out / "scores.png").read_bytes() == b"png"  # not written by this run: kept
    assert json.loads((out / "summary.json").read_text())["queries"]["total"] == 30


def test_partial_results_without_state_file_are_refused(tmp_path):
    x, y, ids = _data(0, 30)
    out = tmp_path / "out"
    (out / "_shards").mkdir(parents=True)
    _write(out / "_shards" / "part-00000.parquet", x, y, ids)  # not this package's shard
    with pytest.raises(ValueError, match=r"holds partial results \(_shards\) but no run state"):
        _mine(x, out, y, ids)
    _, rows = _mine(x, out, y, ids, overwrite=True)
    _, want = _mine(x, tmp_path / "fresh", y, ids)
    assert _key(rows) == _key(want)


def _killed_run(tmp_path, monkeypatch, out, **kw):
    x, y, ids = _data(0, 60)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    args = [str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "-o", str(out),
            "-k", "3", "--block-size", "8x16", "--shard-size", "8", "--no-progress",
            "--no-plot", "--format", "none", "--device", "cpu"]
    import subprocess
    import sys
    env = {**os.environ, STOP_ENV: "3"}
    r = subprocess.run([sys.executable, "-m", "exportminers.pipeline", *args], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 75, r.stderr
    _, want = _mine(x, tmp_path / "fresh", y, block_size=(8, 16))
    return args, want


def test_damaged_shard_is_mined_again(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args, want = _killed_run(tmp_path, monkeypatch, out)
    (out / "_shards" / "part-00001.parquet").write_bytes(b"")
    assert cli_main(args) == 0  # the command line prints warnings as "warning: ..."
    assert re.search(r"deleting shard .*part-00001.*damaged", capsys.readouterr().err)
    assert _key(pq.read_table(out / "mined.parquet").to_pylist()) == _key(want)


def test_shard_of_other_rows_is_mined_again(tmp_path, monkeypatch):
    out = tmp_path / "out"
    args, want = _killed_run(tmp_path, monkeypatch, out)
    t = pq.read_table(out / "_shards" / "part-00000.parquet")
    pq.write_table(t.slice(0, 5), out / "_shards" / "part-00000.parquet")  # rows lost
    with pytest.warns(RuntimeWarning, match=r"deleting shard .*part-00000.*other queries"):
        _, rows = _mine(str(tmp_path / "x.npy"), out, str(tmp_path / "y.npy"), shard_size=8)
    assert _key(rows) == _key(want)


@pytest.mark.parametrize("state", ['{"trunc', "[]", '{"fingerprint": 3}'])
def test_damaged_state_file(tmp_path, monkeypatch, capsys, state):
    out = tmp_path / "out"
    args, want = _killed_run(tmp_path, monkeypatch, out)
    (out / "_state.json").write_text(state)
    assert cli_main(args) == 2
    assert "run state file" in capsys.readouterr().err
    assert cli_main(args + ["--overwrite"]) == 0
    assert _key(pq.read_table(out / "mined.parquet").to_pylist()) == _key(want)


def test_resume_with_the_input_path_spelled_differently(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args, want = _killed_run(tmp_path, monkeypatch, out)
    monkeypatch.chdir(tmp_path)
    args[0] = "./x.npy"
    assert cli_main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["engine"]["shards_run_now"] == s["engine"]["shards"] - 3
    assert _key(pq.read_table(out / "mined.parquet").to_pylist()) == _key(want)


def test_excluded_row_does_not_bound_the_dtype(tmp_path):
    """A row left out for its missing label is never scored: its huge norm must not make
    the run fail the dtype range check."""
    x, y, ids = _data(0, 50)
    y = y.astype(np.float64)
    x[7] = 1e19
    y[7] = np.nan
    for metric in ("l2", "dot"):
        res, rows = _mine(x, tmp_path / metric, y, metric=metric)
        assert res.summary["queries"]["excluded_missing_label"] == 1
        assert rows[7]["status"] == "excluded_missing_label"


def test_float64_beyond_float32_range_is_excluded_without_numpy_warning(tmp_path):
    x, y, ids = _data(0, 30)
    x64 = x.astype(np.float64)
    x64[4, 2] = 1e39
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res, rows = _mine(x64, tmp_path / "out", y)
    assert rows[4]["status"] == "excluded_nonfinite"
    assert json.loads((tmp_path / "out" / "excluded.json").read_text())["queries"][
        "nonfinite_embedding"] == [4]


@pytest.mark.parametrize("metric", ["cosine", "dot", "l2"])
def test_one_row_blocks_give_the_same_scores(tmp_path, metric):
    """Query blocks of one row used to run a matrix-vector kernel with other rounding."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((29, 64)).astype(np.float32)   # rounding differs by kernel
    y = rng.integers(0, 3, 29)
    got = {}
    for bs in ((1, 8), (29, 29), (1, 1), (5, 3)):
        _, rows = _mine(x, tmp_path / f"o{bs}", y, k=4, metric=metric, block_size=bs)
        got[bs] = [(r["neg_ids"], r["neg_scores"], r["pos_ids"], r["pos_scores"]) for r in rows]
    assert got[(1, 8)] == got[(29, 29)] == got[(1, 1)] == got[(5, 3)]
    ref = mine_reference(MineConfig(k=4, metric=metric), x, y, np.arange(29))
    assert [r[0] for r in got[(1, 8)]] == [list(r["neg_ids"]) for r in ref]


def test_demo_refuses_input_options(capsys):
    assert cli_main(["--demo", "--labels", "l.npy", "--no-progress"]) == 2
    assert "--demo mines built-in data: it takes no --labels" in capsys.readouterr().err


def test_id_column_empty_string_uses_row_numbers(tmp_path):
    x, y, _ = _data(0, 20)
    p = tmp_path / "e.parquet"
    pq.write_table(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D),
                             "label": pa.array(y), "id": [f"img{i}.jpg" for i in range(20)]}), p)
    with pytest.raises(ValueError, match="id column 'id' must be non-null integers"):
        _mine(str(p), tmp_path / "o1")
    _, rows = _mine(str(p), tmp_path / "o2", id_column="")
    assert [r["query_id"] for r in rows] == list(range(20))


def test_id_column_in_some_shards_only_is_an_error(tmp_path):
    d = tmp_path / "f"
    d.mkdir()
    x, y, ids = _data(0, 20)
    _write(d / "a.parquet", x[:10], y[:10], ids[:10])
    _write(d / "b.parquet", x[10:], y[10:])
    with pytest.raises(ValueError, match="id column 'id' present in some shards only"):
        _mine(str(d), tmp_path / "o")
    _, rows = _mine(str(d), tmp_path / "o2", id_column="")
    assert len(rows) == 20


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_out_dir_in_a_linked_subfolder_is_refused(tmp_path):
    x, y, ids = _data(0, 30)
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    _write(tmp_path / "data" / "p.parquet", x, y, ids)
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")
    with pytest.raises(ValueError, match=r"inside the input folder .* \(through .*elsewhere\)"):
        _mine(str(tmp_path / "data"), tmp_path / "elsewhere" / "out")
    _mine(str(tmp_path / "data"), tmp_path / "elsewhere" / "_out")   # skipped by the scan
