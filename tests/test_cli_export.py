"""``exportminers export`` / export_scripts/export_all.py: plan, manifest, verification."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

import exportminers
from exportminers import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv):
    return cli.main(list(argv))


def test_export_writes_verified_graphs_and_manifest(tmp_path, capsys):
    out = tmp_path / "graphs"
    rc = _run("export", "--out", str(out), "--miners", "EmbeddingsAlreadyPackagedAsTriplets,TripletMarginMiner",
              "--set", "TripletMarginMiner.margin=0.1",
              "--set", "TripletMarginMiner.type_of_triplets=semihard", "--embedding-dim", "8")
    printed = capsys.readouterr().out
    assert rc == 0, printed
    manifest = json.loads((out / "manifest.json").read_text())
    graphs = manifest["graphs"]
    # packaged triplets: each registry config; TripletMarginMiner: the one given config
    packaged = exportminers.registry.MINERS["EmbeddingsAlreadyPackagedAsTriplets"].configs
    assert [(g["name"], g["file"]) for g in graphs] == [
        ("EmbeddingsAlreadyPackagedAsTriplets", f"EmbeddingsAlreadyPackagedAsTriplets_c{i}.onnx")
        for i in range(len(packaged))] + [
        ("TripletMarginMiner", "TripletMarginMiner_custom0.onnx")]
    assert graphs[-1]["config"] == {"margin": 0.1, "type_of_triplets": "semihard"}
    assert graphs[0]["config"] == packaged[0]
    for g in graphs:
        assert g["status"] == "ok" and g["verify"]["ok"]
        assert [r["n"] for r in g["verify"]["runs"]] in ([12, 20], [12, 21])
        data = (out / g["file"]).read_bytes()
        assert g["sha256"] == hashlib.sha256(data).hexdigest()
        assert [i["name"] for i in g["inputs"]] == ["embeddings", "labels"]
        assert g["inputs"][0] == {"name": "embeddings", "dtype": "float32", "shape": ["N", 8]}
        assert g["outputs"] and isinstance(g["opset"], int)
        assert "NonZero" not in g["op_types"]
    for col in ("graph", "verify", "EmbeddingsAlreadyPackagedAsTriplets_c0.onnx",
                f"{len(graphs)} of {len(graphs)} graphs"):
        assert col in printed
    om = exportminers.OnnxMiner(out / "TripletMarginMiner_custom0.onnx")
    assert om.config["margin"] == 0.1 and om.config["type_of_triplets"] == "semihard"


def test_config_file_with_ref_and_skips(tmp_path, capsys):
    cfg = tmp_path / "miners.json"
    cfg.write_text(json.dumps({"PairMarginMiner": [{"pos_margin": 0.3}],
                               "EmbeddingsAlreadyPackagedAsTriplets": {}}))
    out = tmp_path / "g"
    rc = _run("export", "--out", str(out), "--config", str(cfg), "--with-ref", "--no-verify",
              "--miners", "PairMarginMiner,EmbeddingsAlreadyPackagedAsTriplets", "-q")
    assert rc == 0
    graphs = json.loads((out / "manifest.json").read_text())["graphs"]
    assert [g["status"] for g in graphs] == ["exported", "skipped"]
    assert graphs[0]["config"] == {"pos_margin": 0.3}
    assert [i["name"] for i in graphs[0]["inputs"]] == ["embeddings", "labels", "ref_emb", "ref_labels"]
    assert graphs[0]["inputs"][0]["shape"] == ["N", "D"]
    assert capsys.readouterr().out == ""


def test_anchor_blocks_export_is_verified_in_blocks(tmp_path, capsys):
    out = tmp_path / "a"
    rc = _run("export", "--out", str(out), "--anchor-blocks", "--embedding-dim", "8", "-q",
              "--miners", "BatchHardMiner,HDCMiner")
    assert rc == 0, capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["anchor_blocks"] is True
    hard, hdc = manifest["graphs"][0], manifest["graphs"][-1]
    assert hard["status"] == "ok" and hard["anchor_blocks"]
    assert [i["name"] for i in hard["inputs"]] == ["embeddings", "labels", "anchor_index"]
    assert all(r["chunked_equal"] for r in hard["verify"]["runs"])
    assert hdc["status"] == "skipped" and "independently" in hdc["error"]
    with pytest.raises(SystemExit, match="exclude each other"):
        _run("export", "--out", str(out), "--anchor-blocks", "--with-ref")


def test_failure_is_reported_and_sets_exit_status(tmp_path, monkeypatch, capsys):
    import exportminers.export as ex

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(ex, "export_onnx", broken)
    rc = _run("export", "--out", str(tmp_path), "--miners", "PairMarginMiner")
    assert rc == 1
    graphs = json.loads((tmp_path / "manifest.json").read_text())["graphs"]
    assert all(g["status"] == "failed" and "exporter exploded" in g["error"] for g in graphs)
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["--miners", "NoSuchMiner"], "unknown"),
    (["--set", "PairMarginMiner.margin"], "Miner.key=value"),
    (["--set", "NoSuch.x=1"], "unknown miner"),
    (["--miners", "PairMarginMiner", "--set", "TripletMarginMiner.margin=1"], "not among --miners"),
])
def test_bad_arguments(tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        _run("export", "--out", str(tmp_path), *argv)


def test_plan_parses_values():
    plan = cli.plan_exports("BatchEasyHardMiner", None, [
        "BatchEasyHardMiner.allowed_neg_range=[0.2, 1.5]", "BatchEasyHardMiner.neg_strategy=easy"])
    assert plan == [("BatchEasyHardMiner", 0, {"allowed_neg_range": [0.2, 1.5],
                                               "neg_strategy": "easy"}, True)]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        _run("export", "--help")
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--miners", "--config", "--set", "--dtype", "--with-ref", "--opset",
                 "--embedding-dim", "manifest.json", "examples:"):
        assert flag in text
    assert _run() == 2  # no subcommand: prints help
    assert "export" in capsys.readouterr().out


def test_entry_points_help():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for cmd in ([sys.executable, os.path.join(REPO, "export_scripts", "export_all.py"), "--help"],
                [sys.executable, "-m", "exportminers.cli", "--help"],
                [sys.executable, "-m", "exportminers", "--help"]):
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "export" in res.stdout
    res = subprocess.run([sys.executable, "-m", "exportminers", "--version"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"exportminers {exportminers.__version__}"


def test_demo(capsys):
    assert _run("demo", "--miner", "PairMarginMiner", "--batch-size", "10") == 0
    assert "same as eager: True" in capsys.readouterr().out


def test_user_mistakes_are_one_line_errors(tmp_path):
    """Each mistake exits with a message naming the option, not a traceback."""
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    (tmp_path / "empty.json").write_text('{"TripletMarginMiner": []}')
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--config", str(tmp_path / "missing.json")], "--config"),
        (["--config", str(tmp_path)], "--config"),
        (["--config", str(tmp_path / "bin.json")], "--config"),
        (["--config", str(tmp_path / "empty.json")], "empty list"),
        (["--sizes", "a,b"], "--sizes"),
        (["--sizes=-3,5"], "--sizes"),
        (["--miners", ",,"], "--miners"),
        (["--out", str(tmp_path / "afile"), "--miners", "BatchHardMiner"], "--out"),
    ]
    try:
        import yaml  # noqa: F401
        cases.append((["--config", str(tmp_path / "bad.yaml")], "not valid YAML"))
    except ImportError:
        pass
    for extra, needle in cases:
        argv = ["export", "--out", str(tmp_path / "o"), "--no-verify"] + extra
        with pytest.raises(SystemExit) as e:
            _run(*argv)
        assert needle in str(e.value.code), (extra, e.value.code)
