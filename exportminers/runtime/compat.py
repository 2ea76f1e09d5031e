"""Work-arounds for known bugs of older ONNX Runtime releases (numpy-only, no torch).

Before 1.26, ONNX Runtime's CPU graph optimiser fuses a float64 ``Transpose -> MatMul``
into ``com.microsoft.FusedMatMul``, which has a float kernel only, so a graph with one
fails to load ("Failed to find kernel for com.microsoft.FusedMatMul ... tensor(double)";
measured with 1.18.1 to 1.25.1, fixed in 1.26.0). AngularMiner's graphs compute their
Gram matrices in float64. :func:`session_kwargs` turns that one fusion off there; pass
its result to ``onnxruntime.InferenceSession`` where you build sessions yourself::

    sess = onnxruntime.InferenceSession(path, providers=[...], **session_kwargs(onnxruntime))
"""
import re
from typing import Any, Dict, Optional, Tuple

FUSED_MATMUL_DOUBLE_FIXED = (1, 26)


def ort_version(ort: Any) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of an onnxruntime module, None where its version is unreadable."""
    m = re.search(r"(\d+)\.(\d+)", str(getattr(ort, "__version__", "")))
    return (int(m.group(1)), int(m.group(2))) if m else None


def session_kwargs(ort: Any) -> Dict[str, Any]:
    """Extra ``InferenceSession`` keyword arguments this onnxruntime release needs."""
    v = ort_version(ort)
    if v is not None and v < FUSED_MATMUL_DOUBLE_FIXED:
        return {"disabled_optimizers": ["MatmulTransposeFusion"]}
    return {}
