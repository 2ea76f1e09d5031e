"""Older ONNX Runtime releases: known gaps and work-arounds (numpy-only, no torch).

exportminers is tested with onnxruntime 1.26.0 and newer (the ``cpu``/``gpu`` extras ask
for it). Found with older releases: 1.17 and older cannot load the graphs (ONNX IR 10);
before 1.21 the pipeline's L2 block graphs give wrong scores (inf/NaN, other tie order);
before 1.26 there is no ``OrtValue.from_dlpack``, so ``OnnxMiner`` takes numpy arrays
only (torch tensors and DLPack arrays raise a ``ValueError`` saying so); 1.26.0 hands
bool outputs to DLPack as uint8 (``device_output=True`` turns them back into bool; with
``return_raw=True`` call ``.bool()`` yourself), 1.32.0 as bool; and:

Before 1.26, ONNX Runtime's CPU graph optimiser fuses a float64 ``Transpose -> MatMul``
into ``com.microsoft.FusedMatMul``, which has a float kernel only, so a graph with one
fails to load ("Failed to find kernel for com.microsoft.FusedMatMul ... tensor(double)";
measured with 1.18.1 to 1.25.1, fixed in 1.26.0). AngularMiner's graphs compute their
Gram matrices in float64. :func:`session_kwargs` turns that one fusion off there; pass
its result to ``onnxruntime.InferenceSession`` where you build sessions yourself::

    sess = onnxruntime.InferenceSession(path, providers=[...], **session_kwargs(onnxruntime))
"""
import re
import warnings
from typing import Any, Dict, Optional, Tuple

FUSED_MATMUL_DOUBLE_FIXED = (1, 26)
TESTED_FROM = (1, 26)
_WARNED = [False]


def release(module: Any) -> Optional[Tuple[int, int]]:
    """``(major, minor)`` of a module's ``__version__`` (onnxruntime, torch), None where it
    is unreadable."""
    m = re.search(r"(\d+)\.(\d+)", str(getattr(module, "__version__", "")))
    return (int(m.group(1)), int(m.group(2))) if m else None


def session_kwargs(ort: Any) -> Dict[str, Any]:
    """Extra ``InferenceSession`` keyword arguments this onnxruntime release needs."""
    v = release(ort)
    if v is not None and v < FUSED_MATMUL_DOUBLE_FIXED:
        return {"disabled_optimizers": ["MatmulTransposeFusion"]}
    return {}


def has_dlpack(ort: Any) -> bool:
    """Whether this onnxruntime can wrap DLPack tensors (``OrtValue.from_dlpack``)."""
    return hasattr(getattr(ort, "OrtValue", None), "from_dlpack")


def warn_if_untested(ort: Any) -> None:
    """Warn once per process where onnxruntime is older than :data:`TESTED_FROM`."""
    v = release(ort)
    if v is None or v >= TESTED_FROM or _WARNED[0]:
        return
    _WARNED[0] = True
    warnings.warn(
        f"onnxruntime {ort.__version__} is older than {'.'.join(map(str, TESTED_FROM))}, the "
        f"oldest release exportminers is tested with; known gaps: exportminers.runtime.compat",
        stacklevel=3)
