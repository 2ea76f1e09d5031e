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


def _flat_true(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask).astype(np.int64, copy=False)


def decode_part(mask: np.ndarray, outputs: Sequence[np.ndarray], fields: Sequence[int]) -> List[np.ndarray]:
    """Decode one part; see the module docstring."""
    mask = np.asarray(mask)
    flat = _flat_true(mask)
    shape = mask.shape
    ndim = len(shape)
    strides = [1] * ndim
    for k in range(ndim - 2, -1, -1):
        strides[k] = strides[k + 1] * shape[k + 1]
    coords: List[np.ndarray] = []
    for k in range(ndim):
        if flat.size == 0:
            coords.append(flat.copy())
        else:
            coords.append((flat // strides[k]) % shape[k])
    result: List[np.ndarray] = []
    for f in fields:
        if f < 0:
            result.append(coords[-f - 1])
        else:
            src = np.asarray(outputs[f])
            if src.ndim != ndim:
                raise ValueError("decode: field rank does not match its mask")
            lin = np.zeros_like(flat)
            step = 1
            for k in range(ndim - 1, -1, -1):
                if src.shape[k] != 1:
                    lin = lin + coords[k] * step
                step = step * src.shape[k]
            result.append(np.ascontiguousarray(src).reshape(-1)[lin].astype(np.int64))
    return result


def decode(outputs: Sequence[np.ndarray], layout: Sequence[Sequence[int]]) -> List[np.ndarray]:
    """Decode kernel outputs with a layout; see the module docstring."""
    result: List[np.ndarray] = []
    for part in layout:
        result.extend(decode_part(outputs[part[0]], outputs, list(part[1:])))
    return result
