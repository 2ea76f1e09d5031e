"""Numpy twin of :mod:`exportminers.decode`: fixed-shape kernel outputs -> index tuples.

Same algorithm, same layouts (see that module's docstring): for each part
``[mask, field, ...]`` select the True positions of ``mask`` in row-major order and read
each field there (``field >= 0``: an output broadcastable to the mask; ``field < 0``:
the coordinate along mask axis ``-field - 1``). Imports numpy only.

Example:
    >>> import numpy as np
    >>> pos = np.array([[False, True], [False, False]])
    >>> neg = np.array([[False, False], [True, False]])
    >>> [a.tolist() for a in decode([pos, neg], [[0, -1, -2], [1, -1, -2]])]
    [[0], [1], [1], [0]]
"""
from typing import List, Sequence

import numpy as np


def _read(src: np.ndarray, coords: Sequence[np.ndarray], mask_shape: Sequence[int], n: int) -> np.ndarray:
    """``src`` (broadcastable to the mask) read at the mask's True positions."""
    if src.ndim != len(mask_shape):
        raise ValueError("decode: field rank does not match its mask")
    keep = [k for k in range(src.ndim) if src.shape[k] != 1]  # size-1 axes broadcast
    if any(src.shape[k] != mask_shape[k] for k in keep):
        raise ValueError(f"decode: a field of shape {list(src.shape)} does not broadcast to "
                         f"its mask's shape {list(mask_shape)}")
    if not keep:
        return np.full(n, src.reshape(()), dtype=np.int64)
    if len(keep) < src.ndim:
        src = src.reshape([src.shape[k] for k in keep])
    return src[tuple(coords[k] for k in keep)].astype(np.int64, copy=False)


def decode_part(mask: np.ndarray, outputs: Sequence[np.ndarray], fields: Sequence[int]) -> List[np.ndarray]:
    """Decode one part; see the module docstring."""
    mask = np.asarray(mask)
    if mask.ndim == 0:
        raise ValueError("decode: a part's mask must have at least one axis")
    flat = np.flatnonzero(mask)   # row-major order; np.nonzero is ~3x slower past 1-D
    coords = [flat] if mask.ndim == 1 else list(np.unravel_index(flat, mask.shape))
    coords = [c.astype(np.int64, copy=False) for c in coords]
    n = coords[0].shape[0]
    result: List[np.ndarray] = []
    for f in fields:
        if f < 0:
            result.append(coords[-f - 1])
        else:
            result.append(_read(np.asarray(outputs[f]), coords, mask.shape, n))
    return result


def decode(outputs: Sequence[np.ndarray], layout: Sequence[Sequence[int]]) -> List[np.ndarray]:
    """Decode kernel outputs with a layout; see the module docstring."""
    result: List[np.ndarray] = []
    for part in layout:
        result.extend(decode_part(outputs[part[0]], outputs, list(part[1:])))
    return result
