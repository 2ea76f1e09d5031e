"""Session options that keep ONNX Runtime's CPU memory at one call's peak.

With its defaults, an ONNX Runtime CPU session needs about twice a call's memory from
the second call on (onnxruntime issue #14477): the arena grows in powers of two, and the
memory pattern planned from the first run is requested as one more block beside the
arena's freed chunks. Measured on exported miners (2 cores, N = 1024, d = 128): the
TripletMarginMiner graph's steady peak falls from 2.18 to 1.12 GB, the AngularMiner
graph's (N = 512) from 2.9 to 1.6 GB, at the same speed. Disabling the arena instead
keeps the memory low but re-faults every page on each call (8x slower for the large
graphs).

:func:`lean_cpu_options` registers one CPU arena for the process that grows by what is
requested (``kSameAsRequested``) and turns the memory pattern off. It is applied to the
sessions exportminers builds for the CPU provider alone; a ``session_options`` given by
the caller is used as given, so apply it to your own options to keep the behaviour::

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = 4
    om = OnnxMiner(path, providers=["CPUExecutionProvider"],
                   session_options=lean_cpu_options(onnxruntime, so))

Two consequences of a process-wide arena: its memory stays with the process after the
sessions are gone (reused by later sessions, not returned to the OS), and registering it
replaces a CPU allocator the application registered itself with
``create_and_register_allocator`` (ONNX Runtime 1.32 keeps the last one). Call
``use_shared_arena(False)`` (or set ``EXPORTMINERS_SHARED_ARENA=0``) before building
sessions to keep ONNX Runtime's per-session defaults.
"""
import os
from typing import Any, Sequence

_REGISTERED = False
_ENABLED = os.environ.get("EXPORTMINERS_SHARED_ARENA", "1") != "0"


def use_shared_arena(enabled: bool) -> None:
    """Turn the shared CPU arena on or off for sessions built from now on."""
    global _ENABLED
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be True or False, got {enabled!r}")
    _ENABLED = enabled


def shared_arena_enabled() -> bool:
    return _ENABLED


def _register_env_arena(ort) -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    try:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                 ort.OrtMemType.DEFAULT)
        # OrtArenaCfg(max_mem=0: no limit, arena_extend_strategy=1: kSameAsRequested,
        # initial_chunk_size_bytes=-1, max_dead_bytes_per_chunk=-1: defaults)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
    except Exception:   # older ONNX Runtime: one was registered already; use that one
        pass


def cpu_only(providers: Sequence[Any]) -> bool:
    """Every entry is the CPU provider (a name or a ``(name, options)`` pair)."""
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
    return bool(names) and all(n == "CPUExecutionProvider" for n in names)


def default_cpu_options(ort, session_options=None):
    """What exportminers' own CPU-only sessions use: :func:`lean_cpu_options` while the
    shared arena is enabled (:func:`use_shared_arena`), else ``session_options`` (a new
    ``SessionOptions`` if None) unchanged."""
    if _ENABLED:
        return lean_cpu_options(ort, session_options)
    return ort.SessionOptions() if session_options is None else session_options


def lean_cpu_options(ort, session_options=None):
    """``session_options`` (a new ``SessionOptions`` if None) set to use the process's
    ``kSameAsRequested`` CPU arena, without the memory pattern."""
    so = ort.SessionOptions() if session_options is None else session_options
    _register_env_arena(ort)
    so.add_session_config_entry("session.use_env_allocators", "1")
    so.enable_mem_pattern = False
    return so
