"""The one data-dependent step: fixed-shape kernel outputs -> PML index tuples.

A kernel returns a list of fixed-shape tensors. A miner's *layout* says how to read
them: a list of parts, each ``[mask, field, field, ...]`` where ``mask`` is the position
of a boolean tensor in the kernel outputs and each field is either the position of an
integer tensor broadcastable to that mask (``>= 0``) or ``-(axis + 1)``, meaning "the
coordinate along that axis of the mask". Decoding a part selects, in row-major order,
every True position of the mask and reads each field there. The decoded fields of all
parts are concatenated into the miner's output tuple.

Examples:
    pair masks ``[pos[N, M], neg[N, M]]`` with layout ``[[0, -1, -2], [1, -1, -2]]``
    give ``(a1, p, a2, n)``; a triplet mask ``[mask[N, M, M]]`` with layout
    ``[[0, -1, -2, -3]]`` gives ``(a, p, n)``.

The same algorithm, in numpy, lives in :mod:`exportminers.runtime.decode_np` for the
torch-free ONNX Runtime path; a test checks they agree.
"""
from typing import List

import torch
from torch import Tensor



def cat_release(pieces: List[Tensor]) -> Tensor:
    """``torch.cat(pieces)`` of 1-D tensors that lets go of each piece once copied (the
    list's entries are replaced by empty tensors): the peak is the result plus the pieces
    not yet copied, where ``torch.cat`` keeps every piece alive beside the result while
    the caller holds the list. Decoded blocks of many tuples are joined with it."""
    if len(pieces) == 1:
        return pieces[0]
    total = 0
    for piece in pieces:
        total += piece.size(0)
    out = torch.empty(total, dtype=pieces[0].dtype, device=pieces[0].device)
    pos = 0
    for i in range(len(pieces)):
        k = pieces[i].size(0)
        out.narrow(0, pos, k).copy_(pieces[i])
        pieces[i] = out[:0]
        pos += k
    return out


def _flat_true(mask: Tensor, limit: int = 2147483647) -> Tensor:
    """Flat positions of True entries, in order; ``nonzero`` runs on pieces of at most
    ``limit`` elements (its CUDA kernel handles at most INT_MAX)."""
    flat = mask.reshape(-1)
    n = flat.numel()
    if n <= limit:
        return torch.nonzero(flat).reshape(-1)
    pieces: List[Tensor] = []
    for start in range(0, n, limit):
        stop = min(n, start + limit)
        pieces.append(torch.nonzero(flat[start:stop]).reshape(-1) + start)
    return torch.cat(pieces)


def decode_part(mask: Tensor, outputs: List[Tensor], fields: List[int],
                limit: int = 2147483647) -> List[Tensor]:
    """Decode one part; see the module docstring."""
    flat = _flat_true(mask, limit)
    shape = mask.shape
    ndim = len(shape)
    strides: List[int] = [1] * ndim
    for k in range(ndim - 2, -1, -1):
        strides[k] = strides[k + 1] * shape[k + 1]
    coords: List[Tensor] = []
    for k in range(ndim):
        coords.append(torch.div(flat, strides[k], rounding_mode="floor") % shape[k])
    result: List[Tensor] = []
    for f in fields:
        if f < 0:
            result.append(coords[-f - 1])
        else:
            src = outputs[f]
            if src.dim() != ndim:
                raise ValueError("decode: field rank does not match its mask")
            src = src.contiguous()
            lin = torch.zeros_like(flat)
            step = 1
            for k in range(ndim - 1, -1, -1):
                if src.size(k) != 1:
                    lin = lin + coords[k] * step
                step = step * src.size(k)
            result.append(src.reshape(-1)[lin].to(torch.int64))
    return result


def decode(outputs: List[Tensor], layout: List[List[int]]) -> List[Tensor]:
    """Decode kernel outputs with a layout; see the module docstring."""
    result: List[Tensor] = []
    for part in layout:
        fields: List[int] = []
        for i in range(1, len(part)):
            fields.append(part[i])
        result.extend(decode_part(outputs[part[0]], outputs, fields))
    return result
