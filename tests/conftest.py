import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from harness import stable_seed  # noqa: E402


@pytest.fixture
def seed(request) -> int:
    """A per-test seed: reproducible, different across test cases."""
    s = stable_seed(request.node.nodeid)
    torch.manual_seed(s)
    return s


@pytest.fixture(autouse=True)
def _default_dtype_and_threads():
    torch.set_default_dtype(torch.float32)
    yield
