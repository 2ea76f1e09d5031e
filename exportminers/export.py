"""Export built-in miners to ONNX and TorchScript.

ONNX: :func:`export_onnx` wraps ``miner.kernel`` (the fixed-shape mining step) in a tiny
module and exports it with ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` +
onnxscript) and ``torch.export.Dim`` dynamic axes. That exporter was chosen because it
captures the kernel as one ATen graph with named symbolic sizes (``N``, ``M``, ``D``),
runs onnxscript's optimizer (constant folding, dead-code removal) and gives the flattest
graph; the TorchScript-based exporter (``dynamo=False``) is deprecated in torch 2.x and
emits more shape-computing nodes. Export-only variants of a few primitives
(:func:`exportminers._ops.is_exporting`) keep data-dependent and shape-computing
operators out of the graph.

The graph computes fixed-shape tensors only (masks, per-anchor indices, validity flags);
:class:`exportminers.OnnxMiner` decodes them into index tuples with the layout stored in
the graph's metadata. By default no ``NonZero``/``Loop``/``If``/``Compress``/``Unique``/
``Scan`` node is allowed (checked after every export); ``compact=True`` appends the
decoding (``NonZero`` and gathers) to the graph so it returns the index tuples itself.

TorchScript: :func:`export_torchscript` scripts the whole miner (validation, kernel,
decoding); :func:`load_torchscript` loads it back wrapped so bad input raises
``ValueError`` as in eager mode.

Example:
    >>> miner = miners.TripletMarginMiner(margin=0.2)
    >>> export_onnx(miner, "tm.onnx", embedding_dim=128)
    'tm.onnx'
    >>> a, p, n = OnnxMiner("tm.onnx")(emb, labels)
"""
import contextlib
import inspect
import json
import logging
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import __version__, registry
from .runtime import metadata as md
from .utils.checks import check_positive_int

FORBIDDEN_OPS = frozenset({"NonZero", "Loop", "If", "Compress", "Unique", "Scan"})
SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "Range"})

# Derived from the registry (the one list of built-in miners and how they may be run).
ROW_INDEPENDENT = frozenset(n for n, s in registry.MINERS.items() if s.row_independent)
SELF_ONLY = frozenset(n for n, s in registry.MINERS.items() if s.self_only)
BATCH_MULTIPLE = {n: s.batch_multiple for n, s in registry.MINERS.items() if s.batch_multiple > 1}

_EXAMPLE_N, _EXAMPLE_M, _EXAMPLE_D = 9, 14, 6
_DIM_MAX = 2 ** 40
_PROBES = ((1009, 2003), (1013, 2011))
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16"}
_EXPORTER = f"torch.onnx.export(dynamo=True), torch {torch.__version__}"
# Opset 18: ONNX Runtime's CUDA EP matches an open-ended kernel ("13+") only to nodes of
# exactly that version, and its OperatorKernels.md (early 2026) registers no CUDA kernel
# for Equal-19 or ReduceMax/ReduceMin-20 (onnxruntime issue #27729), which opset 20
# graphs use: those nodes would fall back to the CPU. At 18 every node of every
# exported graph has a CUDA kernel (tests/test_cuda_kernel_coverage.py).
DEFAULT_OPSET = 18

# The oldest torch whose exporter this package's test suite passes with (2.7, 2.8, 2.11
# and 2.13 were run). torch 2.4 / 2.5 lack torch.onnx.export(dynamic_shapes=...); 2.6
# names the dynamic axes s0, s1, ... instead of N, M, D, which OnnxMiner's block sizing
# reads, and has no torch.compiler.is_exporting(), by which the kernels choose their
# export variants (exportminers._ops.is_exporting).
MIN_EXPORT_TORCH = (2, 7)


def require_onnx_exporter() -> None:
    """Raise a clear error, before anything is traced, where this environment cannot
    export: torch older than :data:`MIN_EXPORT_TORCH`, or onnxscript (the exporter's
    backend, the ``export`` extra) missing. Eager and TorchScript miners need neither, and
    :class:`exportminers.OnnxMiner` runs graphs exported elsewhere without torch."""
    import importlib.util

    from .runtime.compat import release
    v = release(torch)
    if v is not None and v < MIN_EXPORT_TORCH:
        need = ".".join(map(str, MIN_EXPORT_TORCH))
        raise RuntimeError(
            f"ONNX export needs torch>={need} (torch.onnx.export(dynamo=True) with named "
            f"dynamic axes); this is torch {torch.__version__}. Eager and TorchScript "
            f"miners work with torch>=2.4, and OnnxMiner runs graphs exported elsewhere.")
    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError("ONNX export needs onnxscript (the torch exporter's backend): "
                          "pip install 'exportminers[export]' (or pip install onnxscript)")


# ---------------------------------------------------------------------------- wrappers


class _KernelGraph(nn.Module):
    """Calls ``miner.kernel`` and returns its fixed-shape outputs (optionally decoded)."""

    def __init__(self, miner: nn.Module, compact: bool):
        super().__init__()
        self.miner = miner
        self.compact = compact

    def _run(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
             ref_labels: Optional[Tensor], noise: Optional[Tensor]) -> Tuple[Tensor, ...]:
        out = list(self.miner.kernel(embeddings, labels, ref_emb, ref_labels, noise))
        return self._finish(out)

    def _finish(self, out: List[Tensor]) -> Tuple[Tensor, ...]:
        if self.compact:
            out = compact_decode(out, self.miner.layout)
        # A kernel may return one tensor twice (BatchEasyHard's shared validity mask).
        # Some exporters (torch 2.6, 2.8) then name the second output after the first
        # ("mask2_alias_2"); a copy keeps every output its own name.
        for k in range(1, len(out)):
            if any(out[k] is out[j] for j in range(k)):
                out[k] = out[k].clone()
        return tuple(out)


class _SelfGraph(_KernelGraph):
    def forward(self, embeddings: Tensor, labels: Tensor):
        return self._run(embeddings, labels, None, None, None)


class _SelfNoiseGraph(_KernelGraph):
    def forward(self, embeddings: Tensor, labels: Tensor, noise: Tensor):
        return self._run(embeddings, labels, None, None, noise)


class _AnchorGraph(_KernelGraph):
    """Self-mining of the rows ``anchor_index`` of the batch against the whole batch."""

    def forward(self, embeddings: Tensor, labels: Tensor, anchor_index: Tensor):
        out = self.miner.kernel(embeddings.index_select(0, anchor_index),
                                labels.index_select(0, anchor_index), embeddings, labels,
                                None, anchor_ids=anchor_index)
        return self._finish(list(out))


class _SelfGatherGraph(_KernelGraph):
    """Self-mining over listed positives (``gather_positives=True``)."""

    def forward(self, embeddings: Tensor, labels: Tensor, positive_index: Tensor):
        return self._finish(list(self.miner.gather_kernel(embeddings, labels, None, None,
                                                          positive_index)))


class _AnchorGatherGraph(_KernelGraph):
    def forward(self, embeddings: Tensor, labels: Tensor, anchor_index: Tensor,
                positive_index: Tensor):
        out = self.miner.gather_kernel(embeddings.index_select(0, anchor_index),
                                       labels.index_select(0, anchor_index), embeddings,
                                       labels, positive_index, anchor_ids=anchor_index)
        return self._finish(list(out))


class _RefGatherGraph(_KernelGraph):
    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor, ref_labels: Tensor,
                positive_index: Tensor):
        return self._finish(list(self.miner.gather_kernel(embeddings, labels, ref_emb,
                                                          ref_labels, positive_index)))


class _RefGraph(_KernelGraph):
    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor, ref_labels: Tensor):
        return self._run(embeddings, labels, ref_emb, ref_labels, None)


class _RefNoiseGraph(_KernelGraph):
    def forward(self, embeddings: Tensor, labels: Tensor, ref_emb: Tensor, ref_labels: Tensor,
                noise: Tensor):
        return self._run(embeddings, labels, ref_emb, ref_labels, noise)


def compact_decode(outputs: List[Tensor], layout: List[List[int]]) -> List[Tensor]:
    """:func:`exportminers.decode.decode` written for the exporter (``compact=True``):
    ``nonzero`` of each mask gives the row-major coordinates, fields are gathered there."""
    result: List[Tensor] = []
    for part in layout:
        mask = outputs[part[0]]
        coords = torch.nonzero(mask)
        for f in part[1:]:
            if f < 0:
                result.append(coords[:, -f - 1])
            else:
                result.append(outputs[f].expand_as(mask)[mask].to(torch.int64))
    return result


# ---------------------------------------------------------------------------- translations


def _aten_sort_stable(self, stable=None, dim: int = -1, descending: bool = False):
    """``aten.sort.stable`` (``torch.argsort(..., stable=True)``) as ONNX ``TopK``.

    torch's ONNX function library has no lowering for the stable overload. ``TopK`` with
    ``sorted=1`` over the whole axis sorts; the ONNX spec breaks ties by the lower index,
    and ONNX Runtime's CPU kernel does, but its CUDA kernel does not for rows of 257 to
    4,096 elements, so kernels that export a sort make its keys unique (or, like
    ``_ops._merge_searchsorted``, tie-proof): tests/test_tie_order.py. ``K`` is read from
    the input's shape (one ``Shape -> Gather`` pair).
    """
    from onnxscript import opset18 as op
    k = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]))
    values, indices = op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def _aten_remainder_scalar(self, other):
    """``aten.remainder.Scalar`` that also takes a symbolic size (``x % t.size(1)``).

    torch's ONNX function library turns the scalar into a constant, which fails when the
    scalar is a symbolic dimension; casting it like ``self`` works for both.
    """
    from onnxscript import opset18 as op
    other = op.CastLike(other, self)
    if self.dtype.is_integer():
        return op.Mod(self, other)  # fmod=0: the sign of the divisor, like torch
    return op.Sub(self, op.Mul(op.Floor(op.Div(self, other)), other))


def _translations() -> Dict[Any, Any]:
    return {torch.ops.aten.sort.stable: _aten_sort_stable,
            torch.ops.aten.remainder.Scalar: _aten_remainder_scalar}


# ---------------------------------------------------------------------------- helpers


def _miner_name(miner: nn.Module) -> str:
    return type(miner).__name__


def miner_config(miner: nn.Module) -> Dict[str, Any]:
    """The constructor configuration of a miner, as JSON-able values.

    Read from the attributes named like the constructor's arguments, then from the
    miner's ``constructor_overrides()`` where it stores an argument otherwise (e.g. an
    angle in radians); the distance is described by its class and arguments.
    ``build_miner(name, miner_config(m))`` rebuilds ``m``.
    """
    skip = {"self", "distance", "normalize_embeddings", "use_similarity", "squared_distances",
            "collect_stats", "loss_function", "mining_function"}
    cfg: Dict[str, Any] = {}
    for cls in type(miner).__mro__:
        if cls is nn.Module or "__init__" not in cls.__dict__:
            continue
        for name, prm in inspect.signature(cls.__init__).parameters.items():
            if name in skip or name in cfg or prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD):
                continue
            if not hasattr(miner, name):
                continue
            value = getattr(miner, name)
            if isinstance(value, tuple):
                value = list(value)
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                value = repr(value)
            cfg[name] = value
    overrides = getattr(miner, "constructor_overrides", None)
    if callable(overrides):
        cfg.update(overrides())
    dist = getattr(miner, "distance", None)
    if isinstance(dist, nn.Module):
        cfg["distance"] = {"class": type(dist).__name__,
                           **{k: getattr(dist, k) for k in ("normalize_embeddings", "p", "power")
                              if hasattr(dist, k)}}
    for name in ("loss_function", "mining_function"):
        value = getattr(miner, name, None)
        if value is not None:
            cfg[name] = type(value).__name__
    return cfg


def _output_kind(miner: nn.Module, n_fields: int) -> str:
    from . import registry
    spec = registry.MINERS.get(_miner_name(miner))
    if spec is not None:
        return spec.output
    kinds = {3: "triplets", 4: "pairs", 1: "subset"}
    if n_fields not in kinds:
        raise ValueError(f"{_miner_name(miner)}: its layout decodes to {n_fields} tensors; "
                         f"expected 3 (triplets), 4 (pairs) or 1 (subset)")
    return kinds[n_fields]


def _dim_spec(values: Sequence[Sequence[int]], probes, with_ref: bool,
              widths: Optional[Sequence[int]] = None) -> List[Any]:
    """Name each dim: "N" / "M" (/ "P", the ``positive_index`` width ``widths``) when it
    follows the probe sizes, an int when constant, "?" otherwise."""
    spec: List[Any] = []
    for k in range(len(values[0])):
        vals = [v[k] for v in values]
        if all(v == n for v, (n, m) in zip(vals, probes)):
            spec.append("N")
        elif with_ref and all(v == m for v, (n, m) in zip(vals, probes)):
            spec.append("M")
        elif widths is not None and all(v == w for v, w in zip(vals, widths)):
            spec.append("P")
        elif all(v == vals[0] for v in vals):
            spec.append(int(vals[0]))
        else:
            spec.append("?")
    return spec


def noise_spec(miner: nn.Module, with_ref: bool) -> List[Any]:
    """Symbolic noise shape ("N", "M" or ints) from ``miner.noise_shape``."""
    fn = getattr(miner, "noise_shape", None)
    if fn is None:
        return []
    probes = _PROBES if with_ref else tuple((n, n) for n, _ in _PROBES)
    shapes = [list(fn(n, m)) for n, m in probes]
    if len(shapes[0]) == 0:
        return []
    spec = _dim_spec(shapes, probes, with_ref)
    if "?" in spec:
        raise NotImplementedError(
            f"{_miner_name(miner)}.noise_shape(n, m) = {shapes[0]} for n, m = {probes[0]}: "
            f"every dim must be n, m or a constant to be exported")
    return spec


def _resolve(spec: List[Any], n: int, m: int) -> List[int]:
    return [n if s == "N" else m if s == "M" else int(s) for s in spec]


def _example_inputs(miner: nn.Module, n: int, m: int, d: int, dtype: torch.dtype,
                    with_ref: bool, nspec: List[Any], seed: int = 0,
                    anchors: bool = False, gather_width: int = 0) -> List[Tensor]:
    """Random example inputs; ``gather_width`` > 0 appends a ``positive_index`` padded
    to that many slots (at least the most positives of any anchor)."""
    g = torch.Generator().manual_seed(seed)
    if anchors:   # the batch has m rows, n of them are the anchors
        args = [torch.randn(m, d, generator=g).to(dtype), torch.randint(0, 3, (m,), generator=g),
                torch.randperm(m, generator=g)[:n]]
    else:
        args = [torch.randn(n, d, generator=g).to(dtype), torch.randint(0, 3, (n,), generator=g)]
    if with_ref:
        args += [torch.randn(m, d, generator=g).to(dtype), torch.randint(0, 3, (m,), generator=g)]
    if nspec:
        args.append(torch.rand(_resolve(nspec, n, m if with_ref else n), generator=g,
                               dtype=torch.float64))
    if gather_width:
        from .runtime.positives import positive_index
        lists = positive_index(args[1].numpy(), args[3].numpy() if with_ref else None,
                               args[2].numpy() if anchors else None)
        if lists.shape[1] > gather_width:
            raise AssertionError(f"example positive lists are {lists.shape[1]} wide, more "
                                 f"than {gather_width}")
        padded = torch.full((lists.shape[0], gather_width), -1, dtype=torch.int64)
        padded[:, :lists.shape[1]] = torch.from_numpy(lists)
        args.append(padded)
    return args


def _row_independent(miner: nn.Module) -> bool:
    """Anchor rows are mined independently of each other (and no noise is drawn)."""
    name = _miner_name(miner)
    flag = bool(getattr(miner, "row_independent", name in ROW_INDEPENDENT))
    return flag and len(noise_spec(miner, True)) == 0


def _check_opset(opset) -> int:
    """An opset the dynamo exporter writes as asked: from 18 (its own) to the newest the
    installed ``onnx`` knows (it converts upward, never below 18)."""
    import numbers

    import onnx
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral) \
            or not 18 <= int(opset) <= newest:
        raise ValueError(f"opset must be an integer from 18 to {newest} (the torch exporter "
                         f"writes opset 18 or converts upward), got {opset!r}")
    return int(opset)


def _default_opset(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return -1


def largest_tensors(model) -> List[List[Any]]:
    """The shapes of the largest tensors a graph computes, symbolically.

    Reads the shapes the exporter recorded for every intermediate and output (dims are
    ints or symbolic expressions of ``N``, ``M``, ``D``) and keeps those not contained in
    another (a shape is dropped when another has every one of its dims, e.g. [N, M] next
    to [N, M, M]). ONNX Runtime's CUDA kernels fail beyond 2^31 elements per tensor
    (../shared/GPU_FACTS.md); :class:`OnnxMiner` sizes its blocks from these shapes.
    """
    shapes: List[List[Any]] = []
    values = list(model.graph.value_info) + list(model.graph.output)
    for vi in values:
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims: List[Any] = []
        for dim in tt.shape.dim:
            if dim.HasField("dim_value"):
                if dim.dim_value != 1:
                    dims.append(int(dim.dim_value))
            elif dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append("?")
        if "?" not in dims:
            shapes.append(sorted(dims, key=str))
    unique: List[List[Any]] = []
    for s in shapes:
        if s not in unique:
            unique.append(s)

    def contained(a: List[Any], b: List[Any]) -> bool:
        rest = list(b)
        for x in a:
            if x not in rest:
                return False
            rest.remove(x)
        return True

    return [a for a in unique
            if not any(b != a and len(b) > len(a) and contained(a, b) for b in unique)]


def _graph_module(miner: nn.Module, with_ref: bool, noisy: bool, compact: bool,
                  anchors: bool = False, gather: bool = False) -> _KernelGraph:
    if gather:
        cls = _AnchorGatherGraph if anchors else _RefGatherGraph if with_ref else _SelfGatherGraph
        return cls(miner, compact)
    if anchors:
        return _AnchorGraph(miner, compact)
    cls = {(False, False): _SelfGraph, (False, True): _SelfNoiseGraph,
           (True, False): _RefGraph, (True, True): _RefNoiseGraph}[(with_ref, noisy)]
    return cls(miner, compact)


def _all_nodes(model) -> List[Any]:
    """Every node of a ModelProto: main graph, subgraphs and local functions."""
    nodes: List[Any] = []

    def walk(graph_nodes):
        for node in graph_nodes:
            nodes.append(node)
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    walk(attr.g.node)
                for g in attr.graphs:
                    walk(g.node)

    walk(model.graph.node)
    for fn in model.functions:
        walk(fn.node)
    return nodes


def op_types(path_or_model) -> Dict[str, int]:
    """Count of each operator type in an ONNX file or ModelProto (subgraphs included)."""
    import onnx
    model = onnx.load(os.fspath(path_or_model)) if isinstance(path_or_model, (str, os.PathLike)) \
        else path_or_model
    counts: Dict[str, int] = {}
    for node in _all_nodes(model):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def _check_dynamic_axes(name: str, model, dynamic_shapes: Dict[str, Any]) -> None:
    """Raise if the exporter specialised an axis that was asked to be dynamic.

    ``torch.export`` silently fixes a size that the kernel turns into a Python number
    (``float(x.size(1))``, ``if n > 3``); the graph would then only accept the example
    size.
    """
    for inp in model.graph.input:
        dims = dynamic_shapes.get(inp.name) or {}
        shape = inp.type.tensor_type.shape.dim
        for axis, dim in dims.items():
            if axis < len(shape) and not shape[axis].dim_param:
                raise RuntimeError(
                    f"exporting {name}: the exporter fixed {inp.name}.shape[{axis}] to "
                    f"{shape[axis].dim_value} instead of keeping it dynamic ({getattr(dim, '__name__', dim)}); "
                    f"the kernel turns that size into a Python number (e.g. float(x.size(1)))"
                    + ("; pass embedding_dim= to export a fixed width" if axis == 1 and
                       inp.name in ("embeddings", "ref_emb") else ""))


def _error_summary(err: BaseException) -> str:
    """The informative line of an exporter error (its 'Exception summary'), else the text."""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        picked = [ln for ln in after if ln.startswith("<class")]
        if picked:
            return " / ".join(picked)
    return f"{type(err).__name__}: {text}"


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's warnings and info logging (restored afterwards)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                               "torch.fx.experimental.symbolic_shapes",
                                               "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ---------------------------------------------------------------------------- ONNX


def export_onnx(miner: nn.Module, path: Union[str, os.PathLike], *,
                embedding_dim: Optional[int] = None, with_ref: bool = False,
                dtype: torch.dtype = torch.float32, opset: Optional[int] = None,
                compact: bool = False, anchor_blocks: bool = False,
                gather_positives: bool = False) -> str:
    """Export a built-in miner's kernel to an ONNX graph with dynamic batch axes.

    Args:
        miner: a built-in miner (anything with ``kernel``, ``layout`` and optionally
            ``noise_shape``, see :mod:`exportminers.miners.base_miner`).
        path: where to write the ``.onnx`` file (parent folders are created).
        embedding_dim: fix the embedding width ``D``; None keeps it dynamic.
        with_ref: export ``(embeddings, labels, ref_emb, ref_labels)`` mining (anchors
            from ``embeddings``, positives/negatives from ``ref_emb``); otherwise
            self-mining with self-pairs excluded.
        dtype: ``torch.float32`` or ``torch.float16`` embeddings.
        opset: ONNX opset (default :data:`DEFAULT_OPSET`, 18: every node then has an ONNX
            Runtime CUDA kernel).
        compact: append the decoding (``NonZero`` + gathers) so the graph returns index
            tuples of data-dependent length instead of fixed-shape tensors.
        anchor_blocks: self-mining in anchor blocks (miners whose anchor rows are
            independent, see ``registry``): the graph takes the whole batch
            (``embeddings`` Tensor[M, D], ``labels`` Tensor[M]) and ``anchor_index``
            Tensor[N] int64, the rows mined as anchors; it mines them against the whole
            batch with each anchor's own row excluded, exactly as self-mining does, and its
            outputs' anchor axis follows ``anchor_index``. :class:`OnnxMiner` uses it to
            self-mine batches in blocks (``chunk_size``, ``max_block_elements``, and on
            the CUDA EP automatically below 2^31 elements per tensor).
        gather_positives: test each anchor's positives against every negative, [N, P, M]
            candidates (P = the most positives of any anchor) instead of [N, M, M], as
            the eager miners do: far smaller and faster graphs when classes are small
            (TripletMarginMiner without a cap, AngularMiner). P depends on the labels, so
            the graph takes one more input, ``positive_index`` Tensor[N, P] int64: each
            anchor's positive columns in increasing order, padded with -1
            (:func:`exportminers.runtime.positives.positive_index`, which
            :class:`OnnxMiner` calls itself). The graph checks the list: its output
            ``unmatched_positives`` Tensor[N] counts each anchor's positives the list
            misses (nonzero: a wrong list, whose triplets would be missing). Combines with
            ``with_ref`` and ``anchor_blocks``, not with ``compact``.

    Graph inputs: ``embeddings`` Tensor[N, D] (``dtype``), ``labels`` Tensor[N] int64;
    with ``with_ref``: ``ref_emb`` Tensor[M, D], ``ref_labels`` Tensor[M] int64; with
    ``anchor_blocks``: ``embeddings`` Tensor[M, D], ``labels`` Tensor[M],
    ``anchor_index`` Tensor[N]; random
    miners: ``noise`` float64 uniform [0, 1) of ``miner.noise_shape(N, M)`` (symbolic);
    with ``gather_positives``, last: ``positive_index`` Tensor[N, P] int64.
    Outputs: the kernel's tensors, named ``mask<k>`` (read by the layout as masks),
    ``index<k>`` (integer fields) or ``out<k>``; with ``compact``: ``a, p, n`` /
    ``a1, p, a2, n`` / ``indices``; with ``gather_positives``: ``mask0`` [N, P, M],
    ``index1`` [N, P, 1] and ``unmatched_positives`` [N]. ``metadata_props`` record the
    package version, the miner class and configuration, layout, input/output names and symbolic shapes, the
    noise shape, output kind, dtype, ``embedding_dim`` and the shapes of the largest
    tensors the graph computes (keys in :mod:`exportminers.runtime.metadata`).

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: unsupported arguments, or a miner that cannot mine against a
            reference set with ``with_ref=True``.
        RuntimeError: the exporter failed, the graph holds a forbidden operator
            (:data:`FORBIDDEN_OPS`) without ``compact``, or torch is older than
            :data:`MIN_EXPORT_TORCH` (:func:`require_onnx_exporter`).
        ImportError: onnxscript is not installed (the ``export`` extra).
    """
    import onnx

    require_onnx_exporter()
    name = _miner_name(miner)
    for attr in ("kernel", "layout"):
        if not hasattr(miner, attr):
            raise ValueError(
                f"miner: {name} has no {attr!r}; only built-in (kernel + layout) miners export")
    for flag, value in (("with_ref", with_ref), ("compact", compact),
                        ("anchor_blocks", anchor_blocks), ("gather_positives", gather_positives)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a file path (str or os.PathLike), got {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"path {os.fspath(path)!r} is a folder; give a file name")
    try:
        dtype_known = dtype in _DTYPE_NAMES
    except TypeError:
        dtype_known = False
    if not dtype_known:
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    if embedding_dim is not None:
        try:
            embedding_dim = check_positive_int(embedding_dim, "embedding_dim")
        except ValueError:
            raise ValueError(f"embedding_dim must be a positive integer or None, got "
                             f"{embedding_dim!r}") from None
    if opset is not None:
        opset = _check_opset(opset)
    with_ref = bool(with_ref)
    if with_ref and (name in SELF_ONLY or not getattr(miner, "supports_ref", True)):
        raise ValueError(f"with_ref: {name} does not mine against a reference set; "
                         f"export it with with_ref=False")
    anchors = bool(anchor_blocks)
    if anchors and with_ref:
        raise ValueError("anchor_blocks: a self-mining option; with_ref=True graphs already "
                         "take any block of anchors against the reference set")
    if anchors and not _row_independent(miner):
        raise ValueError(f"anchor_blocks: {name} does not mine each anchor row independently "
                         f"(or draws noise), so it cannot be mined in anchor blocks")
    gather = bool(gather_positives)
    if gather:
        takes = getattr(miner, "gathers_positives", None)
        if not (callable(takes) and takes()):
            raise ValueError(
                f"gather_positives: {name}"
                + (" with max_triplets_per_anchor" if getattr(miner, "cap", 0) else "")
                + " does not test (anchor, positive) pairs one by one against the negatives; "
                "export it without gather_positives (TripletMarginMiner without a cap and "
                "AngularMiner take it)")
        if compact:
            raise ValueError("gather_positives: not with compact=True (the graph's "
                             "unmatched_positives check would be lost); decode with OnnxMiner")
        dtypes = getattr(miner, "gather_dtypes", None)
        if callable(dtypes) and dtype not in dtypes():
            raise ValueError(f"gather_positives: {name} graphs over listed positives are "
                             f"exported in {[_DTYPE_NAMES[t] for t in dtypes()]} only, not "
                             f"{_DTYPE_NAMES[dtype]}; export the dense graph (without "
                             f"gather_positives) for {_DTYPE_NAMES[dtype]}")
    problem = getattr(miner, "export_problem", None)
    problem = problem() if callable(problem) else None
    if problem:
        raise ValueError(f"miner: {problem}")
    if getattr(miner, "was_set_externally", False):
        warnings.warn(f"{name}: indices set with set_idx_externally are not exported; the "
                      f"graph mines every pair of the batch", stacklevel=2)

    layout: List[List[int]] = [[0, -1, 1, -3]] if gather else \
        [list(map(int, part)) for part in miner.layout]
    n_fields = sum(len(part) - 1 for part in layout)
    kind = _output_kind(miner, n_fields)
    nspec = noise_spec(miner, with_ref)
    noisy = len(nspec) > 0
    sized = with_ref or anchors   # two batch axes, N (anchors) and M (references)
    d = embedding_dim if embedding_dim is not None else _EXAMPLE_D
    n_ex, m_ex = _EXAMPLE_N, _EXAMPLE_M

    was_training = miner.training
    miner.eval()
    try:
        eager_graph = _graph_module(miner, with_ref, noisy, False, anchors, gather)
        # probe the kernel eagerly at two sizes: output count, dtypes and symbolic shapes
        probes = ((n_ex, m_ex), (n_ex + 3, m_ex + 3)) if sized else ((n_ex, n_ex), (n_ex + 3, n_ex + 3))
        # positive_index widths unlike any other size, so the exporter keeps P its own axis
        widths = [m + 5 + 2 * i for i, (n, m) in enumerate(probes)] if gather else None
        probe_shapes: List[List[List[int]]] = []
        with torch.no_grad():
            for i, (n, m) in enumerate(probes):
                outs = eager_graph(*_example_inputs(
                    miner, n, m, d, torch.float32, with_ref, nspec, seed=i, anchors=anchors,
                    gather_width=widths[i] if widths else 0))
                probe_shapes.append([list(o.shape) for o in outs])
        out_dtypes = [o.dtype for o in outs]
        out_shapes = [_dim_spec([p[k] for p in probe_shapes], probes, sized, widths)
                      for k in range(len(out_dtypes))]

        input_names = ["embeddings", "labels"] + (["ref_emb", "ref_labels"] if with_ref else []) \
            + (["anchor_index"] if anchors else []) + (["noise"] if noisy else []) \
            + (["positive_index"] if gather else [])
        if compact:
            output_names = {"triplets": ["a", "p", "n"], "pairs": ["a1", "p", "a2", "n"],
                            "subset": ["indices"]}[kind]
            if len(output_names) != n_fields:
                output_names = [f"field{k}" for k in range(n_fields)]
        else:
            mask_pos = {part[0] for part in layout}
            output_names = []
            for k, dt in enumerate(out_dtypes):
                if k in mask_pos:
                    output_names.append(f"mask{k}")
                elif not dt.is_floating_point and dt != torch.bool:
                    output_names.append(f"index{k}")
                else:
                    output_names.append(f"out{k}")
            custom = getattr(miner, "output_names", None)
            if gather:
                output_names = ["mask0", "index1", "unmatched_positives"]
            elif isinstance(custom, (list, tuple)) and len(custom) == len(output_names):
                output_names = [str(c) for c in custom]

        # An upper bound far beyond any batch: without one, torch 2.7's export emits a
        # guard "N != 2**63 - 1" and then refuses the dynamic axis as over-constrained.
        N = torch.export.Dim("N", min=1, max=_DIM_MAX)
        M = torch.export.Dim("M", min=1, max=_DIM_MAX)
        D = torch.export.Dim("D", min=1, max=_DIM_MAX) if embedding_dim is None else None

        def emb_dims(row):
            return {0: row, 1: D} if D is not None else {0: row}

        if anchors:
            dynamic_shapes: Dict[str, Any] = {"embeddings": emb_dims(M), "labels": {0: M},
                                              "anchor_index": {0: N}}
        else:
            dynamic_shapes = {"embeddings": emb_dims(N), "labels": {0: N}}
        if with_ref:
            dynamic_shapes["ref_emb"] = emb_dims(M)
            dynamic_shapes["ref_labels"] = {0: M}
        if noisy:
            dims = {}
            for k, s in enumerate(nspec):
                if s == "N" or (s == "M" and not with_ref):
                    dims[k] = N
                elif s == "M":
                    dims[k] = M
            dynamic_shapes["noise"] = dims or None
        if gather:
            dynamic_shapes["positive_index"] = {0: N, 1: torch.export.Dim("P", min=1,
                                                                          max=_DIM_MAX)}
        args = tuple(_example_inputs(miner, n_ex, m_ex, d, dtype, with_ref, nspec,
                                     anchors=anchors, gather_width=widths[0] if widths else 0))
        graph = _graph_module(miner, with_ref, noisy, compact, anchors, gather)
        kwargs: Dict[str, Any] = {}
        kwargs["opset_version"] = DEFAULT_OPSET if opset is None else opset
        try:
            with _quiet_exporter(), torch.no_grad():
                program = torch.onnx.export(
                    graph, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                    input_names=input_names, output_names=output_names, optimize=True,
                    custom_translation_table=_translations(), verify=False, report=False,
                    verbose=False, **kwargs)
        except Exception as e:
            hint = getattr(miner, "export_hint", None)
            hint = f" ({hint()})" if callable(hint) and hint() else ""
            raise RuntimeError(f"exporting {name} to ONNX failed{hint}: "
                               f"{_error_summary(e)}") from e
    finally:
        miner.train(was_training)

    model = program.model_proto
    written = _default_opset(model)
    if opset is not None and written != opset:
        raise ValueError(f"opset: the exporter wrote opset {written}, not the requested {opset}")
    counts = op_types(model)
    bad = sorted(FORBIDDEN_OPS.intersection(counts))
    if bad and not compact:
        raise RuntimeError(
            f"the exported {name} graph contains data-dependent operators {bad}; its kernel "
            f"must be fixed-shape (see exportminers.miners.base_miner)")
    _check_dynamic_axes(name, model, dynamic_shapes)
    got_inputs = [i.name for i in model.graph.input]
    got_outputs = [o.name for o in model.graph.output]
    if got_inputs != input_names or got_outputs != output_names:
        raise RuntimeError(f"exported {name}: graph inputs {got_inputs} / outputs {got_outputs} "
                           f"differ from {input_names} / {output_names}")

    meta = {
        md.VERSION: __version__,
        md.MINER: name,
        md.CONFIG: miner_config(miner),
        md.LAYOUT: layout,
        md.INPUTS: input_names,
        md.OUTPUTS: output_names,
        md.OUTPUT_SHAPES: [] if compact else out_shapes,
        md.NOISE_SHAPE: nspec,
        md.NOISE_DTYPE: "float64" if noisy else "",
        md.OUTPUT_KIND: kind,
        md.WITH_REF: with_ref,
        md.DTYPE: _DTYPE_NAMES[dtype],
        md.EMBEDDING_DIM: embedding_dim,
        md.ROW_INDEPENDENT: _row_independent(miner),
        md.ANCHOR_BLOCKS: anchors,
        md.GATHER_POSITIVES: gather,
        md.LARGEST_TENSORS: largest_tensors(model),
        md.BATCH_MULTIPLE: int(BATCH_MULTIPLE.get(name, 1)),
        md.CHECK_FINITE: bool(getattr(miner, "check_finite", True)),
        md.COMPACT: bool(compact),
        md.EXPORTER: _EXPORTER,
    }
    existing = {p.key for p in model.metadata_props}
    for key, value in md.encode(meta).items():
        if key in existing:
            for p in model.metadata_props:
                if p.key == key:
                    p.value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    model.doc_string = f"exportminers {__version__}: {name}({miner.extra_repr()})"
    onnx.checker.check_model(model, full_check=True)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    onnx.save(model, path)
    return path


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The exportminers metadata of an exported graph (decoded JSON values)."""
    import onnx
    model = onnx.load(os.fspath(path), load_external_data=False)
    return md.decode({p.key: p.value for p in model.metadata_props}, os.fspath(path))


def build_miner(name: str, config: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Build a registry miner from a JSON-able configuration.

    ``loss_function`` / ``mining_function`` may be given by name (a class of
    :mod:`exportminers.losses` / :mod:`exportminers.miners`, built with defaults);
    ``MaximumLossMiner`` defaults to ``losses.TripletMarginLoss()``. ``distance`` may be
    ``{"class": "CosineSimilarity", ...kwargs}``.
    """
    from . import distances, losses, miners, registry
    spec = registry.get(name)
    if config is not None and not isinstance(config, dict):
        raise ValueError(f"{name}: a configuration must be a mapping, got "
                         f"{type(config).__name__}")
    cfg = dict(config or {})

    def named(module, kind: str, key: str, value):
        cls = getattr(module, value, None) if isinstance(value, str) else None
        if not isinstance(cls, type):
            known = sorted(k for k, v in vars(module).items()
                           if isinstance(v, type) and not k.startswith(("_", "Base")))
            raise ValueError(f"{name}: {key}={value!r} is not an exportminers {kind}; "
                             f"choose from {known}")
        return cls

    for key, module, kind in (("loss_function", losses, "loss"),
                              ("mining_function", miners, "miner")):
        if isinstance(cfg.get(key), str):
            try:
                cfg[key] = named(module, kind, key, cfg[key])()
            except TypeError as e:
                raise ValueError(f"{name}: {key}={cfg[key]!r}: {e}") from None
    if isinstance(cfg.get("distance"), dict):
        dcfg = dict(cfg["distance"])
        if "class" not in dcfg:
            raise ValueError(f"{name}: distance needs a 'class' key (e.g. {{\"class\": "
                             f"\"CosineSimilarity\"}}), got {sorted(dcfg)}")
        cls = named(distances, "distance", "distance class", dcfg.pop("class"))
        try:
            cfg["distance"] = cls(**dcfg)
        except TypeError as e:
            raise ValueError(f"{name}: distance {cls.__name__}: {e}") from None
    if name == "MaximumLossMiner" and "loss_function" not in cfg:
        cfg["loss_function"] = losses.TripletMarginLoss()
    try:
        return spec.build(**cfg)
    except TypeError as e:   # an unknown or missing argument
        raise ValueError(f"{name}: {e}") from None


# ---------------------------------------------------------------------------- TorchScript


def export_torchscript(miner: nn.Module, path: Union[str, os.PathLike]) -> torch.jit.ScriptModule:
    """Script a miner (validation, kernel and decoding) and save it.

    ``torch.jit.load(path)`` returns a module giving the same results as eager. Bad input
    raises ``torch.jit.Error`` from a scripted module; :func:`load_torchscript` turns that
    back into ``ValueError``.

    Returns:
        The ``torch.jit.ScriptModule``.
    """
    try:
        scripted = torch.jit.script(miner)
    except Exception as e:
        raise RuntimeError(f"scripting {_miner_name(miner)} failed: {type(e).__name__}: {e}") from e
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    scripted.save(path)
    return scripted


_SCRIPT_VALUE_ERROR = "builtins.ValueError: "


def _reraise_script_error(err: BaseException) -> None:
    msg = str(err)
    at = msg.rfind(_SCRIPT_VALUE_ERROR)
    if at >= 0:
        raise ValueError(msg[at + len(_SCRIPT_VALUE_ERROR):].strip()) from err


class TorchScriptMiner(nn.Module):
    """A loaded TorchScript miner whose input errors surface as ``ValueError``.

    See :func:`load_torchscript`. Attributes of the scripted miner (``num_triplets`` ...)
    are readable through the wrapper.
    """

    def __init__(self, module: torch.jit.ScriptModule):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        from .utils.checks import require_tensors
        names = ("embeddings", "labels", "ref_emb", "ref_labels")
        given = list(zip(names, args)) + [(k, v) for k, v in kwargs.items() if k in names]
        require_tensors([(n, v, n.startswith("ref")) for n, v in given])   # as eager
        try:
            return self.module(*args, **kwargs)
        except torch.jit.Error as e:
            _reraise_script_error(e)
            raise

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            module = super().__getattr__("module")
            value = getattr(module, name)
            if not callable(value) or isinstance(value, nn.Module):
                return value

            def call(*args, **kwargs):   # exported methods (set_idx_externally ...)
                try:
                    return value(*args, **kwargs)
                except torch.jit.Error as e:
                    _reraise_script_error(e)
                    raise
                except RuntimeError as e:   # argument types TorchScript refuses
                    if "Expected a value of type" in str(e):
                        raise ValueError(f"{name}: {str(e).splitlines()[0]}") from None
                    raise
            return call


def load_torchscript(path: Union[str, os.PathLike], map_location=None) -> TorchScriptMiner:
    """``torch.jit.load`` a saved miner, wrapped so bad input raises ``ValueError``.

    Example:
        >>> m = load_torchscript("miner.pt")
        >>> m(torch.randn(4, 3), torch.zeros(5))   # ValueError: labels has 5 entries ...

    Raises:
        ValueError: ``path`` is not a readable file, or not a TorchScript archive (as
            ``torch.jit.save`` / :func:`export_torchscript` write; a ``torch.save``
            checkpoint or an ONNX file is not one). A file-like object goes to
            ``torch.jit.load`` as it is.
    """
    import zipfile
    if hasattr(path, "read"):   # a file-like object: torch.jit.load reads it
        return TorchScriptMiner(torch.jit.load(path, map_location=map_location))
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a file path (str or os.PathLike) or a file object, "
                         f"got {path!r}")
    p = os.fspath(path)
    if not os.path.isfile(p):
        what = "is a folder" if os.path.isdir(p) else "does not exist"
        raise ValueError(f"path {p!r} {what}; give a TorchScript file (export_torchscript)")
    not_ts = (f"path {p!r} is not a TorchScript archive (torch.jit.save and "
              f"export_torchscript write one; a torch.save checkpoint or an ONNX file "
              f"(exportminers.OnnxMiner) is not)")
    try:
        with open(p, "rb") as f:
            if not zipfile.is_zipfile(f):
                raise ValueError(not_ts + "; is it damaged?")
            with zipfile.ZipFile(f) as z:   # TorchScript archives hold constants.pkl
                scripted = any(n.endswith("constants.pkl") for n in z.namelist())
    except OSError as e:
        raise ValueError(f"path {p!r}: cannot read it ({e})") from None
    except zipfile.BadZipFile as e:
        raise ValueError(f"{not_ts}; is it damaged? ({e})") from None
    if not scripted:
        raise ValueError(not_ts)
    try:
        module = torch.jit.load(p, map_location=map_location)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"path {p!r}: torch.jit.load failed (a damaged archive, or "
                         f"map_location={map_location!r} unusable here): {first}") from e
    return TorchScriptMiner(module)
