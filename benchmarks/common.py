"""Pieces shared by the benchmark runner, its worker processes and the report.

Nothing here imports torch at module level: the runner stays light and the worker
imports what a row needs.
"""
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

# --------------------------------------------------------------------- implementations


@dataclass(frozen=True)
class Impl:
    key: str
    label: str       # column header in the markdown table and legend in the plots
    device: str      # "cpu", "cuda" or "any" (runs on the run's device)
    onnx: bool       # needs an exported graph
    doc: str


IMPLS: Dict[str, Impl] = {i.key: i for i in [
    Impl("pml", "PML eager", "any", False,
         "pytorch_metric_learning 2.9.0 miner, eager (MaximumLossMiner, absent from PML "
         "2.9.0: an eager loop over PML's TripletMarginLoss with the same subset sampling)"),
    Impl("eager", "ours eager", "any", False,
         "exportminers miner, eager: validate + fixed-shape kernel + decode"),
    Impl("torchscript", "TorchScript", "any", False,
         "torch.jit.script of the exportminers miner (validate + kernel + decode)"),
    Impl("ort_cpu", "ORT CPU", "cpu", True,
         "exportminers.OnnxMiner on CPUExecutionProvider: numpy in, checks, graph, numpy "
         "decode to index tuples"),
    Impl("ort_cpu_raw", "ORT CPU raw", "cpu", True,
         "OnnxMiner(..., return_raw=True) on CPUExecutionProvider: checks + graph, "
         "fixed-shape outputs, no decoding"),
    Impl("ort_cuda_raw", "ORT CUDA raw", "cuda", True,
         "OnnxMiner on CUDAExecutionProvider with torch CUDA tensors (IOBinding), "
         "return_raw=True: fixed-shape outputs left on the GPU"),
    Impl("ort_cuda_decode", "ORT CUDA +decode", "cuda", True,
         "OnnxMiner on CUDAExecutionProvider with IOBinding and device_output=True: "
         "decoded to int64 index tuples on the GPU (torch)"),
]}

# TorchScript's profiling executor profiles the first call and compiles the optimised
# graph on the second: a call timed after one warm-up times that compilation (measured:
# 42.9 ms vs 0.80 ms), so TorchScript rows always get at least this many warm-up calls.
TORCHSCRIPT_MIN_WARMUP = 2


def min_warmup(impl: str) -> int:
    """Warm-up calls a row of ``impl`` needs at least (TorchScript 2, others 1)."""
    return TORCHSCRIPT_MIN_WARMUP if impl == "torchscript" else 1


DEFAULT_IMPLS = {
    "cpu": ["pml", "eager", "torchscript", "ort_cpu", "ort_cpu_raw", "ort_cuda_raw",
            "ort_cuda_decode"],
    "cuda": ["pml", "eager", "torchscript", "ort_cuda_raw", "ort_cuda_decode"],
}

# ------------------------------------------------------------------------------ miners


def default_config(name: str) -> Dict[str, Any]:
    """The registry's first (default) configuration of a built-in miner."""
    from exportminers import registry
    return dict(registry.get(name).configs[0])


def build_ours(name: str, config: Dict[str, Any]):
    from exportminers import registry
    cfg = dict(config)
    if name == "MaximumLossMiner":
        from exportminers.losses import TripletMarginLoss
        cfg["loss_function"] = TripletMarginLoss()
    return registry.get(name).build(**cfg)


class PMLMaximumLoss:
    """Stand-in for PML's old ``MaximumLossMiner`` (not in PML 2.9.0): the same eager
    algorithm with PML's ``TripletMarginLoss``: ``num_trials`` subsets of
    ``output_batch_size`` indices drawn with replacement, the one with the largest loss
    wins. Embeddings are L2-normalised first (the old API's default)."""

    def __init__(self, output_batch_size: int = 32, num_trials: int = 5):
        from pytorch_metric_learning.losses import TripletMarginLoss
        self.loss = TripletMarginLoss()
        self.output_batch_size = output_batch_size
        self.num_trials = num_trials

    def __call__(self, embeddings, labels):
        import torch
        import torch.nn.functional as F
        with torch.no_grad():
            emb = F.normalize(embeddings, p=2, dim=1)
            n = emb.size(0)
            best, best_idx = None, None
            for _ in range(self.num_trials):
                idx = torch.randint(0, n, (self.output_batch_size,), device=emb.device)
                loss = self.loss(emb[idx], labels[idx])
                if best is None or float(loss) > best:
                    best, best_idx = float(loss), idx
            return best_idx


def build_pml(name: str, config: Dict[str, Any]):
    """The PML 2.9.0 miner with the same configuration (default distances agree)."""
    if name == "MaximumLossMiner":
        return PMLMaximumLoss(**config)
    import pytorch_metric_learning.miners as pml_miners
    return getattr(pml_miners, name)(**config)


def effective_n(name: str, n: int) -> int:
    """Batch size actually used: EmbeddingsAlreadyPackagedAsTriplets needs whole triplets."""
    if name == "EmbeddingsAlreadyPackagedAsTriplets":
        return n - n % 3
    return n


def tuple_count(out) -> int:
    """Tuples (or indices) in a miner's output: length of the first index array; for
    pair miners positive + negative pairs."""
    if isinstance(out, (tuple, list)):
        if len(out) == 4:
            return int(len(out[0])) + int(len(out[2]))
        if len(out) == 0:
            return 0
        first = out[0]
        return int(first.shape[0]) if hasattr(first, "shape") else int(len(first))
    return int(out.shape[0]) if hasattr(out, "shape") else int(len(out))


# ------------------------------------------------------------------------------ inputs


def make_inputs(n: int, d: int, per_class: int, count: int, seed: int, spread: float):
    """``count`` fresh batches with class structure, as CPU float32 / int64 tensors.

    Each batch: ``n // per_class`` classes (at least one), class centres ``randn(C, d)``,
    embeddings ``centre + spread * randn``, class ids shuffled. With ``spread=1.25`` and
    d = 128, TripletMarginMiner's default selects about 10% of the valid triplets (a
    mid-training batch, neither trivially easy nor random).
    """
    import torch
    g = torch.Generator().manual_seed(seed)
    c = max(1, n // per_class)
    batches = []
    for _ in range(count):
        centres = torch.randn(c, d, generator=g)
        cls = (torch.arange(n) % c)[torch.randperm(n, generator=g)]
        x = centres[cls] + spread * torch.randn(n, d, generator=g)
        batches.append((x.float().contiguous(), cls.to(torch.int64)))
    return batches


# ------------------------------------------------------------------------------ memory


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> Optional[float]:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> Optional[float]:
    """VmHWM (peak RSS since start or the last :func:`reset_peak_rss`), else ru_maxrss."""
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0


# ---------------------------------------------------------------------------- failures

_OOM_PATTERNS = re.compile(
    r"out of memory|can't allocate memory|cannot allocate memory|bad_alloc|bad allocation|"
    r"Failed to allocate|MemoryError|_ArrayMemoryError|OutOfMemoryError|CUDA error: out of memory|"
    r"std::length_error|Unable to allocate",
    re.IGNORECASE)


def classify_error(text: str) -> str:
    """'oom' when an error message says memory ran out, else 'error'."""
    return "oom" if _OOM_PATTERNS.search(text or "") else "error"


def short(text: str, limit: int = 300) -> str:
    """One line of at most ``limit`` characters: head and tail kept (an allocator's message
    puts the useful part, e.g. the size it tried, at the end)."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    head = (limit - 5) // 2
    return text[:head] + " ... " + text[len(text) - (limit - 5 - head):]


# ------------------------------------------------------------------------------- misc


def onnx_path(out_dir: str, name: str, anchor_blocks: bool = False, gather: bool = False) -> str:
    return os.path.join(out_dir, "onnx", f"{name}{'_anchor_blocks' if anchor_blocks else ''}"
                                         f"{'_gather' if gather else ''}.onnx")


def row_key(row: Dict[str, Any]) -> Tuple[str, int, str]:
    return row["miner"], int(row["n"]), row["impl"]


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_ratio(r: Optional[float]) -> str:
    if r is None:
        return ""
    if r >= 100:
        return f"{r:.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x"


def describe_config(name: str, config: Dict[str, Any]) -> str:
    if name == "MaximumLossMiner":
        config = dict(config, loss_function="TripletMarginLoss()")
    if not config:
        return "defaults"
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


def registry_order() -> List[str]:
    from exportminers import registry
    return list(registry.MINERS)
