"""Input checks shared by every miner (eager and TorchScript).

Messages name the argument, say what was expected and what arrived. Argument
(configuration) checks live beside the constructors; these are tensor checks.
"""
import numbers
from typing import List, Optional, Tuple

import torch
from torch import Tensor



def _shape_str(x: Tensor) -> str:
    return str(list(x.shape))


def _dtype_name(dtype: torch.dtype) -> str:
    # TorchScript formats a dtype as its enum number; spell the common ones out
    if dtype == torch.float32:
        return "torch.float32"
    if dtype == torch.float64:
        return "torch.float64"
    if dtype == torch.float16:
        return "torch.float16"
    if dtype == torch.bfloat16:
        return "torch.bfloat16"
    if dtype == torch.bool:
        return "torch.bool"
    if dtype == torch.int64:
        return "torch.int64"
    if dtype == torch.int32:
        return "torch.int32"
    if dtype == torch.complex64:
        return "torch.complex64"
    return str(dtype)


def check_embeddings(x: Tensor, name: str, check_finite: bool) -> None:
    if x.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D tensor of shape (batch_size, embedding_size), "
            f"got shape {_shape_str(x)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {_dtype_name(x.dtype)}")
    if check_finite:
        require_finite(x, name)


def require_finite(x: Tensor, name: str) -> None:
    """ValueError naming ``name`` and its first bad rows if ``x`` [N, D] holds a NaN or
    an inf.

    One sum settles the usual case: IEEE addition never turns a NaN or an inf back into
    a finite number, so a finite sum means every element is finite (0.02 ms against
    0.7 ms for ``isfinite(x).all()`` on 4096 x 128 float32, one CPU thread). A
    non-finite sum can also come from finite values overflowing; the elementwise test
    decides then.
    """
    if x.numel() == 0 or bool(torch.isfinite(x.sum())):
        return
    if not bool(torch.isfinite(x).all()):
        bad = torch.logical_not(torch.isfinite(x)).any(dim=1)
        rows: List[int] = torch.nonzero(bad).flatten()[:5].tolist()
        raise ValueError(
            f"{name} contains NaN or inf values (first bad rows: {rows})"
        )


def check_labels(labels: Tensor, name: str, n: int, emb_name: str) -> None:
    if labels.dim() != 1:
        raise ValueError(
            f"{name} must be a 1-D tensor of shape (batch_size,), got shape {_shape_str(labels)}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {_dtype_name(labels.dtype)}")
    if labels.size(0) != n:
        raise ValueError(
            f"{name} has {labels.size(0)} entries but {emb_name} has {n} rows; they must match"
        )


@torch.jit.unused
def require_tensors(named) -> None:
    """Eager calls: each ``(name, value, optional)`` is a torch tensor (or None where
    optional), else a ValueError naming it."""
    for name, value, optional in named:
        if value is None and optional:
            continue
        if not isinstance(value, torch.Tensor):
            hint = " (exportminers.OnnxMiner takes numpy arrays)" \
                if type(value).__module__ == "numpy" else ""
            raise ValueError(f"{name} must be a torch.Tensor, got "
                             f"{type(value).__name__}{hint}")


def check_inputs(
    embeddings: Optional[Tensor],
    labels: Optional[Tensor],
    ref_emb: Optional[Tensor],
    ref_labels: Optional[Tensor],
    check_finite: bool = True,
) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Validate a miner call and move labels to the embeddings' device.

    ``embeddings`` and ``labels`` are typed Optional so that a scripted miner called
    with None raises this ValueError (TorchScript lets None through a Tensor argument,
    and such a call leaves the scripted module broken for later calls).

    Reference sets follow PML's identity rule (``ref_labels is labels`` means the
    reference rows are the batch's rows, so a row is never its own positive): the batch
    itself passed as reference (``ref_emb is embeddings`` too) is self-mining, returned
    as ``(None, None)``; the batch's own ``labels`` object with other embeddings (same
    row count) returns ``ref_labels=None`` with ``ref_emb``, which the kernels mine as
    self-mining labels over ``ref_emb``'s distances.

    Returns:
        (embeddings, labels as int64, ref_emb or None, ref_labels as int64 or None)
    """
    if not torch.jit.is_scripting():   # TorchScript's signature already checks types
        require_tensors([("embeddings", embeddings, False), ("labels", labels, False),
                         ("ref_emb", ref_emb, True), ("ref_labels", ref_labels, True)])
    if embeddings is None:
        raise ValueError("embeddings is required, got None")
    if labels is None:
        raise ValueError("labels is required, got None")
    check_embeddings(embeddings, "embeddings", check_finite)
    check_labels(labels, "labels", embeddings.size(0), "embeddings")
    given_labels = labels
    labels = labels.to(device=embeddings.device, dtype=torch.int64)
    if ref_emb is None:
        if ref_labels is not None:
            raise ValueError("ref_labels was given without ref_emb; pass both or neither")
        return embeddings, labels, None, None
    if ref_labels is None:
        raise ValueError("ref_emb was given without ref_labels; pass both or neither")
    check_embeddings(ref_emb, "ref_emb", check_finite)
    if ref_emb.size(1) != embeddings.size(1):
        raise ValueError(
            f"ref_emb has embedding size {ref_emb.size(1)} but embeddings has "
            f"{embeddings.size(1)}; they must match"
        )
    if ref_emb.device != embeddings.device:
        raise ValueError(
            f"ref_emb is on {ref_emb.device} but embeddings is on {embeddings.device}"
        )
    if ref_emb.dtype != embeddings.dtype:
        raise ValueError(
            f"ref_emb has dtype {_dtype_name(ref_emb.dtype)} but embeddings has "
            f"{_dtype_name(embeddings.dtype)}; "
            f"they must match"
        )
    check_labels(ref_labels, "ref_labels", ref_emb.size(0), "ref_emb")
    if ref_labels is given_labels:   # PML: the batch's rows (no self-pairs)
        if ref_emb is embeddings:
            return embeddings, labels, None, None
        return embeddings, labels, ref_emb, None
    ref_labels = ref_labels.to(device=embeddings.device, dtype=torch.int64)
    return embeddings, labels, ref_emb, ref_labels


def _plain_scalar(value):
    """A 0-d tensor or numpy array as its Python number; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        return value.item()
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) == () \
            and hasattr(value, "item"):
        return value.item()
    return value


def check_positive_int(value: int, name: str) -> int:
    """A positive integer: Python, numpy or 0-d tensor integers (not bools)."""
    value = _plain_scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_number(value, name: str, low: Optional[float] = None, high: Optional[float] = None) -> float:
    """A real number (Python, numpy or 0-d tensor; not a bool and not NaN) as a float."""
    value = _plain_scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(value: str, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value
