"""Where the time goes: ONNX Runtime per-operator profile vs PML eager, one miner.

Usage::

    python -m benchmarks.profile_ort --miner HDCMiner --n 256 --threads 1 [--out results/]

For the miner's default configuration at batch size N (the benchmark's inputs), prints
and writes ``profile_<Miner>_<N>.md``:

1. the split of one ``OnnxMiner`` call on CPU: input checks, ``session.run``, decoding
   (medians over ``--runs`` calls after one warm-up call);
2. ONNX Runtime's own profile (``SessionOptions.enable_profiling``): kernel time per
   operator type and the most expensive nodes, median per run over the ``--runs`` runs
   after the warm-up run, with the share of the graph's (median) kernel time.

ONNX Runtime sessions use the benchmark's options (``benchmarks.worker``: ``--threads``
intra-op threads and exportminers' default CPU options, the shared lean arena).
3. ``torch.profiler`` of PML eager and of exportminers eager: the ATen ops with the most
   self CPU time (after one warm-up call).
"""
import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional

from . import common


def _median(xs: List[float]) -> float:
    xs = sorted(xs)
    k = len(xs)
    return 0.0 if k == 0 else (xs[k // 2] if k % 2 else 0.5 * (xs[k // 2 - 1] + xs[k // 2]))


def _feeds(om, x, y) -> Dict[str, Any]:
    """The graph's feeds for one whole batch, as OnnxMiner builds them (numpy inputs)."""
    import numpy as np
    feeds = {"embeddings": np.ascontiguousarray(x.astype(om.dtype, copy=False)),
             "labels": np.ascontiguousarray(y)}
    if getattr(om, "anchor_blocks", False):
        feeds["anchor_index"] = np.arange(x.shape[0], dtype=np.int64)
    if om.is_random:
        feeds["noise"] = om._noise(x.shape[0], x.shape[0], None, None)
    if getattr(om, "gather_positives", False):
        feeds["positive_index"] = om._positive_lists(np.asarray(y), None)
    return feeds


def session_options(threads: int, profile_prefix: Optional[str] = None):
    """The benchmark's ONNX Runtime CPU session options (benchmarks.worker: ``threads``
    intra-op threads and exportminers' default CPU options, the shared lean arena), with
    ONNX Runtime's profiler on when ``profile_prefix`` is given."""
    from .worker import cpu_session_options
    so = cpu_session_options(threads)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return so


def _per_run(events: List[Dict[str, Any]]):
    """ONNX Runtime profile events grouped by ``model_run``: a list, in run order, of
    (model_run us, {node: (op, kernel us)})."""
    runs = sorted((ev for ev in events if ev.get("cat") == "Session"
                   and ev.get("name") == "model_run"), key=lambda ev: ev["ts"])
    per = [(float(r["dur"]), {}) for r in runs]
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        ts = ev["ts"]
        for (dur, nodes), r in zip(per, runs):
            if r["ts"] <= ts <= r["ts"] + r["dur"]:
                node = ev["name"][:-len("_kernel_time")]
                op = ev.get("args", {}).get("op_name", "?")
                prev = nodes.get(node, (op, 0.0))[1]
                nodes[node] = (op, prev + float(ev["dur"]))
                break
    return per


def ort_profile(path: str, batches, threads: int, runs: int) -> Dict[str, Any]:
    """Split of an OnnxMiner call and ONNX Runtime's per-node kernel times: medians over
    the calls after the first (warm-up) one, with the benchmark's session options."""
    import onnxruntime as ort
    from exportminers.runtime.compat import session_kwargs
    import exportminers
    from exportminers.runtime import checks_np, decode_np

    om = exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"],
                                session_options=session_options(threads), seed=0)
    # 1. split of a call
    split = defaultdict(list)
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        emb, lab, _, _ = checks_np.check_inputs(x, y, None, None, om.check_finite)
        t1 = time.perf_counter()
        feeds = _feeds(om, emb, lab)
        t2 = time.perf_counter()
        outs = om.session.run(om.output_names, feeds)
        t3 = time.perf_counter()
        decoded = decode_np.decode(outs, om.layout)
        t4 = time.perf_counter()
        whole0 = time.perf_counter()
        om(x, y)
        whole = time.perf_counter() - whole0
        if i == 0:
            continue  # warm-up
        split["checks"].append((t1 - t0) * 1e3)
        split["feeds (cast, noise)"].append((t2 - t1) * 1e3)
        split["session.run"].append((t3 - t2) * 1e3)
        split["decode (numpy)"].append((t4 - t3) * 1e3)
        split["whole OnnxMiner call"].append(whole * 1e3)
    out_sizes = {name: list(o.shape) for name, o in zip(om.output_names, outs)}
    decoded_len = [int(len(d)) for d in decoded]

    # 2. ONNX Runtime's profiler: the first run (warm-up) is left out, medians per run
    so = session_options(threads, os.path.join(tempfile.mkdtemp(prefix="ortprof_"), "ort"))
    sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"],
                                **session_kwargs(ort))
    for x, y in batches:
        sess.run(None, _feeds(om, x, y))
    prof_path = sess.end_profiling()
    with open(prof_path) as f:
        events = json.load(f)
    per = _per_run(events)[1:]  # the first run is the warm-up
    n_runs = len(per)
    op_runs = defaultdict(lambda: [0.0] * n_runs)
    node_runs = defaultdict(lambda: [0.0] * n_runs)
    node_op: Dict[str, str] = {}
    for j, (_, nodes) in enumerate(per):
        for node, (op, us) in nodes.items():
            op_runs[op][j] += us
            node_runs[node][j] += us
            node_op[node] = op
    return {
        "split_ms": {k: _median(v) for k, v in split.items()},
        "outputs": out_sizes, "decoded_lengths": decoded_len,
        "runs": n_runs, "model_run_us": _median([dur for dur, _ in per]),
        "kernel_us": _median([sum(us for _, us in nodes.values()) for _, nodes in per]),
        "by_op": sorted(((op, _median(v)) for op, v in op_runs.items()), key=lambda t: -t[1]),
        "by_node": sorted(((node, node_op[node], _median(v)) for node, v in node_runs.items()),
                          key=lambda t: -t[2]),
        "profile_file": prof_path,
    }


def torch_profile(fn, batches, top: int) -> List[Any]:
    """(op, self CPU us per call, calls per call) of the ops with the most self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn(*batches[0])
    runs = batches[1:]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for x, y in runs:
            fn(x, y)
    rows = []
    for e in prof.key_averages():
        rows.append((e.key, e.self_cpu_time_total / len(runs), e.count / len(runs)))
    rows.sort(key=lambda t: -t[1])
    total = sum(r[1] for r in rows)
    return [("TOTAL self CPU", total, 0)] + rows[:top]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_ort", description=__doc__)
    p.add_argument("--miner", required=True)
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--spread", type=float, default=1.25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--onnx", help="an exported graph (default: export to a temp folder)")
    p.add_argument("--out", default=None, help="folder for profile_<Miner>_<N>.md")
    args = p.parse_args(argv)
    known = common.registry_order()
    if args.miner not in known:
        p.error(f"--miner {args.miner!r} is not a built-in miner; choose from "
                f"{', '.join(known)}")
    for flag, value, low in (("--n", args.n, 1), ("--dim", args.dim, 1),
                             ("--per-class", args.per_class, 1), ("--threads", args.threads, 0),
                             ("--runs", args.runs, 1), ("--top", args.top, 1)):
        if value < low:
            p.error(f"{flag} must be at least {low}, got {value}")
    if common.effective_n(args.miner, args.n) < 1:
        p.error(f"--n {args.n}: {args.miner} needs whole triplets, at least 3 rows")
    if args.onnx is not None and not os.path.isfile(args.onnx):
        p.error(f"--onnx {args.onnx}: no such file")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} exists and is not a folder")

    import torch
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import exportminers

    name = args.miner
    config = common.default_config(name)
    n = common.effective_n(name, args.n)
    batches_t = common.make_inputs(n, args.dim, args.per_class, args.runs + 1, 0, args.spread)
    batches = [(x.numpy(), y.numpy()) for x, y in batches_t]
    path = args.onnx
    if path is None:
        path = os.path.join(tempfile.mkdtemp(prefix="profile_"), f"{name}.onnx")
        miner = common.build_ours(name, config)
        gathers = getattr(miner, "gathers_positives", None)
        gather = callable(gathers) and gathers()   # the graph the benchmark's ORT rows run
        exportminers.export_onnx(miner, path, embedding_dim=args.dim, anchor_blocks=gather,
                                 gather_positives=gather)
    res = ort_profile(path, batches, args.threads, args.runs)

    lines = [f"# Profile: {name} ({common.describe_config(name, config)}), N = {n}, "
             f"d = {args.dim}, {args.threads} thread(s)", ""]
    lines += ["## One OnnxMiner call on CPU (median ms)", "", "| part | ms |", "|---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in res["split_ms"].items()]
    lines += ["", f"Graph outputs: {res['outputs']}; decoded lengths {res['decoded_lengths']}.", ""]
    kt = res["kernel_us"]
    lines += [f"## ONNX Runtime profile ({res['runs']} runs after a warm-up run, medians): "
              f"model_run {res['model_run_us'] / 1e3:.3f} ms, "
              f"kernels {kt / 1e3:.3f} ms per run", "", "| op type | ms per run | share |",
              "|---|---:|---:|"]
    lines += [f"| {op} | {us / 1e3:.3f} | {100 * us / max(kt, 1e-9):.1f}% |"
              for op, us in res["by_op"][:args.top]]
    lines += ["", "| node | op | ms per run | share |", "|---|---|---:|---:|"]
    lines += [f"| {node} | {op} | {us / 1e3:.3f} | {100 * us / max(kt, 1e-9):.1f}% |"
              for node, op, us in res["by_node"][:args.top]]
    for label, fn in (("PML eager", common.build_pml(name, config)),
                      ("exportminers eager", common.build_ours(name, config))):
        rows = torch_profile(fn, batches_t, args.top)
        lines += ["", f"## torch.profiler: {label} (self CPU per call)", "",
                  "| op | ms per call | calls per call |", "|---|---:|---:|"]
        lines += [f"| {op} | {us / 1e3:.3f} | {calls:g} |" for op, us, calls in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"profile_{name}_{n}.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
