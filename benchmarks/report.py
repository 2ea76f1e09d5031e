"""Render benchmark results: JSON, markdown tables and PNG plots.

Usage (re-render from saved results, e.g. after merging a GPU run)::

    python -m benchmarks.report results/bench_cpu.json [results/bench_cuda.json] --out results/

Tables give the median time per call with its ratio to PML eager *in the same run*
(``time / PML time``: below 1 is faster than PML), peak memory, and the
"ONNX Runtime CPU no slower than PML eager at N = 256" target.
"""
import argparse
import json
import os
from typing import Any, Dict, List, Optional, Tuple

from . import common

CELL_STATUS = {"oom": "OOM", "timeout": "timeout", "skipped": "skipped",
               "unavailable": "unavail.", "error": "error"}
TARGET_N = 256


# ------------------------------------------------------------------------------ helpers


def _index(rows: List[Dict[str, Any]]) -> Dict[Tuple[str, int, str], Dict[str, Any]]:
    return {common.row_key(r): r for r in rows}


def _order(rows: List[Dict[str, Any]]) -> Tuple[List[str], List[int], List[str]]:
    reg = [m for m in common.registry_order()]
    miners = [m for m in reg if any(r["miner"] == m for r in rows)]
    miners += sorted({r["miner"] for r in rows} - set(miners))
    sizes = sorted({int(r["n"]) for r in rows})
    impls = [k for k in common.IMPLS if any(r["impl"] == k for r in rows)]
    return miners, sizes, impls


def _shown_impls(rows: List[Dict[str, Any]], impls: List[str]) -> List[str]:
    """Columns worth a table column: at least one row of the implementation ran."""
    return [k for k in impls if any(r["impl"] == k and r["status"] != "skipped" for r in rows)]


def _ok(row: Optional[Dict[str, Any]]) -> bool:
    return row is not None and row.get("status") == "ok" and row.get("median_ms") is not None


def ratio(idx, miner: str, n: int, impl: str) -> Optional[float]:
    r, base = idx.get((miner, n, impl)), idx.get((miner, n, "pml"))
    if not (_ok(r) and _ok(base)) or not base["median_ms"]:
        return None
    return r["median_ms"] / base["median_ms"]


def _cell(row: Optional[Dict[str, Any]], value: str, notes: Dict[str, int]) -> str:
    if row is None:
        return ""
    if row["status"] == "ok":
        return value
    reason = f"{row['status']}: {row.get('reason', '')}"
    if reason not in notes:
        notes[reason] = len(notes) + 1
    return f"{CELL_STATUS.get(row['status'], row['status'])}[^{notes[reason]}]"


def _label(impl: str) -> str:
    return common.IMPLS[impl].label if impl in common.IMPLS else impl


# ------------------------------------------------------------------------------ markdown


def header_lines(meta: Dict[str, Any]) -> List[str]:
    args = meta.get("args", {})
    dev = meta.get("device", "?")
    lines = [
        f"- Device: **{dev}** ({meta.get('device_name')}); CPU {meta.get('cpu')}, "
        f"{meta.get('cpu_count')} cores; threads per implementation: "
        + (f"{args.get('threads')} (torch.set_num_threads, ONNX Runtime intra_op_num_threads)"
           if args.get("threads") else f"library defaults (torch: {meta.get('torch_threads')})"),
        f"- Date: {meta.get('date')}; wall time {meta.get('wall_s')} s",
        f"- Versions: python {meta.get('python')}, torch {meta.get('torch')}, "
        f"pytorch-metric-learning {meta.get('pml')}, onnxruntime {meta.get('onnxruntime')} "
        f"(providers {meta.get('ort_providers')}), onnx {meta.get('onnx')}, numpy "
        f"{meta.get('numpy')}, exportminers {meta.get('exportminers')}"
        + (f" (git {meta.get('git')})" if meta.get("git") else "")
        + (f", CUDA {meta.get('cuda')}" if meta.get("cuda") else ""),
        f"- Inputs: self-mining, d = {args.get('dim')}, {args.get('per_class')} samples per "
        f"class, class centres N(0, 1) + {args.get('spread')} x N(0, 1) noise, float32, a "
        f"fresh batch per call; default configuration of each miner (registry)",
        f"- Timing: {args.get('warmup')} warm-up call(s), median of up to "
        f"{args.get('repeats')} timed calls (at least {args.get('min_repeats')}, at most "
        f"{args.get('budget_s')} s of timed calls); cap {args.get('cap_s')} s per row; "
        f"memory limit {meta.get('mem_limit')} per worker process; one process per "
        f"{'row' if args.get('rows_per_process', 1) == 1 else 'run'}"
        + (" (**--quick** smoke run)" if args.get("quick") else ""),
    ]
    return lines


def _impl_table(rows, notes, value) -> List[str]:
    """Markdown table, one row per (miner, N), one column per implementation;
    ``value(idx, miner, n, impl, row)`` formats a cell."""
    idx = _index(rows)
    miners, sizes, impls = _order(rows)
    shown = _shown_impls(rows, impls)
    out = ["| Miner | N | " + " | ".join(_label(k) for k in shown) + " |",
           "|---|---:|" + "---:|" * len(shown)]
    for m in miners:
        for n in sizes:
            if not any((m, n, k) in idx for k in shown):
                continue
            cells = [_cell(idx.get((m, n, k)), value(idx, m, n, k, idx.get((m, n, k))), notes)
                     for k in shown]
            out.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return out


def _time_cell(idx, m, n, k, r) -> str:
    val = common.fmt_ms(r.get("median_ms")) if r else ""
    rt = ratio(idx, m, n, k) if k != "pml" else None
    if rt is not None:
        val += f" ({common.fmt_ratio(rt)})"
    return val


def _memory_cell(idx, m, n, k, r) -> str:
    mb = r.get("peak_mem_mb") if r else None
    return "-" if mb is None else f"{mb:.0f}" if mb >= 10 else f"{mb:.1f}"


def time_table(rows, notes) -> List[str]:
    return _impl_table(rows, notes, _time_cell)


def memory_table(rows, notes) -> List[str]:
    return _impl_table(rows, notes, _memory_cell)


def cpu_ratio(idx, miner: str, n: int, impl: str) -> Optional[float]:
    """Ratio of median process CPU times (robust to other load on a shared machine)."""
    r, base = idx.get((miner, n, impl)), idx.get((miner, n, "pml"))
    if not (_ok(r) and _ok(base)) or not base.get("median_cpu_ms") or r.get("median_cpu_ms") is None:
        return None
    return r["median_cpu_ms"] / base["median_cpu_ms"]


def target_table(rows, n: int = TARGET_N) -> List[str]:
    """ORT CPU (decoded, and raw) vs PML eager at N = n, per miner."""
    idx = _index(rows)
    miners, sizes, _ = _order(rows)
    if n not in sizes or not any(r["impl"] == "ort_cpu" and r["status"] != "skipped" for r in rows):
        return []
    out = ["| Miner | PML eager (ms) | ORT CPU (ms) | ratio | ratio of CPU times | ORT CPU raw "
           "(ms) | raw ratio | ours eager ratio | met |",
           "|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for m in miners:
        base, ort, raw = (idx.get((m, n, k)) for k in ("pml", "ort_cpu", "ort_cpu_raw"))
        r1, r2, r3 = ratio(idx, m, n, "ort_cpu"), ratio(idx, m, n, "ort_cpu_raw"), \
            ratio(idx, m, n, "eager")
        c1 = cpu_ratio(idx, m, n, "ort_cpu")
        if r1 is None:
            met = "n/a" if _ok(base) or base is None else f"n/a (PML {base['status']})"
            if ort is not None and not _ok(ort):
                met = f"n/a (ORT {ort['status']})"
        else:
            met = "yes" if r1 <= 1.0 else "**no**"
            if c1 is not None and (c1 <= 1.0) != (r1 <= 1.0):
                met += f" (CPU time: {'yes' if c1 <= 1.0 else 'no'})"

        def ms(r):
            return common.fmt_ms(r["median_ms"]) if _ok(r) else (r["status"] if r else "")
        out.append(f"| {m} | {ms(base)} | {ms(ort)} | {common.fmt_ratio(r1)} | "
                   f"{common.fmt_ratio(c1)} | {ms(raw)} | {common.fmt_ratio(r2)} | "
                   f"{common.fmt_ratio(r3)} | {met} |")
    return out


def markdown(result: Dict[str, Any], plot_names: Optional[List[str]] = None) -> str:
    meta, rows = result["meta"], result["rows"]
    dev = meta.get("device", "?")
    notes: Dict[str, int] = {}
    lines = [f"# exportminers benchmark ({dev})", ""] + header_lines(meta) + [""]
    lines += ["## Median time per call (ms), ratio to PML eager in parentheses",
              "", "Ratio = time / PML time in the same run (below 1: faster than PML).", ""]
    lines += time_table(rows, notes) + [""]
    lines += ["## Peak memory per call (MB)", "",
              f"Method: {_mem_methods(rows)}.", ""]
    lines += memory_table(rows, notes) + [""]
    tt = target_table(rows)
    if tt:
        lines += [f"## Target: ONNX Runtime CPU no slower than PML eager at N = {TARGET_N}", ""]
        lines += tt + [""]
    skipped = sorted({(r["impl"], r.get("reason", "")) for r in rows
                      if r["status"] == "skipped" and r["impl"] not in _shown_impls(rows, [r["impl"]])})
    if skipped:
        lines += ["## Implementations not run", ""]
        lines += [f"- {_label(k)} (`{k}`): {reason}" for k, reason in skipped] + [""]
    lines += ["## Implementations", ""]
    impls = meta.get("impls", {k: v.doc for k, v in common.IMPLS.items()})
    lines += [f"- **{_label(k)}** (`{k}`): {doc}" for k, doc in impls.items()] + [""]
    if plot_names:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plot_names] + [""]
    if notes:
        lines += [f"[^{i}]: {common.short(text, 400)}" for text, i in notes.items()] + [""]
    return "\n".join(lines)


def _mem_methods(rows) -> str:
    methods = sorted({r.get("mem_method") for r in rows if r.get("mem_method")})
    return "; ".join(methods) if methods else "n/a"


# ------------------------------------------------------------------------------ plots


def _grid(k: int):
    cols = min(4, max(1, k))
    return (k + cols - 1) // cols, cols


def plot_vs_n(rows, path: str, field: str, ylabel: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    miners, sizes, impls = _order(rows)
    shown = _shown_impls(rows, impls)
    idx = _index(rows)
    nr, nc = _grid(len(miners))
    fig, axes = plt.subplots(nr, nc, figsize=(4.2 * nc, 3.3 * nr), squeeze=False)
    colors = {k: f"C{i}" for i, k in enumerate(common.IMPLS)}
    handles = {}
    for ax, m in zip(axes.flat, miners):
        fails = []
        for k in shown:
            xs, ys = [], []
            for n in sizes:
                r = idx.get((m, n, k))
                if r is None:
                    continue
                v = r.get(field)
                if r["status"] == "ok" and v is not None and v > 0:
                    xs.append(n)
                    ys.append(v)
                elif r["status"] in ("oom", "timeout"):
                    fails.append((n, k, r["status"]))
            if xs:
                (h,) = ax.plot(xs, ys, marker="o", ms=3, color=colors[k], label=_label(k))
                handles[k] = h
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlim(min(sizes) / 1.4, max(sizes) * 1.4)  # failures at any N stay visible
        ax.set_title(m, fontsize=9)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(True, which="both", alpha=0.25)
        tr = blended_transform_factory(ax.transData, ax.transAxes)
        for j, (n, k, st) in enumerate(fails):
            ax.scatter([n], [0.96 - 0.05 * (j % 6)], transform=tr, marker="x", color=colors[k],
                       s=25, zorder=5)
            ax.text(n, 0.96 - 0.05 * (j % 6), f" {st}", transform=tr, fontsize=6,
                    color=colors[k], va="center")
        ax.set_xlabel("N", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
    for ax in list(axes.flat)[len(miners):]:
        ax.axis("off")
    if handles:
        fig.legend(list(handles.values()), [_label(k) for k in handles], loc="lower center",
                   ncol=min(len(handles), 7), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ratios(rows, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    miners, sizes, impls = _order(rows)
    shown = [k for k in _shown_impls(rows, impls) if k != "pml"]
    idx = _index(rows)
    fig, axes = plt.subplots(1, len(sizes), figsize=(max(6, 0.55 * len(miners) * len(sizes) + 2),
                                                     4.2), squeeze=False)
    width = 0.8 / max(1, len(shown))
    colors = {k: f"C{i}" for i, k in enumerate(common.IMPLS)}
    for ax, n in zip(axes.flat, sizes):
        for j, k in enumerate(shown):
            xs, ys = [], []
            for i, m in enumerate(miners):
                r = ratio(idx, m, n, k)
                if r is not None:
                    xs.append(i + (j - (len(shown) - 1) / 2) * width)
                    ys.append(r)
            ax.bar(xs, ys, width=width, color=colors[k], label=_label(k))
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(miners)))
        ax.set_xticklabels([m.replace("Miner", "").replace("EmbeddingsAlreadyPackagedAsTriplets",
                                                           "Packaged") for m in miners],
                           rotation=60, ha="right", fontsize=7)
        ax.set_title(f"N = {n}", fontsize=9)
        ax.set_ylabel("time / PML time (log)", fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.25)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8,
                   frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ writing


def write_all(result: Dict[str, Any], out_dir: str, plots: bool = True,
              stem: Optional[str] = None) -> List[str]:
    """Write ``bench_<device>.json``, ``.md`` and the plots; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    dev = stem or result["meta"].get("device", "cpu")
    paths = []
    jpath = os.path.join(out_dir, f"bench_{dev}.json")
    with open(jpath, "w") as f:
        json.dump(result, f, indent=1, default=str)
    paths.append(jpath)
    plot_names: List[str] = []
    if plots:
        rows = result["rows"]
        specs = [
            (f"time_vs_n_{dev}.png", lambda p: plot_vs_n(
                rows, p, "median_ms", "median ms per call", f"Median time per call vs N ({dev})")),
            (f"memory_vs_n_{dev}.png", lambda p: plot_vs_n(
                rows, p, "peak_mem_mb", "peak memory (MB)", f"Peak memory per call vs N ({dev})")),
            (f"ratio_vs_pml_{dev}.png", lambda p: plot_ratios(
                rows, p, f"Time relative to PML eager ({dev}; below 1 is faster)")),
        ]
        for name, fn in specs:
            p = os.path.join(out_dir, name)
            fn(p)
            plot_names.append(name)
            paths.append(p)
    mpath = os.path.join(out_dir, f"bench_{dev}.md")
    with open(mpath, "w") as f:
        f.write(markdown(result, plot_names))
    paths.append(mpath)
    return paths


def merge(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One result from several runs on the same device: the first run's environment, and
    for each (miner, N, implementation) the row of the last run that has it (e.g. a re-run
    of a few rows after a library fix). The runs merged are listed in ``meta.merged``."""
    devices = {r["meta"].get("device") for r in results}
    if len(devices) > 1:
        raise ValueError(f"cannot merge runs on different devices: {sorted(map(str, devices))}")
    rows: Dict[Tuple[str, int, str], Dict[str, Any]] = {}
    for res in results:
        for row in res["rows"]:
            rows[common.row_key(row)] = row
    meta = dict(results[0]["meta"])
    meta["merged"] = [{"date": r["meta"].get("date"), "args": r["meta"].get("args"),
                       "rows": len(r["rows"])} for r in results]
    return {"meta": meta, "rows": list(rows.values())}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("json", nargs="+", help="bench_<device>.json files")
    p.add_argument("--out", default=None, help="output folder (default: next to each file)")
    p.add_argument("--merge", action="store_true",
                   help="merge the files (same device; later files win per row) into one report")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    loaded = []
    for path in args.json:
        with open(path) as f:
            loaded.append((path, json.load(f)))
    if args.merge:
        loaded = [(args.json[0], merge([res for _, res in loaded]))]
    for path, result in loaded:
        for out in write_all(result, args.out or os.path.dirname(os.path.abspath(path)),
                             plots=not args.no_plots):
            print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
