"""``mine()``: hard negatives (and positives) for every query against a large bank."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import output as out_mod
from .config import MineConfig, negative_band
from .engine import (DEFAULT_BLOCKS, BlockRunner, DeviceBlock, check_block_sizes,
                     prepare_block, resolve_device, run_pass, runs, select_window)
from .graphs import GraphSpec
from .progress import Progress
from .sources import SENTINEL, RowBlock, Source, arg_name, open_source

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
    max_norm: float = 0.0  # largest L2 norm of a usable row (float64)


def scan_source(src: Source, block: int, name: str) -> Scan:
    """One streaming pass: find rows with NaN/inf embeddings or missing labels."""
    valid = np.zeros(src.n, dtype=bool)
    ids = np.zeros(src.n, dtype=np.int64)
    labels = np.zeros(src.n, dtype=np.int64)
    nonfinite, missing = [], []
    max_norm = 0.0
    h = hashlib.blake2b(digest_size=16)
    for s in range(0, src.n, block):
        e = min(src.n, s + block)
        blk = src.read(s, e)
        if blk.emb.shape[1] != src.dim:
            raise ValueError(f"{name}: rows {s}..{e} have width {blk.emb.shape[1]}, expected {src.dim}")
        fin = np.isfinite(blk.emb).all(axis=1)
        ok = fin & blk.label_ok
        if ok.any():  # excluded rows are never scored: they do not bound the dtype
            e64 = blk.emb[ok].astype(np.float64)
            max_norm = max(max_norm, float(np.sqrt(np.einsum("ij,ij->i", e64, e64).max())))
        if np.any(blk.labels[blk.label_ok] == SENTINEL):
            raise ValueError(f"{name}: label {SENTINEL} is reserved (used for padding)")
        valid[s:e] = ok
        for a in (blk.emb, blk.labels, blk.label_ok, blk.ids):
            h.update(np.ascontiguousarray(a).tobytes())
        ids[s:e] = blk.ids
        labels[s:e] = np.where(blk.label_ok, blk.labels, 0)
        nonfinite.append(np.flatnonzero(~fin) + s)
        missing.append(np.flatnonzero(fin & ~blk.label_ok) + s)
    cat = lambda xs: np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, np.int64)
    return Scan(valid, cat(nonfinite), cat(missing), ids, labels, h.hexdigest(), max_norm)


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
         id_column: Optional[str] = None, engine: str = "local",
         ray_address: Optional[str] = None,
         num_actors: Optional[int] = None, num_gpus_per_actor: float = 0,
         num_cpus_per_actor: Optional[float] = None, bank_shards: int = 1,
         max_retries: int = 3, positives: str = "auto") -> MineResult:
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
        overwrite: discard the outputs of an earlier run with a different configuration
            or inputs (and partial results that cannot be checked); without it such a
            folder is refused. Other files are never deleted.
        progress: progress bar with throughput on stderr.
        plot: write ``scores.png``.
        embedding_column, label_column, id_column: Parquet column names. ``id_column=None``
            reads a column ``id`` where the files have one (else ids are row numbers; in
            some files only: an error); a column named explicitly must be in every file;
            ``""`` ignores any id column (ids are row numbers).
        engine: ``"local"`` (this process, the default) or ``"ray"``: the same mining on
            a Ray cluster (needs ``pip install exportminers[ray]``); see
            :func:`exportminers.pipeline.ray_engine.mine_ray` for ``ray_address``,
            ``num_actors``, ``num_gpus_per_actor``, ``num_cpus_per_actor``,
            ``bank_shards`` and ``max_retries`` (Ray engine only). With
            ``engine="ray"``, ``shard_size`` is the number of queries per Ray batch.
        positives: where the local engine finds positives: ``"graph"`` (masked passes
            over every score block), ``"host"`` (only the same-label pairs, scored on the
            host beside the device's work) or ``"auto"`` (the default: the host when the
            same-label pairs are a small share of the score matrix, see
            :data:`HOST_POSITIVE_SHARE`). In float32 the results are the same either
            way (a positive's score may differ in its last bit: the sum runs in another
            order); in float16 a positive's score can be one float16 step away from the
            graph's, which can change a few positives or band-filtered negatives.

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
    check_positives(positives)
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
            bank_shards=bank_shards, max_retries=max_retries, positives=positives,
            _t_start=t_start)
    ray_only = dict(ray_address=(ray_address, None), num_actors=(num_actors, None),
                    num_gpus_per_actor=(num_gpus_per_actor, 0),
                    num_cpus_per_actor=(num_cpus_per_actor, None),
                    bank_shards=(bank_shards, 1), max_retries=(max_retries, 3))
    for name, (value, default) in ray_only.items():
        if value != default:
            raise ValueError(f"{name} applies to engine='ray' only (got {name}={value!r} with "
                             "engine='local')")
    formats = check_formats(formats, cfg)
    check_engine_numbers(threads=threads, bank_cache_gb=bank_cache_gb)
    device = resolve_device(device)
    dtype_given = dtype is not None
    dtype, np_dtype = resolve_dtype(dtype, device, cfg)
    bq, bm = _parse_block(block_size, device)
    check_block_sizes(bq, bm)
    check_out_dir(out_dir)

    # ---- inputs
    inp = open_inputs(queries, labels, ids, bank, bank_labels, bank_ids, cfg, bq, bm,
                      embedding_column=embedding_column, label_column=label_column,
                      id_column=id_column)
    check_out_vs_inputs(out_dir, inp)
    dtype, np_dtype = fit_dtype(cfg, inp, dtype, dtype_given)
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

    plan = plan_labels(positives, cfg, dtype, inp, device)
    host_pos, specs, pos_kind = plan.host_pos, plan.specs, plan.pos_kind
    runners = [BlockRunner(s, device, threads) for s in specs]
    passes = 2 if cfg.needs_positive else 1

    # ---- output folder and resume state
    out_dir = Path(out_dir)
    shard_dir = out_dir / SHARD_DIR
    state = run_state(cfg, dtype, inp)
    state["shard_size"] = shard_size
    # a resumed run must find positives (and apply the label mask) the same way: in
    # float16 the two ways can round a score one step apart
    state["labels_on_host"] = plan.info()
    prepare_out_dir(out_dir, state, overwrite, shard_dir)
    shard_paths = [shard_dir / f"part-{i:05d}.parquet" for i in range(n_shards)]
    for p in shard_dir.glob("*.tmp"):
        p.unlink()  # partial writes of a killed run
    todo = [i for i in range(n_shards)
            if not _shard_done(shard_paths[i], i * shard_size, min(qsrc.n, (i + 1) * shard_size))]

    # ---- bank blocks (cached on the device when small enough)
    cache_gb = bank_cache_gb if bank_cache_gb is not None else (4.0 if device == "cuda" else 1.0)
    n_bank_blocks = -(-bsrc.n // bm_eff)
    bank_bytes = n_bank_blocks * bm_eff * bsrc.dim * np_dtype.itemsize
    cache_bank = bank_bytes <= cache_gb * 2 ** 30 and (len(todo) * passes > 1)
    bank_cache: List[DeviceBlock] = []

    def bank_blocks(upload: bool = True) -> Iterator[DeviceBlock]:
        """The bank's blocks; ``upload=False``: host arrays only (a pass that runs no
        graph), unless they are being cached for the next pass."""
        if bank_cache:
            yield from bank_cache
            return
        for s in range(0, bsrc.n, bm_eff):
            e = min(bsrc.n, s + bm_eff)
            db = prepare_block(runners[0] if upload or cache_bank else None, "m",
                               inp.keyed(bsrc.read(s, e), s), bscan.valid[s:e],
                               s, bm_eff, cfg.metric, np_dtype, same_id)
            if cache_bank:
                bank_cache.append(db)
            yield db

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
            qblocks.append(prepare_block(runners[0], "q", inp.keyed(qsrc.read(b0, b1), b0),
                                         qscan.valid[b0:b1], b0, bq_eff, cfg.metric, np_dtype,
                                         same_id))
        nrows = s1 - s0
        tick = lambda n_bank_rows, _n=nrows: prog.update(_n * n_bank_rows)
        hp = pos_kind if host_pos else None
        if cfg.needs_positive:
            r1 = run_pass(None if host_pos else runners[0], qblocks,
                          bank_blocks(upload=not host_pos), nrows, kc, k_pos, np_dtype,
                          on_bank_block=tick, host_pos=hp)
            ref = r1.epos if cfg.positive_ref == "easiest" else r1.hpos
            pos_c = ref.c[:, 0].copy()
            pos_c[~np.isfinite(pos_c)] = np.nan
            band = negative_band(cfg, pos_c, nrows)
            r2 = run_pass(runners[-1], qblocks, bank_blocks(), nrows, kc, k_pos, np_dtype,
                          band=band, on_bank_block=tick)
            neg, hpos, epos = r2.neg, r1.hpos, r1.epos
        else:
            band = negative_band(cfg, None, nrows) if cfg.has_band else None
            r = run_pass(runners[0], qblocks, bank_blocks(), nrows, kc, k_pos, np_dtype,
                         band=band, on_bank_block=tick, host_pos=hp)
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
                   "graphs": [s.filename for s in specs],
                   **plan.info(), "shards": n_shards,
                   "shards_run_now": len(todo), "shard_size": shard_size,
                   "bank_cached_on_device": bool(cache_bank)}
    qps = round(todo_rows / mine_seconds, 1) if todo and mine_seconds > 0 else None
    return finish_outputs(cfg, inp, out_dir, mined, formats, plot, engine_info, t_start,
                          mine_seconds, qps)


def _shard_done(path: Path, start: int, stop: int) -> bool:
    """Whether the shard file of queries ``start..stop`` holds them all, read in full. A
    damaged one (or one of other rows) is deleted with a warning: it is mined again."""
    if not path.is_file():
        return False
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        qi = pq.read_table(path).column("query_index").to_numpy()
        if np.array_equal(qi, np.arange(start, stop, dtype=np.int64)):
            return True
        why = f"it holds other queries than {start}..{stop - 1}"
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        why = f"damaged: {str(e).strip()[:200]}"
    warnings.warn(f"deleting shard {path} ({why}); its queries are mined again",
                  RuntimeWarning, stacklevel=3)
    path.unlink()
    return False


# --------------------------------------------------------------------------- shared steps
# (used by the local engine above and by the Ray engine in ray_engine.py)

def check_formats(formats, cfg: Optional[MineConfig] = None) -> List[str]:
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = list(formats or [])
    for f in formats:
        if f not in out_mod.FORMATS:
            raise ValueError(f"formats (--format): unknown format {f!r}; choose from "
                             f"{list(out_mod.FORMATS)} (or none)")
    if cfg is not None and cfg.num_positives == 0:
        need = [f for f in formats if f in ("triplets", "ntuples")]
        if need:
            raise ValueError(
                f"formats (--format) {', '.join(need)} need a positive per query, but "
                "num_positives=0 (--num-positives 0) reports none, so the file(s) would be "
                "empty; use num_positives >= 1, or formats 'pairs' / none (--format pairs, "
                "--format none)")
    return formats


def check_engine_numbers(threads=None, bank_cache_gb=None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(
            threads, (int, np.integer)) or threads < 1):
        raise ValueError(f"threads (--threads) must be an integer >= 1, got {threads!r}")
    if bank_cache_gb is not None and (isinstance(bank_cache_gb, bool) or not isinstance(
            bank_cache_gb, (int, float, np.integer, np.floating))
            or not np.isfinite(bank_cache_gb) or bank_cache_gb < 0):
        raise ValueError(f"bank_cache_gb (--bank-cache-gb) must be a finite number >= 0, "
                         f"got {bank_cache_gb!r}")


def check_out_vs_inputs(out_dir, inp: "Inputs") -> None:
    """Refuse an ``out_dir`` whose outputs would replace an input file, or that lies in an
    input folder (a rerun would read the outputs as input)."""
    out = Path(out_dir).resolve()
    produced = {out / f for f in OUTPUT_FILES + (STATE_FILE,)}
    work = [out / d for d in WORK_DIRS]
    for side, src in (("queries", inp.qsrc), ("bank", inp.bsrc)):
        what = arg_name(side, "data")
        if src.root is not None:   # every folder the scan walked, linked ones included
            for folder in sorted(src.folders or {os.path.realpath(src.root)}):
                root = Path(folder)
                if out == root or root in out.parents:
                    inside = out.relative_to(root).parts
                    if not any(part.startswith((".", "_")) for part in inside):
                        raise ValueError(
                            f"out_dir (-o/--out): {out_dir} is "
                            f"{'the' if not inside else 'inside the'} input folder {src.root}"
                            + ("" if root == src.root.resolve() else f" (through {root})")
                            + f" ({what}): the outputs would be read as input by a rerun; "
                            "choose an out_dir outside it (or a subfolder whose name starts "
                            "with '_', which input folders skip)")
        for f in src.paths:
            fr = Path(f).resolve()
            if fr in produced or any(w == fr or w in fr.parents for w in work):
                raise ValueError(f"out_dir (-o/--out): the input {f} ({what}) is a file this "
                                 f"run writes in {out_dir}; choose another out_dir")


def check_out_dir(out_dir) -> None:
    """Fail early (before reading any input) when ``out_dir`` cannot be a writable folder."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ValueError(f"out_dir (-o/--out) must be a path, got {type(out_dir).__name__}")
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"out_dir (-o/--out): {p} exists and is not a folder")
    probe = p
    while not probe.exists():  # nearest existing ancestor: the folder is created in it
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"out_dir (-o/--out): cannot create {p}: {probe} is a file, not a folder")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir (-o/--out): {probe} is not writable (permission denied)"
                         + ("" if probe == p else f"; cannot create {p}"))


# dtype range: scores must stay below half the dtype's maximum (room for rounding)
def fit_dtype(cfg: MineConfig, inp: "Inputs", dtype: str, given: bool):
    """Check that no score (nor any partial sum of one) can overflow ``dtype``: for dot,
    |q.m| <= |q| |m|; for l2, every term of |q|^2 + |m|^2 - 2 q.m is below (|q| + |m|)^2.
    A default float16 that cannot hold them becomes float32 (with a warning); an explicit
    dtype that cannot is an error. Returns ``(dtype, np.dtype)``."""
    if cfg.metric == "cosine":  # rows are normalised: |score| <= 1
        return dtype, np.dtype(dtype)
    nq, nm = inp.qscan.max_norm, inp.bscan.max_norm
    bound = (nq + nm) ** 2 if cfg.metric == "l2" else max(nq * nm, nq, nm)

    def limit(dt):
        return 0.5 * float(np.finfo(dt).max)

    if bound <= limit(dtype):
        return dtype, np.dtype(dtype)
    what = ("squared distances" if cfg.metric == "l2" else "dot products")
    why = (f"{cfg.metric} scores of these embeddings can reach {bound:.3g} ({what}; largest "
           f"row norm: queries {nq:.3g}, bank {nm:.3g}), more than {dtype} holds safely "
           f"({limit(dtype):.3g}, half its maximum): scores would overflow to inf")
    if dtype == "float16" and not given and bound <= limit("float32"):
        warnings.warn(f"computing in float32 instead of the default float16: {why}",
                      RuntimeWarning, stacklevel=3)
        return "float32", np.dtype("float32")
    fix = ("use dtype='float32' (--dtype float32), or " if dtype == "float16" else "")
    raise ValueError(f"dtype {dtype}{' (--dtype)' if given else ''}: {why}; {fix}scale the "
                     "embeddings down or "
                     "normalise them (metric='cosine', --metric cosine)")


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
    id_key: str = "ids"  # what same-id exclusion compares: "ids", or "rows" (the row itself)

    def keyed(self, blk, start: int):
        """``blk`` (rows ``start``...) with the ids the block graph compares: the row
        numbers when only the row itself is excluded (self-mining without same-id)."""
        if self.id_key != "rows":
            return blk
        return RowBlock(blk.emb, blk.labels, blk.label_ok,
                        np.arange(start, start + len(blk.labels), dtype=np.int64))


def _warn_duplicate_ids(scan: Scan, side: str) -> int:
    """Warn (count and examples) when ids repeat; returns the number of repeated rows."""
    ids = scan.ids
    if len(ids) < 2:
        return 0
    u, counts = np.unique(ids, return_counts=True)
    dup = u[counts > 1]
    if not len(dup):
        return 0
    rows = int(counts[counts > 1].sum())
    warnings.warn(
        f"{side}: {len(dup):,} id(s) occur more than once ({rows:,} rows), e.g. "
        f"{dup[:10].tolist()}: same-id exclusion drops every bank row sharing a query's id, "
        "not just the row itself (pass exclude_same_id=False / --no-exclude-same-id to "
        "compare rows, or give unique ids)", RuntimeWarning, stacklevel=4)
    return rows


def open_inputs(queries, labels, ids, bank, bank_labels, bank_ids, cfg: MineConfig,
                bq: int, bm: int, **cols) -> Inputs:
    """Open both sides, scan them for bad rows and check the configuration fits."""
    if bank is None:
        for arg, v in (("bank_labels", bank_labels), ("bank_ids", bank_ids)):
            if v is not None:
                raise ValueError(f"{arg_name('bank', arg[5:])} needs bank (--bank); without a "
                                 "bank the queries are mined against themselves")
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
        raise ValueError("queries: embeddings have width 0 (every embedding is empty or null)")
    scan_block = max(bq, min(bm, 65536))
    qscan = scan_source(qsrc, scan_block, "queries")
    bscan = qscan if self_mode else scan_source(bsrc, scan_block, "bank")
    n_bank_ok = int(bscan.valid.sum())
    if n_bank_ok == 0:
        raise ValueError("bank: every row is excluded (NaN/inf embeddings or missing labels)")
    # self-mining: a query is never its own candidate, so it sees one row fewer
    n_cand = n_bank_ok - 1 if self_mode else n_bank_ok
    if cfg.range_min + cfg.k > n_cand:
        raise ValueError(
            f"k (-k) is larger than the bank: each query needs range_min + k = "
            f"{cfg.range_min} + {cfg.k} ranked candidates but the bank has {n_bank_ok} "
            "usable rows" + (" (each query has the other rows only)" if self_mode else ""))
    if cfg.num_positives > n_cand:
        raise ValueError(f"num_positives (--num-positives) ({cfg.num_positives}) is larger than "
                         f"the bank ({n_cand} usable rows per query)")
    same_id = cfg.exclude_same_id
    if same_id is None:
        same_id = self_mode or (qsrc.has_ids and bsrc.has_ids)
    id_key = "ids"
    if same_id:
        _warn_duplicate_ids(qscan, "queries")
        if not self_mode:
            _warn_duplicate_ids(bscan, "bank")
    elif self_mode:  # a row is never its own positive or negative, whatever the ids
        same_id, id_key = True, "rows"
    _warn_degenerate_labels(qscan, bscan, cfg)
    kc = min(cfg.num_candidates, n_bank_ok)  # a random window past the bank's end is cut
    k_pos = max(cfg.num_positives, 1)
    # at least 2 rows a block: with one, ONNX Runtime's MatMul takes a matrix-vector
    # kernel that rounds differently, and scores would depend on the block size. A bank
    # block narrower than k is fine: its TopKs return every column.
    bq_eff = max(min(bq, qsrc.n), 2)
    bm_eff = max(min(bm, bsrc.n), 2)
    check_block_sizes(bq_eff, bm_eff)
    return Inputs(qsrc, bsrc, self_mode, qscan, bscan, bool(same_id), kc, k_pos, bq_eff, bm_eff,
                  id_key)


def _warn_degenerate_labels(qscan: Scan, bscan: Scan, cfg: MineConfig) -> None:
    """Warn when the labels leave no query a negative, or no query a positive."""
    ql = np.unique(qscan.labels[qscan.valid])
    bl, bcount = np.unique(bscan.labels[bscan.valid], return_counts=True)
    if len(ql) and len(bl) == 1 and np.array_equal(ql, bl):
        warnings.warn(f"every usable row has the same label ({bl[0]}): there are no "
                      "negatives to mine", RuntimeWarning, stacklevel=4)
    elif (cfg.num_positives or cfg.needs_positive) and len(ql) and bscan is qscan \
            and bcount.max() == 1:
        warnings.warn("every usable row has a label of its own: no query has a positive "
                      "(status no_positive)", RuntimeWarning, stacklevel=4)


def graph_specs(cfg: MineConfig, dtype: str, host_pos: bool = False, unmasked: bool = False):
    """The block graphs a run needs, and (metric kind, easiest too) for the positives.

    One graph (``both``) when the negative band does not depend on the positives, else
    two passes: ``pos`` (positives first), then ``neg`` with the band. With positives on
    the host (``host_pos``) the graphs find negatives only: ``neg``, or no graph for the
    positives' pass; ``unmasked``: negatives graphs that leave the label mask to the
    host (with host positives only)."""
    mk = "l2" if cfg.metric == "l2" else "dot"
    easy = cfg.easiest_positive or (cfg.needs_positive and cfg.positive_ref == "easiest")
    mask = not (host_pos and unmasked)
    if cfg.needs_positive:
        neg = [GraphSpec("neg", mk, band=True, dtype=dtype, label_mask=mask)]
        return (neg if host_pos else [GraphSpec("pos", mk, easy=easy, dtype=dtype)] + neg), (mk, easy)
    if host_pos:
        return [GraphSpec("neg", mk, band=cfg.has_band, dtype=dtype, label_mask=mask)], (mk, easy)
    return [GraphSpec("both", mk, band=cfg.has_band, easy=easy, dtype=dtype)], (mk, easy)


# positives="auto" scores the positives on the host when the same-label pairs are at
# most this share of the query x bank score matrix. The host costs a gather and a d-wide
# dot per pair (about 75 ns at d = 128 on the 2-core dev machine); the graph's masked
# passes cost every element of the matrix. CPU, measured with benchmarks/bench_pipeline.py
# (Q = 2,048 x M = 131,072, float32, blocks 1024 x 8192): host faster at a share of 1/100
# (0.78 vs 1.17 s), slower at 1/20 (1.55 vs 1.02 s). CUDA, estimated from the H100's
# per-pass times (not yet measured): the host work runs beside the device's and stays
# hidden while it is under the negatives graph's ~11 ms per 4096 x 262144 block pair,
# i.e. up to a share of about 1/7000.
HOST_POSITIVE_SHARE = {"cpu": 1 / 64, "cuda": 1 / 8192}


def _bank_rows_per_label(qlabels: np.ndarray, bscan: "Scan") -> np.ndarray:
    """For each of ``qlabels``: how many usable bank rows carry it."""
    return runs(np.sort(bscan.labels[bscan.valid]), qlabels)[1]


def same_label_pairs(qscan: "Scan", bscan: "Scan") -> int:
    """How many (usable query, usable bank row) pairs share a label."""
    return int(_bank_rows_per_label(qscan.labels[qscan.valid], bscan).sum())


# With positives on the host, the negatives graph also leaves the label mask to the host
# (a MatMul and a TopK, no Equal / Where passes over the score block) when the TopK then
# needs at most this many candidates: k + the most bank rows of any query label. ONNX
# Runtime's CPU TopK grows with k (1024 x 8192 block: 2.8 ms at k = 11, 6.6 ms at 40,
# against 7.3 ms for the Equal and Where it saves); its CUDA TopK (radix select) barely
# does up to thousands.
UNMASKED_MAX_K = {"cpu": 40, "cuda": 128}


def largest_query_class(qscan: "Scan", bscan: "Scan") -> int:
    """The most usable bank rows that carry one usable query's label."""
    return int(_bank_rows_per_label(np.unique(qscan.labels[qscan.valid]), bscan).max(initial=0))


def negatives_unmasked(inp: "Inputs", device: str) -> bool:
    return inp.kc + largest_query_class(inp.qscan, inp.bscan) <= UNMASKED_MAX_K[device]


def check_positives(positives) -> None:
    if positives not in ("auto", "graph", "host"):
        raise ValueError(f"positives must be 'auto', 'graph' or 'host', got {positives!r}")


class LabelPlan(NamedTuple):
    """Where a run handles labels, and the block graphs that follows from it."""
    host_pos: bool          # positives scored on the host from same-label pairs
    unmasked: bool          # the negatives' label mask applied on the host too
    specs: List[GraphSpec]
    pos_kind: Tuple[str, bool]   # (metric kind, easiest positive too)

    def info(self) -> dict:   # for the summary's engine section
        return {"positives": "host" if self.host_pos else "graph",
                "label_mask": "host" if self.unmasked else "graph"}


def plan_labels(positives: str, cfg: MineConfig, dtype: str, inp: "Inputs",
                device: str) -> LabelPlan:
    """``positives`` ('auto' | 'graph' | 'host') resolved for these inputs and device."""
    check_positives(positives)
    host_pos = positives_on_host(positives, inp, device)
    unmasked = host_pos and negatives_unmasked(inp, device)
    return LabelPlan(host_pos, unmasked, *graph_specs(cfg, dtype, host_pos, unmasked))


def positives_on_host(positives: str, inp: "Inputs", device: str) -> bool:
    if positives != "auto":
        return positives == "host"
    nq, nb = int(inp.qscan.valid.sum()), int(inp.bscan.valid.sum())
    return same_label_pairs(inp.qscan, inp.bscan) <= HOST_POSITIVE_SHARE[device] * nq * nb


def run_state(cfg: MineConfig, dtype: str, inp: Inputs) -> dict:
    """What a resumed run must share with the earlier one. The inputs count by content
    (``data``: digests of every row), not by how their paths were spelled."""
    def side(src):
        return {k_: v for k_, v in src.describe().items() if k_ != "name"}

    return {
        "config": cfg.to_json(), "dtype": dtype,
        "queries": side(inp.qsrc), "bank": None if inp.self_mode else side(inp.bsrc),
        "exclude_same_id": bool(inp.same_id), "same_id_key": inp.id_key,
        "data": [inp.qscan.digest, inp.bscan.digest],
    }


OUTPUT_FILES = ("mined.parquet", "summary.json", "excluded.json", "scores.png") + tuple(
    f"{f}.parquet" for f in out_mod.FORMATS)
WORK_DIRS = ("_shards", "_ray_parts")


def _remove_outputs(out_dir: Path, work_dir: Path) -> None:
    """Delete an earlier run's outputs (the files this package writes, and nothing else)."""
    for d in {work_dir.name, *WORK_DIRS}:
        shutil.rmtree(out_dir / d, ignore_errors=True)
    for f in OUTPUT_FILES:
        (out_dir / f).unlink(missing_ok=True)


def prepare_out_dir(out_dir: Path, state: dict, overwrite: bool, work_dir: Path) -> None:
    """Refuse (or with ``overwrite`` discard) results of a different run; write the
    run's state file; create ``work_dir`` (the engine's partial results)."""
    fp = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    state["fingerprint"] = fp
    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        try:
            old = json.loads(state_path.read_text())
            old_fp = old.get("fingerprint") if isinstance(old, dict) else None
            damaged = not isinstance(old_fp, str)
        except (OSError, UnicodeDecodeError, ValueError):
            old_fp, damaged = None, True
        if old_fp != fp:
            if not overwrite:
                why = (f"its run state file {state_path} is damaged" if damaged else
                       f"{out_dir} holds results of a different run (configuration, inputs "
                       "or shard size differ)")
                raise ValueError(
                    f"out_dir (-o/--out): {why}; pass overwrite=True (--overwrite) to discard "
                    "the earlier run's outputs, or choose another out_dir")
            _remove_outputs(out_dir, work_dir)
    else:
        # no state file: no earlier run of this package to resume or discard; partial
        # results without one cannot be checked, and other files are never deleted
        stale = [d for d in {work_dir.name, *WORK_DIRS}
                 if (out_dir / d).is_dir() and any((out_dir / d).iterdir())]
        if stale and not overwrite:
            raise ValueError(
                f"out_dir (-o/--out): {out_dir} holds partial results "
                f"({', '.join(sorted(stale))}) but no run state file ({STATE_FILE}), so they "
                "cannot be checked against this run; pass overwrite=True (--overwrite) to "
                "discard them, or choose another out_dir")
        for d in stale:
            shutil.rmtree(out_dir / d, ignore_errors=True)
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir (-o/--out): cannot create {work_dir} ({e})") from None
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
        else:
            warnings.warn("scores.png not written: matplotlib is not installed (pip install "
                          "matplotlib, or the 'pipeline' extra); --no-plot / plot=False "
                          "skips the plot without this warning", stacklevel=2)
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
