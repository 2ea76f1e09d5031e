"""Utilities: PML-compatible index helpers (``loss_and_miner_utils``) and input checks."""
from . import checks, loss_and_miner_utils

__all__ = ["checks", "loss_and_miner_utils"]
