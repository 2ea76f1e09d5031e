"""Run an exported miner with ONNX Runtime: no torch needed.

:class:`OnnxMiner` loads a graph written by :func:`exportminers.export_onnx`, reads its
metadata (miner, layout, inputs, noise), validates inputs with the same checks and
messages as the eager miners (:mod:`exportminers.runtime.checks_np`), runs the
fixed-shape graph and decodes its outputs into PML index tuples
(:mod:`exportminers.runtime.decode_np`).

Example:
    >>> om = OnnxMiner("triplet_margin.onnx")             # CUDA EP if available, else CPU
    >>> a, p, n = om(embeddings, labels)                  # numpy int64 arrays
    >>> raw = om(embeddings, labels, return_raw=True)     # the fixed-shape outputs
"""
import functools
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import arena, checks_np, compat, decode_np, positives
from .providers import exact_providers
from . import metadata as md

_DTYPES = {"float32": np.float32, "float16": np.float16}
_ONNX_TO_NP = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
}
_DLPACK_CPU = 1
_DLPACK_CUDA = 2
_DLPACK_CUDA_HOST = 3
_DLPACK_CUDA_MANAGED = 13

# Largest tensor ONNX Runtime's CUDA kernels handle (../shared/GPU_FACTS.md: an
# elementwise node over more than 2^31 elements failed and poisoned the CUDA context).
CUDA_MAX_ELEMENTS = 2 ** 31 - 1

# How ONNX Runtime words a failed allocation (its arena, the CUDA EP, plain new/malloc
# when the caller's session options turn the CPU arena off).
_OUT_OF_MEMORY = re.compile(r"Failed to allocate memory|out of memory|bad_alloc|bad allocation",
                            re.IGNORECASE)

# On the CPU EP, a chunkable graph (``OnnxMiner.chunkable``) called without chunk_size /
# max_block_elements is mined in anchor blocks whose largest tensor stays within this many
# elements (or within a larger tensor that every run computes anyway): the same result,
# less memory, no loss of speed. Measured on 2 cores (one thread, d = 128): the
# TripletMarginMiner anchor-block graph at N = 1024 took 267 ms in blocks of 256 rows
# against 279 ms in one run, at 772 against 1,586 MB peak RSS.
CPU_BLOCK_ELEMENTS = 2 ** 28


_CGROUP_ROOT = "/sys/fs/cgroup"


def _read_limit(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if text.isdigit() and 0 < int(text) < 2 ** 60:   # "max" or a huge number: no limit
        return int(text)
    return None


def _cgroup_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = _CGROUP_ROOT) -> Optional[int]:
    """The lowest memory limit on this process's cgroup and its parents (v2
    ``memory.max``, v1 ``memory.limit_in_bytes``), None where there is none or it
    cannot be read."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        controllers, path = parts[1], parts[2].strip("/")
        if controllers == "":                       # cgroup v2
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):    # cgroup v1 memory controller
            base, name = os.path.join(root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        pieces = [p for p in path.split("/") if p]
        for k in range(len(pieces), -1, -1):        # this cgroup, then each parent
            limit = _read_limit(os.path.join(base, *pieces[:k], name))
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _rlimit_bytes() -> Optional[int]:
    """The lower of the process's soft ``RLIMIT_AS`` and ``RLIMIT_DATA`` (address space;
    heap and private mappings, which hold ONNX Runtime's buffers), None if unlimited or
    unknown (no ``resource`` module off POSIX)."""
    try:
        import resource
    except ImportError:
        return None
    found: Optional[int] = None
    for name in ("RLIMIT_AS", "RLIMIT_DATA"):
        which = getattr(resource, name, None)
        if which is None:
            continue
        try:
            soft = resource.getrlimit(which)[0]
        except (ValueError, OSError):
            continue
        if soft != resource.RLIM_INFINITY and soft >= 0:
            found = soft if found is None else min(found, soft)
    return found


@functools.lru_cache(maxsize=1)
def physical_memory_bytes() -> Optional[int]:
    """The memory this process may use, in bytes: the machine's physical memory, or where
    lower its cgroup's limit (:func:`_cgroup_limit`) or its soft ``RLIMIT_AS`` /
    ``RLIMIT_DATA`` (None where the OS says none of them). Read once per process."""
    total = None
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        if pages > 0 and size > 0:
            total = pages * size
    except (AttributeError, ValueError, OSError):
        pass
    for limit in (_cgroup_limit(), _rlimit_bytes()):
        if limit is not None:
            total = limit if total is None else min(total, limit)
    return total


def default_providers() -> List[str]:
    """``["CUDAExecutionProvider", "CPUExecutionProvider"]`` when ONNX Runtime has CUDA,
    else ``["CPUExecutionProvider"]``."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _strict_gpu(session_options) -> bool:
    if session_options is None:
        return False
    try:
        return session_options.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    except Exception:  # entry not set
        return False


def _warn_identity(stacklevel: int) -> None:
    """Warn about ``ref_labels is labels``; ``stacklevel``: frames from the warning's
    caller up to the user's call (2 from ``__call__``, 3 from ``_call_bound``)."""
    import warnings
    warnings.warn(
        "ref_labels is the labels object itself: PML and the eager miners then never pair "
        "row i with reference row i (and self-mine when ref_emb is also the embeddings), "
        "but an ONNX graph sees arrays, not objects, and mines the reference set as distinct "
        "rows, so (i, i) pairs can appear. Pass a copy (labels.copy()) to mean a distinct "
        "reference set, or self-mine with a graph exported without with_ref.",
        UserWarning, stacklevel=stacklevel + 1)


def _sliceable(x) -> bool:
    """Inputs that anchor blocks of a with_ref graph can slice: torch tensors, numpy."""
    return _is_torch(x) or isinstance(x, np.ndarray)


def _lists_block(lists: np.ndarray, s: int, e: int) -> np.ndarray:
    """Rows ``s:e`` of the ``positive_index`` lists, cut to the block's widest list
    (lists are left-packed: padding -1 only at the end of a row)."""
    if (s, e) == (0, lists.shape[0]):
        return lists
    block = lists[s:e]
    width = max(1, int((block >= 0).sum(axis=1).max()))
    return np.ascontiguousarray(block[:, :width])


def _np_empty(n: int, like: np.ndarray) -> np.ndarray:
    return np.empty(n, dtype=like.dtype)


def _is_host(x) -> bool:
    """numpy arrays and plain Python data take the host path; other objects exposing
    ``__dlpack__`` (torch tensors, CuPy/JAX arrays, OrtValues) take the IOBinding path."""
    if x is None or isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        return True
    return not hasattr(x, "__dlpack__")


def _dtype_name(dt) -> str:
    """A dtype as numpy names it, whether given by torch, numpy or ONNX ('tensor(float)')."""
    if isinstance(dt, str) and dt.startswith("torch."):
        return dt[len("torch."):]
    if isinstance(dt, str) and dt in _ONNX_TO_NP:
        return np.dtype(_ONNX_TO_NP[dt]).name
    try:
        return np.dtype(dt).name
    except TypeError:
        return str(dt)


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _host_ints(x) -> np.ndarray:
    """Integer labels on the host: numpy as is, torch tensors and DLPack arrays copied."""
    if isinstance(x, np.ndarray):
        return x
    if _is_torch(x):
        return x.detach().cpu().numpy()
    if x.__dlpack_device__()[0] in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
        return np.from_dlpack(x)
    import onnxruntime as ort
    return ort.OrtValue.from_dlpack(x).numpy()


def _positive_int_or_none(value, name: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _check_seed(seed):
    """None or a non-negative integer (Python or numpy; not a bool)."""
    import numbers
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    return int(seed)


class OnnxMiner:
    """A miner exported by :func:`exportminers.export_onnx`, run with ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        providers: ONNX Runtime execution providers; default: CUDA when ONNX Runtime
            offers it (``onnxruntime-gpu``), else CPU. With
            ``session.disable_cpu_ep_fallback = "1"`` in ``session_options`` the default
            is ``["CUDAExecutionProvider"]`` alone (the two may not be combined).
        session_options: an ``onnxruntime.SessionOptions``, used as given. Without it, a
            CPU-only session uses a process-wide CPU arena that grows by what is requested
            and no memory pattern, which keeps repeated calls at one call's peak memory
            (ONNX Runtime's defaults need about twice that, see
            :mod:`exportminers.runtime.arena`).
        seed: seeds the numpy generator (``numpy.random.default_rng``) that draws the
            uniform noise of random miners; calls draw successively from it, so two
            ``OnnxMiner`` objects built with the same seed return the same sequence.
            A call may override it with its own ``seed=`` or pass ``noise=`` explicitly.
        chunk_size: mine anchors in blocks of this many rows against the whole reference
            set (graphs exported ``with_ref=True`` or ``anchor_blocks=True`` of miners
            whose anchor rows are independent; metadata ``row_independent``). Results
            equal one big call.
        max_block_elements: instead of ``chunk_size``, choose the block so that the
            largest tensor the graph computes stays within this many elements. Without
            either, chunkable graphs are cut on their own (2^31 - 1 elements a block on
            the CUDA EP, :data:`CPU_BLOCK_ELEMENTS` or a larger tensor every run computes
            anyway on the CPU EP).
        check_finite: reject NaN/inf embeddings (default: as the exported miner).
        provider_options: one options dict per provider, passed to ``InferenceSession``.
        allow_tf32: let ONNX Runtime's CUDA EP run float32 matmuls in TF32 (its own
            default). Off by default: TF32 rounds the inputs to 10 mantissa bits, moving
            distances by about 1e-3, and the mined tuples then differ from the eager
            miner's and PML's near every margin (see :mod:`exportminers.runtime.providers`).

    Calling it: ``om(embeddings, labels[, ref_emb, ref_labels], seed=None, noise=None,
    return_raw=False, device_output=False)``.

    * numpy inputs (or anything ``np.asarray`` takes) run through ``session.run``;
    * inputs exposing ``__dlpack__`` (torch tensors, CUDA or CPU, CuPy arrays ...) are
      bound in place with IOBinding, outputs are allocated on the same device;
    * the result is a tuple of numpy int64 arrays shaped like the eager miner's
      (``(a, p, n)``, ``(a1, p, a2, n)``, or one array for subset miners);
      ``device_output=True`` (torch inputs) decodes on the inputs' device and returns
      torch int64 tensors there; ``return_raw=True`` returns the graph's fixed-shape
      outputs instead (numpy arrays, or ``OrtValue`` objects on the device for the
      IOBinding path: ``torch.from_dlpack(v)`` views them without a copy).

    On the IOBinding path, inputs are checked for shape and dtype without leaving the
    device; the NaN/inf check runs for torch tensors (on their device) and host
    DLPack arrays, and is skipped for other device arrays.

    On the CUDA EP no tensor may exceed 2^31 - 1 elements (a larger one fails and leaves
    the process's CUDA context unusable): chunkable graphs are then mined in anchor
    blocks automatically, other calls that would exceed it raise ``ValueError`` first.
    On the CPU EP, chunkable graphs called without ``chunk_size`` /
    ``max_block_elements`` are mined in blocks within :data:`CPU_BLOCK_ELEMENTS` (or
    within a larger tensor every run computes anyway), and a call whose largest tensor
    has more elements than the process may use bytes (:func:`physical_memory_bytes`)
    raises ``ValueError`` first. ONNX Runtime failing to allocate a run's memory is a
    ``MemoryError`` that says what ran and how to make it smaller.
    """

    def __init__(self, path: Union[str, os.PathLike], providers: Optional[Sequence[Any]] = None,
                 session_options=None, *, seed: Optional[int] = None,
                 chunk_size: Optional[int] = None, max_block_elements: Optional[int] = None,
                 check_finite: Optional[bool] = None,
                 provider_options: Optional[Sequence[Dict[str, Any]]] = None,
                 allow_tf32: bool = False):
        import onnxruntime as ort

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ValueError(f"path {self.path!r} is not a file")
        if providers is None:
            providers = ["CUDAExecutionProvider"] if _strict_gpu(session_options) \
                else default_providers()
        elif isinstance(providers, str):   # one provider name, not its characters
            providers = [providers]
        compat.warn_if_untested(ort)
        if session_options is None and arena.cpu_only(list(providers)):
            session_options = arena.default_cpu_options(ort)   # see exportminers.runtime.arena
        providers = exact_providers(providers, provider_options, allow_tf32)
        try:
            self.session = ort.InferenceSession(
                self.path, sess_options=session_options, providers=providers,
                **compat.session_kwargs(ort))
        except Exception as e:
            text = str(e)
            if "fallback" in text.lower() and "disable" in text.lower():
                raise ValueError(
                    f"path {self.path!r}: ONNX Runtime cannot place every node on providers "
                    f"{[p[0] for p in providers]} with CPU fallback disabled (session_options: "
                    f"session.disable_cpu_ep_fallback=1); available here: "
                    f"{ort.get_available_providers()} ({type(e).__name__}: "
                    f"{text.strip()[:300]})") from e
            if type(e).__name__ in ("InvalidProtobuf", "InvalidGraph", "Fail", "InvalidArgument",
                                    "NoSuchFile"):
                detail, hint = text.strip()[:300], ""
                ir = re.search(r"Unsupported model IR version: \d+, max supported IR "
                               r"version: \d+", text)
                if ir:   # exported graphs are ONNX IR 10
                    detail = ir.group(0)
                    hint = (f"; exportminers' graphs are IR 10, so they need onnxruntime>=1.18 "
                            f"(tested from 1.26), this is {ort.__version__}")
                raise ValueError(f"path {self.path!r}: ONNX Runtime cannot load it as an ONNX "
                                 f"model ({type(e).__name__}: {detail}){hint}") from e
            raise
        meta = md.decode(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.metadata: Dict[str, Any] = meta
        self.miner_name: str = meta[md.MINER]
        self.config: Dict[str, Any] = meta.get(md.CONFIG, {})
        self.layout: List[List[int]] = meta[md.LAYOUT]
        self.input_names: List[str] = meta[md.INPUTS]
        self.output_names: List[str] = meta[md.OUTPUTS]
        self.output_shapes: List[List[Any]] = meta.get(md.OUTPUT_SHAPES, [])
        self.noise_spec: List[Any] = meta[md.NOISE_SHAPE]
        self.output_kind: str = meta[md.OUTPUT_KIND]
        self.with_ref: bool = bool(meta[md.WITH_REF])
        self.dtype = np.dtype(_DTYPES[meta[md.DTYPE]])
        self.embedding_dim: Optional[int] = meta[md.EMBEDDING_DIM]
        self.row_independent: bool = bool(meta.get(md.ROW_INDEPENDENT, False))
        self.batch_multiple: int = int(meta.get(md.BATCH_MULTIPLE, 1) or 1)
        self.compact: bool = bool(meta.get(md.COMPACT, False))
        self.anchor_blocks: bool = bool(meta.get(md.ANCHOR_BLOCKS, False))
        self.gather_positives: bool = bool(meta.get(md.GATHER_POSITIVES, False))
        if self.gather_positives and "unmatched_positives" not in self.output_names:
            raise ValueError(f"{self.path}: a gather_positives graph without its "
                             f"unmatched_positives output")
        self._unmatched = self.output_names.index("unmatched_positives") \
            if self.gather_positives else -1
        self.largest_tensors: List[List[Any]] = meta.get(md.LARGEST_TENSORS) or [
            ["N"] + list(dims[1:]) for dims in self.output_shapes]
        self.check_finite: bool = bool(meta.get(md.CHECK_FINITE, True)) \
            if check_finite is None else bool(check_finite)
        graph_inputs = {i.name: i for i in self.session.get_inputs()}
        for name in self.input_names:
            if name not in graph_inputs:
                raise ValueError(f"{self.path}: metadata names input {name!r}, the graph lacks it")
        self.noise_dtype = np.dtype(_ONNX_TO_NP.get(graph_inputs["noise"].type, np.float64)) \
            if "noise" in graph_inputs else None
        self.providers: List[str] = self.session.get_providers()
        self.on_cuda: bool = self.providers[0] == "CUDAExecutionProvider"
        self.on_cpu: bool = self.providers[0] == "CPUExecutionProvider"
        self._rng = np.random.default_rng(_check_seed(seed))
        self._largest_seen: Dict[Any, int] = {}
        self.chunk_size = _positive_int_or_none(chunk_size, "chunk_size")
        self.max_block_elements = _positive_int_or_none(max_block_elements, "max_block_elements")
        if self.chunk_size is not None and self.max_block_elements is not None:
            raise ValueError("pass chunk_size or max_block_elements, not both")
        if self.chunk_size is not None or self.max_block_elements is not None:
            self._check_chunkable()
        fields: List[int] = [f for part in self.layout for f in part[1:]]
        self._anchor_fields = [i for i, f in enumerate(fields) if f == -1]
        self.num_pos_pairs = 0
        self.num_neg_pairs = 0
        self.num_triplets = 0

    # ------------------------------------------------------------------ info

    @property
    def is_random(self) -> bool:
        """The miner draws uniform noise (a ``noise`` graph input)."""
        return len(self.noise_spec) > 0

    def __repr__(self) -> str:
        return (f"OnnxMiner({self.path!r}, miner={self.miner_name}, config={self.config}, "
                f"with_ref={self.with_ref}, dtype={self.dtype.name}, providers={self.providers})")

    @property
    def chunkable(self) -> bool:
        """Anchor rows can be mined in blocks with results equal to one call."""
        return self.row_independent and (self.with_ref or self.anchor_blocks)

    def _check_chunkable(self) -> None:
        arg = "chunk_size" if self.chunk_size is not None else "max_block_elements"
        if not self.with_ref and not self.anchor_blocks:
            raise ValueError(
                f"{arg}: anchor chunking needs a graph that takes a block of anchors with the "
                f"whole reference set: export with anchor_blocks=True (self-mining) or "
                f"with_ref=True")
        if not self.row_independent:
            raise ValueError(
                f"{arg}: {self.miner_name} does not mine each anchor row independently "
                f"(or draws noise), so its results cannot be computed in anchor blocks")

    def noise_shape(self, n: int, m: int) -> List[int]:
        """Shape of the noise input for ``n`` anchors and ``m`` references ([] if none)."""
        return [n if s == "N" else m if s == "M" else int(s) for s in self.noise_spec]

    def largest_tensor_elements(self, n: int, m: int, d: int, p: int = 0) -> int:
        """Most elements of any tensor the graph computes for ``n`` anchors, ``m``
        references (= ``n`` when self-mining), width ``d`` and, for ``gather_positives``
        graphs, ``p`` listed positives per anchor (not given: ``m``, the most there can
        be). Remembered per sizes (a training loop repeats them; evaluating the shapes
        costs a few us a call)."""
        if p <= 0 and self.gather_positives:
            p = m   # not given: at most every reference is a positive
        key = (n, m, d, p)
        found = self._largest_seen.get(key)
        if found is None:
            found = md.largest_elements(self.largest_tensors, {"N": n, "M": m, "D": d, "P": p})
            if len(self._largest_seen) >= 256:
                self._largest_seen.clear()
            self._largest_seen[key] = found
        return found

    def _rows_within(self, n: int, m: int, d: int, budget: int, p: int = 0) -> int:
        """Most anchor rows (at most ``n``) whose largest tensor fits ``budget``; 0 if
        not even one row fits."""
        if self.largest_tensor_elements(n, m, d, p) <= budget:
            return n
        lo, hi = 0, n   # elements(lo) fits (or lo = 0), elements(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.largest_tensor_elements(mid, m, d, p) <= budget:
                lo = mid
            else:
                hi = mid
        return lo

    def _soft_budget(self, m: int, d: int, p: int = 0) -> int:
        """Elements a default CPU block may reach: :data:`CPU_BLOCK_ELEMENTS`, or the
        graph's largest tensor that does not grow with the anchors (e.g. a [D, M] view
        of the reference set) where that is larger, so blocks never shrink to one row
        only because of a tensor every run computes anyway."""
        return max(CPU_BLOCK_ELEMENTS, self.largest_tensor_elements(0, m, d, p))

    def _rows_per_block(self, n: int, m: int, d: int, return_raw: bool = False,
                        auto: bool = True, p: int = 0) -> int:
        """Anchor rows per run.

        The asked-for chunking (``chunk_size`` / ``max_block_elements``) if any; else, for
        a chunkable graph on the CPU EP (and ``auto``), blocks whose largest tensor stays
        within :meth:`_soft_budget`. Then the hard limits, checked before anything runs
        (``ValueError`` where a block of one run cannot meet them): on the CUDA EP no
        tensor beyond :data:`CUDA_MAX_ELEMENTS` (chunkable graphs are cut below it), on
        the CPU EP no tensor with more elements than the process may use bytes
        (:func:`physical_memory_bytes`), a certain failure as every element takes at
        least a byte (chunkable graphs are then cut to the default CPU blocks).
        ``return_raw`` is one run."""
        per = n
        if self.chunk_size is not None:
            per = min(n, self.chunk_size)
        elif self.max_block_elements is not None:
            per = max(1, self._rows_within(n, m, d, self.max_block_elements, p))
        elif self.on_cpu and auto and self.chunkable and not return_raw:
            per = max(1, self._rows_within(n, m, d, self._soft_budget(m, d, p), p))
        if self.on_cuda:
            limit = CUDA_MAX_ELEMENTS
            what = "that ONNX Runtime's CUDA kernels handle (a larger one fails and leaves " \
                   "the process's CUDA context unusable)"
        elif self.on_cpu:
            limit = physical_memory_bytes()
            if limit is None:
                return per
            what = (f"bytes of memory this process may use ({limit / 2 ** 30:.1f} GiB, the "
                    f"machine's, its cgroup's or its rlimit; every element takes at least "
                    f"one byte)")
        else:   # other execution providers: their limits are not known here
            return per
        fit = self._rows_within(n, m, d, limit, p)
        if fit >= (n if return_raw else per):
            return per
        where = f"mining {n} anchors against {m} references" if self.with_ref or \
            self.anchor_blocks else f"self-mining {n} rows"
        head = (f"embeddings: {where} makes this {self.miner_name} graph compute a tensor of "
                f"{self.largest_tensor_elements(n, m, d, p):,} elements, more than the "
                f"{limit:,} {what}")
        if return_raw:
            raise ValueError(head + "; return_raw=True returns one run's outputs: mine fewer "
                             "anchors per call" + (", or drop return_raw to mine in anchor "
                                                   "blocks" if self.chunkable and fit >= 1
                                                   else ""))
        if fit >= 1 and self.chunkable:
            if self.on_cuda:
                return fit
            return min(fit, max(1, self._rows_within(n, m, d, self._soft_budget(m, d, p), p)))
        if self.chunkable:
            raise ValueError(
                head + f"; even one anchor row needs {self.largest_tensor_elements(1, m, d, p):,}"
                f" elements: mine smaller batches" + (
                    " or against a smaller reference set" if self.with_ref else ""))
        if self.row_independent and not self.with_ref:
            raise ValueError(head + "; export the miner with anchor_blocks=True to mine the "
                             "batch in anchor blocks, or mine smaller batches")
        raise ValueError(head + "; mine smaller batches" + (
            " or against a smaller reference set" if self.with_ref else ""))

    # ------------------------------------------------------------------ calling

    def __call__(self, embeddings, labels, ref_emb=None, ref_labels=None, *,
                 seed: Optional[int] = None, noise=None, return_raw: bool = False,
                 device_output: bool = False):
        """Mine; see the class docstring."""
        for value, name in ((embeddings, "embeddings"), (labels, "labels")):
            if value is None:
                raise ValueError(f"{name} is required, got None")
        same_labels = ref_labels is not None and ref_labels is labels and self.with_ref
        if not _is_host(embeddings):
            return self._call_bound(embeddings, labels, ref_emb, ref_labels, seed, noise,
                                    return_raw, device_output, same_labels)
        if device_output:
            raise ValueError("device_output=True needs device-resident (torch) inputs; "
                             "numpy inputs give numpy outputs")
        emb, lab, ref, ref_lab = checks_np.check_inputs(
            embeddings, labels, ref_emb, ref_labels, self.check_finite)
        self._check_graph_args(emb.shape, ref is not None)
        if same_labels:
            _warn_identity(stacklevel=2)
        # values beyond a narrower graph type's range (float64 -> float32, -> float16)
        narrowing = self.check_finite and emb.dtype.itemsize > self.dtype.itemsize
        ref_narrowing = self.check_finite and ref is not None and \
            ref.dtype.itemsize > self.dtype.itemsize
        with np.errstate(over="ignore"):   # overflow is reported just below
            emb = emb.astype(self.dtype, copy=False)
            ref = None if ref is None else ref.astype(self.dtype, copy=False)
        if narrowing:
            checks_np.check_in_range(emb, "embeddings")
        if ref_narrowing:
            checks_np.check_in_range(ref, "ref_emb")
        n = emb.shape[0]
        m = n if ref is None else ref.shape[0]
        noise_arr = self._noise(n, m, seed, noise)
        if n == 0 or m == 0:
            return self._empty(n, m, return_raw)
        lists = self._positive_lists(lab, ref_lab)
        p = 0 if lists is None else lists.shape[1]
        per = self._rows_per_block(n, m, emb.shape[1], return_raw, p=p)

        def run(s: int, e: int):
            if self.anchor_blocks:
                feeds = {"embeddings": np.ascontiguousarray(emb),
                         "labels": np.ascontiguousarray(lab),
                         "anchor_index": np.arange(s, e, dtype=np.int64)}
            else:
                feeds = {"embeddings": np.ascontiguousarray(emb[s:e]),
                         "labels": np.ascontiguousarray(lab[s:e])}
            if ref is not None:
                feeds["ref_emb"] = np.ascontiguousarray(ref)
                feeds["ref_labels"] = np.ascontiguousarray(ref_lab)
            if noise_arr is not None:
                feeds["noise"] = noise_arr
            if lists is not None:
                feeds["positive_index"] = _lists_block(lists, s, e)
            try:
                outs = self.session.run(self.output_names, feeds)
            except Exception as err:
                self._raise_if_out_of_memory(err, e - s, m, emb.shape[1], return_raw, p)
                raise
            if lists is not None:
                self._check_lists(outs[self._unmatched], s)
            return outs

        if return_raw:
            return run(0, n)
        blocks = []
        for s in range(0, n, per):
            e = min(n, s + per)
            blocks.append((s, self._decode_np(run(s, e))))
        return self._finish(self._join(blocks, _np_empty))

    def _raise_if_out_of_memory(self, err: Exception, rows: int, m: int, d: int,
                                return_raw: bool = False, p: int = 0) -> None:
        """ONNX Runtime's failure to allocate a run's memory as a MemoryError that says
        what was run and how to make it smaller; other errors pass."""
        text = str(err)
        if not _OUT_OF_MEMORY.search(text):
            return
        found = re.search(r"Failed to allocate memory for requested buffer of size \d+", text)
        detail = found.group(0) if found else text.strip()[:300]
        if return_raw:
            hint = "return_raw=True is one run: mine fewer anchors per call" + (
                ", or drop return_raw to mine in anchor blocks" if self.chunkable else "")
        elif self.chunkable:
            hint = "pass a smaller max_block_elements (or chunk_size) to mine fewer anchors a run"
        elif self.row_independent and not self.with_ref:
            hint = ("export the miner with anchor_blocks=True and pass max_block_elements, or "
                    "mine smaller batches")
        else:
            hint = "mine smaller batches" + (" or against a smaller reference set"
                                             if self.with_ref else "")
        raise MemoryError(
            f"embeddings: ONNX Runtime ran out of memory running this {self.miner_name} graph "
            f"on {rows} anchor rows against {m} references (largest tensor "
            f"{self.largest_tensor_elements(rows, m, d, p):,} elements; {detail}); {hint}") from err

    def _check_graph_args(self, emb_shape, has_ref: bool) -> None:
        if has_ref and not self.with_ref:
            raise ValueError(
                f"ref_emb: this graph ({self.miner_name}) was exported for self-mining "
                f"(with_ref=False); export it with with_ref=True to mine against ref_emb")
        if not has_ref and self.with_ref:
            raise ValueError(
                f"ref_emb: this graph ({self.miner_name}) was exported with with_ref=True; "
                f"pass ref_emb and ref_labels")
        d = emb_shape[1]
        if self.embedding_dim is not None and d != self.embedding_dim:
            raise ValueError(
                f"embeddings has embedding size {d} but this graph was exported with "
                f"embedding_dim={self.embedding_dim}")
        if self.batch_multiple > 1 and emb_shape[0] % self.batch_multiple != 0:
            raise ValueError(
                f"embeddings must hold whole triplets (a multiple of {self.batch_multiple} "
                f"rows), got {emb_shape[0]} rows")

    def _noise(self, n: int, m: int, seed: Optional[int], noise) -> Optional[np.ndarray]:
        if not self.is_random:
            if noise is not None:
                raise ValueError(f"noise: {self.miner_name} is deterministic and takes no noise")
            return None
        shape = self.noise_shape(n, m)
        if noise is not None:
            if hasattr(noise, "__dlpack__") and not isinstance(noise, np.ndarray) and _is_torch(noise):
                noise = noise.detach().cpu().numpy()
            noise = np.asarray(noise)
            if list(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {list(noise.shape)}")
            if checks_np.dtype_kind(noise.dtype) != "f":
                raise ValueError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
            if noise.size and not (bool((noise >= 0).all()) and bool((noise < 1).all())):
                bad = noise[~((noise >= 0) & (noise < 1))].ravel()[:3].tolist()
                raise ValueError(f"noise must hold uniform draws in [0, 1), got values such as {bad}")
            return np.ascontiguousarray(noise, dtype=self.noise_dtype)
        rng = self._rng if seed is None else np.random.default_rng(_check_seed(seed))
        return rng.random(shape, dtype=np.float64).astype(self.noise_dtype, copy=False)

    def _empty(self, n: int, m: int, return_raw: bool, like=None):
        if return_raw:
            out = []
            types = {o.name: o.type for o in self.session.get_outputs()}
            # compact graphs record no shapes: their outputs are 1-D, of any length
            for name, dims in zip(self.output_names,
                                  self.output_shapes or [[0]] * len(self.output_names)):
                shape = [n if s == "N" else m if s == "M" else 1 if s == "P" else
                         (s if isinstance(s, int) else 0) for s in dims]
                out.append(np.zeros(shape, dtype=_ONNX_TO_NP.get(types[name], np.float32)))
            return out
        k = md.TUPLE_LENGTH[self.output_kind]
        if like is not None:
            import torch
            return self._finish([torch.empty(0, dtype=torch.int64, device=like.device)
                                 for _ in range(k)])
        return self._finish([np.zeros(0, dtype=np.int64) for _ in range(k)])

    def _positive_lists(self, labels, ref_labels) -> Optional[np.ndarray]:
        """A ``gather_positives`` graph's ``positive_index`` for every anchor (host
        numpy; torch and DLPack labels are copied to the host: N int64 values), else
        None. Self-mining and anchor-block graphs exclude each anchor's own row."""
        if not self.gather_positives:
            return None
        return positives.positive_index(_host_ints(labels),
                                        None if ref_labels is None else _host_ints(ref_labels))

    def _check_lists(self, unmatched, start: int) -> None:
        """The graph's ``unmatched_positives`` must be zero: the lists named every
        positive (they are computed here, so anything else is a bug, never data to drop)."""
        arr = unmatched if isinstance(unmatched, np.ndarray) else unmatched.numpy()
        bad = np.flatnonzero(arr)
        if bad.size:
            i = int(bad[0])
            raise RuntimeError(
                f"{self.path}: the graph found {int(arr[i])} positive(s) of anchor "
                f"{start + i} (and {bad.size - 1} more anchors) not listed in "
                f"positive_index, whose triplets would be missing; please report this")

    def _decode_np(self, outputs: List[np.ndarray]) -> List[np.ndarray]:
        if self.compact:
            return [np.asarray(o).astype(np.int64, copy=False) for o in outputs]
        return decode_np.decode(outputs, self.layout)

    def _join(self, blocks, empty):
        """Concatenate decoded anchor blocks ``[(start, fields)]``, shifting anchor
        coordinates by each block's start. Each output is allocated once (``empty(count,
        like)``) and filled block by block, dropping every block's piece once copied, so
        the peak is about the output plus one output field (concatenating kept every
        piece alive beside the result: twice the output). Freed host memory may stay
        with the process (the C allocator's heap) for later allocations."""
        if len(blocks) == 1:
            return blocks[0][1]
        for i, (start, fields) in enumerate(blocks):   # the caller's list: pieces let go
            if not isinstance(fields, list):
                blocks[i] = (start, list(fields))
        out = []
        for k in range(len(blocks[0][1])):
            dest = empty(sum(int(fields[k].shape[0]) for _, fields in blocks), blocks[0][1][k])
            pos = 0
            for start, fields in blocks:
                piece, fields[k] = fields[k], None
                stop = pos + int(piece.shape[0])
                dest[pos:stop] = piece
                if start and k in self._anchor_fields:
                    dest[pos:stop] += start
                pos = stop
                del piece
            out.append(dest)
        return out

    def _finish(self, fields):
        k = md.TUPLE_LENGTH[self.output_kind]
        if len(fields) != k:
            raise ValueError(
                f"{self.path}: the layout decodes to {len(fields)} tensors, expected {k} for "
                f"{self.output_kind}")
        self.num_pos_pairs = self.num_neg_pairs = self.num_triplets = 0
        if self.output_kind == "triplets":
            self.num_triplets = int(fields[0].shape[0])
        elif self.output_kind == "pairs":
            self.num_pos_pairs = int(fields[0].shape[0])
            self.num_neg_pairs = int(fields[2].shape[0])
        if self.output_kind == "subset":
            return fields[0]
        return tuple(fields)

    # ------------------------------------------------------------------ IOBinding

    def _prepare_bound(self, x, name: str, want_float: bool, n_rows: Optional[int], emb_name: str):
        """Validate one input of the IOBinding path without leaving its device.

        Device arrays (torch tensors, DLPack objects) stay where they are; host arrays
        (numpy, lists: typical for labels) are validated with numpy and bound as CPU
        inputs (ONNX Runtime copies them to the device).

        Returns:
            (the value to bind: a torch tensor cast/contiguous, a DLPack object or a numpy
            array; its shape; its original dtype, as a name or a numpy dtype)
        """
        import onnxruntime as ort
        if x is None:
            return None, None, ""
        if _is_host(x):
            arr = checks_np._as_array(x, name)
            shape, kind, dtype_name = list(arr.shape), checks_np.dtype_kind(arr.dtype), arr.dtype
        elif _is_torch(x):
            import torch
            shape = list(x.shape)
            kind = "f" if x.is_floating_point() else (
                "b" if x.dtype == torch.bool else ("o" if x.is_complex() else "i"))
            dtype_name = str(x.dtype)
        else:
            contiguous = ("ONNX Runtime needs a contiguous tensor; pass a contiguous one, or "
                          "a torch tensor or numpy array, which are made contiguous")
            if x.__dlpack_device__()[0] in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
                view = np.from_dlpack(x)   # a host view: its strides can be checked here
                if not view.flags.c_contiguous:
                    raise ValueError(f"{name}: ONNX Runtime cannot take this DLPack input "
                                     f"(strided, not contiguous): {contiguous}")
            try:
                ov = ort.OrtValue.from_dlpack(x)
            except Exception as e:  # e.g. strided: ONNX Runtime takes contiguous tensors only
                raise ValueError(f"{name}: ONNX Runtime cannot take this DLPack input "
                                 f"({contiguous}): {str(e).strip().splitlines()[-1][:200]}") from None
            shape = list(ov.shape())
            kind = checks_np.dtype_kind(ov.data_type())
            dtype_name = ov.data_type()
        if want_float:
            checks_np.check_embeddings_meta(shape, kind, dtype_name, name)
        else:
            checks_np.check_labels_meta(shape, kind, dtype_name, name, n_rows, emb_name)
        want = self.dtype if want_float else np.dtype(np.int64)
        if _is_host(x):
            if want_float and self.check_finite:
                checks_np.check_finite(arr, name)
            return np.ascontiguousarray(arr, dtype=want), shape, dtype_name
        if _is_torch(x):
            import torch
            target = (torch.float16 if self.dtype == np.float16 else torch.float32) \
                if want_float else torch.int64
            from ..utils.checks import require_finite  # the eager miners' check
            if want_float and self.check_finite:
                require_finite(x, name)   # NaN/inf in the input itself
            narrows = want_float and x.dtype != target
            x = x.detach().to(target).contiguous()
            if narrows and self.check_finite:
                try:
                    require_finite(x, name)
                except ValueError:
                    raise ValueError(
                        f"{name} has values beyond {self.dtype.name}'s range (largest "
                        f"{float(np.finfo(self.dtype).max):g}), the graph's input type; "
                        "rescale them or export a wider graph") from None
            return x, shape, dtype_name
        if np.dtype(_ONNX_TO_NP.get(dtype_name, np.void)) != want:
            raise ValueError(f"{name}: a DLPack input must already have dtype {want.name} "
                             f"(or pass a torch tensor, which is cast), got {dtype_name}")
        device = x.__dlpack_device__()[0]
        if want_float and self.check_finite and device in (_DLPACK_CPU, _DLPACK_CUDA_HOST):
            checks_np.check_finite(np.from_dlpack(x), name)
        return x, shape, dtype_name

    @staticmethod
    def _bind(binding, name: str, value) -> Any:
        """Bind a host array (copied by ONNX Runtime) or a device array (zero-copy);
        returns what must stay alive until the run ends."""
        import onnxruntime as ort
        if isinstance(value, np.ndarray):
            value = np.ascontiguousarray(value)
            binding.bind_cpu_input(name, value)
            return value
        if _is_torch(value):
            value = value.contiguous()
        ov = ort.OrtValue.from_dlpack(value)
        binding.bind_ortvalue_input(name, ov)
        return (value, ov)

    def _call_bound(self, embeddings, labels, ref_emb, ref_labels, seed, noise,
                    return_raw: bool, device_output: bool, same_labels: bool = False):
        import onnxruntime as ort
        if not compat.has_dlpack(ort):
            raise ValueError(
                f"embeddings: torch tensors and DLPack arrays go through ONNX Runtime's "
                f"IOBinding with OrtValue.from_dlpack, which onnxruntime {ort.__version__} "
                f"lacks (added in 1.26); pass numpy arrays, or upgrade onnxruntime")
        checks_np.check_ref_given(ref_emb, ref_labels)
        emb, emb_shape, emb_dt = self._prepare_bound(embeddings, "embeddings", True, None, "")
        n = int(emb_shape[0])
        lab, _, _ = self._prepare_bound(labels, "labels", False, n, "embeddings")
        ref, ref_shape, ref_dt = self._prepare_bound(ref_emb, "ref_emb", True, None, "")
        if ref is not None:   # torch, numpy and ONNX dtype names compared as one kind
            checks_np.check_pair_meta(emb_shape, _dtype_name(emb_dt), ref_shape,
                                      _dtype_name(ref_dt))
        m = n if ref is None else int(ref_shape[0])
        ref_lab, _, _ = self._prepare_bound(ref_labels, "ref_labels", False, m, "ref_emb")
        self._check_graph_args(emb_shape, ref is not None)
        if same_labels:
            _warn_identity(stacklevel=3)
        torch_in = _is_torch(emb)
        if device_output and not torch_in:
            raise ValueError("device_output=True decodes with torch: pass torch tensors")
        noise_arr = self._noise(n, m, seed, noise)
        if n == 0 or m == 0:
            if return_raw:
                return self._empty(n, m, True)
            return self._empty(n, m, False, like=emb if device_output else None)
        dev_type, dev_id = emb.__dlpack_device__()
        out_device = "cuda" if dev_type in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED) else "cpu"
        # anchor blocks of a with_ref graph slice the inputs: torch tensors and numpy only
        sliceable = self.anchor_blocks or all(_sliceable(v) for v in (emb, lab))
        lists = self._positive_lists(lab, ref_lab)
        p = 0 if lists is None else lists.shape[1]
        per = self._rows_per_block(n, m, int(emb_shape[1]), return_raw, auto=sliceable, p=p)
        if per < n and not sliceable:
            why = ("chunk_size" if self.chunk_size is not None else "max_block_elements"
                   if self.max_block_elements is not None else
                   "the CUDA EP's 2^31-element limit" if self.on_cuda else "the memory limit")
            for what, v in (("embeddings", emb), ("labels", lab)):
                if not _sliceable(v):
                    raise ValueError(
                        f"{what}: mining in anchor blocks ({per} of {n} rows a run, for {why}) "
                        "slices the inputs, which works for torch tensors and numpy arrays "
                        f"only, not {type(v).__name__}; pass one of those" + (
                            ", or no chunk_size / max_block_elements"
                            if why in ("chunk_size", "max_block_elements") else ""))

        def run(s: int, e: int):
            binding = self.session.io_binding()
            whole = (s, e) == (0, n) or self.anchor_blocks
            keep = [self._bind(binding, "embeddings", emb if whole else emb[s:e]),
                    self._bind(binding, "labels", lab if whole else lab[s:e])]
            if self.anchor_blocks:
                keep.append(self._bind(binding, "anchor_index", np.arange(s, e, dtype=np.int64)))
            if ref is not None:
                keep.append(self._bind(binding, "ref_emb", ref))
                keep.append(self._bind(binding, "ref_labels", ref_lab))
            if noise_arr is not None:
                binding.bind_cpu_input("noise", noise_arr)
            if lists is not None:
                keep.append(self._bind(binding, "positive_index", _lists_block(lists, s, e)))
            for name in self.output_names:
                binding.bind_output(name, out_device, dev_id if out_device == "cuda" else 0)
            binding.synchronize_inputs()
            try:
                self.session.run_with_iobinding(binding)
            except Exception as err:
                self._raise_if_out_of_memory(err, e - s, m, int(emb_shape[1]), return_raw, p)
                raise
            binding.synchronize_outputs()
            outs = binding.get_outputs()
            del keep  # the inputs had to outlive the run
            if lists is not None:
                self._check_lists(outs[self._unmatched], s)
            return [outs[i] for i in range(len(self.output_names))]

        if return_raw:
            return run(0, n)
        blocks = []
        for s in range(0, n, per):
            e = min(n, s + per)
            outs = run(s, e)
            if device_output:
                import torch
                from ..decode import decode as decode_torch
                # bool outputs come through DLPack as uint8 from older onnxruntime (1.26)
                tens = [t.bool() if t.dtype == torch.uint8 else t
                        for t in (torch.from_dlpack(o) for o in outs)]
                if self.compact:
                    fields = [t.to(torch.int64) for t in tens]
                else:
                    fields = decode_torch(tens, self.layout)
            else:
                fields = self._decode_np([o.numpy() for o in outs])
            blocks.append((s, fields))
        if device_output:
            import torch
            return self._finish(self._join(
                blocks, lambda n, like: torch.empty(n, dtype=like.dtype, device=like.device)))
        return self._finish(self._join(blocks, _np_empty))
