"""Block engine: stream query and bank blocks through the block graph on ONNX Runtime
and keep running per-query top-k lists on the host (numpy).

Memory is O(block_q x block_m) on the device and O(shard x k) on the host. Every
intermediate of the block graph has ``block_q * block_m`` elements, which must stay
below 2**31 (ONNX Runtime's CUDA kernels fail past that).

Ties are broken by the lower bank row: ONNX TopK keeps the lower index among equal
values, and the host merge sorts by (closeness, bank row).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..runtime import compat
from ..runtime.providers import exact_providers
from .config import F32, MineConfig, band_to_dtype
from .graphs import GraphSpec, graph_path
from .sources import SENTINEL, RowBlock

MAX_ELEMENTS = 2 ** 31 - 1
IDX_MAX = np.iinfo(np.int64).max
DEFAULT_BLOCKS = {"cuda": (4096, 262144), "cpu": (1024, 8192)}


# --------------------------------------------------------------------------- devices

def resolve_device(device: str) -> str:
    import onnxruntime as ort

    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    have_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "auto":
        return "cuda" if have_cuda else "cpu"
    if device == "cuda" and not have_cuda:
        raise ValueError("device='cuda' but ONNX Runtime has no CUDAExecutionProvider here "
                         f"(available: {ort.get_available_providers()}); install "
                         "onnxruntime-gpu or use device='cpu'")
    return device


def check_block_sizes(block_q: int, block_m: int) -> None:
    for name, v in (("block_q", block_q), ("block_m", block_m)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if block_q * block_m > MAX_ELEMENTS:
        raise ValueError(
            f"block sizes {block_q} x {block_m} = {block_q * block_m:,} elements per score "
            f"block; every intermediate must stay below 2**31 = {2 ** 31:,} elements "
            "(ONNX Runtime's CUDA kernels fail beyond that). Use a smaller block size, "
            f"e.g. {block_q} x {MAX_ELEMENTS // block_q // 1024 * 1024}.")


class BlockRunner:
    """One ONNX Runtime session for one block graph, fed through IOBinding.

    Inputs live on the device as OrtValues (``put``); outputs come back to the host.
    """

    def __init__(self, spec: GraphSpec, device: str, threads: Optional[int] = None,
                 profile_prefix: Optional[str] = None):
        import onnxruntime as ort

        self.spec, self.device = spec, device
        self.path = graph_path(spec)
        compat.warn_if_untested(ort)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        if profile_prefix:   # ONNX Runtime's per-node timings (benchmarks), see end_profiling
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_prefix)
        if device == "cuda":
            # Strict placement: every node on CUDA (the graph has no shape nodes).
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
            try:
                self.sess = ort.InferenceSession(
                    str(self.path), so, providers=exact_providers(["CUDAExecutionProvider"]))
            except Exception as e:  # pragma: no cover - needs a GPU
                import warnings

                warnings.warn(f"strict CUDA placement refused ({e}); retrying with CPU "
                              "fallback allowed")
                so = ort.SessionOptions()
                so.log_severity_level = 3
                if threads:
                    so.intra_op_num_threads = int(threads)
                if profile_prefix:
                    so.enable_profiling = True
                    so.profile_file_prefix = str(profile_prefix)
                self.sess = ort.InferenceSession(
                    str(self.path), so,
                    providers=exact_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]))
            if self.sess.get_providers()[0] != "CUDAExecutionProvider":
                # listed but not loaded (a CUDA / cuDNN library missing): ONNX Runtime
                # would run on the CPU and the device-bound blocks would fail later
                raise RuntimeError(
                    f"device 'cuda': ONNX Runtime's CUDAExecutionProvider did not load "
                    f"(session providers {self.sess.get_providers()}); check that the CUDA "
                    f"and cuDNN libraries onnxruntime-gpu {ort.__version__} needs are "
                    f"installed (importing torch first loads them), or use device 'cpu'")
        else:
            from ..runtime.arena import default_cpu_options   # one call's peak memory

            self.sess = ort.InferenceSession(str(self.path), default_cpu_options(ort, so),
                                             providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self._ort = ort

    def put(self, arr: np.ndarray):
        arr = np.ascontiguousarray(arr)
        if self.device == "cuda":
            return self._ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
        return self._ort.OrtValue.ortvalue_from_numpy(arr)

    def run(self, feeds: Dict[str, object]) -> Dict[str, np.ndarray]:
        """Run on OrtValue (or numpy) inputs; the graph's unused feeds are ignored."""
        b = self.sess.io_binding()
        keep = []  # numpy-backed OrtValues must outlive the run
        for name in self.inputs:
            v = feeds[name]
            if isinstance(v, np.ndarray):
                v = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                keep.append(v)
            b.bind_ortvalue_input(name, v)
        for name in self.outputs:
            b.bind_output(name, "cpu")
        self.sess.run_with_iobinding(b)
        return dict(zip(self.outputs, b.copy_outputs_to_cpu()))


# --------------------------------------------------------------------------- blocks

def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=F32)
    # norms in float64: squares of float32 values past ~1.8e19 overflow float32
    n = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    n[n == 0] = 1
    return (x / n[:, None]).astype(F32)


def clean_block(blk: RowBlock, valid: np.ndarray, metric: str):
    """Zero excluded rows, mark them with the sentinel label, normalise for cosine."""
    emb = blk.emb
    if not valid.all():
        emb = emb.copy()
        emb[~valid] = 0
    if metric == "cosine":
        emb = normalize_rows(emb)
    labels = np.where(valid, blk.labels, SENTINEL)
    return emb, labels


@dataclass
class DeviceBlock:
    """One block's graph inputs on the device, and what the host needs to read its
    outputs.

    A query block is padded to ``size`` rows (padded and excluded rows carry the
    sentinel label; padded rows' outputs are never read, excluded rows' are merged but
    never reported). A bank block holds only its usable rows, as ``size`` columns:
    ``cols`` maps a column to its row in the bank (-1 marks padding, added only to reach
    the 2 columns every block needs) and ``ids`` to the id that same-id exclusion
    compares (None: no exclusion). ``label_order`` / ``id_order`` (filled on first use)
    sort the columns by label / id: per block pair, each TopK asks for as many extra
    candidates as the query block's ids (and, unmasked, labels) have columns here, so
    that dropping those on the host still leaves k.
    """

    offset: int
    rows: int
    size: int
    feeds: Dict[str, object]
    host: Tuple  # numpy arrays kept alive for CPU OrtValues
    ids: Optional[np.ndarray] = None
    cols: Optional[np.ndarray] = None
    label_order: Optional[Tuple[np.ndarray, np.ndarray]] = None
    id_order: Optional[np.ndarray] = None


def runs(sorted_vals: np.ndarray, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """For each key: where its run starts in ``sorted_vals`` and how long it is."""
    lo = np.searchsorted(sorted_vals, keys, side="left")
    return lo, np.searchsorted(sorted_vals, keys, side="right") - lo


def most_shared(sorted_vals: np.ndarray, keys: np.ndarray) -> int:
    """The most entries of ``sorted_vals`` equal to any one of ``keys`` (0 for none)."""
    return int(runs(sorted_vals, keys)[1].max(initial=0))


def id_sort(mb: DeviceBlock) -> np.ndarray:
    """A bank block's ids, sorted (computed once per block; padding excluded)."""
    if mb.id_order is None:
        ids = mb.ids[mb.cols >= 0]
        mb.id_order = ids if np.all(ids[1:] > ids[:-1]) else np.sort(ids)
    return mb.id_order


def prepare_block(runner: Optional[BlockRunner], side: str, blk: RowBlock, valid: np.ndarray,
                  offset: int, size: int, metric: str, dtype, same_id: bool) -> DeviceBlock:
    """Put a block on the device as graph inputs: a query block padded to ``size`` rows,
    a bank block as its usable rows only (``size`` does not apply; see DeviceBlock).
    ``runner=None``: host arrays only (a pass that runs no graph)."""
    n = len(blk.labels)
    if side == "q":
        emb, labels = clean_block(blk, valid, metric)
        e = np.zeros((size, emb.shape[1]), dtype=dtype)
        e[:n] = emb
        lab = np.full(size, SENTINEL, dtype=np.int64)
        lab[:n] = labels
        ids = None
        if same_id:
            ids = np.full(size, SENTINEL, dtype=np.int64)
            ids[:n] = blk.ids
        feeds = {} if runner is None else {"q": runner.put(e), "q_label": runner.put(lab)}
        return DeviceBlock(offset, n, size, feeds, (e, lab), ids=ids)
    keep = np.flatnonzero(valid)
    ncol = len(keep)
    if ncol == 0:   # nothing usable in this stretch of the bank
        return DeviceBlock(offset, n, 0, {}, (), cols=np.zeros(0, np.int64))
    emb = np.asarray(blk.emb)[keep]
    if metric == "cosine":
        emb = normalize_rows(emb)
    # two columns at least: with one, ONNX Runtime's MatMul takes a matrix-vector kernel
    # that rounds differently. The padding column is dropped on the host (cols = -1).
    cols_n = max(ncol, 2)
    e = np.zeros((cols_n, emb.shape[1]), dtype=dtype)
    e[:ncol] = emb
    lab = np.full(cols_n, SENTINEL, dtype=np.int64)
    lab[:ncol] = blk.labels[keep]
    cols = np.full(cols_n, -1, dtype=np.int64)
    cols[:ncol] = offset + keep
    ids = None
    if same_id:
        ids = np.full(cols_n, SENTINEL, dtype=np.int64)
        ids[:ncol] = blk.ids[keep]
    feeds = {} if runner is None else {"m": runner.put(e), "m_label": runner.put(lab)}
    return DeviceBlock(offset, n, cols_n, feeds, (e, lab), ids=ids, cols=cols)


def label_sort(mb: DeviceBlock) -> Tuple[np.ndarray, np.ndarray]:
    """A bank block's columns sorted by label (stable) and the sorted labels, computed
    once per block."""
    if mb.label_order is None:
        lab = mb.host[1]
        order = np.argsort(lab, kind="stable")
        mb.label_order = (order, lab[order])
    return mb.label_order


def block_candidates(mb: DeviceBlock, qids: Optional[np.ndarray], c: np.ndarray,
                     i: np.ndarray, largest: bool, qlab: Optional[np.ndarray] = None):
    """A block's TopK output (closeness, column) as (closeness, bank row): padding
    columns, columns with the query's id and, given ``qlab`` (an unmasked graph), columns
    with the query's label become empty slots (-inf when ``largest``, else +inf)."""
    rows = mb.cols[i]
    drop = rows < 0
    if mb.ids is not None and qids is not None:
        drop |= mb.ids[i] == qids[:, None]
    if qlab is not None:
        drop |= mb.host[1][i] == qlab[:, None]
    if drop.any():
        c = np.where(drop, -np.inf if largest else np.inf, c)
    return c, rows


# --------------------------------------------------------------------------- merging

def merge_topk(c_run, i_run, c_new, i_new, k: int, largest: bool):
    """Keep the k best of two candidate lists per row: by closeness (descending when
    ``largest``), then by lower bank row. Empty slots hold -inf (+inf) and IDX_MAX."""
    c = np.concatenate([c_run, c_new], axis=1)
    i = np.concatenate([i_run, i_new], axis=1)
    key = -c if largest else c
    order = np.lexsort((i, key), axis=1)[:, :k]
    return np.take_along_axis(c, order, 1), np.take_along_axis(i, order, 1)


class ScoreOverflowError(ValueError):
    """A block produced an overflowed (inf / NaN) score."""


class TopKState:
    def __init__(self, rows: int, k: int, largest: bool):
        self.k, self.largest = k, largest
        fill = -np.inf if largest else np.inf
        self.c = np.full((rows, k), fill, dtype=F32)
        self.i = np.full((rows, k), IDX_MAX, dtype=np.int64)

    def update(self, r0: int, r1: int, c_new, i_new, valid: Optional[np.ndarray] = None):
        """Merge candidates (closeness, bank row) for rows r0..r1 of the shard."""
        c_new = c_new.astype(F32, copy=False)
        # empty slots are -inf (largest) / +inf (smallest); anything else that is not
        # finite, for a query that is mined (``valid``), is a score that overflowed the
        # compute dtype: never merge it silently
        bad = np.isnan(c_new) | (c_new == (np.inf if self.largest else -np.inf))
        if valid is not None:
            bad &= valid[:, None]
        if bad.any():
            raise ScoreOverflowError(
                "scores overflowed the compute dtype (inf/NaN from the block graph): the "
                "embeddings are too large for it; use dtype='float32' (--dtype float32), or "
                "scale down / normalise the embeddings")
        ok = np.isfinite(c_new)
        i_new = np.where(ok, i_new, IDX_MAX)
        c, i = merge_topk(self.c[r0:r1], self.i[r0:r1], c_new, i_new, self.k, self.largest)
        self.c[r0:r1], self.i[r0:r1] = c, i


# --------------------------------------------------------------------------- passes

@dataclass
class PassResult:
    neg: Optional[TopKState] = None
    hpos: Optional[TopKState] = None
    epos: Optional[TopKState] = None


# Same-label pairs scored on the host at a time: the gathered rows stay in the CPU's
# cache (4,096 pairs were 4x faster than 65,536 on the dev machine).
_PAIR_CHUNK = 1 << 12


def _order_key(score: np.ndarray, largest: bool) -> np.ndarray:
    """uint32 keys whose ascending order is the closeness order (best first)."""
    b = (score + F32(0)).view(np.uint32)   # + 0 turns -0.0 into +0.0: equal floats, equal keys
    key = np.where(b & np.uint32(0x80000000), ~b, b | np.uint32(0x80000000))
    return ~key if largest else key


# Same-label pairs held at once by host_positive_candidates (about 70 bytes each): query
# rows are taken in groups that stay under it (a single query can exceed it alone, up
# to one bank block's columns).
_PAIR_BUDGET = 1 << 21


def host_positive_candidates(qb: DeviceBlock, mb: DeviceBlock, n: int, qvalid: np.ndarray,
                             metric: str, k: int, largest: bool):
    """Each query's ``k`` best same-label columns of a bank block, scored on the host.

    The positives of a query are the bank rows with its label: when there are few per
    query, scoring just those pairs costs far less than the masked passes over the whole
    score block that the graph needs to find them. Scores are computed in float32 from
    the blocks' own compute-dtype rows and rounded to that dtype once. In float32 that
    is the graph's score up to the order of the sum; in float16 it can be one float16
    step away from the graph's (which rounds the MatMul's output, and for L2 each
    intermediate, separately). Returns (closeness float32[n, k], bank row int64[n, k])
    with empty slots as +inf (-inf when ``largest``); same-id columns are never
    candidates.
    """
    fill = -np.inf if largest else np.inf
    c_out = np.full((n, k), fill, dtype=F32)
    r_out = np.full((n, k), -1, dtype=np.int64)
    lo, cnt = runs(label_sort(mb)[1], qb.host[1][:n])
    cnt = np.where(qvalid, cnt, 0)
    cs = np.cumsum(cnt)
    a = 0
    while a < n:
        done = int(cs[a - 1]) if a else 0
        b = max(a + 1, int(np.searchsorted(cs, done + _PAIR_BUDGET, side="right")))
        b = min(b, n)
        if cs[b - 1] > done:
            _host_positive_rows(qb, mb, a, b, lo, cnt, metric, k, largest, c_out, r_out)
        a = b
    return c_out, r_out


def _host_positive_rows(qb, mb, a, b, lo, cnt, metric, k, largest, c_out, r_out):
    """host_positive_candidates for query rows a..b (into c_out / r_out)."""
    order = label_sort(mb)[0]
    cnt = cnt[a:b]
    total = int(cnt.sum())
    qi = a + np.repeat(np.arange(b - a), cnt)
    within = np.arange(total) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    ci = order[np.repeat(lo[a:b], cnt) + within]
    if mb.ids is not None and qb.ids is not None:
        keep = mb.ids[ci] != qb.ids[qi]
        qi, ci = qi[keep], ci[keep]
        total = len(qi)
        if total == 0:
            return
    qe, me = qb.host[0], mb.host[0]
    score = np.empty(total, dtype=F32)
    for s in range(0, total, _PAIR_CHUNK):
        e = min(total, s + _PAIR_CHUNK)
        x = qe[qi[s:e]].astype(F32, copy=False)
        y = me[ci[s:e]].astype(F32, copy=False)
        v = np.einsum("ij,ij->i", x, y)
        if metric == "l2":
            v = -np.sqrt(np.maximum(np.einsum("ij,ij->i", x, x) + np.einsum("ij,ij->i", y, y)
                                    - F32(2) * v, F32(0)))
        score[s:e] = v.astype(qe.dtype).astype(F32, copy=False)
    rows = mb.cols[ci]
    # Pairs come grouped by query, and within a query by increasing bank row (the label
    # sort is stable), so "best first, ties by lower row" is a stable sort on the score
    # within each group.
    starts = np.flatnonzero(np.r_[True, qi[1:] != qi[:-1]])
    owner = qi[starts]
    if k == 1:
        ext = (np.maximum if largest else np.minimum).reduceat(score, starts)
        group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, total]))
        hit = np.flatnonzero(score == ext[group])
        first = hit[np.r_[True, group[hit[1:]] != group[hit[:-1]]]]   # lowest row per query
        c_out[owner, 0] = score[first]
        r_out[owner, 0] = rows[first]
        return
    key = (qi.astype(np.uint64) << np.uint64(32)) | _order_key(score, largest).astype(np.uint64)
    o = np.argsort(key, kind="stable")
    rank = np.arange(total) - np.repeat(starts, np.diff(np.r_[starts, total]))
    sel = rank < k
    c_out[qi[sel], rank[sel]] = score[o][sel]
    r_out[qi[sel], rank[sel]] = rows[o][sel]


def run_pass(runner: Optional[BlockRunner], qblocks: List[DeviceBlock],
             bank: Iterable[DeviceBlock], shard_rows: int, k_neg: int, k_pos: int, dtype,
             band: Optional[Tuple[np.ndarray, np.ndarray]] = None,
             on_bank_block=None, overlap: Optional[bool] = None,
             host_pos: Optional[Tuple[str, bool]] = None) -> PassResult:
    """One sweep of the bank for the shard's query blocks (bank blocks outer, so each
    bank block is read and moved to the device once per pass).

    ``host_pos`` = (metric kind, easy): the positives (hardest ``k_pos``, and the easiest
    when ``easy``) are scored on the host from each block pair's same-label pairs
    (:func:`host_positive_candidates`) instead of by the graph, whose spec then has no
    positives; ``runner`` may be None when nothing else is needed.

    ``overlap`` (default: on for CUDA) merges each block pair's candidates on a helper
    thread while the device runs the next pair (ONNX Runtime releases the GIL while it
    runs), so the host merge costs no device time. Merges still happen one at a time in
    order, so the result is the same either way. On the CPU the merge would only compete
    with ONNX Runtime's own threads.
    """
    if runner is None and host_pos is None:
        raise ValueError("run_pass needs a runner, host positives, or both")
    if runner is not None and host_pos is not None and runner.spec.has_pos:
        raise ValueError("positives come from either the graph or the host, not both")
    if overlap is None:
        overlap = runner is not None and runner.device == "cuda"
    spec = runner.spec if runner is not None else None
    res = PassResult()
    if spec is not None and spec.has_neg:
        res.neg = TopKState(shard_rows, k_neg, largest=True)
    if (spec is not None and spec.has_pos) or host_pos is not None:
        res.hpos = TopKState(shard_rows, k_pos, largest=False)
        if (spec.easy if host_pos is None else host_pos[1]):
            res.epos = TopKState(shard_rows, 1, largest=True)
    base = qblocks[0].offset if qblocks else 0
    # TopK reads k from host memory on every EP, so k stays a CPU OrtValue
    kvals: Dict[int, object] = {}

    def kval(v: int):
        if v not in kvals:
            kvals[v] = runner._ort.OrtValue.ortvalue_from_numpy(np.array([v], dtype=np.int64))
        return kvals[v]

    band_feeds = []
    if spec is not None and spec.has_neg and spec.band:
        lo, hi = band
        lo, hi = band_to_dtype(lo, hi, dtype)
        for qb in qblocks:
            r0 = qb.offset - base
            size = qb.size
            blo = np.full(size, np.inf, dtype=dtype)
            bhi = np.full(size, -np.inf, dtype=dtype)
            blo[:qb.rows] = lo[r0:r0 + qb.rows]
            bhi[:qb.rows] = hi[r0:r0 + qb.rows]
            band_feeds.append(({"neg_lo": runner.put(blo), "neg_hi": runner.put(bhi)}, (blo, bhi)))
    # an unmasked negatives graph leaves same-label columns in: per block pair, its TopK
    # asks for as many more as the query block's most common label has in the bank block
    unmasked = spec is not None and spec.has_neg and not spec.label_mask
    outs = [(res.neg, "neg", True)]
    if host_pos is None:
        outs += [(res.hpos, "hpos", False), (res.epos, "epos", True)]
    outs = [o for o in outs if o[0] is not None]

    def merge(out, qb, mb, r0, r1, qvalid, qids):
        n = r1 - r0
        for st, name, largest in outs:
            qlab = qb.host[1][:n] if unmasked and name == "neg" else None
            c, rows = block_candidates(mb, qids, out[name + "_c"][:n], out[name + "_i"][:n],
                                       largest, qlab)
            st.update(r0, r1, c, rows, qvalid)
        if host_pos is not None:
            for st in (res.hpos, res.epos):
                if st is not None:
                    c, rows = host_positive_candidates(qb, mb, n, qvalid, host_pos[0], st.k,
                                                       st.largest)
                    st.update(r0, r1, c, rows, qvalid)

    pool = pending = None
    if overlap:
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(1, thread_name_prefix="exportminers-merge")
    try:
        for mb in bank:
            if mb.size == 0:
                if on_bank_block is not None:
                    on_bank_block(mb.rows)
                continue
            # a block with a padding column returns all its columns (the padding must
            # never displace a real one), as does any block narrower than a TopK's k
            padded = mb.cols[-1] < 0

            def k_eff(k, _size=mb.size, _padded=padded):
                return _size if _padded else min(k, _size)

            for j, qb in enumerate(qblocks):
                r0 = qb.offset - base
                n = qb.rows
                qvalid = qb.host[1][:n] != SENTINEL  # excluded queries carry the sentinel label
                qids = None if qb.ids is None else qb.ids[:n]
                out = {}
                if runner is not None:
                    # each TopK asks for k plus as many columns as one of the block's
                    # query ids (and, for an unmasked graph, labels) has here: the host
                    # drops those, and k are left
                    extra_id = 0
                    if mb.ids is not None and qids is not None:
                        extra_id = most_shared(id_sort(mb), qids[qvalid])
                    extra_lab = 0
                    if unmasked:
                        extra_lab = most_shared(label_sort(mb)[1], qb.host[1][:n][qvalid])
                    feeds = {**qb.feeds, **mb.feeds,
                             "k_neg": kval(k_eff(k_neg + extra_id + extra_lab)),
                             "k_pos": kval(k_eff(k_pos + extra_id)),
                             "k_epos": kval(k_eff(1 + extra_id))}
                    if band_feeds:
                        feeds.update(band_feeds[j][0])
                    out = runner.run(feeds)
                if pool is None:
                    merge(out, qb, mb, r0, r0 + n, qvalid, qids)
                else:
                    if pending is not None:
                        pending.result()   # one merge at a time, in order; re-raises
                    pending = pool.submit(merge, out, qb, mb, r0, r0 + n, qvalid, qids)
            if on_bank_block is not None:
                on_bank_block(mb.rows)
        if pending is not None:
            pending.result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return res


# --------------------------------------------------------------------------- selection

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _M1
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, query_rows: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Deterministic random keys [len(query_rows), len(ranks)]: depend only on the seed,
    the query's row in the input and the candidate's rank (not on block sizes)."""
    s = _splitmix(np.array([seed], dtype=np.uint64))
    q = _splitmix(s ^ np.asarray(query_rows, dtype=np.uint64))
    return _splitmix(q[:, None] ^ (np.asarray(ranks, dtype=np.uint64)[None, :] * _M2))


def select_window(cfg: MineConfig, c: np.ndarray, query_rows: np.ndarray):
    """Pick each query's negatives from its sorted filtered candidates.

    Args:
        c: float32[n, num_candidates] closeness, sorted closest first, -inf = empty.
        query_rows: int64[n] rows of the queries in the input (seed the sampler).

    Returns:
        ranks int64[n, k] (-1 = none; ascending), count int64[n] (filtered candidates
        seen, capped at num_candidates).
    """
    n, kc = c.shape
    count = np.isfinite(c).sum(axis=1).astype(np.int64)
    r0 = cfg.range_min
    width = kc - r0
    ranks = np.arange(r0, kc, dtype=np.int64)
    avail = ranks[None, :] < count[:, None]  # [n, width]
    if cfg.sampling == "top" or width <= cfg.k:
        take = np.broadcast_to(ranks[:cfg.k], (n, min(cfg.k, width))).copy()
        ok = avail[:, :cfg.k]
    else:
        keys = sample_keys(cfg.seed, query_rows, ranks)
        keys = np.where(avail, keys, np.uint64(np.iinfo(np.uint64).max))
        pick = np.argsort(keys, axis=1, kind="stable")[:, :cfg.k]
        take = ranks[pick]
        ok = np.take_along_axis(avail, pick, 1)
        take = np.where(ok, take, IDX_MAX)
        take.sort(axis=1)
        ok = take != IDX_MAX
    out = np.full((n, cfg.k), -1, dtype=np.int64)
    out[:, :take.shape[1]] = np.where(ok, take, -1)
    return out, count
