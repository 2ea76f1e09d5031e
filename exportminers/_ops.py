"""Small tensor primitives shared by every kernel.

Each primitive has one eager/TorchScript implementation (fast ATen ops) and, where
that ATen op has no ONNX equivalent or would make the exported graph compute shapes,
an export variant chosen while ``torch.export`` / ``torch.onnx.export`` traces. Both
variants return identical values; tests check that.
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

_GRAPH_ARITHMETIC = [False]   # set by graph_arithmetic(): eager runs the export variants


@contextlib.contextmanager
def graph_arithmetic():
    """Run eager (not TorchScript) code with the export variants: the exported graph's
    own arithmetic, computed by torch. They equal the eager variants except where a
    graph computes otherwise on purpose (float16 L_p in float32, rounded once; the
    Atan-free angle test); :func:`exportminers.verify.verify_graph` checks float16 graphs
    against this, so that ONNX Runtime is compared with the same math."""
    before = _GRAPH_ARITHMETIC[0]
    _GRAPH_ARITHMETIC[0] = True
    try:
        yield
    finally:
        _GRAPH_ARITHMETIC[0] = before


def _python_is_exporting() -> bool:
    if _GRAPH_ARITHMETIC[0]:
        return True
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_exporting"):
        if compiler.is_exporting():
            return True
    return bool(torch.onnx.is_in_onnx_export()) or bool(torch.jit.is_tracing())


def is_exporting() -> bool:
    """True while a graph exporter traces the code (never inside TorchScript)."""
    if torch.jit.is_scripting():
        return False
    else:
        return _python_is_exporting()


def index_like(x: Tensor, dim: int) -> Tensor:
    """``arange(x.size(dim))`` as int64 on ``x``'s device.

    When exporting, the index is built from data (a cumulative sum of ones) instead of
    ``arange``: ``arange`` with a symbolic length makes the graph compute shapes, and ONNX
    Runtime places such shape nodes on the CPU (see ../shared/GPU_FACTS.md).
    """
    if is_exporting():
        v = x.select(1 - dim, 0) if x.dim() == 2 else x
        return torch.cumsum(ones_int_like(v), 0) - 1
    return torch.arange(x.size(dim), device=x.device)


def ones_int_like(x: Tensor) -> Tensor:
    """``ones_like(x, dtype=int64)``.

    When exporting it is computed from ``x`` itself (``(x == x) | True``) so the graph
    needs no ``Shape -> Expand`` pair (``ones_like``/``full_like`` with a symbolic shape
    emit one; see ../shared/GPU_FACTS.md). NaN-safe: the ``| True`` wins.
    """
    if is_exporting():
        return ((x == x) | True).to(torch.int64)
    return torch.ones_like(x, dtype=torch.int64)


def zeros_int_like(x: Tensor) -> Tensor:
    """``zeros_like(x, dtype=int64)``; shape-node free when exporting (see :func:`ones_int_like`)."""
    if is_exporting():
        return ((x == x) & False).to(torch.int64)
    return torch.zeros_like(x, dtype=torch.int64)


def diagonal_mask(n_rows_like: Tensor, n_cols_like: Tensor) -> Tensor:
    """Boolean N x M mask, True where row index == column index.

    Args:
        n_rows_like: any tensor whose first dimension is N.
        n_cols_like: any tensor whose first dimension is M.
    """
    rows = index_like(n_rows_like, 0)
    cols = index_like(n_cols_like, 0)
    return rows.unsqueeze(1) == cols.unsqueeze(0)


def searchsorted_rows(sorted_rows: Tensor, values: Tensor, right: bool) -> Tensor:
    """Row-wise ``torch.searchsorted``.

    Args:
        sorted_rows: Tensor[R, L], each row non-decreasing.
        values: Tensor[R, K].
        right: as in ``torch.searchsorted``.

    Returns:
        Tensor[R, K] int64: for each value, the number of row entries ``< value``
        (``right=False``) or ``<= value`` (``right=True``).
    """
    if not is_exporting():
        return torch.searchsorted(sorted_rows.contiguous(), values.contiguous(), right=right)
    return _merge_searchsorted(sorted_rows, values, right)


def _merge_searchsorted(sorted_rows: Tensor, values: Tensor, right: bool) -> Tensor:
    # Merge each row's sorted entries with its values in one sort; a value's position in
    # the merged row minus the number of values placed before it is the number of row
    # entries placed before it.
    #
    # The ONNX spec orders TopK ties by index, but ONNX Runtime's CUDA TopK does not for
    # rows of 257 to 4096 elements (its radix-select path), so nothing here may depend
    # on the tie order: integer rows are keyed 2x+1 / 2x (entries / values, or the other
    # way round for right=True) so that an entry never ties with a value; ties between
    # entries, or between values, do not change any count. Float rows keep their
    # values: an entry tying a value exactly is then the one case the tie order decides.
    # row lengths from data: a Python size would put Shape nodes in the exported graph
    length = ones_int_like(sorted_rows[0]).sum()
    if not sorted_rows.is_floating_point():
        entries = 2 * sorted_rows.to(torch.int64) + (0 if right else 1)
        values = 2 * values.to(torch.int64) + (1 if right else 0)
        sorted_rows = entries
    if right:
        merged = torch.cat([sorted_rows, values], dim=1)  # entries first: ties go before values
    else:
        merged = torch.cat([values, sorted_rows], dim=1)  # values first: ties go after values
    order = torch.argsort(merged, dim=1, stable=True)
    if right:
        is_value = order >= length
        value_slot = (order - length).clamp(min=0)
    else:
        k = ones_int_like(values[0]).sum()
        is_value = order < k
        value_slot = torch.minimum(order, (k - 1).clamp(min=0))
    values_before = torch.cumsum(is_value.to(torch.int64), dim=1) - is_value.to(torch.int64)
    position = index_like(merged.transpose(0, 1), 0).unsqueeze(0)  # [1, L], broadcasts
    entries_before = position - values_before
    out = zeros_int_like(values)
    # add each value's count into its slot; entry positions add 0 into slot 0
    zero = torch.zeros((), dtype=torch.int64, device=order.device)
    src = torch.where(is_value, entries_before, zero)
    idx = torch.where(is_value, value_slot, zero)
    out = out.scatter_add(1, idx, src)
    return out


def normalize(x: Tensor, p: float, eps: float = 1e-12) -> Tensor:
    """``torch.nn.functional.normalize(x, p, dim=1, eps=eps)``.

    When exporting it divides by the clamped norm with broadcasting: ``F.normalize``'s
    ``expand_as`` would make the graph compute shapes (same values).
    """
    if is_exporting():
        norm = torch.linalg.vector_norm(x, ord=p, dim=1, keepdim=True)
        return x / norm.clamp_min(eps)
    return F.normalize(x, p=p, dim=1, eps=eps)


def masked_extreme_value(values: Tensor, mask: Tensor, largest: bool) -> Tensor:
    """Row-wise masked max/min value alone (+-inf where no candidate; a NaN candidate
    makes it NaN, as torch.max/min do): one reduction, no index (see
    :func:`masked_extreme`). Exported ReduceMax/ReduceMin may skip NaN (ONNX Runtime's CPU
    kernel does), so the graph puts NaN back explicitly."""
    fill = float("-inf") if largest else float("inf")
    filled = values.masked_fill(~mask, fill)
    ext = torch.amax(filled, dim=1) if largest else torch.amin(filled, dim=1)
    if is_exporting():
        has_nan = (torch.isnan(values) & mask).any(dim=1)
        ext = torch.where(has_nan, ext * float("nan"), ext)   # (no Shape node)
    return ext


def masked_extreme(values: Tensor, mask: Tensor, largest: bool):
    """Row-wise masked max/min with a validity flag.

    The chosen column is always a candidate: where every candidate equals the fill value
    (+inf candidates of a min, -inf of a max, e.g. SNR distances of a constant row), the
    first candidate is taken, not the first masked column (PML's sentinels pick a masked
    column there). A NaN candidate wins, as in torch.max/min; exported graphs, whose
    ArgMax/ArgMin leave NaN to the runtime (ONNX Runtime's CPU kernel skips it), take
    NaN candidates out of the reduction and pick the row's first NaN.

    Args:
        values: Tensor[N, M].
        mask: Tensor[N, M] bool, candidates.
        largest: max if True else min.

    Returns:
        (extreme Tensor[N] (+-inf where no candidate), index Tensor[N] int64,
        valid Tensor[N] bool)
    """
    fill = float("-inf") if largest else float("inf")
    mask_f = mask.to(values.dtype)
    first_candidate = torch.argmax(mask_f, dim=1)
    valid = mask_f.gather(1, first_candidate.unsqueeze(1)).squeeze(1) > 0
    if is_exporting():
        nan = torch.isnan(values) & mask
        filled = values.masked_fill(~mask | nan, fill)
        idx = torch.argmax(filled, dim=1) if largest else torch.argmin(filled, dim=1)
        chosen = filled.gather(1, idx.unsqueeze(1)).squeeze(1)
        idx = torch.where(chosen == fill, first_candidate, idx)
        nan_f = nan.to(values.dtype)
        first_nan = torch.argmax(nan_f, dim=1)
        has_nan = nan_f.gather(1, first_nan.unsqueeze(1)).squeeze(1) > 0
        idx = torch.where(has_nan, first_nan, idx)
    else:
        filled = values.masked_fill(~mask, fill)
        if largest:
            chosen, idx = torch.max(filled, dim=1)
        else:
            chosen, idx = torch.min(filled, dim=1)
        idx = torch.where(chosen == fill, first_candidate, idx)
    ext = values.gather(1, idx.unsqueeze(1)).squeeze(1).masked_fill(~valid, fill)
    return ext, idx, valid


def rank_select(values: Tensor, valid: Tensor, k: Tensor, largest: bool) -> Tensor:
    """Mask of the ``k`` best valid entries of a flat tensor (stable on ties).

    Args:
        values: Tensor[L].
        valid: Tensor[L] bool.
        k: 0-dim int64 tensor, at most ``valid.sum()``.
        largest: pick the largest values if True, else the smallest.

    Returns:
        Tensor[L] bool with exactly ``k`` True entries, all valid.
    """
    fill = float("-inf") if largest else float("inf")
    key = values.masked_fill(~valid, fill)
    order = torch.argsort(key, descending=largest, stable=True)
    ranks = zeros_int_like(order).scatter(0, order, index_like(order, 0))
    return (ranks < k) & valid


def f64(value: float, like: Tensor) -> Tensor:
    """``value`` as a 0-dim float64 tensor on ``like``'s device, exactly.

    The ONNX exporter stores a Python float that multiplies a float64 tensor as a float32
    constant (1e-6 becomes 9.99999997e-07 in the graph); a float64 tensor operand keeps
    the value. Eager arithmetic is unchanged (same dtype, same operation).
    """
    if is_exporting():   # torch.full's fill value would be exported as float32 too
        return torch.tensor(value, dtype=torch.float64, device=like.device)
    # (TorchScript's torch.tensor(float) rounds through float32; full keeps the double)
    return torch.full((), value, dtype=torch.float64, device=like.device)


def width_of(x: Tensor) -> Tensor:
    """``x.size(1)`` as a 0-dim float64 tensor computed from data (x: Tensor[N >= 1, D]).

    A Python number here would make ``torch.export`` specialise the embedding width.
    """
    return ones_int_like(x[0]).sum().to(torch.float64)


def next_float(t: Tensor, up: bool) -> Tensor:
    """``torch.nextafter(t, +inf if up else -inf)``.

    Eagerly this is ``torch.nextafter`` (any float dtype). When exporting, ``t`` must be
    float32 and ``>= 0``, ``+inf`` or ``-inf`` (where it gives ``-inf`` both ways, not
    ``-FLT_MAX`` upwards). ONNX has no ``nextafter`` (nor a bitcast), so
    the exported graph steps in float64 and rounds back: for a finite ``t >= 0`` with ulp
    ``u``, ``t * (2^-24 + 2^-40)`` lies strictly between ``u / 2`` and ``u * (1 + 2^-16)``
    (``u / 4`` to ``u / 2`` below a power of two, where the spacing halves), so
    ``t +- that`` rounds to the neighbouring float32; below ``2^-125`` the step is the
    fixed subnormal spacing ``2^-149``. ``+inf`` is clamped to ``2^128`` first, so it steps
    down to ``FLT_MAX`` and up to ``inf``. The float64 product's rounding error
    (``2^-53`` relative) is far below the ``2^-16 u`` margins. A test compares the two
    over every float32 exponent, subnormals, ``0``, ``FLT_MAX`` and ``inf``.
    """
    if not is_exporting():
        return torch.nextafter(t, torch.full_like(t, float("inf") if up else float("-inf")))
    if t.dtype != torch.float32:
        raise ValueError(f"next_float: the exported variant is for float32, got {t.dtype}")
    # 2^128: one ulp of FLT_MAX above it; 2^-24 + 2^-40: just over half an ulp, relative;
    # 2^-149: the smallest subnormal, the spacing of float32 below 2^-125
    wide = torch.minimum(t.to(torch.float64), f64(2.0 ** 128, t))
    step = torch.maximum(wide * f64(2.0 ** -24 + 2.0 ** -40, t), f64(2.0 ** -149, t))
    return (wide + step if up else wide - step).to(torch.float32)
