"""Numpy twins of :mod:`exportminers.utils.checks` (torch-free).

Same checks, same argument names and messages (numpy dtype names instead of torch's):
bad input raises ``ValueError`` naming the argument, what was expected and what arrived.
The ``*_meta`` functions check only shape and dtype kind, so device-resident inputs
(DLPack) can be validated without copying them to the host. Their ``dtype_name`` /
``*_dtype`` arguments may be a dtype object: it is only turned into text for an error
(``str(np.dtype)`` costs about 2 us, a large share of a small miner call).
"""
from typing import Optional, Sequence, Tuple

import numpy as np

# dtype kinds: "f" floating, "i" integer (signed or unsigned), "b" bool, "o" anything else


def dtype_kind(dtype) -> str:
    """Kind of a numpy dtype, or of an ONNX type string such as ``"tensor(float)"``."""
    if isinstance(dtype, str) and dtype.startswith("tensor("):
        name = dtype[len("tensor("):-1]
        if name in ("float", "float16", "double", "bfloat16"):
            return "f"
        if name == "bool":
            return "b"
        if name.startswith("int") or name.startswith("uint"):
            return "i"
        return "o"
    kind = np.dtype(dtype).kind
    return {"f": "f", "i": "i", "u": "i", "b": "b"}.get(kind, "o")


def check_embeddings_meta(shape: Sequence[int], kind: str, dtype_name, name: str) -> None:
    if len(shape) != 2:
        raise ValueError(
            f"{name} must be a 2-D tensor of shape (batch_size, embedding_size), "
            f"got shape {list(shape)}"
        )
    if kind != "f":
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {dtype_name}")


def check_finite(x: np.ndarray, name: str) -> None:
    if x.size > 0 and not bool(np.isfinite(x).all()):
        bad = np.logical_not(np.isfinite(x)).any(axis=1)
        rows = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(f"{name} contains NaN or inf values (first bad rows: {rows})")


def check_in_range(cast: np.ndarray, name: str) -> None:
    """After casting finite values to a narrower float (``cast``): none overflowed."""
    try:
        check_finite(cast, name)
    except ValueError:
        rows = np.flatnonzero(np.logical_not(np.isfinite(cast)).any(axis=1))[:5].tolist()
        raise ValueError(
            f"{name} has values beyond {cast.dtype.name}'s range (largest "
            f"{float(np.finfo(cast.dtype).max):g}), the graph's input type (first bad rows: "
            f"{rows}); rescale them or export a wider graph") from None


def check_embeddings(x: np.ndarray, name: str, check_finite_values: bool) -> None:
    check_embeddings_meta(x.shape, dtype_kind(x.dtype), x.dtype, name)
    if check_finite_values:
        check_finite(x, name)


def check_labels_meta(shape: Sequence[int], kind: str, dtype_name, name: str, n: int,
                      emb_name: str) -> None:
    if len(shape) != 1:
        raise ValueError(
            f"{name} must be a 1-D tensor of shape (batch_size,), got shape {list(shape)}"
        )
    if kind != "i":
        raise ValueError(f"{name} must be an integer tensor, got dtype {dtype_name}")
    if shape[0] != n:
        raise ValueError(
            f"{name} has {shape[0]} entries but {emb_name} has {n} rows; they must match"
        )


def check_labels(labels: np.ndarray, name: str, n: int, emb_name: str) -> None:
    check_labels_meta(labels.shape, dtype_kind(labels.dtype), labels.dtype, name, n, emb_name)


def check_pair_meta(emb_shape, emb_dtype, ref_shape, ref_dtype) -> None:
    """The cross-argument checks between ``embeddings`` and ``ref_emb``."""
    if ref_shape[1] != emb_shape[1]:
        raise ValueError(
            f"ref_emb has embedding size {ref_shape[1]} but embeddings has "
            f"{emb_shape[1]}; they must match"
        )
    if ref_dtype != emb_dtype:
        raise ValueError(
            f"ref_emb has dtype {ref_dtype} but embeddings has {emb_dtype}; they must match"
        )


def check_ref_given(ref_emb, ref_labels) -> None:
    if ref_emb is None and ref_labels is not None:
        raise ValueError("ref_labels was given without ref_emb; pass both or neither")
    if ref_emb is not None and ref_labels is None:
        raise ValueError("ref_emb was given without ref_labels; pass both or neither")


def _as_array(x, name: str) -> np.ndarray:
    if hasattr(x, "__dlpack__") and not isinstance(x, np.ndarray) and not hasattr(x, "__array__"):
        try:   # a DLPack producer without __array__ (an OrtValue, a CuPy array, ...)
            return np.from_dlpack(x)
        except Exception as e:
            raise ValueError(
                f"{name} could not be read as a host array ({e}); pass it on the same device "
                "as the embeddings (device inputs go through IOBinding together)") from None
    try:
        return np.asarray(x)
    except Exception as e:  # e.g. a CUDA tensor: no host view
        raise ValueError(f"{name} could not be read as a host array: {e}") from None


def check_inputs(
    embeddings,
    labels,
    ref_emb=None,
    ref_labels=None,
    check_finite: bool = True,
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Validate a miner call on host arrays (anything ``np.asarray`` accepts).

    Returns:
        (embeddings, labels as int64, ref_emb, ref_labels as int64 or None)
    """
    embeddings = _as_array(embeddings, "embeddings")
    labels = _as_array(labels, "labels")
    check_embeddings(embeddings, "embeddings", check_finite)
    check_labels(labels, "labels", embeddings.shape[0], "embeddings")
    labels = labels.astype(np.int64, copy=False)
    check_ref_given(ref_emb, ref_labels)
    if ref_emb is None:
        return embeddings, labels, None, None
    ref_emb = _as_array(ref_emb, "ref_emb")
    ref_labels = _as_array(ref_labels, "ref_labels")
    check_embeddings(ref_emb, "ref_emb", check_finite)
    check_pair_meta(embeddings.shape, embeddings.dtype, ref_emb.shape, ref_emb.dtype)
    check_labels(ref_labels, "ref_labels", ref_emb.shape[0], "ref_emb")
    ref_labels = ref_labels.astype(np.int64, copy=False)
    return embeddings, labels, ref_emb, ref_labels
