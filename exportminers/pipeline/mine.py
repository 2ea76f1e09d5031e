"""``mine()``: hard negatives (and positives) for every query against a large bank."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import output as out_mod
from .config import MineConfig, negative_band
from .engine import (DEFAULT_BLOCKS, BlockRunner, DeviceBlock, check_block_sizes,
                     prepare_block, resolve_device, run_pass, select_window)
from .graphs import GraphSpec
from .progress import Progress
from .sources import SENTINEL, Source, open_source

STOP_ENV = "EXPORTMINERS_PIPELINE_STOP_AFTER_SHARDS"  # test hook: exit after N shards
STATE_FILE = "_state.json"
SHARD_DIR = "_shards"


@dataclass
class Scan:
    valid: np.ndarray  # bool [n]
    nonfinite: np.ndarray  # int64 row numbers
    missing_label: np.ndarray
    ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n] (0 where missing)
    digest: str = ""  # content hash: a resumed run must see the same data


def scan_source(src: Source, block: int, name: str) -> Scan:
    """One streaming pass: find rows with NaN/inf embeddings or missing labels."""
    valid = np.zeros(src.n, dtype=bool)
    ids = np.zeros(src.n, dtype=np.int64)
    labels = np.zeros(src.n, dtype=np.int64)
    nonfinite, missing = [], []
    h = hashlib.blake2b(digest_size=16)
    for s in range(0, src.n, block):
        e = min(src.n, s + block)
        blk = src.read(s, e)
        if blk.emb.shape[1] != src.dim:
            raise ValueError(f"{name}: rows {s}..{e} have width {blk.emb.shape[1]}, expected {src.dim}")
        fin = np.isfinite(blk.emb).all(axis=1)
        ok = fin & blk.label_ok
        if np.any(blk.labels[blk.label_ok] == SENTINEL):
            raise ValueError(f"{name}: label {SENTINEL} is reserved (used for padding)")
        if np.any(blk.ids == SENTINEL) or np.any(blk.ids == SENTINEL + 1):
            raise ValueError(f"{name}: ids {SENTINEL} and {SENTINEL + 1} are reserved")
        valid[s:e] = ok
        for a in (blk.emb, blk.labels, blk.label_ok, blk.ids):
            h.update(np.ascontiguousarray(a).tobytes())
        ids[s:e] = blk.ids
        labels[s:e] = np.where(blk.label_ok, blk.labels, 0)
        nonfinite.append(np.flatnonzero(~fin) + s)
        missing.append(np.flatnonzero(fin & ~blk.label_ok) + s)
    cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)
    return Scan(valid, cat(nonfinite), cat(missing), ids, labels, h.hexdigest())


@dataclass
class MineResult:
    """Where ``mine`` wrote its outputs, and the summary it computed."""

    out_dir: Path
    output: Path
    files: Dict[str, Path]
    summary: dict = field(repr=False)


def _parse_block(block_size, device) -> Tuple[int, int]:
    if block_size is None:
        return DEFAULT_BLOCKS[device]
    if isinstance(block_size, str):
        parts = block_size.lower().replace(",", "x").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"block_size must look like 4096 or 4096x262144, got {block_size!r}") from None
        block_size = vals[0] if len(vals) == 1 else tuple(vals)
    if isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool):
        return int(block_size), int(block_size)
    if isinstance(block_size, (tuple, list)) and len(block_size) == 2:
        return int(block_size[0]), int(block_size[1])
    raise ValueError(f"block_size must be an int or (block_q, block_m), got {block_size!r}")


def mine(queries, labels=None, ids=None, *, bank=None, bank_labels=None, bank_ids=None,
         out_dir: Union[str, os.PathLike] = "mined", config: Optional[MineConfig] = None,
         k: int = 10, metric: str = "cosine", strategy: str = "hardest", margin: float = 0.2,
         epsilon: float = 0.1, min_score: Optional[float] = None,
         max_score: Optional[float] = None, margin_pos: Optional[float] = None,
         perc_pos: Optional[float] = None, range_min: int = 0,
         range_max: Optional[int] = None, sampling: str = "top", seed: int = 0,
         num_positives: int = 1, easiest_positive: bool = False,
         positive_ref: str = "hardest", exclude_same_id: Optional[bool] = None,
         formats: Sequence[str] = ("triplets",), device: str = "auto",
         dtype: Optional[str] = None, block_size=None, shard_size: Optional[int] = None,
         bank_cache_gb: Optional[float] = None, overwrite: bool = False,
         progress: bool = True, plot: bool = True, threads: Optional[int] = None,
         embedding_column: str = "embedding", label_column: str = "label",
         id_column: str = "id", engine: str = "local", ray_address: Optional[str] = None,
         num_actors: Optional[int] = None, num_gpus_per_actor: float = 0,
         num_cpus_per_actor: Optional[float] = None, bank_shards: int = 1,
         max_retries: int = 3) -> MineResult:
    """Mine hard negatives and positives for every query against a bank, out of core.

    Queries and bank are streamed in blocks through a fixed-shape ONNX block graph on
    ONNX Runtime (CUDA or CPU); per-query top-k lists are merged on the host, so memory
    is O(block_q x block_m + queries x k). Results are written per query shard (resumable:
    a rerun skips finished shards) and then joined into ``out_dir/mined.parquet``.

    Args:
        queries: embeddings: an array ``[n, d]``, a ``.npy`` path (memory-mapped), a
            ``.parquet`` file, a folder of Parquet shards, or a folder with
            ``embeddings.npy`` / ``labels.npy`` / ``ids.npy``.
        labels, ids: query labels / ids (arrays or ``.npy`` paths) when ``queries`` is an
            array or ``.npy``. Ids default to row numbers.
        bank, bank_labels, bank_ids: the reference set, same forms. ``None``: mine the
            queries against themselves.
        out_dir: output folder (created).
        config: a :class:`MineConfig`; otherwise built from the keyword arguments
            ``k`` ... ``exclude_same_id`` (see :class:`MineConfig`).
        formats: flat files to derive: ``"triplets"``, ``"ntuples"``, ``"pairs"``.
        device: ``"auto"`` (CUDA if ONNX Runtime has it), ``"cuda"`` or ``"cpu"``.
        dtype: compute dtype; default float16 on CUDA for cosine/dot, else float32.
        block_size: ``int`` or ``(block_q, block_m)`` (``"4096x262144"``); block_q *
            block_m must stay below 2**31.
        shard_size: queries per output shard (default 16 query blocks).
        bank_cache_gb: keep the prepared bank on the device when it is at most this big
            (default 4 on CUDA, 1 on CPU); otherwise it is streamed again for every shard.
        overwrite: discard shards left by a run with a different configuration.
        progress: progress bar with throughput on stderr.
        plot: write ``scores.png``.
        engine: ``"local"`` (this process, the default) or ``"ray"``: the same mining on
            a Ray cluster (needs ``pip install exportminers[ray]``); see
            :func:`exportminers.pipeline.ray_engine.mine_ray` for ``ray_address``,
            ``num_actors``, ``num_gpus_per_actor``, ``num_cpus_per_actor``,
            ``bank_shards`` and ``max_retries`` (Ray engine only). With
            ``engine="ray"``, ``shard_size`` is the number of queries per Ray batch.

    Returns:
        :class:`MineResult` with the output paths and the summary dict.

    Example:
        >>> res = mine(emb, labels, out_dir="out", k=5, strategy="semihard", margin=0.1)
        >>> res.output  # out/mined.parquet, one row per query
    """
    t_start = time.time()
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if config is None:
        config = MineConfig(
            k=k, metric=metric, strategy=strategy, margin=margin, epsilon=epsilon,
            min_score=min_score, max_score=max_score, margin_pos=margin_pos,
            perc_pos=perc_pos, range_min=range_min, range_max=range_max, sampling=sampling,
            seed=seed, num_positives=num_positives, easiest_positive=easiest_positive,
            positive_ref=positive_ref, exclude_same_id=exclude_same_id)
    cfg = config
    if engine == "ray":
        from .ray_engine import mine_ray  # imports ray; the local engine never does

        return mine_ray(
            queries, labels, ids, bank=bank, bank_labels=bank_labels, bank_ids=bank_ids,
            out_dir=out_dir, config=cfg, formats=formats, device=device, dtype=dtype,
            block_size=block_size, batch_size=shard_size, overwrite=overwrite,
            progress=progress, plot=plot, threads=threads,
            embedding_column=embedding_column, label_column=label_column,
            id_column=id_column, ray_address=ray_address, num_actors=num_actors,
            num_gpus_per_actor=num_gpus_per_actor, num_cpus_per_actor=num_cpus_per_actor,
            bank_shards=bank_shards, max_retries=max_retries, _t_start=t_start)
    ray_only = dict(ray_address=(ray_address, None), num_actors=(num_actors, None),
                    num_gpus_per_actor=(num_gpus_per_actor, 0),
                    num_cpus_per_actor=(num_cpus_per_actor, None),
                    bank_shards=(bank_shards, 1), max_retries=(max_retries, 3))
    for name, (value, default) in ray_only.items():
        if value != default:
            raise ValueError(f"{name} applies to engine='ray' only (got {name}={value!r} with "
                             "engine='local')")
    formats = check_formats(formats)
    device = resolve_device(device)
    dtype, np_dtype = resolve_dtype(dtype, device, cfg)
    bq, bm = _parse_block(block_size, device)
    check_block_sizes(bq, bm)

    # ---- inputs
    inp = open_inputs(queries, labels, ids, bank, bank_labels, bank_ids, cfg, bq, bm,
                      embedding_column=embedding_column, label_column=label_column,
                      id_column=id_column)
    qsrc, bsrc, qscan, bscan = inp.qsrc, inp.bsrc, inp.qscan, inp.bscan
    same_id, kc, k_pos = inp.same_id, inp.kc, inp.k_pos
    bq_eff, bm_eff = inp.bq_eff, inp.bm_eff

    # ---- blocks, graphs
    if shard_size is None:
        shard_size = 16 * bq_eff
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    shard_size = -(-int(shard_size) // bq_eff) * bq_eff
    n_shards = -(-qsrc.n // shard_size)

    specs = graph_specs(cfg, dtype)
    runners = [BlockRunner(s, device, threads) for s in specs]

    # ---- output folder and resume state
    out_dir = Path(out_dir)
    shard_dir = out_dir / SHARD_DIR
    state = run_state(cfg, dtype, inp)
    state["shard_size"] = shard_size
    prepare_out_dir(out_dir, state, overwrite, shard_dir)
    shard_paths = [shard_dir / f"part-{i:05d}.parquet" for i in range(n_shards)]
    for p in shard_dir.glob("*.tmp"):
        p.unlink()  # partial writes of a killed run
    todo = [i for i in range(n_shards) if not shard_paths[i].is_file()]

    # ---- bank blocks (cached on the device when small enough)
    cache_gb = bank_cache_gb if bank_cache_gb is not None else (4.0 if device == "cuda" else 1.0)
    n_bank_blocks = -(-bsrc.n // bm_eff)
    bank_bytes = n_bank_blocks * bm_eff * bsrc.dim * np_dtype.itemsize
    cache_bank = bank_bytes <= cache_gb * 2 ** 30 and (len(todo) * len(specs) > 1)
    bank_cache: List[DeviceBlock] = []

    def bank_blocks() -> Iterator[DeviceBlock]:
        if bank_cache:
            yield from bank_cache
            return
        for s in range(0, bsrc.n, bm_eff):
            e = min(bsrc.n, s + bm_eff)
            db = prepare_block(runners[0], "m", bsrc.read(s, e), bscan.valid[s:e], s, bm_eff,
                               cfg.metric, np_dtype, same_id)
            if cache_bank:
                bank_cache.append(db)
            yield db

    passes = len(specs)
    todo_rows = sum(min(qsrc.n, (i + 1) * shard_size) - i * shard_size for i in todo)
    prog = Progress(total=todo_rows * passes * bsrc.n, enabled=progress,
                    desc="mining", unit_scale=1.0 / bsrc.n / passes, unit="queries")
    stop_after = int(os.environ.get(STOP_ENV, "0") or 0)
    written = 0
    t_mine = time.time()
    for si in todo:
        s0 = si * shard_size
        s1 = min(qsrc.n, s0 + shard_size)
        rows = np.arange(s0, s1, dtype=np.int64)
        qblocks = []
        for b0 in range(s0, s1, bq_eff):
            b1 = min(s1, b0 + bq_eff)
            qblocks.append(prepare_block(runners[0], "q", qsrc.read(b0, b1), qscan.valid[b0:b1],
                                         b0, bq_eff, cfg.metric, np_dtype, same_id))
        nrows = s1 - s0
        tick = lambda n_bank_rows, _n=nrows: prog.update(_n * n_bank_rows)
        if cfg.needs_positive:
            r1 = run_pass(runners[0], qblocks, bank_blocks(), nrows, kc, k_pos, np_dtype,
                          on_bank_block=tick)
            ref = r1.epos if cfg.positive_ref == "easiest" else r1.hpos
            pos_c = ref.c[:, 0].copy()
            pos_c[~np.isfinite(pos_c)] = np.nan
            band = negative_band(cfg, pos_c, nrows)
            r2 = run_pass(runners[1], qblocks, bank_blocks(), nrows, kc, k_pos, np_dtype,
                          band=band, on_bank_block=tick)
            neg, hpos, epos = r2.neg, r1.hpos, r1.epos
        else:
            band = negative_band(cfg, None, nrows) if cfg.has_band else None
            r = run_pass(runners[0], qblocks, bank_blocks(), nrows, kc, k_pos, np_dtype,
                         band=band, on_bank_block=tick)
            neg, hpos, epos = r.neg, r.hpos, r.epos
        ranks, count = select_window(cfg, neg.c, rows)
        excl = np.full(nrows, "", dtype=object)
        excl[np.isin(rows, qscan.nonfinite)] = "excluded_nonfinite"
        excl[np.isin(rows, qscan.missing_label)] = "excluded_missing_label"
        table = out_mod.shard_table(
            cfg, rows, qscan.ids[s0:s1], qscan.labels[s0:s1], excl.astype(str), neg.c, neg.i,
            ranks, count, hpos.c if hpos is not None else None,
            hpos.i if hpos is not None else None,
            epos.c if epos is not None else None, epos.i if epos is not None else None,
            bscan.ids)
        out_mod.write_atomic(table, shard_paths[si])
        written += 1
        if stop_after and written >= stop_after and si != todo[-1]:
            prog.close()
            print(f"exportminers: stopping after {written} shard(s) ({STOP_ENV})", file=sys.stderr)
            sys.stderr.flush()
            os._exit(75)
    prog.close()
    mine_seconds = time.time() - t_mine

    # ---- final outputs
    mined = out_dir / "mined.parquet"
    out_mod.concat_shards(shard_paths, mined)
    engine_info = {"device": device, "dtype": dtype, "block_q": bq_eff, "block_m": bm_eff,
                   "graphs": [s.filename for s in specs], "shards": n_shards,
                   "shards_run_now": len(todo), "shard_size": shard_size,
                   "bank_cached_on_device": bool(cache_bank)}
    qps = round(todo_rows / mine_seconds, 1) if todo and mine_seconds > 0 else None
    return finish_outputs(cfg, inp, out_dir, mined, formats, plot, engine_info, t_start,
                          mine_seconds, qps)


# --------------------------------------------------------------------------- shared steps
# (used by the local engine above and by the Ray engine in ray_engine.py)

def check_formats(formats) -> List[str]:
    formats = list(formats or [])
    for f in formats:
        if f not in out_mod.FORMATS:
            raise ValueError(f"formats: unknown format {f!r}; choose from {list(out_mod.FORMATS)}")
    return formats


def resolve_dtype(dtype: Optional[str], device: str, cfg: MineConfig):
    if dtype is None:
        dtype = "float16" if (device == "cuda" and cfg.metric != "l2") else "float32"
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    return dtype, np.dtype(dtype)


@dataclass
class Inputs:
    """Opened and scanned inputs, with the sizes every engine derives from them."""

    qsrc: Source
    bsrc: Source
    self_mode: bool
    qscan: Scan
    bscan: Scan
    same_id: bool
    kc: int  # negative candidates kept per query
    k_pos: int  # hardest positives kept per query
    bq_eff: int
    bm_eff: int


def open_inputs(queries, labels, ids, bank, bank_labels, bank_ids, cfg: MineConfig,
                bq: int, bm: int, **cols) -> Inputs:
    """Open both sides, scan them for bad rows and check the configuration fits."""
    qsrc = open_source(queries, labels, ids, name="queries", **cols)
    self_mode = bank is None
    bsrc = qsrc if self_mode else open_source(bank, bank_labels, bank_ids, name="bank", **cols)
    if qsrc.n == 0:
        raise ValueError("queries: the input is empty (0 rows)")
    if bsrc.n == 0:
        raise ValueError("bank: the input is empty (0 rows)")
    if qsrc.dim != bsrc.dim:
        raise ValueError(f"embedding widths differ: queries have {qsrc.dim} columns, the bank "
                         f"has {bsrc.dim}")
    if qsrc.dim == 0:
        raise ValueError("queries: embeddings have width 0")
    scan_block = max(bq, min(bm, 65536))
    qscan = scan_source(qsrc, scan_block, "queries")
    bscan = qscan if self_mode else scan_source(bsrc, scan_block, "bank")
    n_bank_ok = int(bscan.valid.sum())
    if n_bank_ok == 0:
        raise ValueError("bank: every row is excluded (NaN/inf embeddings or missing labels)")
    if cfg.range_min + cfg.k > n_bank_ok:
        raise ValueError(
            f"k is larger than the bank: each query needs range_min + k = "
            f"{cfg.range_min} + {cfg.k} ranked candidates but the bank has {n_bank_ok} "
            "usable rows")
    if cfg.num_positives > n_bank_ok:
        raise ValueError(f"num_positives ({cfg.num_positives}) is larger than the bank "
                         f"({n_bank_ok} usable rows)")
    same_id = cfg.exclude_same_id
    if same_id is None:
        same_id = self_mode or (qsrc.has_ids and bsrc.has_ids)
    kc = min(cfg.num_candidates, n_bank_ok)  # a random window past the bank's end is cut
    k_pos = max(cfg.num_positives, 1)
    bq_eff = min(bq, qsrc.n)
    bm_eff = max(min(bm, bsrc.n), kc, k_pos)
    check_block_sizes(bq_eff, bm_eff)
    return Inputs(qsrc, bsrc, self_mode, qscan, bscan, bool(same_id), kc, k_pos, bq_eff, bm_eff)


def graph_specs(cfg: MineConfig, dtype: str) -> List[GraphSpec]:
    """One graph (``both``) when the negative band does not depend on the positives,
    else two passes: ``pos`` (positives first), then ``neg`` with the band."""
    mk = "l2" if cfg.metric == "l2" else "dot"
    easy = cfg.easiest_positive or (cfg.needs_positive and cfg.positive_ref == "easiest")
    if cfg.needs_positive:
        return [GraphSpec("pos", mk, easy=easy, dtype=dtype),
                GraphSpec("neg", mk, band=True, dtype=dtype)]
    return [GraphSpec("both", mk, band=cfg.has_band, easy=easy, dtype=dtype)]


def run_state(cfg: MineConfig, dtype: str, inp: Inputs) -> dict:
    return {
        "config": cfg.to_json(), "dtype": dtype,
        "queries": inp.qsrc.describe(), "bank": None if inp.self_mode else inp.bsrc.describe(),
        "exclude_same_id": bool(inp.same_id),
        "data": [inp.qscan.digest, inp.bscan.digest],
    }


def prepare_out_dir(out_dir: Path, state: dict, overwrite: bool, work_dir: Path) -> None:
    """Refuse (or with ``overwrite`` discard) results of a different run; write the
    run's state file; create ``work_dir`` (the engine's partial results)."""
    fp = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    state["fingerprint"] = fp
    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        old = json.loads(state_path.read_text())
        if old.get("fingerprint") != fp:
            if not overwrite:
                raise ValueError(
                    f"{out_dir} holds results of a different run (configuration, inputs or "
                    "shard size differ); pass overwrite=True (--overwrite) to discard them, or "
                    "choose another out_dir")
            shutil.rmtree(work_dir, ignore_errors=True)
            for f in ("mined.parquet",):
                (out_dir / f).unlink(missing_ok=True)
    elif overwrite:
        shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    out_mod.write_json(state, state_path)


def finish_outputs(cfg: MineConfig, inp: Inputs, out_dir: Path, mined: Path,
                   formats: List[str], plot: bool, engine_info: dict, t_start: float,
                   mine_seconds: float, queries_per_second: Optional[float]) -> MineResult:
    """Flat files, excluded.json, the plot and summary.json from ``mined.parquet``."""
    qsrc, bsrc, qscan, bscan = inp.qsrc, inp.bsrc, inp.qscan, inp.bscan
    files = {"mined": mined}
    for f in formats:
        p = out_dir / f"{f}.parquet"
        out_mod.write_flat(f, mined, p, cfg.k)
        files[f] = p
    sc = out_mod.collect_scores(mined)
    excluded_full = {
        "queries": {"nonfinite_embedding": qscan.ids[qscan.nonfinite].tolist(),
                    "missing_label": qscan.ids[qscan.missing_label].tolist()},
    }
    if not inp.self_mode:
        excluded_full["bank"] = {"nonfinite_embedding": bscan.ids[bscan.nonfinite].tolist(),
                                 "missing_label": bscan.ids[bscan.missing_label].tolist()}
    ex_path = out_dir / "excluded.json"
    out_mod.write_json(excluded_full, ex_path)
    files["excluded"] = ex_path
    if plot:
        pp = out_mod.plot_scores(cfg, sc, out_dir / "scores.png")
        if pp is not None:
            files["plot"] = pp
    files["summary"] = out_dir / "summary.json"
    extra = {
        "inputs": {"queries": qsrc.describe(), "bank": "queries (self-mining)" if inp.self_mode
                   else bsrc.describe(), "exclude_same_id": bool(inp.same_id)},
        "engine": engine_info,
        "timing": {"total_seconds": round(time.time() - t_start, 3),
                   "mining_seconds": round(mine_seconds, 3),
                   "queries_per_second": queries_per_second},
        "files": {k_: str(v) for k_, v in files.items()},
    }
    summary = out_mod.build_summary(cfg, sc, excluded_full, extra)
    out_mod.write_json(summary, files["summary"])
    return MineResult(out_dir, mined, files, summary)
