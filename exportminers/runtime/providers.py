"""Execution-provider lists with exact float32 arithmetic on ONNX Runtime's CUDA EP.

ONNX Runtime's CUDA EP runs float32 MatMul / Gemm in TF32 unless told otherwise (its
provider option ``use_tf32`` defaults to 1): inputs rounded to 10 mantissa bits, which
moves distances by ~1e-3 and changes which pairs and triplets pass a margin or a
threshold. Eager torch keeps float32 matmuls exact by default
(``torch.backends.cuda.matmul.allow_tf32`` is False), and PML parity needs that, so
exportminers asks for ``use_tf32=0`` unless the caller chose a value. Float16 graphs are
unaffected.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple

CUDA = "CUDAExecutionProvider"


def exact_providers(providers: Sequence[Any],
                    provider_options: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
                    allow_tf32: bool = False) -> List[Tuple[str, Dict[str, Any]]]:
    """``providers`` (names or ``(name, options)`` pairs) with ``provider_options``
    merged in, as ``(name, options)`` pairs for ``InferenceSession(providers=...)``; the
    CUDA EP gets ``use_tf32="0"`` unless ``allow_tf32`` or the caller set ``use_tf32``."""
    providers = list(providers)
    if provider_options is not None and len(provider_options) != len(providers):
        raise ValueError(f"provider_options: {len(provider_options)} entries for "
                         f"{len(providers)} providers {providers}; give one dict per provider")
    out = []
    for i, p in enumerate(providers):
        if isinstance(p, str):
            name, opts = p, {}
        elif isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) \
                and isinstance(p[1], dict):
            name, opts = p[0], dict(p[1])
        else:
            raise ValueError(f"providers[{i}] = {p!r}: give a provider name or a "
                             f"(name, options dict) pair")
        if provider_options is not None and provider_options[i]:
            opts.update(provider_options[i])
        if name == CUDA and not allow_tf32:
            opts.setdefault("use_tf32", "0")
        out.append((name, opts))
    return out
