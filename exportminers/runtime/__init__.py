"""Torch-free runtime: run exported miners with numpy + ONNX Runtime only.

* :class:`OnnxMiner`: load a graph from :func:`exportminers.export_onnx`, validate, run,
  decode.
* :mod:`.decode_np`: numpy twin of :mod:`exportminers.decode`.
* :mod:`.checks_np`: numpy twins of the input checks.
* :mod:`.metadata`: the ``metadata_props`` keys of an exported graph.

Nothing here imports torch (torch tensors passed in are handled through DLPack, and
only ``device_output=True`` decodes with torch).
"""
from . import checks_np, decode_np, metadata
from .arena import lean_cpu_options
from .onnx_miner import OnnxMiner, default_providers

__all__ = ["OnnxMiner", "default_providers", "lean_cpu_options", "checks_np", "decode_np",
           "metadata"]
