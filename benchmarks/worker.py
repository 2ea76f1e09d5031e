"""Benchmark worker: runs the tasks in a JSON file, one after another, and reports each.

Started by :mod:`benchmarks.run` as ``python -m benchmarks.worker TASKS.json`` under a
memory limit; the runner enforces the time cap per task and reads the protocol lines
this process prints (everything else on stdout/stderr is kept as error context):

* ``@@READY`` once the imports are done;
* ``@@START <i>`` before task ``i``;
* ``@@RESULT <json>`` after it (status ``ok``, ``oom``, ``error``, ...).

Tasks are ``{"kind": "export", ...}`` (export one miner to ONNX) or
``{"kind": "row", ...}`` (time one miner x implementation x batch size).

Timing: ``warmup`` calls on their own fresh batches (at least one; TorchScript at least
``common.TORCHSCRIPT_MIN_WARMUP``: its profiling executor optimises the graph on the
second call), then up to ``repeats`` timed calls, each on a fresh batch (generated before
timing starts), stopping early once the timed calls used ``budget_s`` (after at least
``min_repeats``, and never before the first) or the next call would run past the task's
cap. Warm-up stops early after a call longer than ``budget_s / 2`` or when the next would
run past the cap, once the minimum is done; the row's ``warmup`` is the number of warm-up
calls made. With ``repeats = 0`` (the runner refuses it) the time reported is the first,
cold call's and the row's ``note`` says so. CPU: ``time.perf_counter``; CUDA: CUDA events
on the current stream around the call (ONNX Runtime synchronises its own stream before
returning). On CPU the process CPU time of each call is recorded too (``median_cpu_ms``):
on a shared machine it is not inflated when other processes take the core (with one
thread it equals the compute time; with more, it sums the threads).

Peak memory (``peak_mem_mb``), measured from just before the first warm-up call:

* CPU: growth of the resident set: ``VmHWM`` after the timed calls (the peak mark is
  reset with ``/proc/self/clear_refs`` after the warm-up) minus ``VmRSS`` before the
  warm-up; memory an implementation keeps between calls (ONNX Runtime's arena) counts.
  Where ``clear_refs`` is refused: ``ru_maxrss`` minus the same baseline (includes
  warm-up/compilation peaks).
* CUDA, torch implementations: ``torch.cuda.max_memory_allocated`` during the timed
  calls minus ``memory_allocated`` before the warm-up.
* CUDA, ONNX Runtime: torch's allocator does not see ONNX Runtime's arena, so device
  memory in use (``torch.cuda.mem_get_info``) after the timed calls minus before the
  warm-up, plus torch's own peak (input checks, decoding).

Only the first row of a worker process gets its own peak. Later rows in the same process
(``--rows-per-process`` > 1) start from a baseline that holds what earlier rows left
behind (ONNX Runtime's process-wide CPU arena, the C allocator's and torch's caches), which
they may reuse: their growth is a lower bound, marked ``mem_shared_process`` (except CUDA
torch rows: ``max_memory_allocated`` counts this row's allocations only).
"""
import gc
import json
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

from exportminers.runtime import metadata as md

from . import common


def emit(tag: str, payload: str = "") -> None:
    sys.stdout.write(f"@@{tag} {payload}\n" if payload else f"@@{tag}\n")
    sys.stdout.flush()


def _error_result(e: BaseException) -> Dict[str, Any]:
    text = f"{type(e).__name__}: {e}"
    status = "oom" if isinstance(e, MemoryError) else common.classify_error(text)
    return {"status": status, "reason": common.short(text)}


# ------------------------------------------------------------------------------ export


class RowSkipped(Exception):
    """A row that cannot be measured as defined (its reason is recorded, status skipped)."""


def run_export(task: Dict[str, Any]) -> Dict[str, Any]:
    """Export the miner's self-mining graph; where it is row-independent and one run of
    that graph would compute a tensor beyond ``CUDA_MAX_ELEMENTS`` at one of the task's
    ``sizes``, also its ``anchor_blocks=True`` graph (``blocks_path``), which the rows at
    those sizes use: OnnxMiner mines it in anchor blocks (see :func:`pick_graph`)."""
    import exportminers
    from exportminers.runtime.onnx_miner import CUDA_MAX_ELEMENTS
    miner = common.build_ours(task["miner"], task["config"])
    t0 = time.perf_counter()
    exportminers.export_onnx(miner, task["path"], embedding_dim=task["d"], with_ref=False)
    out = {"status": "ok", "path": task["path"], "export_s": round(time.perf_counter() - t0, 3)}
    meta = graph_metadata(task["path"])
    too_big = [n for n in task.get("sizes", [])
               if largest_elements(meta, n, task["d"]) > CUDA_MAX_ELEMENTS]
    if too_big and meta.get(md.ROW_INDEPENDENT) and task.get("blocks_path"):
        t1 = time.perf_counter()
        exportminers.export_onnx(miner, task["blocks_path"], embedding_dim=task["d"],
                                 anchor_blocks=True)
        out.update(blocks_path=task["blocks_path"], blocks_for=too_big,
                   blocks_export_s=round(time.perf_counter() - t1, 3))
    gathers = getattr(miner, "gathers_positives", None)
    if task.get("gather_path") and callable(gathers) and gathers():
        t1 = time.perf_counter()
        exportminers.export_onnx(miner, task["gather_path"], embedding_dim=task["d"],
                                 anchor_blocks=True, gather_positives=True)
        out.update(gather_path=task["gather_path"],
                   gather_export_s=round(time.perf_counter() - t1, 3))
    return out


def graph_metadata(path: str) -> Dict[str, Any]:
    """An exported graph's exportminers metadata, read from the file (no session)."""
    import onnx
    model = onnx.load(path, load_external_data=False)
    return md.decode({p.key: p.value for p in model.metadata_props}, path)


def largest_elements(meta: Dict[str, Any], n: int, d: int, p: int = 0) -> int:
    """Most elements of any tensor a self-mining graph computes for a batch of ``n`` (and
    ``p`` listed positives per anchor, gather_positives graphs)."""
    return md.largest_elements(meta.get(md.LARGEST_TENSORS) or [],
                               {"N": n, "M": n, "D": d, "P": p})


def pick_graph(task: Dict[str, Any], n: int) -> str:
    """The graph a row of ``n`` rows runs: the self-mining graph, or where one run of it
    would compute a tensor beyond ``CUDA_MAX_ELEMENTS`` elements (the dense triplet
    miners: N^3), the anchor-block graph, mined in blocks as OnnxMiner does by itself
    (below 2^31 - 1 elements a block on the CUDA EP, ``CPU_BLOCK_ELEMENTS`` on the CPU).
    Fixed-shape (raw) rows are one run by definition: skipped there."""
    from exportminers.runtime.onnx_miner import CUDA_MAX_ELEMENTS
    if task.get("onnx_gather_path"):
        # the benchmark's batches have per_class rows a class: per_class - 1 positives
        p = max(1, min(n, int(task["per_class"])) - 1)
        largest = largest_elements(graph_metadata(task["onnx_gather_path"]), n, task["d"], p)
        if task["impl"].endswith("_raw") and largest > CUDA_MAX_ELEMENTS:
            raise RowSkipped(
                f"fixed-shape outputs are one run's, and one run at N={n} computes a tensor "
                f"of {largest:,} elements, beyond 2^31 - 1")
        task["_graph"] = "gather_positives"
        return task["onnx_gather_path"]
    largest = largest_elements(graph_metadata(task["onnx_path"]), n, task["d"])
    if largest <= CUDA_MAX_ELEMENTS:
        return task["onnx_path"]
    if task["impl"].endswith("_raw"):
        raise RowSkipped(
            f"fixed-shape outputs are one run's, and one run at N={n} computes a tensor of "
            f"{largest:,} elements, beyond 2^31 - 1 (ONNX Runtime's CUDA limit, applied to "
            f"the CPU rows too so that both tables run the same graphs); the decoded row "
            f"mines it in anchor blocks")
    if not task.get("onnx_blocks_path"):
        raise RowSkipped(
            f"one run at N={n} computes a tensor of {largest:,} elements (beyond 2^31 - 1) "
            f"and {task['miner']} cannot be mined in anchor blocks (not row-independent)")
    task["_graph"] = "anchor_blocks"
    return task["onnx_blocks_path"]


# ------------------------------------------------------------------------------ rows


def session_options(threads: int):
    """ONNX Runtime session options: ``threads`` intra-op threads (0: its default)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if threads > 0:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    return so


def cpu_session_options(threads: int):
    """:func:`session_options` as OnnxMiner sets up a CPU session without options (the
    shared arena unless turned off: exportminers.runtime.arena)."""
    import onnxruntime as ort

    from exportminers.runtime.arena import default_cpu_options
    return default_cpu_options(ort, session_options(threads))


def set_threads(threads: int) -> None:
    """torch intra-op threads (0: leave torch's default)."""
    if threads > 0:
        import torch
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:
            pass  # already set (e.g. a second row in the same worker)


def _build(task: Dict[str, Any], device) -> Callable:
    """The callable timed for the task's implementation, taking (embeddings, labels)."""
    import torch
    name, impl, config = task["miner"], task["impl"], task["config"]
    if impl == "pml":
        miner = common.build_pml(name, config)
        if isinstance(miner, torch.nn.Module):
            miner = miner.to(device)
        return miner
    if impl == "eager":
        return common.build_ours(name, config).to(device)
    if impl == "torchscript":
        return torch.jit.script(common.build_ours(name, config)).to(device)
    if impl.startswith("ort_"):
        import exportminers
        path = pick_graph(task, common.effective_n(name, task["n"]))
        if impl.startswith("ort_cpu"):
            so = cpu_session_options(task.get("threads", 0))
            om = exportminers.OnnxMiner(path, providers=["CPUExecutionProvider"],
                                        session_options=so, seed=task["seed"])
        else:
            so = session_options(task.get("threads", 0))
            om = exportminers.OnnxMiner(path,
                                        providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
                                        session_options=so, seed=task["seed"])
            if om.providers[0] != "CUDAExecutionProvider":
                raise RuntimeError(f"the session did not get the CUDA provider: {om.providers}")
        task["_providers"] = list(om.providers)
        if impl == "ort_cpu":
            return lambda x, y: om(x, y)
        if impl in ("ort_cpu_raw", "ort_cuda_raw"):
            return lambda x, y: om(x, y, return_raw=True)
        if impl == "ort_cuda_decode":
            return lambda x, y: om(x, y, device_output=True)
    raise ValueError(f"unknown implementation {impl!r}")


def _count(impl: str, out) -> Optional[int]:
    if impl.endswith("_raw"):
        return None  # fixed-shape outputs: nothing decoded
    try:
        return common.tuple_count(out)
    except Exception:
        return None


SHARED_MEM_NOTE = ("memory measured in a worker process shared with earlier rows "
                   "(--rows-per-process > 1): growth beyond what they left allocated there "
                   "(ONNX Runtime's process-wide CPU arena, allocator caches), a lower bound, "
                   "not this row's own peak")


def run_row(task: Dict[str, Any], deadline: float, shared_process: bool = False) -> Dict[str, Any]:
    import numpy as np
    import torch

    device = torch.device(task["device"])
    cuda = device.type == "cuda"
    name, impl = task["miner"], task["impl"]
    n = common.effective_n(name, task["n"])
    need_warm = common.min_warmup(impl)
    warmup, repeats = max(need_warm, int(task["warmup"])), max(0, int(task["repeats"]))
    budget_s, min_repeats = float(task["budget_s"]), int(task["min_repeats"])
    torch.manual_seed(task["seed"])

    t_setup = time.perf_counter()
    batches = common.make_inputs(n, task["d"], task["per_class"], warmup + repeats,
                                 task["seed"], task["spread"])
    if impl in ("ort_cpu", "ort_cpu_raw"):
        batches = [(x.numpy(), y.numpy()) for x, y in batches]
    else:
        batches = [(x.to(device), y.to(device)) for x, y in batches]
    fn = _build(task, device)
    setup_s = time.perf_counter() - t_setup

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    cpu_times: List[float] = []

    def call(x, y):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(x, y)
            end.record()
            end.synchronize()
            return out, float(start.elapsed_time(end))
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = fn(x, y)
        t1 = time.perf_counter()
        cpu_times.append((time.process_time() - c0) * 1e3)
        return out, (t1 - t0) * 1e3

    gc.collect()
    sync()
    rss0 = common.rss_mb()
    if cuda:
        alloc0 = torch.cuda.memory_allocated(device)
        reserved0 = torch.cuda.memory_reserved(device)
        free0 = torch.cuda.mem_get_info(device)[0]

    # warm-up (at least need_warm calls: first-call costs are reported on their own)
    first_ms = None
    out = None
    warm_done = 0
    for i in range(warmup):
        out = None
        out, ms = call(*batches[i])
        warm_done += 1
        if first_ms is None:
            first_ms = ms
        if warm_done >= need_warm and (ms / 1e3 > budget_s / 2
                                       or time.perf_counter() + ms / 1e3 > deadline):
            break
    count = _count(impl, out)
    out = None
    gc.collect()
    sync()
    hwm_reset = common.reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    times: List[float] = []
    del cpu_times[:]
    t_loop = time.perf_counter()
    last_ms = first_ms or 0.0
    for i in range(repeats):
        now = time.perf_counter()
        if times and now + last_ms / 1e3 > deadline:
            break
        if len(times) >= max(1, min_repeats) and now - t_loop > budget_s:
            break
        x, y = batches[warmup + i]
        out = None
        out, ms = call(x, y)
        times.append(ms)
        last_ms = ms
        count = _count(impl, out)
    out = None
    sync()

    result: Dict[str, Any] = {
        "status": "ok", "n_actual": n, "times_ms": [round(t, 4) for t in times],
        "repeats": len(times), "warmup": warm_done, "first_call_ms": first_ms,
        "setup_s": round(setup_s, 3), "out_count": count,
        "threads": torch.get_num_threads(),
    }
    if times:
        arr = np.asarray(times)
        result.update(median_ms=float(np.median(arr)), min_ms=float(arr.min()),
                      mean_ms=float(arr.mean()), p25_ms=float(np.percentile(arr, 25)),
                      p75_ms=float(np.percentile(arr, 75)))
        if cpu_times:
            result["median_cpu_ms"] = float(np.median(np.asarray(cpu_times)))
    else:
        # no timed call (only with repeats = 0): report the first, cold warm-up call
        result.update(median_ms=first_ms, min_ms=first_ms, mean_ms=first_ms,
                      note=f"no timed call (repeats={repeats}): the time is the first, cold "
                           f"warm-up call's, compilation and first-call costs included")
    host_peak = common.peak_rss_mb()
    host_growth = None if (host_peak is None or rss0 is None) else max(0.0, host_peak - rss0)
    if cuda:
        torch_peak = max(0, torch.cuda.max_memory_allocated(device) - alloc0) / 2 ** 20
        if impl.startswith("ort_"):
            # device memory taken since before warm-up, less what torch's caching
            # allocator reserved meanwhile (counted by torch_peak): ONNX Runtime's arena
            # (which keeps its peak) and any lazily made CUDA handles
            torch_growth = max(0, torch.cuda.memory_reserved(device) - reserved0)
            used_growth = max(0, free0 - torch.cuda.mem_get_info(device)[0] - torch_growth)
            result["peak_mem_mb"] = used_growth / 2 ** 20 + torch_peak
            result["mem_method"] = ("cuda: device memory growth outside torch (mem_get_info: "
                                    "ORT's arena) + torch peak")
        else:
            result["peak_mem_mb"] = torch_peak
            result["mem_method"] = "cuda: torch.cuda.max_memory_allocated growth"
        result["host_peak_mb"] = host_growth
    else:
        result["peak_mem_mb"] = host_growth
        result["mem_method"] = ("cpu: VmHWM (reset after warm-up) - VmRSS before warm-up"
                                if hwm_reset else "cpu: ru_maxrss - VmRSS before warm-up")
    if shared_process and not (cuda and not impl.startswith("ort_")):
        result["mem_shared_process"] = True
        result["mem_note"] = SHARED_MEM_NOTE
    if "_providers" in task:
        result["providers"] = task["_providers"]
    if "_graph" in task:
        result["graph"] = task["_graph"]
    return result


# ------------------------------------------------------------------------------ main


def main(argv: List[str]) -> int:
    with open(argv[0]) as f:
        tasks = json.load(f)
    # imports the tasks need, before READY so they do not count against a task's cap
    import numpy  # noqa: F401
    import torch  # noqa: F401
    set_threads(int(tasks[0].get("threads", 0)) if tasks else 0)
    import exportminers.miners  # noqa: F401
    if any(t.get("impl") == "pml" for t in tasks):   # (a broken PML install fails only its rows)
        try:
            import pytorch_metric_learning.miners  # noqa: F401
        except Exception:
            pass   # each PML row reports the import error itself
    if any(t.get("impl", "").startswith("ort_") or t["kind"] == "export" for t in tasks):
        import onnxruntime  # noqa: F401
    emit("READY")
    for i, task in enumerate(tasks):
        emit("START", str(i))
        deadline = time.perf_counter() + 0.85 * float(task.get("cap_s", 60.0))
        try:
            if task["kind"] == "export":
                result = run_export(task)
            else:
                result = run_row(task, deadline, shared_process=i > 0)
        except RowSkipped as e:
            result = {"status": "skipped", "reason": str(e)}
        except BaseException as e:  # noqa: BLE001 - every failure is a result
            if isinstance(e, KeyboardInterrupt):
                raise
            result = _error_result(e)
            result["traceback"] = common.short(traceback.format_exc(), 2000)
            try:
                import torch
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    torch.cuda.empty_cache()
            except Exception:
                pass
        gc.collect()
        emit("RESULT", json.dumps({"index": i, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
