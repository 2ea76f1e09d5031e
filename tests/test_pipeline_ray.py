"""The mining pipeline on Ray (``engine="ray"``): the same rows as the local engine with
the bank split into shards, through a failing batch and a killed actor; a run killed
part-way resumes from its finished parts; the local engine never imports ray; a clear
error where ray is missing."""
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from exportminers.pipeline import mine  # noqa: E402
from exportminers.pipeline.cli import main  # noqa: E402
from exportminers.pipeline.ray_engine import (FAULT_ENV, PARTS_DIR, query_ranges,  # noqa: E402
                                              reusable_parts, write_part)

# Ray's own deprecation notices (its DataContext defaults) are not ours to fix here
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
D = 5
BLOCKS = (7, 11)  # small blocks: several query blocks per batch, several bank blocks per shard


@pytest.fixture(scope="module")
def ray_local():
    """One small local Ray instance for the module, shut down afterwards."""
    assert not ray.is_initialized()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_DEDUP_LOGS", "0")
        mp.setenv("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 ** 2,
                 log_to_driver=False, logging_level=logging.WARNING)
        try:
            yield ray
        finally:
            ray.shutdown()


def _int_data(seed, n, labels=5):
    """Integer-valued embeddings: exact scores and many ties (broken by bank row)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-2, 3, (n, D)).astype(np.float32), rng.integers(0, labels, n)


def _self_data():
    x, y = _int_data(0, 60)
    x[4, 1] = np.nan  # reported as excluded_nonfinite, never a candidate
    yf = y.astype(np.float64)
    yf[9] = np.nan  # missing label
    return dict(queries=x, labels=yf)


def _bank_data():
    q, ql = _int_data(1, 40)
    m, ml = _int_data(2, 70)
    m[3, 0] = np.inf  # a bad bank row
    return dict(queries=q, labels=ql, ids=1000 + np.arange(40), bank=m, bank_labels=ml,
                bank_ids=1000 + np.arange(70))


CASES = {
    "hardest": (_self_data, dict(k=3, metric="dot", num_positives=2), 3, 3),
    # positive-aware filter: two passes (positives, then negatives in each query's band)
    "margin_pos_easiest": (_bank_data, dict(k=3, metric="dot", margin_pos=1.5, num_positives=2,
                                            easiest_positive=True, positive_ref="easiest"), 2, 2),
    # random sampling in a rank window; 2 shards with 2 actors each
    "random_window": (_self_data, dict(k=4, metric="dot", range_min=1, range_max=12,
                                       sampling="random", seed=3), 2, 4),
}


def _mine(data, out, **kw):
    d = dict(data)
    q, lab, ids = d.pop("queries"), d.pop("labels"), d.pop("ids", None)
    kw = {"block_size": BLOCKS, "shard_size": 14, "progress": False, "plot": False,
          "formats": ["triplets", "pairs"], "device": "cpu", **kw}
    return mine(q, lab, ids, out_dir=out, **d, **kw)


def _assert_same(local, remote, n):
    a, b = pq.read_table(local.output), pq.read_table(remote.output)
    assert a.schema.equals(b.schema), (a.schema, b.schema)
    ra, rb = a.to_pylist(), b.to_pylist()
    assert [r["query_index"] for r in rb] == list(range(n))  # every query exactly once
    for x, y in zip(ra, rb):
        for key in x:
            if "score" in key and x[key] is not None:
                np.testing.assert_allclose(y[key], x[key], rtol=1e-6, atol=1e-6)
            else:
                assert x[key] == y[key], (key, x, y)
    for fmt in ("triplets", "pairs"):
        fa, fb = pq.read_table(local.files[fmt]), pq.read_table(remote.files[fmt])
        assert fa.schema.equals(fb.schema)
        for col in fa.column_names:
            if "score" in col:
                np.testing.assert_allclose(fb.column(col).to_numpy(), fa.column(col).to_numpy(),
                                           rtol=1e-6, atol=1e-6)
            else:
                assert fa.column(col).equals(fb.column(col)), col
    assert (json.loads(local.files["excluded"].read_text())
            == json.loads(remote.files["excluded"].read_text()))
    sa, sb = local.summary, remote.summary
    for key in ("queries", "short_of_negatives", "no_positive", "excluded", "config"):
        assert sa[key] == sb[key], key
    assert sb["engine"]["name"] == "ray"
    assert not (remote.out_dir / PARTS_DIR).exists()


@pytest.mark.parametrize("positives", ["graph", "host"])
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_bank_equals_local_engine(ray_local, tmp_path, name, positives):
    make, cfg, shards, actors = CASES[name]
    data = make()
    local = _mine(data, tmp_path / "local", positives=positives, **cfg)
    remote = _mine(data, tmp_path / "ray", engine="ray", bank_shards=shards, num_actors=actors,
                   positives=positives, **cfg)
    eng = remote.summary["engine"]
    assert eng["positives"] == local.summary["engine"]["positives"] == positives
    assert eng["label_mask"] == local.summary["engine"]["label_mask"]
    assert eng["bank_shards"] == shards and sum(eng["actors_per_shard"]) == actors
    assert len(eng["bank_shard_rows"]) == shards and eng["batches"] > 1
    assert eng["duplicate_rows_dropped"] == 0
    assert eng["resumed_queries"] == 0 and eng["queries_run_now"] == len(data["queries"])
    _assert_same(local, remote, len(data["queries"]))
    rows = pq.read_table(remote.output).to_pylist()
    if name == "hardest":
        assert rows[4]["status"] == "excluded_nonfinite"
        assert rows[9]["status"] == "excluded_missing_label" and rows[9]["label"] is None
        assert all(not {4, 9} & set(r["neg_ids"] + r["pos_ids"]) for r in rows)
    if name == "margin_pos_easiest":
        assert all(1003 not in r["neg_ids"] + r["pos_ids"] for r in rows)


@pytest.mark.parametrize("mode, cfg", [
    ("raise", dict(k=2, metric="l2", strategy="semihard", margin=1.1)),  # two passes
    ("exit", dict(k=3, metric="dot", min_score=-1.5)),
])
def test_failed_batch_or_killed_actor_is_retried_without_loss_or_duplicates(
        ray_local, tmp_path, monkeypatch, mode, cfg):
    """``raise``: the first attempt of the batch holding query 30 raises (retried in
    place); ``exit``: the actor holding a bank shard dies in the middle of that batch
    (restarted by Ray, its task retried)."""
    data = _self_data()
    local = _mine(data, tmp_path / "local", **cfg)
    marker = tmp_path / f"failed-{mode}"
    monkeypatch.setenv(FAULT_ENV, f"{mode}:30:{marker}")
    remote = _mine(data, tmp_path / "ray", engine="ray", bank_shards=2, **cfg)
    assert marker.is_file()  # the failure did happen
    _assert_same(local, remote, 60)


def test_cli_engine_ray_on_parquet_shards(ray_local, tmp_path, capsys):
    x, y = _int_data(3, 50)
    ids = np.arange(50) * 7 + 1
    folder = tmp_path / "in"
    folder.mkdir()
    for j, s in enumerate(range(0, 50, 20)):  # a folder of Parquet shards, small row groups
        t = pa.table({"embedding": pa.array(list(x[s:s + 20]), type=pa.list_(pa.float32(), D)),
                      "label": pa.array(y[s:s + 20]), "id": pa.array(ids[s:s + 20])})
        pq.write_table(t, folder / f"part-{j}.parquet", row_group_size=6)
    common = [str(folder), "-k", "3", "--metric", "dot", "--num-positives", "2",
              "--format", "ntuples", "--no-progress", "--no-plot",
              "--block-size", "8x16", "--device", "cpu"]
    assert main(common + ["-o", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    assert main(common + ["-o", str(tmp_path / "ray"), "--engine", "ray", "--bank-shards", "2",
                          "--shard-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "mined 50 of 50 queries against themselves with Ray (2 actor(s), 2 bank shard(s))" in out
    for f in ("mined.parquet", "ntuples.parquet"):
        assert pq.read_table(tmp_path / "local" / f).equals(pq.read_table(tmp_path / "ray" / f)), f
    assert pq.read_table(tmp_path / "ray" / "mined.parquet").column("query_id").to_pylist() == \
        ids.tolist()


def test_ray_arguments_are_checked(ray_local, tmp_path, capsys):
    data = _self_data()
    for kw, match in [(dict(bank_shards=7), "bank_shards \\(7\\) is more than the bank's 6"),
                      (dict(bank_shards=3, num_actors=2), "num_actors \\(2\\) must be >="),
                      (dict(device="cuda"), "num_gpus_per_actor"),
                      (dict(bank_shards=0), "bank_shards must be")]:
        with pytest.raises(ValueError, match=match):
            _mine(data, tmp_path / "o", engine="ray", k=3, **kw)
    with pytest.raises(ValueError, match="engine='ray' only"):
        _mine(data, tmp_path / "o", bank_shards=2, k=3)
    with pytest.raises(ValueError, match="engine must be"):
        _mine(data, tmp_path / "o", engine="spark", k=3)
    np.save(tmp_path / "x.npy", data["queries"])
    np.save(tmp_path / "y.npy", data["labels"])
    rc = main([str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "-o",
               str(tmp_path / "c"), "--bank-shards", "2", "--no-progress"])
    assert rc == 2 and "--engine ray only" in capsys.readouterr().err


def test_local_engine_never_imports_ray_and_missing_ray_is_a_clear_error(tmp_path):
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from exportminers.pipeline import mine
        from exportminers.pipeline.cli import main
        rng = np.random.default_rng(0)
        np.save({str(tmp_path / "x.npy")!r}, rng.normal(size=(30, 4)).astype(np.float32))
        np.save({str(tmp_path / "y.npy")!r}, rng.integers(0, 3, 30))
        x, y = np.load({str(tmp_path / "x.npy")!r}), np.load({str(tmp_path / "y.npy")!r})
        mine(x, y, out_dir={str(tmp_path / "a")!r}, k=2, progress=False, plot=False,
             device="cpu", strategy="semihard")
        assert main([{str(tmp_path / "x.npy")!r}, "--labels", {str(tmp_path / "y.npy")!r},
                     "-o", {str(tmp_path / "b")!r}, "-k", "2", "--no-progress"]) == 0
        loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
        assert not loaded, loaded
        print("LOCAL WITHOUT RAY OK")
        sys.modules["ray"] = None  # as if ray were not installed
        try:
            mine(x, y, out_dir={str(tmp_path / "c")!r}, k=2, engine="ray", progress=False)
        except ImportError as e:
            assert "exportminers[ray]" in str(e), e
            print("CLEAR ERROR OK")
        rc = main([{str(tmp_path / "x.npy")!r}, "--labels", {str(tmp_path / "y.npy")!r},
                   "-o", {str(tmp_path / "d")!r}, "--engine", "ray", "--no-progress"])
        assert rc == 2, rc
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LOCAL WITHOUT RAY OK" in r.stdout and "CLEAR ERROR OK" in r.stdout
    assert "pip install 'exportminers[ray]'" in r.stderr


# --------------------------------------------------------------------------- resume

KILLED_RUN = textwrap.dedent("""
    import json, logging, sys
    import ray
    from exportminers.pipeline import mine
    a = json.loads(sys.argv[1])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 ** 2,
             log_to_driver=False, logging_level=logging.WARNING)
    mine(a["x"], a["y"], out_dir=a["out"], engine="ray", num_actors=1, **a["kw"])
""")


def _save_self_data(tmp_path):
    """``_self_data`` as ``.npy`` files: a killed subprocess and its rerun must see the
    same inputs (the run's state fingerprint names them)."""
    data = _self_data()
    x, y = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(x, data["queries"])
    np.save(y, data["labels"])
    return {"queries": str(x), "labels": str(y)}


def _session_pids(sid):
    """Live (not zombie) processes of session ``sid``, from /proc."""
    pids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        state, _, _, session = stat[stat.rindex(")") + 2:].split()[:4]
        if int(session) == sid and state != "Z":
            pids.append(int(d))
    return pids


def _kill_session(sid):
    """SIGKILL a run's driver and the Ray instance it started (one session: its worker
    processes have their own process groups) and wait until none of them is left."""
    deadline = time.time() + 30
    while pids := _session_pids(sid):
        assert time.time() < deadline, f"processes {pids} survive SIGKILL"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _kill_part_way(tmp_path, data, out, cfg, stall_query):
    """Run ``mine(engine="ray")`` in a subprocess with its own small Ray instance; the
    part writer of the batch holding ``stall_query`` stalls (``FAULT_ENV`` ``hang``), so
    the run cannot finish; once another batch's part is written, SIGKILL the whole run.
    Returns the number of queries in the finished part files."""
    marker, log = tmp_path / "stalled", tmp_path / "killed-run.log"
    env = dict(os.environ, RAY_DEDUP_LOGS="0", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{FAULT_ENV: f"hang:{stall_query}:{marker}"})
    env.pop("RAY_ADDRESS", None)
    kw = {"block_size": BLOCKS, "shard_size": 14, "progress": False, "plot": False,
          "formats": ["triplets", "pairs"], "device": "cpu", **cfg}
    arg = json.dumps({"x": data["queries"], "y": data["labels"], "out": str(out), "kw": kw})
    parts = out / PARTS_DIR
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "-c", KILLED_RUN, arg], env=env, stdout=f,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (marker.is_file() and any(parts.glob("*.parquet"))):
            assert p.poll() is None, f"the run ended ({p.returncode}):\n{log.read_text()}"
            assert time.time() < deadline, f"no part written in time:\n{log.read_text()}"
            time.sleep(0.1)
    finally:
        _kill_session(p.pid)
        p.wait()
    assert not (out / "mined.parquet").exists()
    return sum(pq.read_metadata(f).num_rows for f in parts.glob("*.parquet"))


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the run's processes "
                    "in /proc")
@pytest.mark.parametrize("cfg", [
    dict(k=3, metric="dot", num_positives=2),  # one pass
    dict(k=2, metric="l2", strategy="semihard", margin=1.1),  # two passes: positives first
], ids=["one_pass", "two_passes"])
def test_run_killed_part_way_resumes_from_its_finished_parts(ray_local, tmp_path, cfg):
    """SIGKILL a Ray run (driver and Ray instance) part-way; the rerun mines only the
    queries of the missing parts (in both passes) and equals an uninterrupted run."""
    data = _save_self_data(tmp_path)
    local = _mine(data, tmp_path / "local", **cfg)
    out = tmp_path / "ray"
    done = _kill_part_way(tmp_path, data, out, cfg, stall_query=30)
    assert 0 < done <= 60 - 14  # the stalled batch (queries 28..41) is never written
    rerun = _mine(data, out, engine="ray", **cfg)
    eng = rerun.summary["engine"]
    assert eng["resumed_queries"] == done and eng["queries_run_now"] == 60 - done
    assert 1 <= eng["batches"] < 5  # a fresh run has 5 batches of 14
    assert eng["duplicate_rows_dropped"] == 0
    _assert_same(local, rerun, 60)


def test_rerun_reuses_complete_parts_and_a_changed_configuration_discards_them(
        ray_local, tmp_path):
    """All queries in finished parts: the rerun does not start Ray. Another configuration
    refuses the folder, or (overwrite=True) discards the parts and mines everything."""
    data = _save_self_data(tmp_path)
    cfg_a, cfg_b = dict(k=3, metric="dot", num_positives=2), dict(k=2, metric="dot",
                                                                   min_score=-1.5)
    local_a, local_b = _mine(data, tmp_path / "la", **cfg_a), _mine(data, tmp_path / "lb", **cfg_b)
    out = tmp_path / "ray"
    first = _mine(data, out, engine="ray", **cfg_a)
    rows = pq.read_table(first.output)
    (out / PARTS_DIR).mkdir()  # removed at the end of a run
    write_part(rows.slice(0, 31), out / PARTS_DIR)  # as if killed during the assembly
    write_part(rows.slice(31), out / PARTS_DIR)
    again = _mine(data, out, engine="ray", **cfg_a)
    eng = again.summary["engine"]
    assert (eng["resumed_queries"], eng["queries_run_now"], eng["batches"]) == (60, 0, 0)
    assert eng["cluster"] == {}  # Ray was not needed
    assert again.summary["timing"]["queries_per_second"] is None
    _assert_same(local_a, again, 60)

    (out / PARTS_DIR).mkdir()
    old = write_part(rows, out / PARTS_DIR)
    with pytest.raises(ValueError, match="holds results of a different run"):
        _mine(data, out, engine="ray", **cfg_b)
    assert old.is_file()  # refused: nothing discarded
    other = _mine(data, out, engine="ray", overwrite=True, **cfg_b)
    eng = other.summary["engine"]
    assert eng["resumed_queries"] == 0 and eng["queries_run_now"] == 60
    _assert_same(local_b, other, 60)


def test_rerun_skips_tmp_leftovers_and_mines_a_truncated_part_again(ray_local, tmp_path):
    data = _save_self_data(tmp_path)
    cfg = dict(k=3, metric="dot", num_positives=2)
    local = _mine(data, tmp_path / "local", **cfg)
    out = tmp_path / "ray"
    rows = pq.read_table(_mine(data, out, engine="ray", **cfg).output)
    parts = out / PARTS_DIR
    parts.mkdir()  # removed at the end of a run
    write_part(rows.slice(0, 20), parts)
    bad = write_part(rows.slice(20, 20), parts)
    bad.write_bytes(bad.read_bytes()[:len(bad.read_bytes()) // 2])  # a damaged file
    (parts / (bad.name + ".1234abcd.tmp")).write_bytes(b"PAR1 partial")  # a killed write
    write_part(rows.slice(45), parts)
    with pytest.warns(RuntimeWarning, match=f"deleting part file .*{bad.name}, damaged"):
        rerun = _mine(data, out, engine="ray", **cfg)
    eng = rerun.summary["engine"]
    assert eng["resumed_queries"] == 35 and eng["queries_run_now"] == 25
    assert eng["batches"] == 3  # 20..27, 28..41, 42..44: cut at the batches of 14
    _assert_same(local, rerun, 60)


def test_reusable_parts_and_query_ranges(tmp_path):
    """The resume bookkeeping without Ray: which queries complete parts hold (damaged or
    foreign parts and ``*.tmp`` leftovers deleted), and the ranges left to mine."""
    def table(qi, k=2):
        return pa.table({"query_index": pa.array(qi, pa.int64()),
                         "neg_ids": pa.array([[1] * k] * len(qi), pa.list_(pa.int64()))})

    parts = tmp_path / "parts"
    parts.mkdir()
    schema = table([]).schema
    good = write_part(table([0, 1, 2, 7]), parts)
    assert write_part(table([2, 7, 1, 0]), parts) == good  # same queries: same name
    other = write_part(table([0, 1, 2, 8]), parts)  # a different set never shares it
    assert other != good
    foreign = write_part(table([3, 4]).rename_columns(["query_index", "pos_ids"]), parts)
    outside = write_part(table([9, 10]), parts)
    cut = write_part(table(list(range(12, 15))), parts)
    cut.write_bytes(cut.read_bytes()[:-9])
    tmp = parts / "q-0.parquet.abc.tmp"
    tmp.write_bytes(b"partial")
    with pytest.warns(RuntimeWarning) as w:
        done = reusable_parts(parts, 10, schema)
    assert np.flatnonzero(done).tolist() == [0, 1, 2, 7, 8]
    messages = [str(m.message) for m in w]
    assert len(messages) == 3, messages
    for f, why in ((foreign, "schema"), (outside, "outside 0..9"), (cut, "")):
        assert any(f"part file {f}," in m and why in m for m in messages), (f, messages)
    assert sorted(parts.iterdir()) == sorted([good, other])
    assert query_ranges(np.flatnonzero(~done), 4) == [(3, 4), (4, 7), (9, 10)]
    assert query_ranges(np.arange(10), 4) == [(0, 4), (4, 8), (8, 10)]
    assert query_ranges(np.array([], np.int64), 4) == []
