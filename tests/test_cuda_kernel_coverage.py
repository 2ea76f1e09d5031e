"""Static CUDA kernel coverage: every node of our ONNX graphs has a kernel registered in
ONNX Runtime's CUDAExecutionProvider for its op, opset and element types.

Runs on the CPU, with no GPU: it reads ONNX Runtime's kernel table
(``data/ort_cuda_kernels.json``, extracted from ONNX Runtime's ``docs/OperatorKernels.md``
by ``data/extract_ort_cuda_kernels.py``) and checks each node of

* every built-in miner's graph: each registry config, self-mining and (unless
  ``self_only``) ``with_ref``, float32 and float16 embeddings (exports come from the
  session-wide :mod:`onnx_graph_cache`, shared with test_export_onnx.py / test_runtime.py);
* every shipped pipeline graph (``exportminers/pipeline/graphs/*.onnx``).

A node is covered when a kernel of its ``domain::op`` matches the node's schema version the
way ONNX Runtime matches it (the kernel starts at that version, or has a closed range
reaching it: an open "13+" kernel does not serve a version-19 node) and, for every type
constraint the node binds (its inputs' and outputs' element types, bound to the schema's
``type_str`` such as ``T`` / ``T1``), lists the bound types. A node without such a kernel
would run on the CPU EP (a device copy each way, or a refused session with
``disable_cpu_ep_fallback``). The only ones allowed are shape computations: ``Shape`` and
int64 nodes whose inputs all derive from ``Shape`` outputs and constants; ONNX Runtime
puts those on the CPU by design anyway (shared/GPU_FACTS.md).

With ``-v`` the module prints one summary line per graph at the end. Cost: the exports
(88 graphs at 1 to 3 s each, about 2 minutes alone; the float32 ones are shared with
test_export_onnx.py and test_runtime.py); the check itself takes milliseconds a graph.
"""
import glob
import json
import os
from typing import Dict, List, Set, Tuple

import onnx
import pytest
import torch
from onnx import shape_inference

import exportminers
from exportminers import registry

import onnx_graph_cache

HERE = os.path.dirname(os.path.abspath(__file__))
TABLE = os.path.join(HERE, "data", "ort_cuda_kernels.json")
PIPELINE_GRAPHS = sorted(glob.glob(os.path.join(
    os.path.dirname(exportminers.__file__), "pipeline", "graphs", "*.onnx")))

# Real gaps of the kernel table: (op, schema version) -> what and why. Every graph case is
# xfail(strict=True) while this is non-empty (each graph holds at least one of them) and
# must fail with only these gaps (KnownCudaGap): any other gap fails it outright, and once
# the gaps are gone (graphs exported at another opset, or a newer table) the cases XPASS
# and fail, so the entries have to go.
KNOWN_GAPS: Dict[Tuple[str, int], str] = {}
# History: at opset 20 every graph had Equal-19 nodes (CUDA registers 7-10, 11-12, 13+)
# and several ReduceMax-20 / ReduceMin-20 (CUDA: 1-17, 18+). ONNX Runtime matches an
# open-ended kernel ("13+") only at its start version (its VerifyKernelDef), so those
# nodes ran on the CPU EP (ORT issue #27729). Graphs are exported at opset 18 since
# (exportminers.export.DEFAULT_OPSET); AngularMiner's Atan (no CUDA kernel at all) was
# replaced by an exact cut-off comparison.
KNOWN_GAPS_REASON = ("no CUDA kernel in the table for "
                     + ", ".join(f"{op.split('::')[1]}-{v}" for op, v in KNOWN_GAPS)
                     + " (see KNOWN_GAPS)")


class KnownCudaGap(AssertionError):
    """Only gaps listed in KNOWN_GAPS."""


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# TensorProto enum -> ONNX type string as OperatorKernels.md writes it ("tensor(float16)")
_TYPE_NAMES = {v: f"tensor({k.lower()})" for k, v in onnx.TensorProto.DataType.items()}


def _marks():
    if not KNOWN_GAPS:
        return []
    return [pytest.mark.xfail(strict=True, raises=KnownCudaGap, reason=KNOWN_GAPS_REASON)]


def _miner_cases():
    """Every registry config, self and ref, in float32; float16 and anchor-block graphs for
    the first config (the kernels do not change with the configuration's values)."""
    cases = []
    for name, spec in registry.MINERS.items():
        for cfg in range(len(spec.configs)):
            modes = ["self"] + ([] if spec.self_only else ["ref"])
            if cfg == 0 and spec.row_independent:
                modes.append("anchors")
            if cfg == 0 and name in GATHERING:   # listed-positive graphs, every input mode
                modes += ["gather-self", "gather-ref", "gather-anchors"]
            for mode in modes:
                half = mode in ("self", "ref") or (mode == "gather-self" and
                                                     name == "AngularMiner")
                for dt in _DTYPES if cfg == 0 and half else ["fp32"]:
                    cid = f"{name}-{cfg}-{mode}-{dt}"
                    cases.append(pytest.param(name, cfg, mode, dt, id=cid, marks=_marks()))
    return cases


GATHERING = ("TripletMarginMiner", "AngularMiner")   # export_onnx(gather_positives=True)


def _pipeline_cases():
    return [pytest.param(p, id="pipeline-" + os.path.basename(p)[:-len(".onnx")],
                         marks=_marks())
            for p in PIPELINE_GRAPHS]


# ------------------------------------------------------------------------ the check


def load_kernels(path: str = TABLE) -> Dict[str, List[dict]]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)["kernels"]


def _domain(d: str) -> str:
    return "ai.onnx" if d in ("", "ai.onnx") else d


def _value_types(model: onnx.ModelProto) -> Dict[str, str]:
    """Element type ('tensor(float)') of every value: graph inputs/outputs, shape-inferred
    value_info, initializers and Constant outputs."""
    inferred = shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types: Dict[str, str] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = _TYPE_NAMES[vi.type.tensor_type.elem_type]
    for init in g.initializer:
        types[init.name] = _TYPE_NAMES[init.data_type]
    for node in g.node:
        if node.op_type == "Constant" and _domain(node.domain) == "ai.onnx":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = _TYPE_NAMES[a.t.data_type]
                elif a.name in ("value_float", "value_floats"):
                    types[node.output[0]] = "tensor(float)"
                elif a.name in ("value_int", "value_ints"):
                    types[node.output[0]] = "tensor(int64)"
    return types


def _bind(schema, names: List[str], formals, types: Dict[str, str],
          bound: Dict[str, Set[str]], unknown: List[str]) -> None:
    """Bind the node's actual values to the schema's type constraints."""
    constraints = {c.type_param_str for c in schema.type_constraints}
    for i, name in enumerate(names):
        if not name:
            continue  # omitted optional input/output
        if i < len(formals):
            formal = formals[i]
        elif formals and formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic:
            formal = formals[-1]
        else:
            continue
        if formal.type_str not in constraints:
            continue  # fixed type ("tensor(int64)"), checked by the schema, not the kernel
        if name not in types:
            unknown.append(name)
            continue
        bound.setdefault(formal.type_str, set()).add(types[name])


def _shape_nodes(graph: onnx.GraphProto, types: Dict[str, str]) -> Set[int]:
    """Indices of shape-computation nodes: Shape/Size, and int64 nodes whose inputs all
    derive from Shape outputs and constants (at least one from a Shape)."""
    consts = {i.name for i in graph.initializer}
    derived: Set[str] = set()
    found: Set[int] = set()
    for idx, node in enumerate(graph.node):
        if node.op_type == "Constant":
            consts.update(node.output)
            continue
        ins = [i for i in node.input if i]
        if node.op_type in ("Shape", "Size"):
            is_shape = True
        else:
            is_shape = (bool(ins) and all(i in derived or i in consts for i in ins)
                        and any(i in derived for i in ins)
                        and all(types.get(o) == "tensor(int64)" for o in node.output if o))
        if is_shape:
            found.add(idx)
            derived.update(o for o in node.output if o)
    return found


def _version_ok(row: dict, since: int) -> bool:
    """ONNX Runtime's rule (KernelRegistry's VerifyKernelDef) for a node whose schema is
    ``since``: the kernel starts there, or starts before and has a closed range reaching
    it; an open range ("13+") never matches a node of a later schema version."""
    return row["since"] == since or (
        row["since"] < since and row["until"] is not None and row["until"] >= since)


def _kernel_match(rows: List[dict], since: int, bound: Dict[str, Set[str]]):
    """(in_range_rows, matching_row or None)."""
    in_range = [r for r in rows if _version_ok(r, since)]
    for r in in_range:
        if all(tc not in r["types"] or ts <= set(r["types"][tc]) for tc, ts in bound.items()):
            return in_range, r
    return in_range, None


def coverage(model: onnx.ModelProto, kernels: Dict[str, List[dict]]) -> dict:
    """Check each node of ``model`` against ``kernels``.

    Returns ``{"nodes": n, "missing": [record, ...], "shape_nodes": [record, ...]}`` where a
    record is ``{"node", "op", "opset", "since", "types", "why", "shape"}``; ``missing`` holds
    every node with no CUDA kernel (shape computations included, with ``shape`` True).
    """
    graph = model.graph
    opsets = {_domain(o.domain): o.version for o in model.opset_import}
    types = _value_types(model)
    shape_idx = _shape_nodes(graph, types)
    missing, shape_nodes = [], []
    for idx, node in enumerate(graph.node):
        for a in node.attribute:
            if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise AssertionError(f"node {node.name} ({node.op_type}) has a subgraph: "
                                     "this check does not walk subgraphs")
        dom = _domain(node.domain)
        op = f"{dom}::{node.op_type}"
        rec = {"node": node.name or f"#{idx}", "op": op, "opset": opsets.get(dom),
               "since": None, "types": {}, "why": "", "shape": idx in shape_idx}
        if rec["shape"]:
            shape_nodes.append(rec)
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get(dom, 1),
                                          "" if dom == "ai.onnx" else dom)
        except onnx.defs.SchemaError:
            schema = None
        if schema is None:
            rec["why"] = "no ONNX schema (cannot bind types)"
            missing.append(rec)
            continue
        rec["since"] = schema.since_version
        bound: Dict[str, Set[str]] = {}
        unknown: List[str] = []
        _bind(schema, list(node.input), schema.inputs, types, bound, unknown)
        _bind(schema, list(node.output), schema.outputs, types, bound, unknown)
        rec["types"] = {k: sorted(v) for k, v in sorted(bound.items())}
        if unknown:
            rec["why"] = f"element type unknown for {unknown}"
            missing.append(rec)
            continue
        rows = kernels.get(op, [])
        in_range, match = _kernel_match(rows, schema.since_version, bound)
        if match is None:
            if not rows:
                rec["why"] = "no CUDA kernel for this op"
            elif not in_range:
                spans = ", ".join(f"{r['since']}..{r['until'] or ''}" for r in rows)
                rec["why"] = f"no CUDA kernel for version {schema.since_version} (has {spans})"
            else:
                have = {tc: sorted(set().union(*(set(r["types"].get(tc, [])) for r in in_range)))
                        for tc in bound}
                rec["why"] = f"CUDA kernel types {have}"
            missing.append(rec)
    return {"nodes": len(graph.node), "missing": missing, "shape_nodes": shape_nodes}


def _fmt(rec: dict) -> str:
    types = ", ".join(f"{k}={'|'.join(t[7:-1] for t in v)}" for k, v in rec["types"].items())
    return (f"{rec['node']}: {rec['op']} (opset {rec['opset']}, schema {rec['since']}) "
            f"[{types}] - {rec['why']}")


# ------------------------------------------------------------------------ the tests

SUMMARY: Dict[str, str] = {}


@pytest.fixture(scope="module")
def kernels():
    return load_kernels()


def _table_source() -> str:
    with open(TABLE, encoding="utf-8") as f:
        return json.load(f)["source"]


@pytest.fixture(scope="module", autouse=True)
def _print_summary(request):
    yield
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if request.config.option.verbose <= 0 or not SUMMARY or tr is None or capman is None:
        return
    with capman.global_and_fixture_disabled():
        tr.write_line("")
        tr.write_line(f"CUDA kernel coverage, {len(SUMMARY)} graphs (kernel table: "
                      f"{_table_source()})")
        for cid in sorted(SUMMARY):
            tr.write_line(f"  {cid}: {SUMMARY[cid]}")


def _assert_covered(cid: str, res: dict, known=()) -> None:
    """Fail on gaps (nodes without a CUDA kernel that are not shape computations):
    KnownCudaGap when each is a ``(op, schema version)`` of ``known``, else AssertionError."""
    gaps = [r for r in res["missing"] if not r["shape"]]
    if not gaps:
        return
    msg = (f"{cid}: {len(gaps)} node(s) have no CUDA kernel and are not shape computations:"
           "\n  " + "\n  ".join(_fmt(r) for r in gaps))
    if all((r["op"], r["since"]) in known for r in gaps):
        raise KnownCudaGap(msg)
    raise AssertionError(msg)


def _check(cid: str, model: onnx.ModelProto, kernels) -> None:
    res = coverage(model, kernels)
    gaps = [r for r in res["missing"] if not r["shape"]]
    shape_cpu = [r for r in res["missing"] if r["shape"]]
    line = (f"{res['nodes']} nodes, {len(res['shape_nodes'])} shape-computation "
            f"({', '.join(sorted(r['op'].split('::')[1] for r in res['shape_nodes'])) or '-'}), "
            f"{len(shape_cpu)} shape nodes without a CUDA kernel, {len(gaps)} gaps")
    if gaps:
        line += ": " + "; ".join(_fmt(r) for r in gaps)
    SUMMARY[cid] = line
    print(f"{cid}: {line}")
    _assert_covered(cid, res, KNOWN_GAPS)


@pytest.mark.parametrize("name,cfg,mode,dt", _miner_cases())
def test_miner_graph(kernels, request, name, cfg, mode, dt):
    # float32 self-mining graphs (width D) and with_ref graphs of config 0 (dynamic width)
    # are the ones test_export_onnx.py / test_runtime.py use too: one export per session
    with_ref = mode in ("ref", "gather-ref")
    _, path = onnx_graph_cache.graph(name, cfg, with_ref=with_ref, dtype=_DTYPES[dt],
                                     embedding_dim=None if with_ref else onnx_graph_cache.D,
                                     anchor_blocks=mode in ("anchors", "gather-anchors"),
                                     gather_positives=mode.startswith("gather"))
    _check(request.node.callspec.id, onnx.load(path), kernels)


@pytest.mark.parametrize("path", _pipeline_cases())
def test_pipeline_graph(kernels, request, path):
    _check(request.node.callspec.id, onnx.load(path), kernels)


# ------------------------------------------------------------------------ the checker


def _tiny(nodes, inputs, outputs, opset=20, inits=()):
    g = onnx.helper.make_graph(nodes, "t", inputs, outputs, initializer=list(inits))
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", opset)])


def _vi(name, elem, shape):
    return onnx.helper.make_tensor_value_info(name, elem, shape)


def test_checker_flags_types_without_kernel(kernels):
    """Where over bool values and ArgMin over int64 have no CUDA kernel; Where over float
    and ArgMin over float16 do."""
    T = onnx.TensorProto
    model = _tiny(
        [onnx.helper.make_node("Where", ["c", "b1", "b2"], ["wb"], name="where_bool"),
         onnx.helper.make_node("Where", ["c", "f1", "f2"], ["wf"], name="where_float"),
         onnx.helper.make_node("ArgMin", ["i"], ["ai"], axis=0, name="argmin_int64"),
         onnx.helper.make_node("ArgMin", ["h"], ["ah"], axis=0, name="argmin_half")],
        [_vi("c", T.BOOL, [3]), _vi("b1", T.BOOL, [3]), _vi("b2", T.BOOL, [3]),
         _vi("f1", T.FLOAT, [3]), _vi("f2", T.FLOAT, [3]), _vi("i", T.INT64, [3]),
         _vi("h", T.FLOAT16, [3])],
        [_vi("wb", T.BOOL, [3]), _vi("wf", T.FLOAT, [3]), _vi("ai", T.INT64, [1]),
         _vi("ah", T.INT64, [1])])
    res = coverage(model, kernels)
    assert sorted(r["node"] for r in res["missing"]) == ["argmin_int64", "where_bool"]
    assert all(not r["shape"] for r in res["missing"])
    where = next(r for r in res["missing"] if r["node"] == "where_bool")
    assert where["types"] == {"B": ["tensor(bool)"], "T": ["tensor(bool)"]}


def test_checker_versions_and_shape_nodes(kernels):
    """A kernel must cover the node's schema version; Shape -> Gather -> Range (int64, on
    shape values only) is shape computation, and an int64 ArgMin over the shape is exempt
    as one, while the same ArgMin over data is a gap."""
    T = onnx.TensorProto
    zero = onnx.helper.make_tensor("zero", T.INT64, [], [0])
    one = onnx.helper.make_tensor("one", T.INT64, [], [1])
    model = _tiny(
        [onnx.helper.make_node("Shape", ["x"], ["s"], name="shape"),
         onnx.helper.make_node("Gather", ["s", "zero"], ["n"], axis=0, name="gather"),
         onnx.helper.make_node("Range", ["zero", "n", "one"], ["r"], name="range"),
         onnx.helper.make_node("ArgMin", ["s"], ["as"], axis=0, name="argmin_shape"),
         onnx.helper.make_node("Cast", ["x"], ["xi"], to=T.INT64, name="cast"),
         onnx.helper.make_node("ArgMin", ["xi"], ["ax"], axis=0, name="argmin_data")],
        [_vi("x", T.FLOAT, [4, 2])],
        [_vi("r", T.INT64, [None]), _vi("as", T.INT64, [1]), _vi("ax", T.INT64, [1, 2])],
        inits=[zero, one])
    res = coverage(model, kernels)
    assert {r["node"] for r in res["shape_nodes"]} == {"shape", "gather", "range",
                                                        "argmin_shape"}
    assert sorted((r["node"], r["shape"]) for r in res["missing"]) == [
        ("argmin_data", False), ("argmin_shape", True)]
    # ArgMax at opset 11: the CUDA kernels cover schema versions 1..11, 12 and 13+
    argmax = _tiny([onnx.helper.make_node("ArgMax", ["x"], ["y"], axis=0)],
                   [_vi("x", T.FLOAT, [3])], [_vi("y", T.INT64, [1])], opset=11)
    assert coverage(argmax, kernels)["missing"] == []
    # a version range that does not reach the node: Upsample (deprecated at 10) at opset 9
    # has a CUDA kernel; a made-up table without it flags the node
    ups = _tiny([onnx.helper.make_node("Upsample", ["x", "sc"], ["y"])],
                [_vi("x", T.FLOAT, [1, 1, 2, 2]), _vi("sc", T.FLOAT, [4])],
                [_vi("y", T.FLOAT, None)], opset=9)
    assert coverage(ups, kernels)["missing"] == []
    only_old = {"ai.onnx::Upsample": [r for r in kernels["ai.onnx::Upsample"] if r["since"] < 9]}
    (rec,) = coverage(ups, only_old)["missing"]
    assert rec["why"].startswith("no CUDA kernel for version 9")
    # an open range starting before the node's schema version does not match (ORT's rule)
    open_old = {"ai.onnx::Upsample": [dict(only_old["ai.onnx::Upsample"][0], until=None)]}
    assert [r["node"] for r in coverage(ups, open_old)["missing"]] == [rec["node"]]


def test_known_gap_is_exact(kernels):
    """Known gaps excuse their own (op, schema version) only (Atan has no CUDA kernel)."""
    T = onnx.TensorProto
    atan = onnx.helper.make_node("Atan", ["x"], ["y"], name="atan")
    only = coverage(_tiny([atan], [_vi("x", T.FLOAT, [3])], [_vi("y", T.FLOAT, [3])]), kernels)
    with pytest.raises(KnownCudaGap):
        _assert_covered("atan", only, {("ai.onnx::Atan", 7)})
    with pytest.raises(AssertionError) as err:
        _assert_covered("atan", only, {("ai.onnx::Atan", 8)})
    assert not isinstance(err.value, KnownCudaGap)
    both = coverage(_tiny(
        [atan, onnx.helper.make_node("Where", ["c", "c", "c"], ["w"], name="where_bool")],
        [_vi("x", T.FLOAT, [3]), _vi("c", T.BOOL, [3])],
        [_vi("y", T.FLOAT, [3]), _vi("w", T.BOOL, [3])]), kernels)
    with pytest.raises(AssertionError) as err:
        _assert_covered("both", both, {("ai.onnx::Atan", 7)})
    assert not isinstance(err.value, KnownCudaGap) and "where_bool" in str(err.value)
