"""Where ONNX Runtime puts a graph's nodes, and whether a strict GPU session loads it.

ONNX Runtime assigns every node of a session to an execution provider and reports the
assignment only in its verbose log. :func:`node_placement` reads that log while it
creates a session; :func:`strict_session` tries the session that refuses any CPU
fallback (``session.disable_cpu_ep_fallback``), which ONNX Runtime only loads when every
node has a kernel on the first provider. Together they say whether an exported miner
keeps all of its data on the GPU (../shared/GPU_FACTS.md has what was measured).

torch-free: numpy and onnxruntime only.
"""
import contextlib
import os
import re
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import compat

_PLACED = re.compile(r"(All nodes|Node\(s\)) placed on \[(\w+)\]\.\s*Number of nodes:\s*(\d+)")
_NODE = re.compile(r"\]\s{2,}(\w+) \(")


@contextlib.contextmanager
def _stderr_to(path: str):
    """Send file descriptor 2 (where ONNX Runtime's C++ logger writes) to ``path``."""
    import sys
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)


def parse_placement(log: str) -> Dict[str, Dict[str, Any]]:
    """``{provider: {"nodes": count, "ops": [op types] or None}}`` from a verbose
    session log (``ops`` is None where the log says "All nodes placed on")."""
    placed: Dict[str, Dict[str, Any]] = {}
    current: Optional[str] = None
    for line in log.splitlines():
        if "VerifyEachNodeIsAssignedToAnEp" not in line:
            continue
        m = _PLACED.search(line)
        if m:
            current = m.group(2)
            placed[current] = {"nodes": int(m.group(3)),
                               "ops": None if m.group(1) == "All nodes" else []}
            continue
        m = _NODE.search(line)
        if m and current is not None and placed[current]["ops"] is not None:
            placed[current]["ops"].append(m.group(1))
    return placed


def node_placement(path: str, providers: Sequence[Any],
                   provider_options: Optional[Sequence[Dict[str, Any]]] = None
                   ) -> Dict[str, Dict[str, Any]]:
    """Create a session for ``path`` with ``providers`` and report where its nodes went:
    ``{provider: {"nodes": count, "ops": [op types]}}`` (``ops`` None when every node
    sits on that provider). Nodes are counted after ONNX Runtime's graph optimisations
    (fusions, copies it inserts such as ``MemcpyToHost``)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 0
    so.log_verbosity_level = 0
    fd, log_path = tempfile.mkstemp(prefix="exportminers-ort-", suffix=".log")
    os.close(fd)
    try:
        with _stderr_to(log_path):
            ort.InferenceSession(os.fspath(path), so, providers=list(providers),
                                 provider_options=provider_options,
                                 **compat.session_kwargs(ort))
        with open(log_path, encoding="utf-8", errors="replace") as f:
            log = f.read()
    finally:
        os.remove(log_path)
    placed = parse_placement(log)
    if not placed:
        raise RuntimeError(f"{path}: ONNX Runtime's verbose log named no node placement")
    return placed


def strict_session_options(base=None):
    """Session options that forbid ONNX Runtime's CPU fallback (use them with
    ``providers=["CUDAExecutionProvider"]`` alone: the two may not be combined)."""
    import onnxruntime as ort
    so = base if base is not None else ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    return so


def strict_session(path: str, provider: str = "CUDAExecutionProvider"
                   ) -> Tuple[Optional[Any], Optional[str]]:
    """``(session, None)`` if ``path`` loads with every node on ``provider`` and the CPU
    fallback disabled, else ``(None, ONNX Runtime's reason)``."""
    import onnxruntime as ort
    try:
        sess = ort.InferenceSession(os.fspath(path), strict_session_options(),
                                    providers=[provider], **compat.session_kwargs(ort))
    except Exception as e:  # ONNX Runtime raises its own Fail/RuntimeException types
        return None, f"{type(e).__name__}: {e}".strip()
    return sess, None


def cpu_nodes(placed: Dict[str, Dict[str, Any]], graph_ops: Sequence[str] = ()) -> List[str]:
    """Op types placed on the CPU (every op of ``graph_ops`` if all nodes went there)."""
    cpu = placed.get("CPUExecutionProvider")
    if cpu is None:
        return []
    return list(graph_ops) if cpu["ops"] is None else list(cpu["ops"])
