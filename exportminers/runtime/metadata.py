"""Keys of the ``metadata_props`` every exported graph carries (torch-free).

:func:`exportminers.export_onnx` writes them and :class:`exportminers.OnnxMiner` reads
them; values are strings, JSON-encoded where structured.
"""
import ast
import json
from typing import Any, Dict, List, Mapping, Optional

PREFIX = "exportminers."

VERSION = PREFIX + "version"            # package version that exported the graph
MINER = PREFIX + "miner"                # miner class name
CONFIG = PREFIX + "config"              # JSON: constructor configuration
LAYOUT = PREFIX + "layout"              # JSON: decode layout (see exportminers.decode)
INPUTS = PREFIX + "inputs"              # JSON: graph input names, in order
OUTPUTS = PREFIX + "outputs"            # JSON: graph output names, in order
OUTPUT_SHAPES = PREFIX + "output_shapes"  # JSON: per output, dims as "N", "M", int or "?"
NOISE_SHAPE = PREFIX + "noise_shape"    # JSON: dims of the uniform noise input ([] = none)
NOISE_DTYPE = PREFIX + "noise_dtype"    # "float64" or "" when the miner draws no noise
OUTPUT_KIND = PREFIX + "output_kind"    # "triplets", "pairs" or "subset"
WITH_REF = PREFIX + "with_ref"          # JSON bool
DTYPE = PREFIX + "dtype"                # "float32" or "float16"
EMBEDDING_DIM = PREFIX + "embedding_dim"  # JSON: int, or null when dynamic
ROW_INDEPENDENT = PREFIX + "row_independent"  # JSON bool: anchor rows may be chunked
BATCH_MULTIPLE = PREFIX + "batch_multiple"    # JSON int: N must be a multiple of it
CHECK_FINITE = PREFIX + "check_finite"  # JSON bool: the miner's check_finite
COMPACT = PREFIX + "compact"            # JSON bool: outputs are already index tuples
EXPORTER = PREFIX + "exporter"          # which exporter produced the graph
ANCHOR_BLOCKS = PREFIX + "anchor_blocks"  # JSON bool: self-mining of anchor_index rows
LARGEST_TENSORS = PREFIX + "largest_tensors"  # JSON: shapes of the largest tensors computed
GATHER_POSITIVES = PREFIX + "gather_positives"  # JSON bool: positive_index input, [N, P, M]

_JSON_KEYS = (CONFIG, LAYOUT, INPUTS, OUTPUTS, OUTPUT_SHAPES, NOISE_SHAPE, WITH_REF,
              EMBEDDING_DIM, ROW_INDEPENDENT, BATCH_MULTIPLE, CHECK_FINITE, COMPACT,
              ANCHOR_BLOCKS, LARGEST_TENSORS, GATHER_POSITIVES)
REQUIRED = (VERSION, MINER, LAYOUT, INPUTS, OUTPUTS, NOISE_SHAPE, OUTPUT_KIND, WITH_REF,
            DTYPE, EMBEDDING_DIM)
OUTPUT_KINDS = ("triplets", "pairs", "subset")
TUPLE_LENGTH = {"triplets": 3, "pairs": 4, "subset": 1}


def encode(values: Mapping[str, Any]) -> Dict[str, str]:
    """JSON-encode the structured entries of a metadata dict (strings stay as they are)."""
    out: Dict[str, str] = {}
    for key, value in values.items():
        out[key] = value if isinstance(value, str) and key not in _JSON_KEYS else json.dumps(value)
    return out


def decode(props: Mapping[str, str], source: str = "the graph") -> Dict[str, Any]:
    """Parse ``metadata_props`` written by :func:`encode`; ValueError if entries are missing."""
    missing: List[str] = [k for k in REQUIRED if k not in props]
    if missing:
        raise ValueError(
            f"{source} is not an exportminers graph: metadata_props lacks {missing} "
            f"(export it with exportminers.export_onnx)")
    out: Dict[str, Any] = {}
    for key, value in props.items():
        if not key.startswith(PREFIX):
            continue
        out[key] = json.loads(value) if key in _JSON_KEYS else value
    if out[OUTPUT_KIND] not in OUTPUT_KINDS:
        raise ValueError(f"{source}: unknown output kind {out[OUTPUT_KIND]!r}")
    return out


def _eval_dim(expr: Any, sizes: Mapping[str, int]) -> Optional[int]:
    """Value of one symbolic dim (an int, or an expression such as ``"2*N"``, ``"N**2"``,
    ``"M*N"`` over the names in ``sizes``); None when it names anything else."""
    if isinstance(expr, int):
        return expr
    try:
        tree = ast.parse(str(expr), mode="eval")
    except SyntaxError:
        return None

    def ev(node) -> Optional[int]:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return int(node.value)
        if isinstance(node, ast.Name):
            return sizes.get(node.id)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left), ev(node.right)
            if a is None or b is None:
                return None
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if isinstance(node.op, ast.FloorDiv) and b != 0:
                return a // b
            if isinstance(node.op, ast.Pow) and 0 <= b <= 8:
                return a ** b
        return None

    return ev(tree)


def largest_elements(shapes: List[List[Any]], sizes: Mapping[str, int]) -> int:
    """Most elements of any tensor among ``shapes`` (the ``LARGEST_TENSORS`` entry) for
    the given sizes (``{"N": ..., "M": ..., "D": ...}``); shapes it cannot evaluate are
    skipped."""
    best = 0
    for shape in shapes:
        total = 1
        for dim in shape:
            v = _eval_dim(dim, sizes)
            if v is None:
                total = -1
                break
            total *= max(v, 0)
        best = max(best, total)
    return best
