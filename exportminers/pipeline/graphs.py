"""The fixed-shape block graph: one query block against one bank block.

The graph is written in torch and exported with ``torch.onnx.export(dynamo=True)``,
then its top-k sizes are lifted to int64 inputs (``k_neg``, ``k_pos``, ``k_epos``) so that one
file serves every k. All batch axes are dynamic; the data path is MatMul / Equal /
comparisons / Where / TopK only: no node computes a shape, so on ONNX Runtime's CUDA
EP every node can sit on the GPU.

Graphs ship prebuilt in ``exportminers/pipeline/graphs/`` (a few KB each), so mining
needs onnxruntime + numpy only. When a graph is missing there, it is exported on first
use into the cache directory (``$EXPORTMINERS_CACHE`` or ``~/.cache/exportminers``),
which needs torch. Rebuild the shipped set with
``python -m exportminers.pipeline.graphs``.

Inputs (``B_q`` query rows, ``B_m`` bank rows, ``d`` width; ``T`` = float32 or float16):

- ``q`` T[B_q, d], ``q_label`` int64[B_q]
- ``m`` T[B_m, d], ``m_label`` int64[B_m]
- ``neg_lo``, ``neg_hi`` T[B_q]: inclusive closeness band for negatives (``band``
  graphs only)
- ``k_neg``, ``k_pos``, ``k_epos`` int64[1]: how many candidates each TopK keeps

Outputs (closeness: larger = closer; -inf / +inf mark empty slots):

- ``neg_c`` T[B_q, k_neg], ``neg_i`` int64[B_q, k_neg]: the most similar
  different-label columns (any label in an unmasked graph) inside the band, closest
  first, ties by lower column
- ``hpos_c`` T[B_q, k_pos], ``hpos_i``: the least similar same-label columns, least
  close first (+inf = none)
- ``epos_c`` T[B_q, k_epos], ``epos_i``: the most similar same-label columns
  (``easy`` graphs)

Graph version 4 compares nothing but labels; the rest is done on the host, where it
costs nothing per score (version 3 spent five of its eleven full-block passes on it):

- excluded bank rows (NaN/inf, missing label) are left out of the bank block, not
  masked, and a short block is a smaller ``B_m``, not padding (except one padding
  column for a block with a single usable row, which the host drops);
- same-id exclusion: per block pair, each TopK asks for as many extra candidates as one
  of the query block's ids has columns in the bank block, and the host drops the
  query's own id from what comes back, which leaves exactly the top k of the id-masked
  block.

``unmasked`` negatives graphs (``label_mask=False``) do not compare labels either: the
engine asks their TopK for as many more candidates as a query label has columns in the
bank block and drops those on the host, which leaves the graph a MatMul and a TopK when
classes are small.
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

GRAPH_VERSION = 4   # 2: opset 18 (every node has an ONNX Runtime CUDA kernel); 3: same-id
# rows are never negatives either; 4: labels only (ids, padding, exclusions on the host)
PACKAGE_GRAPH_DIR = Path(__file__).resolve().parent / "graphs"
KINDS = ("neg", "pos", "both")
METRIC_KINDS = ("dot", "l2")
DTYPES = ("float32", "float16")
# Placeholders used for TopK at export time, then replaced by graph inputs.
_K_NEG_PLACEHOLDER = 7
_K_POS_PLACEHOLDER = 3
_K_EPOS_PLACEHOLDER = 5
_K_INPUTS = {_K_NEG_PLACEHOLDER: "k_neg", _K_POS_PLACEHOLDER: "k_pos", _K_EPOS_PLACEHOLDER: "k_epos"}
ALLOWED_OPS = frozenset({
    "MatMul", "Transpose", "Unsqueeze", "Add", "Sub", "Mul", "Neg", "Sqrt", "Max", "Clip",
    "ReduceSum", "Equal", "Not", "And", "Or", "Greater", "GreaterOrEqual", "Less",
    "LessOrEqual", "Where", "TopK", "Constant", "Identity", "Cast",
})


@dataclass(frozen=True)
class GraphSpec:
    """Which block graph: ``kind`` in neg/pos/both, ``metric`` dot (also cosine on
    normalized rows) or l2, ``band`` (negatives limited to [neg_lo, neg_hi]),
    ``easy`` (also the easiest positive), ``dtype`` float32 / float16."""

    kind: str
    metric: str
    band: bool = False
    easy: bool = False
    dtype: str = "float32"
    label_mask: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.metric not in METRIC_KINDS:
            raise ValueError(f"metric must be one of {METRIC_KINDS}, got {self.metric!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kind == "pos" and self.band:
            raise ValueError("a 'pos' graph has no negative band")
        if self.kind == "neg" and self.easy:
            raise ValueError("a 'neg' graph has no positives")
        if not self.label_mask and self.kind != "neg":
            raise ValueError("only a 'neg' graph can leave the label mask to the host")

    @property
    def has_neg(self) -> bool:
        return self.kind in ("neg", "both")

    @property
    def has_pos(self) -> bool:
        return self.kind in ("pos", "both")

    @property
    def filename(self) -> str:
        return (f"block_{self.kind}_{self.metric}_{'band' if self.band else 'noband'}_"
                f"{'easy' if self.easy else 'hard'}_{self.dtype}"
                f"{'' if self.label_mask else '_unmasked'}_v{GRAPH_VERSION}.onnx")


def all_specs() -> List[GraphSpec]:
    out = []
    for metric in METRIC_KINDS:
        for dtype in DTYPES:
            for mask in (True, False):
                out.append(GraphSpec("neg", metric, band=False, dtype=dtype, label_mask=mask))
                out.append(GraphSpec("neg", metric, band=True, dtype=dtype, label_mask=mask))
            for easy in (False, True):
                out.append(GraphSpec("pos", metric, easy=easy, dtype=dtype))
                for band in (False, True):
                    out.append(GraphSpec("both", metric, band=band, easy=easy, dtype=dtype))
    return out


def cache_dir() -> Path:
    env = os.environ.get("EXPORTMINERS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/exportminers").expanduser()


_lock = threading.Lock()


def graph_path(spec: GraphSpec, allow_export: bool = True) -> Path:
    """Path of the ONNX file for ``spec``: the shipped copy, else the cached copy, else
    exported now into the cache (needs torch)."""
    shipped = PACKAGE_GRAPH_DIR / spec.filename
    if shipped.is_file():
        return shipped
    cached = cache_dir() / spec.filename
    if cached.is_file():
        return cached
    if not allow_export:
        raise FileNotFoundError(f"no prebuilt block graph {spec.filename}")
    with _lock:
        if not cached.is_file():
            try:
                import torch  # noqa: F401
            except ImportError:
                raise RuntimeError(
                    f"the block graph {spec.filename} is neither shipped in {PACKAGE_GRAPH_DIR} "
                    f"nor cached in {cache_dir()}, and exporting it needs torch, which is not "
                    "installed. Reinstall exportminers (the shipped graphs cover every "
                    "configuration) or install torch once to export it."
                ) from None
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
            export_graph(spec, tmp)
            os.replace(tmp, cached)
    return cached


# --------------------------------------------------------------------------- export

def _make_module(spec: GraphSpec):
    import torch
    from torch import Tensor

    inf = float("inf")

    class BlockGraph(torch.nn.Module):
        def forward(self, q: Tensor, q_label: Tensor, m: Tensor, m_label: Tensor,
                    neg_lo: Tensor, neg_hi: Tensor):
            qm = torch.matmul(q, m.transpose(0, 1))
            if spec.metric == "l2":
                qn = (q * q).sum(dim=1).unsqueeze(1)
                mn = (m * m).sum(dim=1).unsqueeze(0)
                # torch.maximum, not clamp: clamp exports as Clip, which ONNX Runtime
                # saturates at the float maximum, so an overflowed +inf would become a
                # finite distance and reach the output unnoticed
                zero = torch.zeros((), dtype=qm.dtype)
                c = -torch.sqrt(torch.maximum(qn + mn - 2.0 * qm, zero))
            else:
                c = qm
            same_label = q_label.unsqueeze(1) == m_label.unsqueeze(0)
            outs = []
            if spec.has_neg:
                # unmasked: the engine asks for as many more candidates as the query's
                # label has columns in the block and drops those on the host
                neg = torch.where(same_label, torch.tensor(-inf, dtype=c.dtype), c) \
                    if spec.label_mask else c
                if spec.band:
                    in_band = (c >= neg_lo.unsqueeze(1)) & (c <= neg_hi.unsqueeze(1))
                    neg = torch.where(in_band, neg, torch.tensor(-inf, dtype=c.dtype))
                nc, ni = torch.topk(neg, _K_NEG_PLACEHOLDER, dim=1, largest=True, sorted=True)
                outs += [nc, ni]
            if spec.has_pos:
                hp = torch.where(same_label, c, torch.tensor(inf, dtype=c.dtype))
                hc, hi_ = torch.topk(hp, _K_POS_PLACEHOLDER, dim=1, largest=False, sorted=True)
                outs += [hc, hi_]
                if spec.easy:
                    ep = torch.where(same_label, c, torch.tensor(-inf, dtype=c.dtype))
                    ec, ei = torch.topk(ep, _K_EPOS_PLACEHOLDER, dim=1, largest=True, sorted=True)
                    outs += [ec, ei]
            return tuple(outs)

    return BlockGraph().eval()


def _output_names(spec: GraphSpec) -> List[str]:
    names = []
    if spec.has_neg:
        names += ["neg_c", "neg_i"]
    if spec.has_pos:
        names += ["hpos_c", "hpos_i"]
        if spec.easy:
            names += ["epos_c", "epos_i"]
    return names


INPUT_NAMES = ["q", "q_label", "m", "m_label", "neg_lo", "neg_hi"]


# ONNX Runtime's CUDA EP has no Equal-19 / ReduceMax-20 kernels in some releases; the
# exportminers.export.DEFAULT_OPSET note says why 18.
GRAPH_OPSET = 18


def export_graph(spec: GraphSpec, path) -> Path:
    """Export the block graph for ``spec`` to ``path`` (needs torch and onnxscript)."""
    import warnings

    import onnx
    import torch

    from ..export import require_onnx_exporter
    require_onnx_exporter()
    dt = torch.float16 if spec.dtype == "float16" else torch.float32
    bq, bm, d = 8, 16, 4
    args = (
        torch.randn(bq, d).to(dt), torch.zeros(bq, dtype=torch.long),
        torch.randn(bm, d).to(dt), torch.zeros(bm, dtype=torch.long),
        torch.zeros(bq, dtype=dt), torch.zeros(bq, dtype=dt),
    )
    Dim = torch.export.Dim
    dq, dm, dd = Dim("block_q", min=1), Dim("block_m", min=_K_NEG_PLACEHOLDER + 1), Dim("dim", min=1)
    dyn = ({0: dq, 1: dd}, {0: dq}, {0: dm, 1: dd}, {0: dm}, {0: dq}, {0: dq})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        prog = torch.onnx.export(
            _make_module(spec), args, input_names=INPUT_NAMES,
            output_names=_output_names(spec), dynamic_shapes=dyn, dynamo=True,
            optimize=True, verbose=False, report=False, opset_version=GRAPH_OPSET,
        )
    model = prog.model_proto
    _lift_k_inputs(model, spec)
    if spec.dtype == "float16":
        _strip_exact_casts(model)
    model.doc_string = (f"exportminers pipeline block graph {spec} (graph version "
                        f"{GRAPH_VERSION}); see exportminers/pipeline/graphs.py")
    del model.metadata_props[:]
    for vi in list(model.graph.input) + list(model.graph.output):
        del vi.metadata_props[:]
    for n in model.graph.node:  # exporter provenance (stack traces): not needed to run
        del n.metadata_props[:]
        n.doc_string = ""
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    check_graph_ops(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _lift_k_inputs(model, spec: GraphSpec) -> None:
    """Replace the constant K of every TopK with graph inputs k_neg / k_pos / k_epos
    (int64[1])."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    consts = {}
    for init in g.initializer:
        consts[init.name] = ("init", numpy_helper.to_array(init))
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = ("node", numpy_helper.to_array(a.t))
    used = {name: False for name in _K_INPUTS.values()}
    for node in g.node:
        if node.op_type != "TopK":
            continue
        k = int(consts[node.input[1]][1].reshape(-1)[0])
        name = _K_INPUTS.get(k)
        if name is None:
            raise RuntimeError(f"unexpected TopK k={k} in exported graph")
        node.input[1] = name
        used[name] = True
        # output dims become symbolic
        for out_name in node.output:
            for vi in list(g.output) + list(g.value_info):
                if vi.name == out_name:
                    vi.type.tensor_type.shape.dim[1].Clear()
                    vi.type.tensor_type.shape.dim[1].dim_param = name
    for name, u in used.items():
        if u:
            g.input.append(helper.make_tensor_value_info(name, TensorProto.INT64, [1]))
    # drop now-unused constants and inputs
    live = {i for n in g.node for i in n.input}
    ins = [i for i in g.input if i.name in live]
    del g.input[:]
    g.input.extend(ins)
    keep = [i for i in g.initializer if i.name in live]
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output[0] not in live)]
    del g.node[:]
    g.node.extend(nodes)


_COMPARISONS = frozenset({"GreaterOrEqual", "LessOrEqual", "Greater", "Less", "Equal"})


def _strip_exact_casts(model) -> None:
    """Drop float16 -> float32 Casts that only feed comparisons.

    The exporter upcasts half-precision operands of ``>=`` / ``<=``; the upcast is exact,
    so comparing the float16 values directly gives the same booleans without writing
    a float32 copy of the whole score block.
    """
    from onnx import TensorProto

    g = model.graph
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rename = {}
    for n in g.node:
        if n.op_type != "Cast":
            continue
        to = [a.i for a in n.attribute if a.name == "to"]
        users = consumers.get(n.output[0], [])
        if to == [TensorProto.FLOAT] and users and all(u.op_type in _COMPARISONS for u in users):
            rename[n.output[0]] = n.input[0]
    if not rename:
        return
    for n in g.node:
        for j, i in enumerate(n.input):
            if i in rename:
                n.input[j] = rename[i]
    nodes = [n for n in g.node if not (n.op_type == "Cast" and n.output[0] in rename)]
    del g.node[:]
    g.node.extend(nodes)
    keep = [vi for vi in g.value_info if vi.name not in rename]
    del g.value_info[:]
    g.value_info.extend(keep)


def check_graph_ops(model) -> None:
    """Raise if the graph holds an operator outside the shape-free data path."""
    bad = sorted({n.op_type for n in model.graph.node} - ALLOWED_OPS)
    if bad:
        raise RuntimeError(f"block graph contains shape-computing or unexpected ops: {bad}")


def graph_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def build_package_graphs(out_dir: Optional[Path] = None, verbose: bool = True) -> List[Path]:
    """(Re)export every block graph into the package's ``graphs/`` folder."""
    out_dir = Path(out_dir) if out_dir else PACKAGE_GRAPH_DIR
    paths = []
    for spec in all_specs():
        p = export_graph(spec, out_dir / spec.filename)
        paths.append(p)
        if verbose:
            print(f"wrote {p} ({p.stat().st_size} bytes)")
    return paths


if __name__ == "__main__":  # pragma: no cover
    build_package_graphs()
