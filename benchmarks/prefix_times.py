"""Where a graph's time goes on a provider, by timing its prefixes.

ONNX Runtime's profiler times the host side of CUDA nodes (kernels run async), so this
times prefixes instead: the graph cut after every ``len(nodes) / cuts`` nodes, outputs
bound on the device (IOBinding, no copy back), median of 3 runs. Where the time jumps is
the slow node. Used on the H100 to find HDCMiner's slow histogram and the pipeline block
graph's per-node costs (benchmarks/RESULTS.md, GPU section).

    python benchmarks/prefix_times.py cuda GRAPH.onnx:N:CUTS [...]

``N``: rows of the miner's batch (random embeddings d = 128, labels N / 8 classes, the
miner's noise for random miners), or, for a pipeline block graph (``block_*.onnx``), the
query rows against 262,144 bank rows in float16. A job stops after 60 s.
"""
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import shape_inference
prov = sys.argv[1] if len(sys.argv) > 1 else ""
if len(sys.argv) < 3 or prov not in ("cuda", "cpu"):
    sys.exit(__doc__)
jobs = [(a, int(b), int(c)) for a, b, c in (j.rsplit(":", 2) for j in sys.argv[2:])]
for path, n, cuts in jobs:
    m = shape_inference.infer_shapes(onnx.load(path))
    types = {v.name: v.type for v in list(m.graph.value_info) + list(m.graph.output)}
    nodes = m.graph.node
    rng = np.random.default_rng(0)
    feeds = {}
    if os.path.basename(path).startswith("block_"):   # pipeline block: n query rows x 262144 bank rows, fp16
        bq, bm = n, 262144
        feeds = {"q": rng.standard_normal((bq, 128)).astype(np.float16),
                 "q_label": rng.integers(0, 100000, bq),
                 "m": rng.standard_normal((bm, 128)).astype(np.float16),
                 "m_label": rng.integers(0, 100000, bm),
                 "neg_lo": np.full(bq, -np.inf, np.float16), "neg_hi": np.full(bq, np.inf, np.float16),
                 "k_neg": np.array([11]), "k_pos": np.array([2]), "k_epos": np.array([2])}
        feeds = {i.name: feeds[i.name] for i in m.graph.input}
    for i in ([] if feeds else m.graph.input):
        et = i.type.tensor_type.elem_type
        if i.name in ("embeddings", "ref_emb"):
            feeds[i.name] = rng.standard_normal((n, 128)).astype(
                np.float16 if et == onnx.TensorProto.FLOAT16 else np.float32)
        elif et == onnx.TensorProto.INT64 and len(i.type.tensor_type.shape.dim) == 1 and "label" in i.name:
            feeds[i.name] = rng.integers(0, n // 8, n).astype(np.int64)
        elif i.name == "noise":
            from exportminers.runtime import OnnxMiner
            shp = OnnxMiner(path, providers=["CPUExecutionProvider"]).noise_shape(n, n)
            feeds[i.name] = rng.random(shp).astype(np.float64 if et == onnx.TensorProto.DOUBLE else np.float32)
        elif et == onnx.TensorProto.DOUBLE or et == onnx.TensorProto.FLOAT16:
            feeds[i.name] = rng.random((n, n)).astype(np.float64 if et == onnx.TensorProto.DOUBLE else np.float16)
        else:
            print("input", i.name, et, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
    if any(i.name not in feeds for i in m.graph.input):
        for i in m.graph.input:
            if i.name not in feeds:   # noise etc: uniform of the declared rank, n per dim
                shp = [n if (d.dim_param or not d.dim_value) else d.dim_value for d in i.type.tensor_type.shape.dim]
                feeds[i.name] = rng.random(shp).astype(np.float32)
    print(f"== {path} N={n}: {len(nodes)} nodes, inputs {[(k, v.shape, v.dtype.name) for k, v in feeds.items()]}")
    prev = 0.0
    job_t0 = time.perf_counter()
    step = max(1, len(nodes) // cuts)
    marks = list(range(step, len(nodes), step)) + [len(nodes)]
    for j in marks:
        if time.perf_counter() - job_t0 > 60:
            print("  (60 s per job: stopped)"); break
        outs = [o for o in nodes[j - 1].output if o in types]
        if not outs:
            continue
        g = onnx.helper.make_graph(list(nodes[:j]), "p", list(m.graph.input),
                                   [onnx.helper.make_value_info(o, types[o]) for o in outs],
                                   list(m.graph.initializer))
        pm = onnx.helper.make_model(g, opset_imports=m.opset_import)
        pm.ir_version = m.ir_version
        so = ort.SessionOptions(); so.log_severity_level = 3
        provs = [("CUDAExecutionProvider", {"use_tf32": "0"})] if prov == "cuda" else ["CPUExecutionProvider"]
        try:
            s = ort.InferenceSession(pm.SerializeToString(), so, providers=provs)
            dev = "cuda" if prov == "cuda" else "cpu"
            b = s.io_binding()
            for k, v in feeds.items():
                if k in ("k_neg", "k_pos"):
                    b.bind_cpu_input(k, v)
                else:
                    b.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, dev, 0))
            for o in outs:
                b.bind_output(o, dev, 0)
            t0 = time.perf_counter(); s.run_with_iobinding(b); b.synchronize_outputs()
            first = time.perf_counter() - t0
            ts = [first] if first > 0.5 else []
            for _ in range(0 if first > 0.5 else 3):
                t0 = time.perf_counter(); s.run_with_iobinding(b); b.synchronize_outputs(); ts.append(time.perf_counter() - t0)
            t = float(np.median(ts)) * 1e3
        except Exception as e:
            print(f"  prefix {j}: error {str(e)[:120]}"); continue
        ops = [nd.op_type for nd in nodes[marks[marks.index(j) - 1] if marks.index(j) else 0:j]]
        print(f"  nodes <{j:4d}: {t:10.2f} ms (+{t - prev:9.2f})  {','.join(ops)[:160]}")
        prev = t
