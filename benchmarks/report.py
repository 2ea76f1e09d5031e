"""Render benchmark results: JSON, markdown tables and PNG plots.

Usage (re-render from saved results, e.g. after merging a GPU run)::

    python -m benchmarks.report results/bench_cpu.json [results/bench_cuda.json] --out results/
    python -m benchmarks.report old/bench_cpu.json rerun/bench_cpu.json --merge --out merged/

Several files of one device written to one folder need ``--merge`` (later files win per
row; ``meta.merged`` lists every source run, through nested merges); without it they
would overwrite each other's ``bench_<device>.*`` and the report refuses.

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
    """time / PML time; None unless both rows have timed calls."""
    r, base = idx.get((miner, n, impl)), idx.get((miner, n, "pml"))
    if not (_ok(r) and _ok(base)) or not base["median_ms"] or no_timed_call(r) \
            or no_timed_call(base):
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


def _note_ref(notes: Dict[str, int], text: str) -> str:
    """A footnote reference for ``text`` (numbered in order of first use)."""
    if text not in notes:
        notes[text] = len(notes) + 1
    return f"[^{notes[text]}]"


def no_timed_call(row: Optional[Dict[str, Any]]) -> bool:
    """An ok row whose time is its first (cold) call: it got no timed call."""
    return row is not None and row.get("status") == "ok" and row.get("median_ms") is not None \
        and (row.get("repeats") == 0 or row.get("times_ms") == [])


def _label(impl: str) -> str:
    return common.IMPLS[impl].label if impl in common.IMPLS else impl


# ------------------------------------------------------------------------------ markdown


def _sources(meta: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The source runs of a merged result (``meta['merged']``), else []."""
    merged = meta.get("merged")
    return list(merged) if isinstance(merged, list) else []


def _agreed(meta: Dict[str, Any], key: str, sub: Optional[str] = None):
    """``meta[key]`` (or ``meta['args'][sub]``), or "varies by run" when the source runs
    of a merge disagree on it."""
    srcs = _sources(meta)
    if sub is None:
        value = meta.get(key)
        vals = {json.dumps(s.get(key), default=str) for s in srcs if key in s}
    else:
        value = (meta.get("args") or {}).get(sub)
        vals = {json.dumps((s.get("args") or {}).get(sub), default=str) for s in srcs
                if isinstance(s.get("args"), dict)}
    return "varies by run" if len(vals) > 1 else value


def _processes(rpp) -> str:
    if rpp in (None, 1):
        return "one worker process per row"
    if rpp >= 10 ** 6:
        return "all rows in one worker process"
    return f"{rpp} rows per worker process"


def _timing(args: Dict[str, Any]) -> str:
    """Warm-up, timed calls, cap and worker processes of one run's args."""
    return (f"{args.get('warmup')} warm-up call(s), median of up to {args.get('repeats')} "
            f"timed calls (at least {args.get('min_repeats')}, at most {args.get('budget_s')} "
            f"s of timed calls); cap {args.get('cap_s')} s per row; "
            f"{_processes(args.get('rows_per_process', 1))}")


def header_lines(meta: Dict[str, Any]) -> List[str]:
    args = meta.get("args", {}) or {}
    dev = meta.get("device", "?")
    srcs = _sources(meta)
    threads = _agreed(meta, "args", "threads")
    tmin = meta.get("torchscript_min_warmup")
    ts_note = f" (TorchScript rows at least {tmin}; each row's own count is in the JSON)" \
        if tmin else ""
    lines = [
        f"- Device: **{dev}** ({meta.get('device_name')}); CPU {meta.get('cpu')}, "
        f"{meta.get('cpu_count')} cores; threads per implementation: "
        + (f"{threads} (torch.set_num_threads, ONNX Runtime intra_op_num_threads)"
           if threads and threads != "varies by run"
           else "varies by run" if threads == "varies by run"
           else f"library defaults (torch: {meta.get('torch_threads')})"),
    ]
    if srcs:
        lines.append(f"- **Merge of {len(srcs)} runs** (for each miner, N and implementation "
                     f"the row of the last run that has it); the runs:")
        for k, src in enumerate(srcs, 1):
            sargs = src.get("args") or {}
            sizes = src.get("sizes") or sargs.get("sizes")
            lines.append(
                f"  {k}. git {src.get('git', '?')}, date {src.get('date', '?')}, device "
                f"{src.get('device', dev)}, sizes {sizes}, memory limit "
                f"{src.get('mem_limit', '?')}, wall time {src.get('wall_s', '?')} s, "
                f"{src.get('rows', '?')} rows" + (" (**--quick** smoke run)" if sargs.get(
                    "quick") else "") + (f", from {src['file']}" if src.get("file") else "")
                + (f"; timing: {_timing(sargs)}" if sargs else ""))
    else:
        lines.append(f"- Date: {meta.get('date')}; wall time {meta.get('wall_s')} s")
    versions = {k: _agreed(meta, k) for k in ("torch", "pml", "onnxruntime", "exportminers")}
    lines += [
        f"- Versions{' (of the first run where they vary)' if srcs else ''}: python "
        f"{meta.get('python')}, torch {versions['torch']}, "
        f"pytorch-metric-learning {versions['pml']}, onnxruntime {versions['onnxruntime']} "
        f"(providers {meta.get('ort_providers')}), onnx {meta.get('onnx')}, numpy "
        f"{meta.get('numpy')}, exportminers {versions['exportminers']}"
        + (f" (git {meta.get('git')})" if meta.get("git") and not srcs else "")
        + (f", CUDA {meta.get('cuda')}" if meta.get("cuda") else ""),
        f"- Inputs: self-mining, d = {_agreed(meta, 'args', 'dim')}, "
        f"{_agreed(meta, 'args', 'per_class')} samples per "
        f"class, class centres N(0, 1) + {_agreed(meta, 'args', 'spread')} x N(0, 1) noise, "
        f"float32, a fresh batch per call; default configuration of each miner (registry)",
    ]
    if srcs:
        lines.append(f"- Timing: per run, see the list above{ts_note}")
    else:
        lines.append(f"- Timing: {_timing(args)}{ts_note}; memory limit "
                     f"{meta.get('mem_limit')} per worker process"
                     + (" (**--quick** smoke run)" if args.get("quick") else ""))
    return lines


def _impl_table(rows, notes, value) -> List[str]:
    """Markdown table, one row per (miner, N), one column per implementation;
    ``value(idx, miner, n, impl, row)`` formats a cell."""
    idx = _index(rows)
    miners, sizes, impls = _order(rows)
    shown = _shown_impls(rows, impls)
    if not shown:
        return ["No rows: no implementation ran in this run (every row was skipped; see "
                "below)."]
    out = ["| Miner | N | " + " | ".join(_label(k) for k in shown) + " |",
           "|---|---:|" + "---:|" * len(shown)]
    for m in miners:
        for n in sizes:
            if not any((m, n, k) in idx for k in shown):
                continue
            cells = [_cell(idx.get((m, n, k)),
                           value(idx, m, n, k, idx.get((m, n, k)), notes), notes)
                     for k in shown]
            out.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return out


ANCHOR_BLOCKS_NOTE = (
    "one run of the self-mining graph would compute a tensor beyond 2^31 - 1 elements "
    "(N^3 for the dense triplet miners): this row runs the miner's anchor_blocks=True graph, "
    "which OnnxMiner mines in anchor blocks by itself (below 2^31 - 1 elements a block on the "
    "CUDA EP, 2^28 on the CPU), with the same tuples as one run")


GATHER_NOTE = (
    "this row runs the miner's gather_positives=True graph (anchor_blocks=True too): each "
    "anchor's positives against every negative, [N, P, M] candidates (P = samples per "
    "class - 1, 7 in these tables) instead of [N, M, M]; OnnxMiner lists the positives on "
    "the host each call (numpy, included in the time), the graph checks the list; the same "
    "tuples as the dense graph")


def _time_cell(idx, m, n, k, r, notes) -> str:
    val = common.fmt_ms(r.get("median_ms")) if r else ""
    rt = ratio(idx, m, n, k) if k != "pml" else None
    if rt is not None:
        val += f" ({common.fmt_ratio(rt)})"
    if no_timed_call(r):
        val += " (1 call)" + _note_ref(notes, r.get("note") or (
            "no timed call: the time is the first, cold call's"))
    if r and r.get("graph") == "anchor_blocks":
        val += _note_ref(notes, ANCHOR_BLOCKS_NOTE)
    if r and r.get("graph") == "gather_positives":
        val += _note_ref(notes, GATHER_NOTE)
    return val


def _memory_cell(idx, m, n, k, r, notes) -> str:
    mb = r.get("peak_mem_mb") if r else None
    val = "-" if mb is None else f"{mb:.0f}" if mb >= 10 else f"{mb:.1f}"
    if r and r.get("mem_shared_process") and mb is not None:
        val += " (shared process)" + _note_ref(notes, r.get("mem_note") or (
            "memory measured in a worker process shared with earlier rows: a lower bound"))
    return val


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
    if plots and any(r.get("status") == "ok" for r in result["rows"]):
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


SOURCE_KEYS = ("git", "date", "device", "device_name", "sizes", "mem_limit", "wall_s",
               "torch", "pml", "onnxruntime", "exportminers", "args")


def source_run(meta: Dict[str, Any], rows: List[Dict[str, Any]],
               path: Optional[str] = None) -> Dict[str, Any]:
    """What ``meta['merged']`` keeps of one (unmerged) run."""
    src = {k: meta.get(k) for k in SOURCE_KEYS}
    if src["sizes"] is None:
        src["sizes"] = sorted({int(r["n"]) for r in rows if "n" in r})
    src["rows"] = len(rows)
    if path:
        src["file"] = path
    return src


def merge(results: List[Dict[str, Any]], paths: Optional[List[str]] = None) -> Dict[str, Any]:
    """One result from several runs on the same device: for each (miner, N,
    implementation) the row of the last run that has it (e.g. a re-run of a few rows after
    a library fix). ``meta`` is the first run's environment; ``meta['merged']`` lists every
    source run (git commit, date, device, sizes, memory limit, wall time, versions, args,
    row count), flattened through earlier merges; the run-specific top-level fields (git,
    date, wall time, memory limit) are kept only where every source run agrees."""
    devices = {r["meta"].get("device") for r in results}
    if len(devices) > 1:
        raise ValueError(f"cannot merge runs on different devices: {sorted(map(str, devices))}")
    rows: Dict[Tuple[str, int, str], Dict[str, Any]] = {}
    sources: List[Dict[str, Any]] = []
    for i, res in enumerate(results):
        for row in res["rows"]:
            rows[common.row_key(row)] = row
        earlier = res["meta"].get("merged")
        if isinstance(earlier, list) and earlier:
            sources.extend(dict(e) for e in earlier)
        else:
            sources.append(source_run(res["meta"], res["rows"],
                                      paths[i] if paths and i < len(paths) else None))
    meta = dict(results[0]["meta"])
    meta["merged"] = sources
    for key in ("git", "date", "wall_s", "mem_limit"):
        vals = {json.dumps(s.get(key), default=str) for s in sources}
        if len(vals) > 1:
            meta[key] = None
    return {"meta": meta, "rows": list(rows.values())}


def load(path: str) -> Dict[str, Any]:
    """A bench_<device>.json; ``ValueError`` with a one-line reason when it is not one."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a folder, not a bench_<device>.json file") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict) \
            or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not a benchmark result (a JSON object with 'meta' and "
                         f"'rows', as benchmarks.run writes to bench_<device>.json)")
    for row in data["rows"]:
        if not isinstance(row, dict) or not {"miner", "n", "impl", "status"} <= set(row):
            raise ValueError(f"{path}: a row lacks miner/n/impl/status: "
                             f"{common.short(json.dumps(row, default=str), 160)}")
    return data


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("json", nargs="+", help="bench_<device>.json files")
    p.add_argument("--out", default=None, help="output folder (default: next to each file)")
    p.add_argument("--merge", action="store_true",
                   help="merge the files (same device; later files win per row) into one report")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} exists and is not a folder")
    loaded = []
    for path in args.json:
        try:
            loaded.append((path, load(path)))
        except ValueError as e:
            p.error(str(e))
    if args.merge:
        try:
            merged = merge([res for _, res in loaded], [path for path, _ in loaded])
        except ValueError as e:
            p.error(f"--merge: {e}; merge the files of one device at a time")
        loaded = [(args.json[0], merged)]
    else:
        targets: Dict[str, List[str]] = {}
        for path, result in loaded:
            out_dir = os.path.abspath(args.out or os.path.dirname(os.path.abspath(path)))
            target = os.path.join(out_dir, f"bench_{result['meta'].get('device', 'cpu')}")
            targets.setdefault(target, []).append(path)
        clashes = {t: ps for t, ps in targets.items() if len(ps) > 1}
        if clashes:
            t, ps = next(iter(clashes.items()))
            p.error(f"{', '.join(ps)} would all be written to {t}.json/.md (same device, same "
                    f"folder); pass --merge to combine them into one report, or render them "
                    f"one at a time with different --out folders")
    for path, result in loaded:
        for out in write_all(result, args.out or os.path.dirname(os.path.abspath(path)),
                             plots=not args.no_plots):
            print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
