"""Offline hard-negative mining: a whole dataset against a large bank, outside PyTorch.

Needs onnxruntime, numpy and pyarrow only (matplotlib for the plot, scikit-learn for
``--demo``); the block graphs ship with the package.

Example:
    >>> from exportminers.pipeline import mine
    >>> res = mine("emb.npy", "labels.npy", out_dir="mined", k=10)
    >>> res.output   # mined/mined.parquet: one row per query

Command line: ``python -m exportminers.pipeline --help`` (or ``exportminers mine``).
"""
from .config import MineConfig
from .mine import MineResult, mine

__all__ = ["MineConfig", "MineResult", "mine"]
