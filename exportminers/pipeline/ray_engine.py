"""The mining pipeline on a Ray cluster: ``mine(..., engine="ray")``.

Same inputs, configuration, outputs and results as the local engine
(:func:`exportminers.pipeline.mine`); the work is spread over a Ray cluster with
Ray Data:

- The driver opens and scans the inputs exactly as the local engine does (bad rows,
  content digest, the run's state file), so ``excluded.json``, the statuses and the
  resume guard are the same.
- The bank is cut into ``bank_shards`` contiguous shards at bank-block boundaries;
  each shard goes into the object store once (``ray.put``).
- The queries are a Ray Dataset of row ranges (one per batch of ``batch_size``
  queries); a read task turns each range into a batch with the package's readers
  (Parquet row groups, memory-mapped ``.npy``, or arrays from the object store), so
  every row keeps its ``query_index`` (the random sampler and the output are keyed by
  it).
- One ``map_batches`` actor pool per bank shard (``concurrency`` = its replicas,
  ``num_gpus`` / ``num_cpus`` per actor): each actor builds an ONNX Runtime session
  (CUDA EP when it has a GPU) and prepares its shard's bank blocks once, at start.
  A batch flows through the shard pools in turn; each runs the local engine's
  :func:`~exportminers.pipeline.engine.run_pass` over its shard and merges the result
  into the batch's running per-query lists with the same order the local engine uses
  (closeness, then lower bank row). The global top-k is within the union of the
  shards' top-k, so the merge is exact.
- Configurations whose negative filters depend on the positive (semihard,
  multisimilarity, ``margin_pos``, ``perc_pos``) run the local engine's two passes as
  two Ray executions: positives over every shard first (collected on the driver, each
  query checked exactly once), then negatives with each query's band.
- A final task applies the local engine's selection
  (:func:`~exportminers.pipeline.engine.select_window`) and table builder
  (:func:`~exportminers.pipeline.output.shard_table`) and writes the batch's rows as
  one part file in ``out_dir/_ray_parts`` (under a temporary name, renamed when
  complete; named after the batch's set of ``query_index`` values); only row counts
  come back to the driver. The driver checks that every query is there exactly once
  and joins the parts into ``mined.parquet`` in query order, then writes the flat
  files, ``summary.json`` and the plot with the local engine's code.

Failures: actors are restarted (``max_restarts``) and their tasks retried
(``max_task_retries``), exceptions raised by a batch are retried in place
(``DataContext.retried_map_errors`` / ``max_map_retries``), read and write tasks are
retried (``max_retries``). Every step is deterministic and keyed by query index, so a
retried batch produces the same rows, and the final assembly keeps one row per query.

Resume: a run that dies (driver or cluster killed) leaves its finished part files. A
rerun with the same state fingerprint (configuration, inputs, dtype: the local
engine's guard) keeps them, deletes ``*.tmp`` leftovers and damaged parts (with a
warning), and mines only the missing queries: its ranges are the missing indices'
contiguous runs, cut at the batches, and a two-pass configuration runs both passes on
those ranges only. When nothing is missing, Ray is not started at all.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import output as out_mod
from .config import F32, MineConfig, negative_band
from .engine import (IDX_MAX, BlockRunner, check_block_sizes, prepare_block,
                     run_pass, select_window)
from .graphs import GraphSpec
from .mine import (MineResult, _parse_block, check_engine_numbers, check_formats,
                   check_out_dir, check_out_vs_inputs, finish_outputs, fit_dtype,
                   open_inputs, plan_labels,
                   prepare_out_dir, resolve_dtype, run_state)
from .sources import RowBlock, Source, open_source

FAULT_ENV = "EXPORTMINERS_RAY_FAULT"  # test hook: "raise|exit|hang:QUERY_INDEX:MARKER_FILE"
PARTS_DIR = "_ray_parts"
TASK_CPUS = 0.1  # read / finalize tasks: light numpy and I/O work


def import_ray():
    """Import Ray Data, or raise an ImportError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "engine='ray' (--engine ray) needs Ray Data, which is not installed: "
            "pip install 'exportminers[ray]'  (or: pip install 'ray[data]>=2.9')") from e
    return ray


# --------------------------------------------------------------------------- worker side

_SOURCES: Dict[str, Source] = {}


def _open_side(spec: dict) -> Source:
    """Reopen an input on a worker (cached per worker process)."""
    src = _SOURCES.get(spec["key"])
    if src is None:
        import ray

        def val(v):
            if v is None:
                return None
            kind, x = v
            return ray.get(x) if kind == "ref" else x

        src = open_source(val(spec["data"]), val(spec["labels"]), val(spec["ids"]),
                          name=spec["name"], **spec["cols"])
        if len(_SOURCES) > 4:
            _SOURCES.clear()
        _SOURCES[spec["key"]] = src
    return src


def _empty_lists(n: int, k: int, largest: bool):
    fill = -np.inf if largest else np.inf
    return (np.full((n, k), fill, F32), np.full((n, k), IDX_MAX, np.int64),
            np.zeros((n, k), np.int64))


def _read_queries(batch, *, spec: dict, cfg: dict, kinds: Sequence[str], kc: int, k_pos: int,
                  positives: Optional[list] = None):
    """Read task: a row range -> a batch of queries with empty running candidate lists
    (``kinds``: which lists the pass fills) and, where needed, each query's band."""
    cfg = MineConfig(**cfg)
    src = _open_side(spec)
    parts = [src.read(int(s), int(e)) for s, e in zip(batch["start"], batch["stop"])]
    rows = np.concatenate([np.arange(int(s), int(e), dtype=np.int64)
                           for s, e in zip(batch["start"], batch["stop"])])
    blk = parts[0] if len(parts) == 1 else RowBlock(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("emb", "labels", "label_ok", "ids")))
    n = len(rows)
    out = {"query_index": rows, "emb": np.ascontiguousarray(blk.emb, dtype=F32),
           "label": blk.labels.astype(np.int64), "label_ok": blk.label_ok.astype(bool),
           "finite": np.isfinite(blk.emb).all(axis=1), "qid": blk.ids.astype(np.int64)}
    sizes = {"neg": (kc, True), "hpos": (k_pos, False), "epos": (1, True)}
    for kind in kinds:
        c, i, d = _empty_lists(n, *sizes[kind])
        out[kind + "_c"], out[kind + "_i"], out[kind + "_id"] = c, i, d
    if positives is not None:  # second pass: the positives found by the first one
        import ray

        pos = ray.get(positives[0])
        for name, arr in pos.items():
            out[name] = arr[rows]
        ref = out["epos_c"] if cfg.positive_ref == "easiest" else out["hpos_c"]
        pos_c = ref[:, 0].copy()
        pos_c[~np.isfinite(pos_c)] = np.nan
        out["band_lo"], out["band_hi"] = negative_band(cfg, pos_c, n)
    elif cfg.has_band and "neg" in kinds:
        out["band_lo"], out["band_hi"] = negative_band(cfg, None, n)
    return out


def _merge_with_ids(c_run, i_run, d_run, c_new, i_new, d_new, k: int, largest: bool):
    """:func:`exportminers.pipeline.engine.merge_topk` (same order: closeness, then
    lower bank row) carrying each candidate's bank id along."""
    c = np.concatenate([c_run, c_new], axis=1)
    i = np.concatenate([i_run, i_new], axis=1)
    d = np.concatenate([d_run, d_new], axis=1)
    key = -c if largest else c
    order = np.lexsort((i, key), axis=1)[:, :k]
    return (np.take_along_axis(c, order, 1), np.take_along_axis(i, order, 1),
            np.take_along_axis(d, order, 1))


def _inject_fault(fault: Optional[str], rows: np.ndarray, modes: Sequence[str]) -> None:
    """Test hook (``FAULT_ENV`` = ``MODE:QUERY_INDEX:MARKER_FILE``), once per marker file,
    for the batch holding that query: ``raise`` fails it and ``exit`` kills its actor (in
    the shard actors); ``hang`` stalls it before its part file is written (in the part
    writer: a run to kill part-way). ``modes``: the ones this call site handles."""
    if not fault:
        return
    mode, qi, marker = fault.split(":", 2)
    if mode not in modes or int(qi) not in rows:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # failed once already
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    if mode == "exit":
        os._exit(1)  # the actor dies mid-task
    if mode == "hang":
        while True:  # until the run is killed
            time.sleep(60)
    raise RuntimeError(f"injected failure for query {qi} ({FAULT_ENV})")


class _ShardWorker:
    """Actor: one ONNX Runtime session and one bank shard (prepared once); merges the
    shard's candidates into every batch's running lists. ``graph=None``: no session (a
    positives pass scored on the host, ``host_pos``)."""

    def __init__(self, *, graph: Optional[dict], shard: list, offset: int, block_q: int,
                 block_m: int, metric: str, dtype: str, same_id: bool, kc: int, k_pos: int,
                 device: str, threads: Optional[int], fault: Optional[str] = None,
                 id_key: str = "ids", host_pos: Optional[tuple] = None):
        import ray

        from .engine import resolve_device

        self.spec = GraphSpec(**graph) if graph is not None else None
        self.device = resolve_device(device)
        self.runner = BlockRunner(self.spec, self.device, threads) if self.spec else None
        self.host_pos = tuple(host_pos) if host_pos is not None else None
        self.dtype = np.dtype(dtype)
        self.metric, self.same_id = metric, same_id
        self.block_q, self.kc, self.k_pos = block_q, kc, k_pos
        self.fault = fault
        self.id_key = id_key  # "rows": same-id exclusion compares row numbers (self-mining)
        data = ray.get(shard[0])
        n = len(data["labels"])
        self.offset = offset
        self.ids = np.array(data["ids"], dtype=np.int64)  # a copy: do not pin the object
        self.blocks = []
        for a in range(0, n, block_m):
            b = min(n, a + block_m)
            key = (np.arange(offset + a, offset + b, dtype=np.int64) if id_key == "rows"
                   else data["ids"][a:b])
            blk = RowBlock(data["emb"][a:b], data["labels"][a:b], data["label_ok"][a:b], key)
            self.blocks.append(prepare_block(self.runner, "m", blk, data["valid"][a:b],
                                             offset + a, block_m, metric, self.dtype, same_id))
        del data

    def __call__(self, batch: dict) -> dict:
        rows = batch["query_index"]
        _inject_fault(self.fault, rows, ("raise", "exit"))
        n = len(rows)
        valid = batch["finite"] & batch["label_ok"]
        qkey = batch["query_index"] if self.id_key == "rows" else batch["qid"]
        qblocks = []
        for b0 in range(0, n, self.block_q):
            b1 = min(n, b0 + self.block_q)
            blk = RowBlock(batch["emb"][b0:b1], batch["label"][b0:b1], batch["label_ok"][b0:b1],
                           qkey[b0:b1])
            qblocks.append(prepare_block(self.runner, "q", blk, valid[b0:b1], b0, self.block_q,
                                         self.metric, self.dtype, self.same_id))
        band = (batch["band_lo"], batch["band_hi"]) if self.spec and self.spec.band else None
        res = run_pass(self.runner, qblocks, self.blocks, n, self.kc, self.k_pos, self.dtype,
                       band=band, host_pos=self.host_pos)
        out = dict(batch)
        for kind, st in (("neg", res.neg), ("hpos", res.hpos), ("epos", res.epos)):
            if st is None:
                continue
            # ids of this shard's rows; a padding row (which the graphs may return with a
            # finite score for queries they cannot match, e.g. excluded ones) gets 0 and
            # is never reported, as with the local engine
            row = st.i - self.offset
            inside = (st.i != IDX_MAX) & (row >= 0) & (row < len(self.ids))
            d_new = np.where(inside, self.ids[np.where(inside, row, 0)], 0)
            out[kind + "_c"], out[kind + "_i"], out[kind + "_id"] = _merge_with_ids(
                batch[kind + "_c"], batch[kind + "_i"], batch[kind + "_id"], st.c, st.i, d_new,
                st.k, st.largest)
        return out


def _finalize(batch, *, cfg: dict, easy: bool, parts_dir: str, fault: Optional[str] = None):
    """Task: the local engine's selection and per-query table for a batch, written as one
    part file (:func:`write_part`); returns only the number of rows written."""
    rows = batch["query_index"]
    _inject_fault(fault, rows, ("hang",))
    if len(rows):
        write_part(_batch_table(batch, MineConfig(**cfg), easy), Path(parts_dir))
    return {"rows": np.array([len(rows)], np.int64)}


def part_path(parts_dir: Path, query_index: np.ndarray) -> Path:
    """A part file's name, from the set of queries it holds (Ray Data may split or merge
    batches, so it is keyed by ``query_index``, not by input range): a retried batch gets
    its first attempt's name, two different sets of queries never share one."""
    qi = np.unique(np.asarray(query_index, dtype=np.int64))
    digest = hashlib.blake2b(qi.tobytes(), digest_size=6).hexdigest()
    return parts_dir / f"q{qi[0]:010d}-{qi[-1]:010d}-{digest}.parquet"


def write_part(table, parts_dir: Path) -> Path:
    """Write one batch's rows (at least one) under a temporary name unique to this
    attempt and rename it when complete: after a kill, a ``*.parquet`` part is whole or
    absent."""
    import pyarrow.parquet as pq

    final = part_path(parts_dir, table.column("query_index").to_numpy())
    tmp = final.with_name(f"{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, final)
    return final


def _batch_table(batch, cfg: MineConfig, easy: bool):
    """The local engine's selection and per-query table for a batch."""
    rows = batch["query_index"]
    n = len(rows)
    ranks, count = select_window(cfg, batch["neg_c"], rows)
    excl = np.full(n, "", dtype=object)
    excl[~batch["finite"]] = "excluded_nonfinite"
    excl[batch["finite"] & ~batch["label_ok"]] = "excluded_missing_label"
    labels = np.where(batch["label_ok"], batch["label"], 0)
    kinds = ["neg", "hpos"] + (["epos"] if easy else [])
    # a compact bank-id table for the rows this batch refers to
    i_all = np.concatenate([batch[k + "_i"].ravel() for k in kinds])
    d_all = np.concatenate([batch[k + "_id"].ravel() for k in kinds])
    found = i_all != IDX_MAX
    uniq, first = np.unique(i_all[found], return_index=True)
    bank_ids = np.concatenate([d_all[found][first], np.zeros(1, np.int64)])

    def local(i):
        return np.where(i != IDX_MAX, np.searchsorted(uniq, np.where(i != IDX_MAX, i, 0)),
                        len(uniq)).astype(np.int64)

    return out_mod.shard_table(
        cfg, rows, batch["qid"], labels, excl.astype(str), batch["neg_c"],
        local(batch["neg_i"]), ranks, count, batch["hpos_c"], local(batch["hpos_i"]),
        batch["epos_c"] if easy else None, local(batch["epos_i"]) if easy else None, bank_ids)


# --------------------------------------------------------------------------- driver side

def _side_spec(ray, data, labels, ids, name: str, cols: dict) -> dict:
    """How a worker reopens one input: paths (absolute; they must be visible on every
    node, as with ``ray.data.read_parquet``), or arrays / sources via the object store."""

    def one(x):
        if x is None:
            return None
        if isinstance(x, (str, os.PathLike)):
            return ("value", str(Path(x).resolve()))
        if isinstance(x, (list, tuple)) and x and all(isinstance(p, (str, os.PathLike)) for p in x):
            return ("value", [str(Path(p).resolve()) for p in x])
        if isinstance(x, Source):
            return ("ref", ray.put(x))
        return ("ref", ray.put(np.asarray(x)))

    return {"key": uuid.uuid4().hex, "data": one(data), "labels": one(labels), "ids": one(ids),
            "name": name, "cols": cols}


@contextlib.contextmanager
def _data_context(progress: bool, max_retries: int):
    """Ray Data settings for one run (restored afterwards)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    want = {"enable_progress_bars": bool(progress), "print_on_execution_start": bool(progress),
            "enable_auto_log_stats": False}
    if hasattr(ctx, "retried_map_errors"):  # retry a batch's exception in place
        want.update(retried_map_errors=True, max_map_retries=int(max_retries))
    else:  # older Ray: retry the actor task
        want["actor_task_retry_on_errors"] = True
    old = {k: getattr(ctx, k) for k in want if hasattr(ctx, k)}
    for k, v in want.items():
        if hasattr(ctx, k):
            setattr(ctx, k, v)
    logger = logging.getLogger("ray.data")
    level = logger.level
    if not progress:
        logger.setLevel(logging.WARNING)
    try:
        yield ctx
    finally:
        for k, v in old.items():
            setattr(ctx, k, v)
        logger.setLevel(level)


def _map_batches(ds, fn, remote_args: dict, **kw):
    """``ds.map_batches`` with extra Ray remote options (restarts / retries) where this
    Ray version still takes them as keyword arguments; newer versions deprecate (2.60)
    and then drop them, and their defaults (restart and retry system failures) apply."""
    params = inspect.signature(ds.map_batches).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        remote_args = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return ds.map_batches(fn, **kw, **remote_args)


def _check_positive_int(name, v, lo=1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return int(v)


def _expected_schema(cfg: MineConfig, easy: bool, kc: int, k_pos: int):
    """The local engine's table schema (its builder on zero rows)."""
    z = np.zeros(0, np.int64)
    e = lambda k: np.zeros((0, k), F32)  # noqa: E731
    ei = lambda k: np.zeros((0, k), np.int64)  # noqa: E731
    t = out_mod.shard_table(cfg, z, z, z, np.zeros(0, dtype=str), e(kc), ei(kc),
                            ei(cfg.k), z, e(k_pos), ei(k_pos), e(1) if easy else None,
                            ei(1) if easy else None, np.zeros(1, np.int64))
    return t.schema


def assemble_parts(parts_dir: Path, out: Path, n: int, schema) -> int:
    """Join the Ray-written parts into ``out`` in query order; every query must be
    there (else RuntimeError). Returns the number of duplicate rows dropped (a retried
    batch's copies are identical: every step is deterministic)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(parts_dir.glob("*.parquet"))
    seen = np.zeros(n, np.int64)
    infos = []
    for f in files:
        qi = pq.read_table(f, columns=["query_index"]).column(0).to_numpy()
        if not len(qi):
            continue
        if qi.min() < 0 or qi.max() >= n:
            raise RuntimeError(f"ray engine: {f} holds query_index values outside 0..{n - 1}")
        np.add.at(seen, qi, 1)
        infos.append((int(qi.min()), f, qi))
    missing = np.flatnonzero(seen == 0)
    if len(missing):
        raise RuntimeError(
            f"ray engine: {len(missing)} of {n} queries are missing from the output "
            f"(query_index {missing[:10].tolist()}{' ...' if len(missing) > 10 else ''})")
    dups = int((seen - 1).sum())
    infos.sort(key=lambda t: t[0])
    in_order = dups == 0 and all(np.all(np.diff(qi) == 1) for _, _, qi in infos) and all(
        a[2][-1] + 1 == b[2][0] for a, b in zip(infos, infos[1:]))
    tmp = out.with_name(out.name + ".tmp")
    writer = pq.ParquetWriter(tmp, schema)
    try:
        if in_order:  # the usual case: one part per batch, contiguous ranges
            for _, f, _ in infos:
                writer.write_table(pq.read_table(f).cast(schema))
        else:
            t = pa.concat_tables([pq.read_table(f).cast(schema) for _, f, _ in infos])
            qi = t.column("query_index").to_numpy()
            order = np.argsort(qi, kind="stable")
            keep = order[np.concatenate([[True], np.diff(qi[order]) != 0])]
            writer.write_table(t.take(pa.array(keep)))
    finally:
        writer.close()
    os.replace(tmp, out)
    return dups


def reusable_parts(parts_dir: Path, n: int, schema) -> np.ndarray:
    """Which of the ``n`` queries the part files in ``parts_dir`` already hold (a bool
    mask): the complete parts of an earlier run with the same state fingerprint.
    ``*.tmp`` leftovers of a killed run are deleted; so is a part that cannot be read in
    full or is not this run's (schema, query range), with a RuntimeWarning: its queries
    are mined again."""
    import pyarrow as pa

    for tmp in parts_dir.glob("*.tmp"):
        tmp.unlink()
    done = np.zeros(n, bool)
    for f in sorted(parts_dir.glob("*.parquet")):
        try:
            done[_part_query_index(f, n, schema)] = True
        except (OSError, ValueError, pa.ArrowException) as e:
            warnings.warn(f"ray engine: deleting part file {f}, damaged or not this run's "
                          f"({e}); its queries are mined again", RuntimeWarning, stacklevel=3)
            f.unlink()
    return done


def _part_query_index(f: Path, n: int, schema) -> np.ndarray:
    """The ``query_index`` column of the part file ``f``, read in full (a damaged page
    fails here, not in the final assembly); ValueError if it is not this run's."""
    import pyarrow.parquet as pq

    t = pq.read_table(f)
    if not t.schema.equals(schema):
        raise ValueError(f"schema {t.schema.names} differs from this run's")
    qi = t.column("query_index").to_numpy()
    if len(qi) and (qi.min() < 0 or qi.max() >= n):
        raise ValueError(f"query_index values outside 0..{n - 1}")
    return qi


def query_ranges(todo: np.ndarray, batch_rows: int) -> List[Tuple[int, int]]:
    """Row ranges ``[start, stop)`` covering the query indices ``todo`` (sorted, unique):
    its contiguous runs, cut at multiples of ``batch_rows`` (so that a fresh run's
    ranges are its batches and a resumed run's are pieces of them)."""
    todo = np.asarray(todo, dtype=np.int64)
    if not len(todo):
        return []
    cut = np.flatnonzero((np.diff(todo) != 1) | (todo[1:] % batch_rows == 0)) + 1
    starts, stops = np.concatenate([[0], cut]), np.concatenate([cut, [len(todo)]])
    return [(int(todo[a]), int(todo[b - 1]) + 1) for a, b in zip(starts, stops)]


def _gather_positives(ds, todo: np.ndarray, n: int, k_pos: int, kinds: Sequence[str]) -> dict:
    """Run pass 1 and gather its positive lists on the driver, indexed by query; every
    query of ``todo`` (the ones this run mines) must be there exactly once, else
    RuntimeError."""
    sizes = {"hpos": (k_pos, np.inf), "epos": (1, -np.inf)}
    got = {}
    for kind in kinds:
        k, fill = sizes[kind]
        got.update({kind + "_c": np.full((n, k), fill, F32),
                    kind + "_i": np.full((n, k), IDX_MAX, np.int64),
                    kind + "_id": np.zeros((n, k), np.int64)})
    ds = ds.select_columns(["query_index"] + list(got)).materialize()  # small; ends the pass
    seen = np.zeros(n, np.int64)
    for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
        qi = b["query_index"]
        np.add.at(seen, qi, 1)
        for name, arr in got.items():
            arr[qi] = b[name]
    lost = todo[seen[todo] == 0]
    if len(lost):
        raise RuntimeError(f"ray engine: the positive pass lost {len(lost)} of the {len(todo)} "
                           f"queries it ran (query_index {lost[:10].tolist()})")
    return got


CONNECT_TIMEOUT_S = 15.0


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """ConnectionError when ``host:port`` (or ``ray://host:port``) does not accept a TCP
    connection within ``timeout`` seconds: ``ray.init`` would retry it forever."""
    import socket

    addr = address.strip()
    if addr in ("auto", "local") or not addr:
        return
    if "://" in addr:
        addr = addr.split("://", 1)[1]
    addr = addr.split("/", 1)[0]
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"ray_address (--address) must look like HOST:PORT, ray://HOST:PORT or "
                         f"auto, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(
            f"ray_address (--address): cannot reach a Ray cluster at {address!r} ({e}); check "
            "the address and that the cluster is up (ray status)") from None


@contextlib.contextmanager
def _ray_session(ray, ray_address: Optional[str], progress: bool, info: Optional[dict] = None):
    """The Ray instance of one run: the one this process already runs, else
    ``ray_address`` / ``RAY_ADDRESS``, else a new local one (shut down at the end;
    ``info["started_here"]`` is then True)."""
    info = {} if info is None else info
    info["started_here"] = False
    if ray.is_initialized():
        if ray_address is not None:
            warnings.warn(f"Ray is already initialized in this process; ray_address="
                          f"{ray_address!r} is ignored", RuntimeWarning, stacklevel=4)
        yield
        return
    init = dict(address=ray_address, logging_level=logging.INFO if progress else logging.WARNING,
                log_to_driver=bool(progress))
    target = ray_address if ray_address is not None else os.environ.get("RAY_ADDRESS")
    if target:
        check_reachable(target)
    else:
        init["include_dashboard"] = False
        info["started_here"] = True
    ray.init(**init)
    try:
        yield
    finally:
        ray.shutdown()


def _default_actor_cpus(cluster: dict, num_actors: int) -> float:
    """1 CPU per actor, less when the cluster has fewer than 1.25 CPUs per actor."""
    cpus = float(cluster.get("CPU", 0))
    if cpus >= 1.25 * num_actors or cpus == 0:
        return 1.0
    return math.floor(80 * cpus / num_actors) / 100


def _warn_if_cluster_too_small(cluster: dict, num_actors: int, num_cpus_per_actor: float,
                               num_gpus_per_actor: float, fixed: bool = False) -> None:
    """When the actors cannot all start: a RuntimeWarning (the run waits for the
    cluster to grow), or a ValueError when the cluster is ``fixed`` (a local instance
    this run started itself: it would wait forever)."""
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    problems = []
    if (cpus or fixed) and num_actors * num_cpus_per_actor + TASK_CPUS > cpus + 1e-9:
        problems.append(
            f"{num_actors} actor(s) x {num_cpus_per_actor} CPU + {TASK_CPUS} CPU for the "
            f"read / write tasks is more than the cluster's {cpus:g} CPUs; lower "
            "num_cpus_per_actor (--num-cpus-per-actor) or num_actors (--num-actors)")
    if num_gpus_per_actor and num_actors * num_gpus_per_actor > gpus + 1e-9:
        problems.append(
            f"{num_actors} actor(s) x {num_gpus_per_actor} GPU is more than the cluster's "
            f"{gpus:g} GPUs; lower num_gpus_per_actor (--num-gpus-per-actor; fractions share "
            "a GPU) or num_actors (--num-actors)")
    for msg in problems:
        if fixed:
            raise ValueError(f"{msg}. The local Ray instance this run started cannot grow, so "
                             "the run could never start (give ray_address / --address for a "
                             "larger cluster)")
        warnings.warn(f"{msg}: the run waits until the cluster grows (it hangs on a fixed "
                      "cluster)", RuntimeWarning, stacklevel=3)


def _bank_shards(n_rows: int, block_m: int, shards: int) -> List[Tuple[int, int]]:
    """Contiguous bank row ranges cut at block boundaries (same blocks as the local
    engine, so the same GEMM shapes and bit-identical scores)."""
    n_blocks = -(-n_rows // block_m)
    if shards > n_blocks:
        raise ValueError(f"bank_shards ({shards}) is more than the bank's {n_blocks} block(s) of "
                         f"{block_m} rows; use bank_shards <= {n_blocks} or a smaller block_size")
    cuts = [s * n_blocks // shards for s in range(shards + 1)]
    return [(cuts[s] * block_m, min(n_rows, cuts[s + 1] * block_m)) for s in range(shards)]


def mine_ray(queries, labels=None, ids=None, *, bank=None, bank_labels=None, bank_ids=None,
             out_dir="mined", config: Optional[MineConfig] = None,
             formats: Sequence[str] = ("triplets",), device: str = "auto",
             dtype: Optional[str] = None, block_size=None, batch_size: Optional[int] = None,
             overwrite: bool = False, progress: bool = True, plot: bool = True,
             threads: Optional[int] = None, embedding_column: str = "embedding",
             label_column: str = "label", id_column: Optional[str] = None,
             ray_address: Optional[str] = None, num_actors: Optional[int] = None,
             num_gpus_per_actor: float = 0, num_cpus_per_actor: Optional[float] = None,
             bank_shards: int = 1, max_retries: int = 3, positives: str = "auto",
             _t_start: Optional[float] = None, **config_kwargs) -> MineResult:
    """:func:`exportminers.pipeline.mine` on a Ray cluster (``mine(..., engine="ray")``
    calls this). Same inputs, configuration and outputs; the results equal the local
    engine's. Resumable: a rerun with the same configuration and inputs mines only the
    queries missing from the finished part files of a killed run (``out_dir`` must be
    writable at the same path on every node: the workers write the parts).

    Args (beyond :func:`~exportminers.pipeline.mine`'s):
        ray_address: cluster to connect to (``"auto"``, ``"ray://head:10001"``, ...).
            ``None``: the Ray instance this process already runs, else ``RAY_ADDRESS``,
            else a new local one (shut down at the end).
        num_actors: actors per pass, spread over the bank shards (each shard gets
            ``num_actors // bank_shards`` replicas, the first shards one more for the
            remainder). Default: ``bank_shards``.
        num_gpus_per_actor: GPUs per actor (fractions share a GPU); > 0 runs the block
            graphs on the CUDA EP (needs onnxruntime-gpu on the workers).
        num_cpus_per_actor: CPUs reserved per actor (default: 1, less when the cluster
            has fewer than 1.25 CPUs per actor); also ONNX Runtime's thread count on CPU
            unless ``threads`` is given.
        bank_shards: contiguous pieces of the bank, one actor pool each; a shard is
            held by its actors for the whole run, so choose it to fit one actor's
            (GPU) memory.
        batch_size: queries per Ray batch (rounded up to whole query blocks); default
            16 query blocks, fewer so that every actor gets about 4 batches.
        max_retries: restarts of a dead actor, retries of a failed task or batch.
        config_kwargs: :class:`MineConfig` fields when ``config`` is not given.
    """
    t_start = time.time() if _t_start is None else _t_start
    ray = import_ray()
    cfg = config if config is not None else MineConfig(**config_kwargs)
    if config is not None and config_kwargs:
        raise ValueError(f"pass either config or its fields, not both ({sorted(config_kwargs)})")

    # ---- Ray arguments
    bank_shards = _check_positive_int("bank_shards", bank_shards)
    num_actors = bank_shards if num_actors is None else _check_positive_int("num_actors", num_actors)
    if num_actors < bank_shards:
        raise ValueError(f"num_actors ({num_actors}) must be >= bank_shards ({bank_shards}): every "
                         "shard needs at least one actor")
    max_retries = _check_positive_int("max_retries", max_retries, lo=0)
    if isinstance(num_gpus_per_actor, bool) or not isinstance(num_gpus_per_actor, (int, float)) \
            or not num_gpus_per_actor >= 0:
        raise ValueError(f"num_gpus_per_actor must be a number >= 0, got {num_gpus_per_actor!r}")
    if num_cpus_per_actor is not None and (
            isinstance(num_cpus_per_actor, bool) or not isinstance(num_cpus_per_actor, (int, float))
            or not num_cpus_per_actor > 0):
        raise ValueError(f"num_cpus_per_actor must be a number > 0, got {num_cpus_per_actor!r}")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    actor_device = "cuda" if num_gpus_per_actor > 0 else "cpu"
    if device == "cuda" and actor_device == "cpu":
        raise ValueError("device='cuda' with engine='ray' needs GPUs for the actors: pass "
                         "num_gpus_per_actor (--num-gpus-per-actor), e.g. 1")
    if device == "cpu" and actor_device == "cuda":
        raise ValueError("device='cpu' but num_gpus_per_actor > 0; drop one of them")

    # ---- the local engine's checks, scan and sizes
    formats = check_formats(formats, cfg)
    check_engine_numbers(threads=threads)
    dtype_given = dtype is not None
    dtype, np_dtype = resolve_dtype(dtype, actor_device, cfg)
    bq, bm = _parse_block(block_size, actor_device)
    check_block_sizes(bq, bm)
    check_out_dir(out_dir)
    cols = dict(embedding_column=embedding_column, label_column=label_column, id_column=id_column)
    inp = open_inputs(queries, labels, ids, bank, bank_labels, bank_ids, cfg, bq, bm, **cols)
    check_out_vs_inputs(out_dir, inp)
    dtype, np_dtype = fit_dtype(cfg, inp, dtype, dtype_given)
    qsrc, bsrc, bscan = inp.qsrc, inp.bsrc, inp.bscan
    bq_eff, bm_eff, kc, k_pos = inp.bq_eff, inp.bm_eff, inp.kc, inp.k_pos
    shard_rows = _bank_shards(bsrc.n, bm_eff, bank_shards)
    replicas = [num_actors // bank_shards + (s < num_actors % bank_shards)
                for s in range(bank_shards)]
    if batch_size is None:
        per_actor = -(-qsrc.n // (4 * max(replicas)))
        batch_size = min(16 * bq_eff, per_actor)
    batch_size = _check_positive_int("batch_size (shard_size)", batch_size)
    batch_rows = -(-batch_size // bq_eff) * bq_eff
    plan = plan_labels(positives, cfg, dtype, inp, actor_device)
    host_pos, specs, pos_kind = plan.host_pos, plan.specs, plan.pos_kind
    easy = pos_kind[1]
    schema = _expected_schema(cfg, easy, kc, k_pos)

    # ---- output folder: the parts of an earlier run with the same state are kept (resume)
    out_dir = Path(out_dir)
    parts_dir = out_dir / PARTS_DIR
    state = run_state(cfg, dtype, inp)
    state["engine"] = "ray"
    state["labels_on_host"] = plan.info()
    prepare_out_dir(out_dir, state, overwrite, parts_dir)
    todo = np.flatnonzero(~reusable_parts(parts_dir, qsrc.n, schema))
    ranges = query_ranges(todo, batch_rows)
    resumed = qsrc.n - len(todo)
    if progress and resumed:
        print(f"exportminers: resuming in {out_dir}: {resumed:,} of {qsrc.n:,} queries were "
              f"mined by an earlier run; {len(todo):,} left to mine", file=sys.stderr)
    fault = os.environ.get(FAULT_ENV) or None

    # ---- Ray (not started when every query is done already)
    cluster, written, mine_seconds = {}, 0, 0.0
    if len(todo):
        session = {}
        with _ray_session(ray, ray_address, progress, session):
            cluster = ray.cluster_resources()
            if num_cpus_per_actor is None:
                num_cpus_per_actor = _default_actor_cpus(cluster, num_actors)
            _warn_if_cluster_too_small(cluster, num_actors, num_cpus_per_actor,
                                       num_gpus_per_actor, fixed=session["started_here"])
            if threads is None and actor_device == "cpu":
                threads = max(1, int(num_cpus_per_actor))
            shard_refs = []
            for s0, s1 in shard_rows:  # one shard in driver memory at a time
                blk = bsrc.read(s0, s1)
                shard_refs.append(ray.put({"emb": blk.emb, "labels": blk.labels,
                                           "label_ok": blk.label_ok, "ids": blk.ids,
                                           "valid": bscan.valid[s0:s1]}))
                del blk
            qspec = _side_spec(ray, queries, labels, ids, "queries", cols)
            worker_kw = dict(block_q=bq_eff, block_m=bm_eff, metric=cfg.metric, dtype=dtype,
                             same_id=inp.same_id, kc=kc, k_pos=k_pos, device=actor_device,
                             threads=threads, fault=fault, id_key=inp.id_key)
            actor_res = dict(num_cpus=num_cpus_per_actor)
            if num_gpus_per_actor:
                actor_res["num_gpus"] = num_gpus_per_actor
            # bounded fault tolerance (Ray Data's defaults retry system failures forever)
            actor_remote = dict(max_restarts=max_retries, max_task_retries=max_retries)
            task_remote = dict(max_retries=max_retries)

            def pipeline(spec: Optional[GraphSpec], kinds, positives=None):
                items = [{"start": a, "stop": b} for a, b in ranges]
                nb = ("override_num_blocks" if "override_num_blocks" in
                      inspect.signature(ray.data.from_items).parameters else "parallelism")
                ds = ray.data.from_items(items, **{nb: len(ranges)})
                ds = _map_batches(
                    ds, _read_queries, task_remote, batch_size=1, batch_format="numpy",
                    fn_kwargs=dict(spec=qspec, cfg=cfg.to_json(), kinds=kinds, kc=kc,
                                   k_pos=k_pos, positives=positives), num_cpus=TASK_CPUS)
                graph = None if spec is None else dict(
                    kind=spec.kind, metric=spec.metric, band=spec.band, easy=spec.easy,
                    dtype=spec.dtype, label_mask=spec.label_mask)
                hp = pos_kind if host_pos and "hpos" in kinds else None
                for s, (s0, _) in enumerate(shard_rows):
                    # an explicit batch size: Ray Data requires one for GPU actors (and
                    # the actors handle any size; rows are keyed by query_index)
                    ds = _map_batches(
                        ds, _ShardWorker, actor_remote, batch_size=batch_rows,
                        batch_format="numpy",
                        fn_constructor_kwargs=dict(graph=graph, shard=[shard_refs[s]],
                                                   offset=s0, host_pos=hp, **worker_kw),
                        compute=ray.data.ActorPoolStrategy(size=replicas[s]), **actor_res)
                return ds

            t_mine = time.time()
            with _data_context(progress, max_retries):
                if cfg.needs_positive:  # pass 1: positives over every shard
                    pkinds = ["hpos"] + (["epos"] if easy else [])
                    got = _gather_positives(pipeline(None if host_pos else specs[0], pkinds),
                                            todo, qsrc.n, k_pos, pkinds)
                    ds = pipeline(specs[-1], ["neg"], [ray.put(got)])
                    del got
                else:
                    ds = pipeline(specs[0], ["neg", "hpos"] + (["epos"] if easy else []))
                ds = _map_batches(ds, _finalize, task_remote, batch_size=None,
                                  batch_format="numpy", num_cpus=TASK_CPUS,
                                  fn_kwargs=dict(cfg=cfg.to_json(), easy=easy, fault=fault,
                                                 parts_dir=str(parts_dir.resolve())))
                written = sum(int(b["rows"].sum()) for b in
                              ds.iter_batches(batch_size=None, batch_format="numpy"))
            mine_seconds = time.time() - t_mine

    # ---- assembly and the local engine's final outputs
    mined = out_dir / "mined.parquet"
    dups = assemble_parts(parts_dir, mined, qsrc.n, schema)
    shutil.rmtree(parts_dir, ignore_errors=True)
    engine_info = {
        "name": "ray", "device": actor_device, "dtype": dtype, "block_q": bq_eff,
        "block_m": bm_eff, "graphs": [s.filename for s in specs],
        "passes": 2 if cfg.needs_positive else 1, **plan.info(),
        "bank_shards": bank_shards, "bank_shard_rows": [b - a for a, b in shard_rows],
        "num_actors": num_actors, "actors_per_shard": replicas,
        "num_gpus_per_actor": num_gpus_per_actor, "num_cpus_per_actor": num_cpus_per_actor,
        "threads_per_actor": threads, "batch_rows": batch_rows, "batches": len(ranges),
        "resumed_queries": resumed, "queries_run_now": written,
        "cluster": {k: v for k, v in cluster.items() if k in ("CPU", "GPU", "memory")},
        "duplicate_rows_dropped": dups,
    }
    qps = round(written / mine_seconds, 1) if written and mine_seconds > 0 else None
    return finish_outputs(cfg, inp, out_dir, mined, formats, plot, engine_info, t_start,
                          mine_seconds, qps)
