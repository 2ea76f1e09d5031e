"""Benchmark the offline mining pipeline's block engine against a hand-written torch baseline.

Default (the H100 setting): Q = 65,536 queries vs M = 1,048,576 bank rows, d = 128,
k = 10 hardest negatives + the hardest positive per query, float16 on ONNX Runtime's CUDA
EP (inputs resident on the GPU via IOBinding; per-block top-k lists merged on the host),
beside a PyTorch float16 chunked matmul + masked topk doing the same work on the same
blocks. Prints seconds, queries/s, effective TFLOP/s (2*Q*M*d / t) and peak GPU memory,
and checks that both found the same negatives.

    python benchmarks/bench_pipeline.py            # GPU, full size
    python benchmarks/bench_pipeline.py --quick    # tiny, CPU, seconds

File IO (Parquet shards) is not timed here; ``mine()`` adds it on top.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exportminers.pipeline.config import MineConfig  # noqa: E402
from exportminers.pipeline.engine import (BlockRunner, check_block_sizes, prepare_block,  # noqa: E402
                                          resolve_device, run_pass)
from exportminers.pipeline.graphs import GraphSpec  # noqa: E402
from exportminers.pipeline.sources import RowBlock  # noqa: E402


def make_data(n, d, n_classes, seed, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype), rng.integers(0, n_classes, n).astype(np.int64)


def gpu_memory_mib():
    """Device memory in use on GPU 0 now (MiB), or None: torch's ``mem_get_info`` where
    torch has CUDA, else nvidia-smi's total for the GPU (its per-process query does not see
    this process's PID inside a container)."""
    try:
        import torch
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return (total - free) / 2 ** 20
    except Exception:   # no torch, or its CUDA libraries fail to load: try nvidia-smi
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                              "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_ort(q, ql, m, ml, k, bq, bm, device, dtype, profile_prefix=None, positives="graph"):
    """Engine path: every bank block once, all query blocks against it, host merge.
    ``positives``: "graph" (the ``both`` block graph) or "host" (a ``neg`` graph, and
    the same-label pairs scored on the host beside it)."""
    from types import SimpleNamespace

    from exportminers.pipeline.mine import negatives_unmasked

    cfg = MineConfig(k=k, metric="dot", num_positives=1)
    host = positives == "host"

    def scan(lab):
        return SimpleNamespace(labels=lab, valid=np.ones(len(lab), bool))

    # mine()'s rule: with host positives, the label mask goes to the host too when the
    # classes are small enough
    unmasked = host and negatives_unmasked(
        SimpleNamespace(kc=cfg.num_candidates, qscan=scan(ql), bscan=scan(ml)), device)
    spec = GraphSpec("neg" if host else "both", "dot", band=False, easy=False, dtype=dtype,
                     label_mask=not unmasked)
    mem0 = gpu_memory_mib() if device == "cuda" else None
    runner = BlockRunner(spec, device, profile_prefix=profile_prefix)
    npd = np.dtype(dtype)
    Q, M = len(q), len(m)

    def block(x, lab, s, e, side, size):
        n = e - s
        rb = RowBlock(x[s:e].astype(np.float32), lab[s:e], np.ones(n, bool),
                      np.arange(s, e, dtype=np.int64) + (0 if side == "m" else 1 << 40))
        return prepare_block(runner, side, rb, np.ones(n, bool), s, size, "dot", npd, True)

    t0 = time.perf_counter()
    qblocks = [block(q, ql, s, min(Q, s + bq), "q", bq) for s in range(0, Q, bq)]
    mblocks = [block(m, ml, s, min(M, s + bm), "m", bm) for s in range(0, M, bm)]
    t_upload = time.perf_counter() - t0
    # warm-up: one block pair (session init, kernel selection)
    hp = ("dot", False) if host else None
    run_pass(runner, qblocks[:1], mblocks[:1], qblocks[0].rows, k, 1, npd, host_pos=hp)
    t0 = time.perf_counter()
    res = run_pass(runner, qblocks, mblocks, Q, cfg.num_candidates, 1, npd, host_pos=hp)
    t = time.perf_counter() - t0
    prof = runner.sess.end_profiling() if profile_prefix else ""
    ops = op_breakdown(prof) if prof else None
    # ONNX Runtime's arena keeps its peak: the growth since before the session is the
    # engine's peak device memory (blocks, arena, CUDA handles)
    mem1 = gpu_memory_mib() if mem0 is not None else None
    return (t, t_upload, res.neg.i, res.hpos.i, None if mem1 is None else mem1 - mem0, ops)


def op_breakdown(profile_path):
    """{op type: total microseconds} from an ONNX Runtime profile (per-node "kernel time").
    On the CUDA EP of release builds (no CUPTI) that is host time: launches are async, so a
    node that waits for the device (a copy to the host) absorbs the earlier kernels' time."""
    with open(profile_path, encoding="utf-8") as f:
        events = json.load(f)
    total = {}
    for ev in events:
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        op = (ev.get("args") or {}).get("op_name", "?")
        total[op] = total.get(op, 0) + int(ev.get("dur", 0))
    os.remove(profile_path)
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def matmul_floor(Q, M, d, k, bq, bm, device, dtype):
    """Seconds for the block matmuls alone (the pipeline's compute floor on these blocks),
    seconds for one torch top-k over each block's scores (the selection floor), and the
    TFLOP/s of one large square matmul (the device's fp16 ceiling), with torch."""
    import torch

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    tdt = torch.float16 if dtype == "float16" else torch.float32
    if dev.type == "cpu" and tdt == torch.float16:
        tdt = torch.float32
    qb = torch.randn(bq, d, device=dev).to(tdt)
    mb = torch.randn(bm, d, device=dev).to(tdt)
    n_pairs = -(-Q // bq) * -(-M // bm)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        out = qb @ mb.T
        reps = min(n_pairs, 8)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(qb, mb.T, out=out)
        sync()
        floor = (time.perf_counter() - t0) / reps * n_pairs
        torch.topk(out, k, dim=1)
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.topk(out, k, dim=1)
        sync()
        topk_floor = (time.perf_counter() - t0) / reps * n_pairs
        del out
        s = 8192 if dev.type == "cuda" else 1024
        a = torch.randn(s, s, device=dev).to(tdt)
        c = a @ a
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            torch.matmul(a, a, out=c)
        sync()
        peak = 2.0 * s ** 3 * 5 / (time.perf_counter() - t0) / 1e12
    return floor, topk_floor, peak


def run_torch(q, ql, m, ml, k, bq, bm, device, dtype):
    import torch

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    tdt = torch.float16 if dtype == "float16" else torch.float32
    Q, M = len(q), len(m)
    qt = torch.from_numpy(q.astype(np.float32)).to(dev, tdt)
    mt = torch.from_numpy(m.astype(np.float32)).to(dev, tdt)
    qlt = torch.from_numpy(ql).to(dev)
    mlt = torch.from_numpy(ml).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def once(nq=Q):
        best_c = torch.full((nq, k), float("-inf"), device=dev, dtype=tdt)
        best_i = torch.zeros((nq, k), device=dev, dtype=torch.long)
        pos_c = torch.full((nq, 1), float("inf"), device=dev, dtype=tdt)
        pos_i = torch.zeros((nq, 1), device=dev, dtype=torch.long)
        for ms in range(0, M, bm):
            mb, mlb = mt[ms:ms + bm], mlt[ms:ms + bm]
            for qs in range(0, nq, bq):
                qe = min(nq, qs + bq)
                s = qt[qs:qe] @ mb.T
                same = qlt[qs:qe, None] == mlb[None, :]
                pos = s.masked_fill(~same, float("inf"))
                pc, pi = pos.min(dim=1, keepdim=True)
                s.masked_fill_(same, float("-inf"))
                c, i = torch.topk(s, k, dim=1)
                c2 = torch.cat([best_c[qs:qe], c], 1)
                i2 = torch.cat([best_i[qs:qe], i + ms], 1)
                c3, o = torch.topk(c2, k, dim=1)
                best_c[qs:qe], best_i[qs:qe] = c3, torch.gather(i2, 1, o)
                better = pc < pos_c[qs:qe]
                pos_c[qs:qe] = torch.where(better, pc, pos_c[qs:qe])
                pos_i[qs:qe] = torch.where(better, pi + ms, pos_i[qs:qe])
        return best_i, pos_i

    with torch.no_grad():
        once(min(Q, bq))  # warm-up
        sync()
        t0 = time.perf_counter()
        ni, pi = once()
        sync()
        t = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else None
    return t, ni.cpu().numpy(), pi.cpu().numpy(), peak


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes on CPU (a smoke test)")
    p.add_argument("--queries", type=int, default=65536)
    p.add_argument("--bank", type=int, default=1048576)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--classes", type=int, default=None, help="label classes (default: bank / 10)")
    p.add_argument("--block-size", default="4096x262144", help="QxM block (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--dtype", choices=["float16", "float32"], default=None)
    p.add_argument("--skip-torch", action="store_true", help="ONNX Runtime only")
    p.add_argument("--block-sizes", default=None, metavar="QxM,...",
                   help="also time the block engine at these block sizes (throughput vs block "
                        "size; plotted with --out)")
    p.add_argument("--positives", choices=["graph", "host", "both"], default="both",
                   help="time the engine with positives from the block graph, from the host "
                        "(same-label pairs only), or both (default: %(default)s)")
    p.add_argument("--ort-profile", action="store_true",
                   help="break the engine's time down by ONNX operator (ONNX Runtime profiling)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write pipeline_<device>.json (and pipeline_blocks_<device>.png) here")
    args = p.parse_args(argv)
    if args.quick:
        args.queries, args.bank, args.dim = 512, 8192, 32
        args.block_size = "128x2048"
        if args.device == "auto":
            args.device = "cpu"
    device = resolve_device(args.device)
    if device == "cuda":
        try:   # torch (when present) loads the CUDA / cuDNN libraries onnxruntime-gpu needs
            __import__("torch")
        except ImportError:
            pass
    dtype = args.dtype or ("float16" if device == "cuda" else "float32")
    bq, bm = (int(v) for v in args.block_size.lower().split("x"))
    check_block_sizes(bq, bm)
    Q, M, d, k = args.queries, args.bank, args.dim, args.k
    classes = args.classes or max(2, M // 10)
    print(f"Q={Q:,} queries x M={M:,} bank, d={d}, k={k} hardest negatives + hardest positive, "
          f"{dtype} on {device}, blocks {bq}x{bm}")
    q, ql = make_data(Q, d, classes, 1, np.float16 if dtype == "float16" else np.float32)
    m, ml = make_data(M, d, classes, 2, np.float16 if dtype == "float16" else np.float32)
    flops = 2.0 * Q * M * d

    result = {"queries": Q, "bank": M, "dim": d, "k": k, "dtype": dtype, "device": device,
              "block": f"{bq}x{bm}", "rows": []}

    def report(name, t, mem, **extra):
        mem_s = f"{mem:,.0f} MiB" if mem is not None else "n/a"
        print(f"{name:28s} {t:8.3f} s  {Q / t:12,.0f} queries/s  {flops / t / 1e12:8.2f} TFLOP/s  "
              f"peak GPU memory {mem_s}")
        result["rows"].append({"name": name, "seconds": t, "queries_per_s": Q / t,
                               "tflops": flops / t / 1e12, "peak_gpu_mib": mem, **extra})

    if args.out:
        os.makedirs(args.out, exist_ok=True)
    modes = ["graph", "host"] if args.positives == "both" else [args.positives]
    runs = {}
    for mode in modes:
        t_m, t_up, neg_m, pos_m, mem, _ = run_ort(q, ql, m, ml, k, bq, bm, device, dtype,
                                                  positives=mode)
        runs[mode] = (t_m, neg_m, pos_m)
        name = "onnxruntime block engine" + ("" if mode == "graph" else ", host labels")
        report(name, t_m, mem, block=f"{bq}x{bm}", upload_s=t_up, positives=mode)
        print(f"{'':28s} (+{t_up:.3f} s preparing and uploading blocks, not timed above)")
    if len(runs) > 1:
        same_neg = np.mean(runs["graph"][1] == runs["host"][1])
        same_pos = np.mean(runs["graph"][2][:, 0] == runs["host"][2][:, 0])
        print(f"host vs graph positives: {100 * same_pos:.2f}% of hardest positives and "
              f"{100 * same_neg:.2f}% of negatives equal")
        result.update(host_vs_graph_pos=float(same_pos), host_vs_graph_neg=float(same_neg))
    best = min(runs, key=lambda md: runs[md][0])   # the engine's best, compared below
    t, ort_neg, ort_pos = runs[best]
    if args.ort_profile:   # a second, profiled pass (profiling slows the timed one)
        profile = os.path.join(args.out or ".", "ort_profile")
        tp, _, _, _, _, ops = run_ort(q, ql, m, ml, k, bq, bm, device, dtype, profile,
                                      positives=best)
        if ops:
            total = sum(ops.values()) or 1
            where = ("host time per node: CUDA kernels run async, so a node that waits on "
                     "the device absorbs earlier kernels' time" if device == "cuda"
                     else "kernel time per node")
            print(f"onnxruntime profile ({where}; {best} positives, profiled pass {tp:.3f} s): " + ", ".join(
                f"{op} {100 * us / total:.1f}%" for op, us in list(ops.items())[:8]))
            result["ort_ops_us"] = ops
            result["ort_ops_note"] = where
    sweep = []
    for size in (args.block_sizes.split(",") if args.block_sizes else []):
        sq, sm = (int(v) for v in size.lower().split("x"))
        check_block_sizes(sq, sm)
        ts = run_ort(q, ql, m, ml, k, sq, sm, device, dtype, positives=best)[0]
        report(f"  engine, blocks {sq}x{sm}", ts, None, block=f"{sq}x{sm}")
        sweep.append((f"{sq}x{sm}", Q / ts))
    have_torch = not args.skip_torch
    if have_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            print("torch not installed: baseline skipped")
            have_torch = False
    if have_torch:
        tt, t_neg, t_pos, tmem = run_torch(q, ql, m, ml, k, bq, bm, device, dtype)
        report("torch chunked matmul+topk", tt, tmem)
        same_neg = np.mean([len(set(a) & set(b)) / k for a, b in zip(ort_neg, t_neg)])
        same_pos = np.mean(ort_pos[:, 0] == t_pos[:, 0])
        print(f"agreement: {100 * same_neg:.2f}% of negatives, {100 * same_pos:.2f}% of hardest "
              "positives (float16 ties may differ)")
        print(f"speed ratio torch / onnxruntime: {tt / t:.2f}x")
        floor, topk_floor, peak = matmul_floor(Q, M, d, k, bq, bm, device, dtype)
        print(f"{'matmul floor (same blocks)':28s} {floor:8.3f} s  {flops / floor / 1e12:8.2f} "
              f"TFLOP/s; large square matmul: {peak:.3g} TFLOP/s; the engine takes "
              f"{t / floor:.1f}x the matmul floor")
        print(f"{'torch top-k alone (same blocks)':28s} {topk_floor:8.3f} s  (one top-{k} over "
              f"each block's scores, no masking or merge: the selection floor)")
        result.update(torch_over_ort=tt / t, agreement_neg=float(same_neg),
                      agreement_pos=float(same_pos), matmul_floor_s=floor,
                      topk_floor_s=topk_floor, matmul_peak_tflops=peak,
                      engine_over_floor=t / floor)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"pipeline_{device}.json"), "w") as f:
            json.dump(result, f, indent=1)
        if sweep:
            try:
                import matplotlib
                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
                fig, ax = plt.subplots(figsize=(6, 3.5))
                ax.bar([s for s, _ in sweep], [v for _, v in sweep])
                ax.set_xlabel("block (queries x bank rows)")
                ax.set_ylabel("queries / s")
                ax.set_title(f"pipeline throughput vs block size ({device}, {dtype})")
                fig.tight_layout()
                fig.savefig(os.path.join(args.out, f"pipeline_blocks_{device}.png"), dpi=120)
            except ImportError:
                print("matplotlib not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
