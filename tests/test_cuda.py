"""Every built-in miner's graph on ONNX Runtime's CUDA EP: placement, strict load, parity.

Runs where ONNX Runtime has ``CUDAExecutionProvider`` (``onnxruntime-gpu``) and skips
elsewhere. For each registry miner and configuration, self-mining and (where the miner
takes one) reference-set graphs in float32, the first configuration in float16, and the
anchor-block graphs of the miners with independent anchor rows:

* placement, from ONNX Runtime's verbose log: nothing but small shape nodes may sit on
  the CPU, and the graphs that compute no shapes must have every node on CUDA;
* strict load (``providers=["CUDAExecutionProvider"]`` with
  ``session.disable_cpu_ep_fallback=1``): required for the shape-free graphs;
* parity: the graph on CUDA against the eager miner on the GPU (torch CUDA when present)
  at three batch sizes (24, 41, 150: ONNX Runtime's CUDA TopK takes a different code
  path below 257, up to 4096 and beyond 4096 elements per row), tuples equal except those within float rounding of a threshold
  (exportminers.verify), random miners fed the same noise, valid and reproducible;
  anchor blocks equal to one call;
* IOBinding: torch CUDA tensors in, index tuples decoded on the GPU, equal to the host path.

``pytest -m cuda -s`` prints the per-graph table (also written to
``$EXPORTMINERS_CUDA_REPORT`` when set) at the end of the run.
"""
import json
import os
import time

import numpy as np
import pytest
import torch

from exportminers import export, registry
from exportminers.runtime import OnnxMiner
from exportminers.runtime import placement as pl
from exportminers.verify import as_multisets, random_batch, verify_graph

import onnx_graph_cache

try:
    import onnxruntime as ort
    HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
except ImportError:  # pragma: no cover
    HAS_CUDA_EP = False

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA_EP,
                                 reason="ONNX Runtime has no CUDAExecutionProvider here")]

D = onnx_graph_cache.D
# What ONNX Runtime may leave on the CPU: integer shape arithmetic (each sorting graph's
# Shape -> Gather giving TopK its k). Anything else on the CPU moves data: a failure.
SHAPE_ONLY_OPS = {"Shape", "Gather", "Squeeze", "Unsqueeze", "Concat", "Slice", "Reshape",
                  "Cast", "Constant", "ConstantOfShape", "Range", "Mul", "Add", "Sub", "Div",
                  "Identity"}
ROWS = []


def _cases():
    out = []
    for name, spec in registry.MINERS.items():
        for cfg in range(len(spec.configs)):
            modes = ["self"] + ([] if spec.self_only else ["ref"])
            for mode in modes:
                out.append(pytest.param(name, cfg, mode, "float32",
                                        id=f"{name}-{cfg}-{mode}-float32"))
                if cfg == 0:
                    out.append(pytest.param(name, cfg, mode, "float16",
                                            id=f"{name}-{cfg}-{mode}-float16"))
        if spec.row_independent:
            out.append(pytest.param(name, 0, "anchors", "float32", id=f"{name}-0-anchors-float32"))
        if name in ("TripletMarginMiner", "AngularMiner"):   # gather_positives=True graphs
            modes = [("gather-self", "float32"), ("gather-ref", "float32"),
                     ("gather-anchors", "float32")]
            if name == "AngularMiner":   # TripletMargin's float16 gather graph is refused
                modes.append(("gather-self", "float16"))
            for mode, dtype in modes:
                out.append(pytest.param(name, 0, mode, dtype, id=f"{name}-0-{mode}-{dtype}"))
    return out


def _graph(name, cfg, mode, dtype):
    return onnx_graph_cache.graph(
        name, cfg, with_ref=mode in ("ref", "gather-ref"),
        anchor_blocks=mode in ("anchors", "gather-anchors"),
        dtype=torch.float16 if dtype == "float16" else torch.float32,
        embedding_dim=None if mode in ("ref", "gather-ref") else D,
        gather_positives=mode.startswith("gather"))


def _table(rows=None) -> str:
    cols = ("graph", "strict", "cpu nodes", "memcpy", "parity", "tuples", "sec")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in (ROWS if rows is None else rows):
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def merge_reports(report: str, out: str) -> int:
    """One table in ``out`` from the rows every pytest-xdist worker saved next to
    ``report`` (``report``.gwN.json); returns the number of graphs."""
    import glob

    rows = []
    for f in sorted(glob.glob(report + "*.json")):
        with open(f, encoding="utf-8") as fh:
            rows += json.load(fh)
    rows.sort(key=lambda r: r["graph"])
    with open(out, "w", encoding="utf-8") as f:
        f.write(_table(rows) + "\n")
    return len(rows)


def _write_report() -> None:
    out = os.environ.get("EXPORTMINERS_CUDA_REPORT")
    if out and os.environ.get("PYTEST_XDIST_WORKER"):   # one file per pytest-xdist worker
        out += "." + os.environ["PYTEST_XDIST_WORKER"]
    if out and ROWS:
        with open(out, "w", encoding="utf-8") as f:
            f.write(_table() + "\n")
        with open(out + ".json", "w", encoding="utf-8") as f:
            json.dump(ROWS, f, indent=1)


@pytest.fixture(autouse=True)
def _report_so_far():
    # rewritten after every test: a run cut off by a time limit keeps its rows so far
    yield
    _write_report()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if not ROWS:
        return
    print("\n\nONNX Runtime CUDA EP, per graph (onnxruntime "
          f"{ort.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no torch CUDA'})\n"
          + _table())
    _write_report()


@pytest.mark.parametrize("name,cfg,mode,dtype", _cases())
def test_graph_on_cuda(name, cfg, mode, dtype):
    t0 = time.perf_counter()
    miner, path = _graph(name, cfg, mode, dtype)
    row = {"graph": f"{name}[{cfg}] {mode} {dtype}", "strict": "", "cpu nodes": "",
           "memcpy": "", "parity": "", "tuples": "", "sec": ""}
    ROWS.append(row)

    placed = pl.node_placement(path, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    cpu = pl.cpu_nodes(placed, ["<all>"])
    cuda_ops = (placed.get("CUDAExecutionProvider") or {}).get("ops") or []
    row["cpu nodes"] = ",".join(cpu) or "-"
    # ONNX Runtime lists no nodes when it places them all on one provider
    row["memcpy"] = (sum(op.startswith("Memcpy") for op in cuda_ops + cpu)
                     if cuda_ops or cpu else "n/a")
    sess, why = pl.strict_session(path)
    row["strict"] = "yes" if sess is not None else "no"
    assert "CUDAExecutionProvider" in placed, placed
    assert set(cpu) <= SHAPE_ONLY_OPS, f"data nodes on the CPU: {cpu}"
    if not export.SHAPE_OPS.intersection(export.op_types(path)):  # (test_export_onnx pins which)
        assert not cpu, f"a shape-free graph left nodes on the CPU: {cpu}"
        assert sess is not None, f"strict CUDA session refused: {why}"

    strict = sess is not None
    providers = ["CUDAExecutionProvider"] if strict else ["CUDAExecutionProvider",
                                                          "CPUExecutionProvider"]
    options = pl.strict_session_options() if strict else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = verify_graph(miner, path, sizes=(24, 41, 150), ref_sizes=(37, 19, 160), seed=cfg,
                          providers=providers, session_options=options, eager_device=device)
    row["parity"] = "ok" if report["ok"] else "MISMATCH"
    row["tuples"] = ",".join(str(r["tuples"]) for r in report["runs"])
    assert report["ok"], json.dumps(report["runs"])

    # IOBinding: device tensors in, tuples decoded on the device, equal to the host path
    if torch.cuda.is_available():
        om = OnnxMiner(path, providers=providers, session_options=pl.strict_session_options()
                       if strict else None)
        n = 24 - 24 % om.batch_multiple
        b = random_batch(n, D, m=29 if om.with_ref else None, seed=3,
                         dtype=np.float16 if dtype == "float16" else np.float32)
        keys = ["embeddings", "labels"] + (["ref_emb", "ref_labels"] if om.with_ref else [])
        host = om(*[b[k] for k in keys], seed=5)
        dev = om(*[torch.from_numpy(b[k]).cuda() for k in keys], seed=5, device_output=True)
        dev = [dev] if isinstance(dev, torch.Tensor) else list(dev)
        host = [host] if isinstance(host, np.ndarray) else list(host)
        assert all(d.is_cuda for d in dev)
        kind = om.output_kind
        assert as_multisets([d.cpu().numpy() for d in dev], kind) == as_multisets(host, kind)
    row["sec"] = round(time.perf_counter() - t0, 1)


def test_cuda_size_guard_on_the_real_provider():
    """A call whose largest tensor would pass 2^31 - 1 elements is refused (or blocked)
    before ONNX Runtime runs it: the process's CUDA context stays usable."""
    _, path = onnx_graph_cache.graph("TripletMarginMiner")
    om = OnnxMiner(path, providers=["CUDAExecutionProvider"])
    assert om.on_cuda
    n = 1300                                  # 1300^3 = 2.2e9 elements > 2^31 - 1
    b = random_batch(n, D, seed=0)
    with pytest.raises(ValueError, match="anchor_blocks=True"):
        om(b["embeddings"], b["labels"])
    _, blocks = onnx_graph_cache.graph("TripletMarginMiner", anchor_blocks=True)
    ob = OnnxMiner(blocks, providers=["CUDAExecutionProvider"])
    assert ob._rows_per_block(n, n, D) < n
    small = random_batch(40, D, seed=1)
    assert as_multisets(ob(small["embeddings"], small["labels"]), "triplets") == \
        as_multisets(om(small["embeddings"], small["labels"]), "triplets")
