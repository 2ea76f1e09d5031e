"""The benchmark runner: its --quick run writes JSON, markdown and plots, and a row that
runs past its cap or out of memory is recorded as such (no timing assertions)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

pytest.importorskip("matplotlib")
pytest.importorskip("pytorch_metric_learning")

from benchmarks import run as bench_run  # noqa: E402

STATUSES = {"ok", "oom", "timeout", "skipped", "unavailable", "error"}


def _onnx_available() -> bool:
    return bench_run.onnx_api_problem() is None


def test_quick_run_writes_json_markdown_and_plots(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--device", "cpu", "--threads", "1",
         "--out", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    data = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["pml"]
    rows = data["rows"]
    assert rows and all(r["status"] in STATUSES for r in rows)
    assert all(r["status"] == "ok" for r in rows if r["impl"] in ("pml", "eager", "torchscript"))
    for r in rows:
        if r["status"] == "ok":
            assert r["median_ms"] > 0 and r["repeats"] >= 1 and r["peak_mem_mb"] is not None
    ort = [r for r in rows if r["impl"] == "ort_cpu"]
    assert ort, "the quick run has at least one ONNX Runtime row"
    if _onnx_available():
        assert any(r["status"] == "ok" for r in ort), ort
    else:
        assert all(r["status"] == "unavailable" for r in ort)

    md = (tmp_path / "bench_cpu.md").read_text()
    assert "| Miner | N |" in md and "PML eager" in md and "BatchHardMiner" in md
    for name in ("time_vs_n_cpu.png", "memory_vs_n_cpu.png", "ratio_vs_pml_cpu.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_timeout_and_oom_are_recorded_not_dropped():
    gib = 2 ** 30
    # PML's TripletMarginMiner at N = 1024 takes well over 0.2 s per call: past that cap
    # the row is killed and recorded as a timeout. PML's AngularMiner at N = 2048 builds an
    # 8.6e9-element (8 GiB) triplet mask: it runs out of memory under a 6 GiB address-space
    # limit (the CPU runs' kind; a CUDA build of torch maps ~2 GiB of libraries, so 3 GiB
    # cannot even import it) and under a 3 GiB data limit (the CUDA runs' kind).
    slow = bench_run.row_task("TripletMarginMiner", "pml", 1024, cap_s=0.2, warmup=1, repeats=1)
    hungry = bench_run.row_task("AngularMiner", "pml", 2048, warmup=1, repeats=1)
    (timed_out,) = bench_run.run_tasks([slow], "as", 8 * gib)
    assert timed_out["status"] == "timeout", timed_out
    for kind, limit in (("as", 6 * gib), ("data", 3 * gib)):
        (oom,) = bench_run.run_tasks([hungry], kind, limit)
        assert oom["status"] == "oom", (kind, oom)


# ------------------------------------------------------------------ argument handling

from benchmarks import report as bench_report  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--repeats", "-3"], "--repeats must be at least 1"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
    (["--rows-per-process", "0"], "--rows-per-process must be at least 1"),
    (["--cap-s", "0"], "--cap-s must be positive"),
    (["--cap-s", "-5"], "--cap-s must be positive"),
    (["--sizes", "25x"], "'25x' is not an integer"),
    (["--sizes", ","], "give comma-separated positive integers"),
    (["--sizes", "0,-8"], "batch sizes must be positive"),
    (["--quick", "--sizes", "-1"], "batch sizes must be positive"),
    (["--pipeline"], "--pipeline on --device cpu"),
    (["--deadline-s", "-1"], "--deadline-s must be 0 (none) or more"),
])
def test_run_rejects_bad_arguments(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(argv + ["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_deadline_records_unstarted_rows_and_still_writes_results(tmp_path):
    # a run inside a time-limited job (the GPU machine's 10-minute calls): once the
    # deadline has passed, no further row starts, the rest are recorded as skipped, and
    # the JSON / markdown are written as usual
    rc = bench_run.main(["--device", "cpu", "--miners", "BatchHardMiner,PairMarginMiner",
                         "--sizes", "32", "--impls", "eager,torchscript", "--warmup", "1",
                         "--repeats", "1", "--min-repeats", "1", "--rows-per-process", "1",
                         "--threads", "1", "--deadline-s", "1e-9", "--no-plots",
                         "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "bench_cpu.json").read_text())["rows"]
    assert len(rows) == 4, rows
    assert all(r["status"] == "skipped" for r in rows), rows
    assert all(r["reason"].startswith("deadline: --deadline-s 1e-09") for r in rows)
    assert {(r["miner"], r["impl"]) for r in rows} == {
        (m, i) for m in ("BatchHardMiner", "PairMarginMiner") for i in ("eager", "torchscript")}
    assert "deadline" in (tmp_path / "bench_cpu.md").read_text()


def test_rows_stop_sharing_workers_when_a_shared_one_could_outlast_the_deadline(tmp_path):
    # with 100 s left and a 60 s cap, a worker of 5 rows could run 300 s past its start:
    # each row gets its own worker (no row is marked as sharing one), so the run ends by
    # the deadline plus one row's cap
    argv = ["--device", "cpu", "--miners", "BatchHardMiner", "--sizes", "32",
            "--impls", "eager,torchscript", "--warmup", "1", "--repeats", "1",
            "--min-repeats", "1", "--rows-per-process", "5", "--cap-s", "60", "--threads", "1",
            "--no-plots"]
    assert bench_run.main(argv + ["--deadline-s", "100", "--out", str(tmp_path / "d")]) == 0
    rows = json.loads((tmp_path / "d" / "bench_cpu.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    assert not any(r.get("mem_shared_process") for r in rows), rows
    # without a deadline the two rows share one worker
    assert bench_run.main(argv + ["--out", str(tmp_path / "n")]) == 0
    rows = json.loads((tmp_path / "n" / "bench_cpu.json").read_text())["rows"]
    assert sum(bool(r.get("mem_shared_process")) for r in rows) == 1, rows


def test_run_rejects_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(["--out", str(f)])
    assert exc.value.code == 2
    assert "is not a folder" in capsys.readouterr().err


def test_quick_sets_only_what_was_not_given(tmp_path, monkeypatch):
    args = bench_run.parse_args(["--quick", "--out", str(tmp_path)])
    assert args.size_list == [bench_run.QUICK_SIZE]
    assert (args.warmup, args.repeats, args.min_repeats) == (1, 1, 1)
    assert args.rows_per_process >= 10 ** 6 and args.cap_s == 60.0
    assert set(args.quick_set) == set(bench_run.QUICK_DEFAULTS)

    # explicit options win over --quick, including ones equal to the plain defaults
    args = bench_run.parse_args(["--quick", "--out", str(tmp_path), "--sizes", "256,1024,4096",
                                 "--warmup", "3", "--repeats", "5", "--min-repeats", "2",
                                 "--cap-s", "120", "--rows-per-process", "1"])
    assert args.size_list == [256, 1024, 4096]
    assert (args.warmup, args.repeats, args.min_repeats) == (3, 5, 2)
    assert args.cap_s == 120.0 and args.rows_per_process == 1 and args.quick_set == {}

    # without --quick: the documented defaults; sizes sorted and de-duplicated
    args = bench_run.parse_args(["--out", str(tmp_path), "--sizes", "64,32,64"])
    assert args.size_list == [32, 64]
    assert (args.warmup, args.repeats, args.min_repeats, args.rows_per_process) == (3, 20, 3, 1)

    # a relative --out is made absolute (workers run with cwd = the repository root)
    monkeypatch.chdir(tmp_path)
    args = bench_run.parse_args(["--out", "rel"])
    assert args.out == os.path.join(str(tmp_path), "rel")


def test_device_cuda_without_cuda_is_an_error():
    args = bench_run.parse_args(["--device", "cuda", "--out", "/tmp/unused_bench_out"])
    no_cuda = {"cuda_available": False, "ort_providers": ["CPUExecutionProvider"]}
    assert "torch.cuda.is_available() is False" in bench_run.check_device(args, no_cuda)
    no_ep = {"cuda_available": True, "ort_providers": ["CPUExecutionProvider"]}
    assert "CUDAExecutionProvider" in bench_run.check_device(args, no_ep)
    args.impls = "pml,eager"
    assert bench_run.check_device(args, no_ep) is None
    cpu = bench_run.parse_args(["--out", "/tmp/unused_bench_out"])
    assert bench_run.check_device(cpu, no_cuda) is None


def test_torchscript_rows_get_two_warmup_calls(tmp_path):
    # planned: --quick asks for one warm-up call, TorchScript rows are given two
    args = bench_run.parse_args(["--quick", "--out", str(tmp_path), "--miners", "BatchHardMiner",
                                 "--impls", "pml,torchscript"])
    env = {"cuda_available": False, "ort_providers": []}
    to_run, _, _ = bench_run.plan(args, env)
    warm = {r["impl"]: r["warmup"] for r in to_run}
    assert warm == {"pml": 1, "torchscript": 2}
    # run: even asked for one and with every call longer than budget_s / 2 (budget 0), the
    # worker makes two warm-up calls and records the count it made
    task = bench_run.row_task("BatchHardMiner", "torchscript", 16, warmup=1, repeats=1,
                              min_repeats=1, budget_s=0.0, threads=1)
    (res,) = bench_run.run_tasks([task], "none", 0)
    assert res["status"] == "ok", res
    assert res["warmup"] == 2 and res["repeats"] == 1


def test_timeout_skips_larger_n_with_rows_sharing_a_process():
    slow = [bench_run.row_task("TripletMarginMiner", "pml", n, cap_s=0.2, warmup=1, repeats=1)
            for n in (1024, 2048)]
    first, second = bench_run.run_tasks(slow, "none", 0)
    assert first["status"] == "timeout", first
    assert second["status"] == "skipped" and "timeout at N=1024" in second["reason"], second


# ------------------------------------------------------------------ report


def _row(miner, n, impl, ms=1.0, **extra):
    return dict({"miner": miner, "n": n, "impl": impl, "status": "ok", "median_ms": ms,
                 "times_ms": [ms], "repeats": 1, "warmup": 1, "peak_mem_mb": 1.0}, **extra)


def _result(device="cpu", date="2025-01-01", git="abc", rows=None, sizes=(64,)):
    return {"meta": {"device": device, "date": date, "git": git, "wall_s": 1.0,
                     "mem_limit": "as 8 GB", "sizes": list(sizes),
                     "args": {"warmup": 1, "repeats": 1, "min_repeats": 1, "cap_s": 60.0,
                              "rows_per_process": 1, "quick": True}},
            "rows": rows if rows is not None else [_row("BatchHardMiner", 64, "pml")]}


def _dump(path, result):
    path.write_text(json.dumps(result))
    return str(path)


def test_report_user_mistakes_are_clean_errors(tmp_path, capsys):
    cpu = _dump(tmp_path / "a.json", _result("cpu"))
    cuda = _dump(tmp_path / "b.json", _result("cuda"))
    no_meta = _dump(tmp_path / "c.json", {"rows": []})
    cases = [
        ([cpu, cuda, "--merge"], "cannot merge runs on different devices"),
        ([no_meta], "not a benchmark result"),
        ([str(tmp_path / "missing.json")], "no such file"),
    ]
    other = tmp_path / "other"
    other.mkdir()
    cpu2 = _dump(other / "bench_cpu.json", _result("cpu", date="2025-02-02"))
    cases.append(([cpu, cpu2, "--out", str(tmp_path / "out")], "pass --merge"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            bench_report.main(argv + ["--no-plots"])
        assert exc.value.code == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (tmp_path / "out").exists()


def test_report_merge_keeps_every_source_run(tmp_path):
    a = _result(date="2025-01-01", git="aaa", sizes=(64,))
    b = _result(date="2025-02-02", git="bbb", sizes=(128,),
                rows=[_row("BatchHardMiner", 128, "pml")])
    c = _result(date="2025-03-03", git="ccc", sizes=(256,),
                rows=[_row("BatchHardMiner", 256, "pml")])
    merged = bench_report.merge([bench_report.merge([a, b]), c])
    srcs = merged["meta"]["merged"]
    assert [s["git"] for s in srcs] == ["aaa", "bbb", "ccc"]
    assert [s["sizes"] for s in srcs] == [[64], [128], [256]]
    assert all(s["mem_limit"] == "as 8 GB" and s["wall_s"] == 1.0 for s in srcs)
    assert merged["meta"]["date"] is None and merged["meta"]["git"] is None
    md = bench_report.markdown(merged)
    assert "Merge of 3 runs" in md
    assert all(x in md for x in ("aaa", "bbb", "ccc", "2025-01-01", "2025-03-03"))
    assert "- Date:" not in md


def test_report_tables_without_columns_and_untimed_rows():
    skipped = _result(rows=[dict(_row("BatchHardMiner", 64, "pml"), status="skipped",
                                 reason="CUDA not available")])
    md = bench_report.markdown(skipped)
    for line in md.splitlines():  # every table: header and delimiter have the same cells
        assert not line.startswith("| Miner | N |  |"), line
    assert "No rows" in md
    cold = _result(rows=[_row("BatchHardMiner", 64, "pml"),
                         _row("BatchHardMiner", 64, "eager", ms=50.0, times_ms=[], repeats=0,
                              note="no timed call (repeats=0): cold call")])
    md = bench_report.markdown(cold)
    line = next(x for x in md.splitlines() if x.startswith("| BatchHardMiner | 64 |"))
    assert "(1 call)[^1]" in line and "x)" not in line  # marked, and no ratio to PML
    assert "[^1]: no timed call (repeats=0): cold call" in md


@pytest.mark.skipif(not _onnx_available(), reason="torch.onnx export unavailable here")
def _assert_row_runs_graph_like_eager(row, graph, n, d):
    """A TripletMarginMiner ORT row runs ``graph`` and mines the eager miner's tuples."""
    from benchmarks import common, worker
    from exportminers.verify import as_multisets
    out = worker.run_row(dict(row), deadline=1e18)
    assert out["status"] == "ok" and out["graph"] == graph
    x, y = common.make_inputs(n, d, 8, 1, 0, 1.25)[0]
    got = worker._build(dict(row), "cpu")(x.numpy(), y.numpy())
    miner = common.build_ours("TripletMarginMiner", common.default_config("TripletMarginMiner"))
    assert as_multisets(got, "triplets") == as_multisets(miner(x, y), "triplets")


def test_rows_beyond_one_run_use_the_anchor_block_graph(tmp_path, monkeypatch):
    """Where one run of a self-mining graph would compute a tensor beyond 2^31 - 1 elements
    (shrunk here to 1,000), the export adds the miner's anchor-block graph and its decoded
    rows run that (marked, with a footnote) with the same tuples as the eager miner; its
    fixed-shape rows are skipped with the reason; a miner that is not row-independent
    gets no anchor-block graph and its rows at that size are skipped."""
    from benchmarks import common, worker
    from exportminers.runtime import onnx_miner
    monkeypatch.setattr(onnx_miner, "CUDA_MAX_ELEMENTS", 1000)   # 12^3 > 1000 > 6^3
    d = 16

    def export(name):
        task = {"miner": name, "config": common.default_config(name), "d": d,
                "path": common.onnx_path(str(tmp_path), name),
                "blocks_path": common.onnx_path(str(tmp_path), name, anchor_blocks=True),
                "sizes": [6, 12]}
        os.makedirs(os.path.dirname(task["path"]), exist_ok=True)
        return worker.run_export(task)

    res = export("TripletMarginMiner")
    assert res["status"] == "ok" and res["blocks_for"] == [12] and os.path.isfile(res["blocks_path"])
    row = bench_run.row_task("TripletMarginMiner", "ort_cpu", 12, d=d, warmup=1, repeats=1,
                             onnx_path=res["path"], onnx_blocks_path=res["blocks_path"])
    assert worker.pick_graph(dict(row, n=6), 6) == res["path"]
    assert worker.pick_graph(dict(row), 12) == res["blocks_path"]
    with pytest.raises(worker.RowSkipped, match="1,728 elements.*anchor blocks"):
        worker.pick_graph(dict(row, impl="ort_cpu_raw"), 12)
    _assert_row_runs_graph_like_eager(row, "anchor_blocks", 12, d)

    res = export("DistanceWeightedMiner")       # [N, N] tensors only: fits at 12 too
    assert res["status"] == "ok" and "blocks_path" not in res
    monkeypatch.setattr(onnx_miner, "CUDA_MAX_ELEMENTS", 100)    # 12^2 > 100
    res = export("DistanceWeightedMiner")
    assert "blocks_path" not in res            # not row-independent: no anchor blocks
    row = bench_run.row_task("DistanceWeightedMiner", "ort_cpu", 12, d=d, onnx_path=res["path"])
    with pytest.raises(worker.RowSkipped, match="not row-independent"):
        worker.pick_graph(row, 12)

    md = bench_report.markdown(_result(rows=[
        _row("TripletMarginMiner", 64, "pml"),
        _row("TripletMarginMiner", 64, "ort_cpu", graph="anchor_blocks")]))
    line = next(x for x in md.splitlines() if x.startswith("| TripletMarginMiner | 64 |"))
    assert "[^1]" in line and "[^1]: one run of the self-mining graph" in md


def test_rows_of_gathering_miners_run_the_gather_positives_graph(tmp_path):
    """With a gather path the export adds the miner's gather_positives graph (miners that
    take it only), the ONNX rows run it (marked, footnoted) with the eager tuples, and a
    fixed-shape row whose one run would pass 2^31 - 1 elements is skipped."""
    from benchmarks import common, worker
    d = 16

    def export(name):
        task = {"miner": name, "config": common.default_config(name), "d": d,
                "path": common.onnx_path(str(tmp_path), name),
                "gather_path": common.onnx_path(str(tmp_path), name, gather=True),
                "sizes": [16]}
        os.makedirs(os.path.dirname(task["path"]), exist_ok=True)
        return worker.run_export(task)

    res = export("TripletMarginMiner")
    assert res["status"] == "ok" and os.path.isfile(res["gather_path"])
    assert res["gather_path"].endswith("TripletMarginMiner_gather.onnx")
    assert "gather_path" not in export("BatchHardMiner")
    row = bench_run.row_task("TripletMarginMiner", "ort_cpu", 16, d=d, warmup=1, repeats=1,
                             onnx_path=res["path"], onnx_gather_path=res["gather_path"])
    assert worker.pick_graph(dict(row), 16) == res["gather_path"]
    assert worker.pick_graph(dict(row, impl="ort_cpu_raw"), 16) == res["gather_path"]
    with pytest.raises(worker.RowSkipped, match="one run at N=50000"):
        worker.pick_graph(dict(row, impl="ort_cpu_raw"), 50000)   # 50000 * 7 * 50000
    _assert_row_runs_graph_like_eager(row, "gather_positives", 16, d)
    md = bench_report.markdown(_result(rows=[
        _row("TripletMarginMiner", 64, "pml"),
        _row("TripletMarginMiner", 64, "ort_cpu", graph="gather_positives")]))
    assert "[^1]: this row runs the miner's gather_positives=True graph" in md


def test_cuda_report_merge_used_by_gpu_session(tmp_path):
    """benchmarks/gpu_session.sh joins the pytest-xdist workers' CUDA rows with
    tests/test_cuda.py's merge_reports: one table, every row, sorted by graph."""
    import json

    from test_cuda import merge_reports

    rows = [{"graph": g, "strict": "yes", "cpu nodes": "-", "memcpy": 0, "parity": "ok",
             "tuples": "1,2", "sec": 0.5} for g in ("c", "a", "b")]
    for w, part in (("gw0", rows[:2]), ("gw1", rows[2:])):
        (tmp_path / f"cuda_report.md.{w}.json").write_text(json.dumps(part))
    out = tmp_path / "merged.md"
    assert merge_reports(str(tmp_path / "cuda_report.md"), str(out)) == 3
    lines = out.read_text().splitlines()
    assert [ln.split(" | ")[0] for ln in lines[2:]] == ["| a", "| b", "| c"]
    script = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "benchmarks", "gpu_session.sh"), encoding="utf-8").read()
    assert "merge_reports(" in script
