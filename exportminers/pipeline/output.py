"""Output: per-query Parquet shards, the final table, flat formats, summary and plot."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from .config import F32, MineConfig

FORMATS = ("triplets", "ntuples", "pairs")
STATUSES = ("ok", "short", "no_positive", "excluded_nonfinite", "excluded_missing_label")
EXAMPLE_IDS = 20


def _list_array(values: np.ndarray, valid: np.ndarray):
    """pyarrow list array from a padded [n, k] matrix and its validity mask (valid
    entries must form a prefix of each row)."""
    import pyarrow as pa

    counts = valid.sum(axis=1)
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[valid]))


def shard_table(cfg: MineConfig, rows: np.ndarray, q_ids: np.ndarray, q_labels: np.ndarray,
                q_status_excl: np.ndarray, neg_c, neg_i, ranks, count, hpos_c, hpos_i,
                epos_c, epos_i, bank_ids: np.ndarray):
    """One row per query of a shard.

    ``q_status_excl``: '' for mined queries, else the exclusion status.
    """
    import pyarrow as pa

    n = len(rows)
    excluded = q_status_excl != ""
    # negatives
    sel = ranks >= 0
    sel &= ~excluded[:, None]
    safe = np.where(sel, ranks, 0)
    nc = np.take_along_axis(neg_c, safe, 1) if neg_c.shape[1] else np.zeros((n, ranks.shape[1]), F32)
    ni = np.take_along_axis(neg_i, safe, 1) if neg_i.shape[1] else np.zeros((n, ranks.shape[1]), np.int64)
    nid = np.where(sel, bank_ids[np.where(sel, ni, 0)], 0)
    nsc = cfg.to_raw(nc)
    # hardest positives
    kp = cfg.num_positives
    if kp:
        pv = np.isfinite(hpos_c[:, :kp]) & ~excluded[:, None]
        pid = np.where(pv, bank_ids[np.where(pv, hpos_i[:, :kp], 0)], 0)
        psc = cfg.to_raw(hpos_c[:, :kp])
    else:
        pv = np.zeros((n, 0), bool)
        pid = np.zeros((n, 0), np.int64)
        psc = np.zeros((n, 0), F32)
    has_pos = (np.isfinite(hpos_c[:, 0]) if hpos_c is not None and hpos_c.shape[1]
               else np.ones(n, bool))
    n_neg = sel.sum(axis=1)
    status = np.full(n, "ok", dtype=object)
    status[n_neg < cfg.k] = "short"
    if cfg.num_positives or cfg.needs_positive:
        status[~has_pos] = "no_positive"
    status[excluded] = q_status_excl[excluded]
    label_ok = q_status_excl != "excluded_missing_label"
    cols = {
        "query_index": pa.array(rows.astype(np.int64)),
        "query_id": pa.array(q_ids.astype(np.int64)),
        "label": pa.array(q_labels.astype(np.int64), mask=~label_ok),
        "status": pa.array(status.astype(str)),
        "num_candidates": pa.array(np.where(excluded, 0, count).astype(np.int32)),
        "neg_ids": _list_array(nid, sel),
        "neg_scores": _list_array(nsc.astype(F32), sel),
        "neg_ranks": _list_array(np.where(sel, ranks, 0).astype(np.int32), sel),
        "pos_ids": _list_array(pid, pv),
        "pos_scores": _list_array(psc.astype(F32), pv),
    }
    if cfg.easiest_positive:
        ev = np.isfinite(epos_c[:, 0]) & ~excluded
        cols["easy_pos_id"] = pa.array(bank_ids[np.where(ev, epos_i[:, 0], 0)], mask=~ev)
        cols["easy_pos_score"] = pa.array(cfg.to_raw(epos_c[:, 0]).astype(F32), mask=~ev)
    return pa.table(cols)


def write_atomic(table, path: Path) -> None:
    import pyarrow.parquet as pq

    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def concat_shards(shards: Sequence[Path], out: Path) -> int:
    import pyarrow.parquet as pq

    tmp = out.with_name(out.name + ".tmp")
    writer = None
    rows = 0
    try:
        for s in shards:
            t = pq.read_table(s)
            if writer is None:
                writer = pq.ParquetWriter(tmp, t.schema)
            writer.write_table(t)
            rows += t.num_rows
    finally:
        if writer is not None:
            writer.close()
    os.replace(tmp, out)
    return rows


# --------------------------------------------------------------------------- flat formats

def write_flat(fmt: str, mined: Path, out: Path, k: int) -> int:
    """Derive a flat training file from the per-query table; returns its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(mined)
    tmp = out.with_name(out.name + ".tmp")
    writer = None
    total = 0
    for batch in pf.iter_batches(batch_size=65536):
        qid = batch.column("query_id").to_numpy()
        negs = batch.column("neg_ids")
        nsc = batch.column("neg_scores")
        pos = batch.column("pos_ids")
        psc = batch.column("pos_scores")
        nlen = np.asarray(negs.value_lengths().to_numpy(zero_copy_only=False))
        plen = np.asarray(pos.value_lengths().to_numpy(zero_copy_only=False))
        noff = np.concatenate([[0], np.cumsum(nlen)])
        poff = np.concatenate([[0], np.cumsum(plen)])
        nflat = negs.flatten().to_numpy()
        nsflat = nsc.flatten().to_numpy()
        pflat = pos.flatten().to_numpy()
        psflat = psc.flatten().to_numpy()
        n = len(qid)
        first = np.minimum(poff[:-1], max(len(pflat) - 1, 0))
        p_first = pflat[first] if len(pflat) else np.zeros(n, np.int64)
        ps_first = psflat[first] if len(psflat) else np.zeros(n, F32)
        if fmt == "triplets":
            keep = (plen > 0) & (nlen > 0)
            row = np.repeat(np.arange(n), nlen)
            m = keep[row]
            r = row[m]
            cols = {"anchor_id": qid[r], "positive_id": p_first[r], "negative_id": nflat[m],
                    "positive_score": ps_first[r].astype(F32),
                    "negative_score": nsflat[m].astype(F32)}
        elif fmt == "ntuples":
            keep = (plen > 0) & (nlen >= k)
            js = np.flatnonzero(keep)
            cols = {"anchor_id": qid[js], "positive_id": p_first[js]}
            for r in range(k):
                cols[f"negative_{r + 1}_id"] = nflat[noff[js] + r] if len(js) else np.zeros(0, np.int64)
        elif fmt == "pairs":
            a = np.concatenate([np.repeat(qid, plen), np.repeat(qid, nlen)])
            o = np.concatenate([pflat, nflat])
            lab = np.concatenate([np.ones(len(pflat), np.int8), np.zeros(len(nflat), np.int8)])
            sc = np.concatenate([psflat, nsflat]).astype(F32)
            cols = {"anchor_id": a, "other_id": o, "label": lab, "score": sc}
        else:
            raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
        t = pa.table({name: pa.array(np.asarray(v)) for name, v in cols.items()})
        if writer is None:
            writer = pq.ParquetWriter(tmp, t.schema)
        writer.write_table(t)
        total += t.num_rows
    if writer is not None:
        writer.close()
        os.replace(tmp, out)
    return total


# --------------------------------------------------------------------------- summary

def _stats(x: np.ndarray) -> Dict[str, float]:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return {"count": 0}
    q = np.quantile(x, [0.05, 0.5, 0.95])
    return {"count": int(len(x)), "mean": float(x.mean()), "std": float(x.std()),
            "min": float(x.min()), "p05": float(q[0]), "median": float(q[1]),
            "p95": float(q[2]), "max": float(x.max())}


def collect_scores(mined: Path):
    import pyarrow.parquet as pq

    t = pq.read_table(mined, columns=["query_id", "status", "num_candidates", "neg_ids",
                                      "neg_scores", "pos_scores"])
    # an Array, not the ChunkedArray: pyarrow 12's ChunkedArray.to_numpy takes no arguments
    status = np.asarray(t.column("status").combine_chunks().to_numpy(zero_copy_only=False)
                        ).astype(str)
    neg = t.column("neg_scores").combine_chunks()
    pos = t.column("pos_scores").combine_chunks()
    plen = np.asarray(pos.value_lengths().to_numpy(zero_copy_only=False))
    poff = np.concatenate([[0], np.cumsum(plen)])
    pflat = pos.flatten().to_numpy()
    first_pos = pflat[poff[:-1][plen > 0]] if len(pflat) else np.zeros(0, F32)
    nlen = np.asarray(t.column("neg_ids").combine_chunks().value_lengths().to_numpy(
        zero_copy_only=False))
    return {
        "query_id": t.column("query_id").to_numpy(), "status": status,
        "neg": neg.flatten().to_numpy(), "pos": pflat, "hardest_pos": first_pos,
        "num_neg": nlen, "num_candidates": t.column("num_candidates").to_numpy(),
    }


def build_summary(cfg: MineConfig, sc: dict, excluded: dict, extra: dict) -> dict:
    status = sc["status"]
    counts = {s: int((status == s).sum()) for s in STATUSES}
    # every mined query with fewer than k negatives, whatever its status says first
    mined_q = (status != "excluded_nonfinite") & (status != "excluded_missing_label")
    short = mined_q & (np.asarray(sc["num_neg"]) < cfg.k)
    hist = {}
    if short.any():
        vals, cnt = np.unique(sc["num_neg"][short], return_counts=True)
        hist = {str(int(v)): int(c) for v, c in zip(vals, cnt)}
    need = cfg.range_min + cfg.k
    summary = {
        "queries": {"total": int(len(status)),
                    "mined": int(len(status) - counts["excluded_nonfinite"]
                                 - counts["excluded_missing_label"]),
                    **counts},
        "short_of_negatives": {
            "count": int(short.sum()),
            "also_no_positive": int((short & (status == "no_positive")).sum()),
            "why": (f"fewer than {cfg.k} negatives left in the rank window "
                    f"[{cfg.range_min}, {cfg.range_min + cfg.k if cfg.range_max is None else cfg.range_max})"
                    f" after the label, score{' and positive-aware' if cfg.needs_positive else ''} "
                    f"filters (the window needs {need} filtered negatives)"),
            "negatives_found": hist,
            "example_query_ids": sc["query_id"][short][:EXAMPLE_IDS].tolist(),
        },
        "no_positive": {
            "count": counts["no_positive"],
            "why": ("no other bank row shares the query's label"
                    + ("; positive-aware filters then leave no negatives" if cfg.needs_positive else "")),
            "example_query_ids": sc["query_id"][status == "no_positive"][:EXAMPLE_IDS].tolist(),
        },
        "excluded": {side: {why: {"count": len(ids), "example_ids": list(ids[:EXAMPLE_IDS])}
                            for why, ids in d.items()} for side, d in excluded.items()},
        "scores": {"metric": cfg.metric,
                   "negatives": _stats(sc["neg"]),
                   "hardest_positive": _stats(sc["hardest_pos"])},
        "config": cfg.to_json(),
    }
    summary.update(extra)
    return summary


def plot_scores(cfg: MineConfig, sc: dict, path: Path) -> Optional[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    neg, pos = sc["neg"], sc["hardest_pos"]
    both = np.concatenate([neg, pos]) if len(neg) + len(pos) else np.zeros(1)
    bins = np.linspace(float(both.min()), float(both.max()) + 1e-6, 60)
    if len(pos):
        ax.hist(pos, bins=bins, alpha=0.6, density=True, label=f"hardest positive (n={len(pos)})")
    if len(neg):
        ax.hist(neg, bins=bins, alpha=0.6, density=True, label=f"mined negatives (n={len(neg)})")
    ax.set_xlabel(("similarity" if cfg.similarity else "distance") + f" ({cfg.metric})")
    ax.set_ylabel("density")
    ax.set_title(f"{cfg.strategy} negatives, k={cfg.k}")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        f.write("\n")
    os.replace(tmp, path)
