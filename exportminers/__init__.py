"""exportminers: hard-example miners that script, export to ONNX and run anywhere.

Importing the package does not import torch: submodules and the export/runtime entry
points load on first use (PEP 562), so ``exportminers.OnnxMiner`` works where only
numpy and onnxruntime are installed.

Example:
    >>> import exportminers
    >>> miner = exportminers.miners.TripletMarginMiner(margin=0.2)
    >>> path = exportminers.export_onnx(miner, "miner.onnx", embedding_dim=128)
    >>> a, p, n = exportminers.OnnxMiner(path)(embeddings_np, labels_np)
"""
import importlib
from typing import Any, List

__version__ = "0.1.0"

_SUBMODULES = {"miners", "distances", "utils", "losses", "registry", "decode", "runtime",
               "export", "cli", "pipeline"}
_ATTRIBUTES = {
    "export_onnx": "export",
    "export_torchscript": "export",
    "load_torchscript": "export",
    "OnnxMiner": "runtime.onnx_miner",
}

__all__ = ["__version__", "miners", "distances", "utils", "losses", "registry",
           "export_onnx", "export_torchscript", "load_torchscript", "OnnxMiner"]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
            raise
        globals()[name] = module
        return module
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(f"{__name__}.{_ATTRIBUTES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | _SUBMODULES | set(_ATTRIBUTES))
