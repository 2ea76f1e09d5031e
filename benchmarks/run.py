"""Benchmark every built-in miner: PML 2.9.0 eager vs exportminers eager, TorchScript and
ONNX Runtime (CPU; CUDA with IOBinding, raw and decoded).

Usage::

    python -m benchmarks.run --device cpu --out results/
    python -m benchmarks.run --device cuda --out results/ --sizes 256,1024,4096
    python -m benchmarks.run --device cpu --out /tmp/q --quick      # < 1 min smoke run
    python -m benchmarks.run --device cpu --out results/ --miners BatchHardMiner --impls pml,ort_cpu

Per miner (registry default configuration), batch size N and implementation, one *row*:
self-mining, d = 128, 8 samples per class, embeddings with class structure, a fresh
batch for every call, warm-up calls, then the median of the timed calls, and the peak
memory (see :mod:`benchmarks.worker` for both methods).

Each row runs in its own worker process (``--rows-per-process`` to share one; the peak
memory of a row after the first in a process is then marked ``shared process``: a lower
bound, see ``--help``) under a
memory limit (``--mem-limit-gb``; RLIMIT_AS on CPU runs, RLIMIT_DATA on CUDA runs, where
the driver's address-space reservations would trip RLIMIT_AS) and a time cap
(``--cap-s``). A row that runs out of memory or past the cap is recorded as ``oom`` or
``timeout``, never dropped; once a row times out, its larger batch sizes are recorded as
``skipped``. Rows that need CUDA are recorded as ``skipped`` with the reason when it is
not available, and ONNX rows as ``unavailable`` when the graph cannot be exported.

Outputs in ``--out``: ``bench_<device>.json`` (every row, with the environment),
``bench_<device>.md`` (tables: medians and ratios to PML in the same run, peak memory,
the N = 256 ORT-vs-PML target, failures), ``time_vs_n_<device>.png``,
``memory_vs_n_<device>.png`` and ``ratio_vs_pml_<device>.png``. ``--pipeline`` also runs
``benchmarks/bench_pipeline.py`` (the mining pipeline's benchmark) into ``--out``.
"""
import argparse
import datetime
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from . import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_MINERS = ["BatchHardMiner", "TripletMarginMiner", "MultiSimilarityMiner"]
QUICK_ONNX_MINERS = ["BatchHardMiner"]
QUICK_SIZE = 64


# ------------------------------------------------------------------------- environment


def probe_environment(device: str) -> Dict[str, Any]:
    """Versions, CPU, thread counts and what CUDA offers (torch and ONNX Runtime)."""
    import torch
    env: Dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": bool(torch.cuda.is_available()),
    }
    for mod, key in (("pytorch_metric_learning", "pml"), ("onnxruntime", "onnxruntime"),
                     ("onnx", "onnx"), ("numpy", "numpy"), ("exportminers", "exportminers")):
        try:
            env[key] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            env[key] = f"unavailable: {common.short(e, 120)}"
    try:
        import onnxruntime as ort
        env["ort_providers"] = ort.get_available_providers()
    except Exception as e:  # noqa: BLE001
        env["ort_providers"] = []
        env["ort_error"] = common.short(e, 200)
    if env["cuda_available"]:
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    env["git"] = _git_state()
    env["device"] = device
    env["device_name"] = env.get("gpu") if device == "cuda" else env["cpu"]
    return env


def _git_state() -> str:
    """``<commit>`` of the working tree, ``+dirty`` when it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return (head or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def onnx_api_problem() -> Optional[str]:
    """Why ONNX rows cannot run (None when export_onnx and OnnxMiner import)."""
    try:
        import exportminers
        exportminers.export_onnx  # noqa: B018
        exportminers.OnnxMiner  # noqa: B018
        import onnxruntime  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"exportminers.export_onnx / OnnxMiner not importable: {common.short(e, 200)}"
    from exportminers.export import require_onnx_exporter
    try:
        require_onnx_exporter()   # torch too old for the exporter, or no onnxscript
    except (RuntimeError, ImportError) as e:
        return common.short(e, 200)
    return None


def skip_reason(impl: common.Impl, device: str, env: Dict[str, Any]) -> Optional[str]:
    """Why this implementation cannot run in this run (None when it can)."""
    needs_cuda = impl.device == "cuda" or (impl.device == "any" and device == "cuda")
    if impl.device == "cpu" and device == "cuda":
        return "CPU row: run with --device cpu"
    if needs_cuda:
        if not env["cuda_available"]:
            return "CUDA not available (torch.cuda.is_available() is False); pending a GPU session"
        if impl.onnx and "CUDAExecutionProvider" not in env.get("ort_providers", []):
            return (f"ONNX Runtime has no CUDAExecutionProvider (providers: "
                    f"{env.get('ort_providers')}); install onnxruntime-gpu")
        if device != "cuda":
            return "GPU row: run with --device cuda"
    return None


# ------------------------------------------------------------------------- processes


def _preexec(limit_kind: str, limit_bytes: int):
    def apply():
        if limit_kind == "none" or limit_bytes <= 0:
            return
        import resource
        res = resource.RLIMIT_AS if limit_kind == "as" else resource.RLIMIT_DATA
        resource.setrlimit(res, (limit_bytes, limit_bytes))
    return apply


def run_tasks(tasks: List[Dict[str, Any]], limit_kind: str, limit_bytes: int,
              import_timeout_s: float = 180.0) -> List[Dict[str, Any]]:
    """Run tasks in one worker process; returns one result per task (failures included).

    Tasks the worker never started (it died or hung on an earlier one) are run again in
    a fresh worker. When a row times out, the rows of the same miner and implementation
    at a larger N that have not run yet are recorded as ``skipped`` (as in one process
    per row).
    """
    results: Dict[int, Dict[str, Any]] = {}
    pending = list(range(len(tasks)))
    lost = 0
    while pending:
        got, failure = _run_worker([tasks[i] for i in pending], limit_kind, limit_bytes,
                                   import_timeout_s)
        for local, res in got.items():
            results[pending[local]] = res
        if failure is not None:
            local, res = failure
            if local is not None:
                results[pending[local]] = res
                if res.get("status") == "timeout":
                    _skip_after_timeout(tasks, tasks[pending[local]], pending, results)
            else:  # died or hung outside a task: retry once, then give up on the rest
                lost += 1
                if lost >= 2:
                    for i in pending:
                        results.setdefault(i, dict(res))
        else:
            for i in pending:
                results.setdefault(i, {"status": "error",
                                       "reason": "the worker exited without reporting this task"})
        pending = [i for i in pending if i not in results]
    return [results[i] for i in range(len(tasks))]


def _skip_after_timeout(tasks: List[Dict[str, Any]], slow: Dict[str, Any], pending: List[int],
                        results: Dict[int, Dict[str, Any]]) -> None:
    """Record the not yet run rows of ``slow``'s miner and implementation at a larger N
    as skipped."""
    if slow.get("kind") != "row":
        return
    for i in pending:
        t = tasks[i]
        if i not in results and t.get("kind") == "row" and t["miner"] == slow["miner"] \
                and t["impl"] == slow["impl"] and int(t["n"]) > int(slow["n"]):
            results[i] = {"status": "skipped",
                          "reason": f"timeout at N={slow['n']}; larger N not attempted"}


def _run_worker(tasks: List[Dict[str, Any]], limit_kind: str, limit_bytes: int,
                import_timeout_s: float
                ) -> Tuple[Dict[int, Dict[str, Any]], Optional[Tuple[Optional[int], Dict[str, Any]]]]:
    """One worker process over ``tasks``. Returns (results by local index, failure), where
    failure is (index of the task that was running or None, its result)."""
    fd, path = tempfile.mkstemp(prefix="bench_tasks_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(tasks, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    threads = int(tasks[0].get("threads", 0)) if tasks else 0
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", path], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True,
                            preexec_fn=_preexec(limit_kind, limit_bytes))
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def reader():
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    results: Dict[int, Dict[str, Any]] = {}
    tail: List[str] = []
    current: Optional[int] = None
    deadline = time.monotonic() + import_timeout_s
    timed_out = False
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                timed_out = True
                break
            if line is None:
                break
            if line.startswith("@@READY"):
                deadline = time.monotonic() + 60.0
            elif line.startswith("@@START"):
                current = int(line.split()[1])
                tail = []
                deadline = time.monotonic() + float(tasks[current].get("cap_s", 60.0))
            elif line.startswith("@@RESULT"):
                res = json.loads(line[len("@@RESULT "):])
                results[int(res.pop("index"))] = res
                current = None
                deadline = time.monotonic() + 60.0
            else:
                tail.append(line.rstrip("\n"))
                tail = tail[-40:]
            if time.monotonic() > deadline:
                timed_out = True
                break
    finally:
        if timed_out:
            _kill(proc)
        rc = proc.wait()
        os.unlink(path)
    if timed_out:
        if current is not None:
            cap = tasks[current].get("cap_s", 60.0)
            return results, (current, {"status": "timeout",
                                       "reason": f"exceeded the {cap:g} s cap; killed"})
        return results, (None, {"status": "error",
                                "reason": "the worker hung outside a task; killed"})
    if current is not None or rc != 0:
        text = "\n".join(tail)
        if rc < 0:
            sig = signal.Signals(-rc).name
            status = "oom" if (-rc == signal.SIGKILL or common.classify_error(text) == "oom") \
                else "error"
            reason = f"worker killed by {sig}" + (
                " (most likely the kernel OOM killer)" if -rc == signal.SIGKILL else "")
        else:
            status = common.classify_error(text)
            reason = f"worker exited with code {rc}"
        reason += f": {common.short(text[-600:], 600)}" if text else ""
        return results, (current, {"status": status, "reason": reason})
    return results, None


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            proc.kill()
        except ProcessLookupError:
            pass


# ------------------------------------------------------------------------- planning


def parse_list(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    return [s.strip() for s in text.split(",") if s.strip()]


# Defaults of the options --quick changes; options the user gives win over both.
DEFAULTS = {"sizes": "256,1024,4096", "warmup": 3, "repeats": 20, "min_repeats": 3,
            "cap_s": 60.0, "rows_per_process": 1}
QUICK_DEFAULTS = {"sizes": str(QUICK_SIZE), "warmup": 1, "repeats": 1, "min_repeats": 1,
                  "cap_s": 60.0, "rows_per_process": 10 ** 6}
TORCHSCRIPT_MIN_WARMUP = common.TORCHSCRIPT_MIN_WARMUP


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default="results",
                   help="output folder (made absolute; default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: N={QUICK_SIZE}, {', '.join(QUICK_MINERS)}, ONNX rows for "
                        f"{', '.join(QUICK_ONNX_MINERS)}, one warm-up call (TorchScript: "
                        f"{TORCHSCRIPT_MIN_WARMUP}) and one timed call, all rows in one worker; "
                        f"options given explicitly (--sizes, --warmup, --repeats, --min-repeats, "
                        f"--cap-s, --rows-per-process, --miners, --impls) win over these")
    p.add_argument("--miners", help="comma-separated miner names (default: every built-in)")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated batch sizes N (default: {DEFAULTS['sizes']}; "
                        f"--quick: {QUICK_SIZE})")
    p.add_argument("--impls", help="comma-separated implementations (default per device): "
                                   + ", ".join(common.IMPLS))
    p.add_argument("--dim", type=int, default=128, help="embedding width d")
    p.add_argument("--per-class", type=int, default=8, help="samples per class")
    p.add_argument("--spread", type=float, default=1.25,
                   help="within-class noise scale (class centres are standard normal)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"warm-up calls per row (default: {DEFAULTS['warmup']}; --quick: "
                        f"{QUICK_DEFAULTS['warmup']}); at least 1 is made (the first, cold "
                        f"call is reported on its own), TorchScript rows get at least "
                        f"{TORCHSCRIPT_MIN_WARMUP} (its profiling executor optimises on the "
                        f"second call)")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed calls at most, >= 1 (default: {DEFAULTS['repeats']}; --quick: "
                        f"{QUICK_DEFAULTS['repeats']})")
    p.add_argument("--min-repeats", type=int, default=None,
                   help=f"timed calls at least, budget permitting (default: "
                        f"{DEFAULTS['min_repeats']}; --quick: {QUICK_DEFAULTS['min_repeats']})")
    p.add_argument("--budget-s", type=float, default=5.0,
                   help="stop timing a row after this many seconds of timed calls")
    p.add_argument("--cap-s", type=float, default=None,
                   help=f"time cap per row (setup, warm-up and timed calls); past it: timeout "
                        f"(default: {DEFAULTS['cap_s']:g})")
    p.add_argument("--export-cap-s", type=float, default=300.0, help="time cap per ONNX export")
    p.add_argument("--deadline-s", type=float, default=0.0,
                   help="wall-clock budget for the rows (0: none): rows not started by then "
                        "are recorded as skipped ('deadline') and the results written, and "
                        "near it rows stop sharing workers, so the run ends by the deadline "
                        "plus one row's --cap-s (exports, which come first, not counted)")
    p.add_argument("--mem-limit-gb", type=float, default=8.0,
                   help="memory limit per worker process (0: none)")
    p.add_argument("--mem-limit-kind", choices=["auto", "as", "data", "none"], default="auto",
                   help="auto: RLIMIT_AS on cpu, RLIMIT_DATA on cuda (the CUDA driver reserves "
                        "far more address space than RLIMIT_AS allows); if CUDA fails to "
                        "initialise under the limit, pass none")
    p.add_argument("--rows-per-process", type=int, default=None,
                   help="rows sharing one worker process (default: 1; --quick: all). With "
                        "more than one, the peak memory of every row after the first in a "
                        "process is only the growth beyond what earlier rows left there (ONNX "
                        "Runtime's process-wide CPU arena, allocator caches): such rows are "
                        "marked 'shared process' and their memory is a lower bound, not the "
                        "row's own peak (CUDA torch rows excepted: "
                        "max_memory_allocated is per row). A timeout still skips the larger "
                        "N of that miner and implementation.")
    p.add_argument("--graphs", choices=["gather", "dense"], default="gather",
                   help="ONNX rows of the miners that can test listed positives "
                        "(TripletMarginMiner, AngularMiner): 'gather' runs their "
                        "gather_positives=True graphs ([N, P, M] candidates, positive lists "
                        "made on the host each call, as OnnxMiner does), 'dense' their "
                        "[N, M, M] graphs (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch and ONNX Runtime (0: their defaults); on a "
                        "shared machine 1 avoids OpenMP stalls when cores are busy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--pipeline", action="store_true",
                   help="also run benchmarks/bench_pipeline.py (the pipeline benchmark); on "
                        "--device cpu only with --quick (its full size, 65,536 x 1,048,576, "
                        "is a GPU setting)")
    return p


def parse_sizes(text: str) -> List[int]:
    """Batch sizes from ``--sizes``: positive integers, sorted, duplicates removed."""
    items = parse_list(text) or []
    if not items:
        raise ValueError(f"--sizes {text!r}: give comma-separated positive integers, e.g. "
                         f"256,1024")
    sizes = []
    for s in items:
        try:
            n = int(s)
        except ValueError:
            raise ValueError(f"--sizes {text!r}: {s!r} is not an integer") from None
        if n <= 0:
            raise ValueError(f"--sizes {text!r}: batch sizes must be positive, got {n}")
        sizes.append(n)
    return sorted(set(sizes))


def resolve_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset (--quick's values or the defaults), validate every
    option (``p.error`` on a bad one) and make ``--out`` absolute. Records what --quick
    set in ``args.quick_set``."""
    base = QUICK_DEFAULTS if args.quick else DEFAULTS
    args.quick_set = {}
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            if args.quick:
                args.quick_set[key] = value
    try:
        args.size_list = parse_sizes(args.sizes)
    except ValueError as e:
        p.error(str(e))
    checks = [
        (args.repeats >= 1, f"--repeats must be at least 1, got {args.repeats}"),
        (args.min_repeats >= 1, f"--min-repeats must be at least 1, got {args.min_repeats}"),
        (args.warmup >= 0, f"--warmup must be 0 or more, got {args.warmup}"),
        (args.rows_per_process >= 1,
         f"--rows-per-process must be at least 1, got {args.rows_per_process}"),
        (args.cap_s > 0, f"--cap-s must be positive, got {args.cap_s:g}"),
        (args.export_cap_s > 0, f"--export-cap-s must be positive, got {args.export_cap_s:g}"),
        (args.budget_s >= 0, f"--budget-s must be 0 or more, got {args.budget_s:g}"),
        (args.deadline_s >= 0, f"--deadline-s must be 0 (none) or more, got {args.deadline_s:g}"),
        (args.mem_limit_gb >= 0, f"--mem-limit-gb must be 0 (none) or more, got "
                                 f"{args.mem_limit_gb:g}"),
        (args.dim >= 1, f"--dim must be at least 1, got {args.dim}"),
        (args.per_class >= 1, f"--per-class must be at least 1, got {args.per_class}"),
        (args.spread >= 0, f"--spread must be 0 or more, got {args.spread:g}"),
        (args.threads >= 0, f"--threads must be 0 (library defaults) or more, got {args.threads}"),
    ]
    for ok, message in checks:
        if not ok:
            p.error(message)
    args.out = os.path.abspath(os.path.expanduser(args.out))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} exists and is not a folder")
    if args.pipeline and args.device == "cpu" and not args.quick:
        p.error("--pipeline on --device cpu runs benchmarks/bench_pipeline.py at its full GPU "
                "size (65,536 queries x 1,048,576 bank rows) with no time limit; add --quick "
                "for its tiny CPU setting, or run python benchmarks/bench_pipeline.py --device "
                "cpu with smaller --queries and --bank")
    return args


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = build_parser()
    return resolve_args(p, p.parse_args(argv))


def check_device(args, env: Dict[str, Any]) -> Optional[str]:
    """Why this run cannot use --device as asked (None when it can): CUDA missing, or the
    ONNX rows asked for need a CUDAExecutionProvider that ONNX Runtime lacks."""
    if args.device != "cuda":
        return None
    if not env["cuda_available"]:
        return ("--device cuda: torch.cuda.is_available() is False (torch "
                f"{env.get('torch')}); run on a machine with a CUDA GPU and a CUDA build of "
                "torch, or use --device cpu")
    impls = parse_list(args.impls) or common.DEFAULT_IMPLS["cuda"]
    onnx_cuda = [i for i in impls if i in common.IMPLS and common.IMPLS[i].onnx
                 and common.IMPLS[i].device == "cuda"]
    if onnx_cuda and "CUDAExecutionProvider" not in env.get("ort_providers", []):
        torch_impls = [i for i in impls if i in common.IMPLS and not common.IMPLS[i].onnx]
        return (f"--device cuda: ONNX Runtime has no CUDAExecutionProvider (providers: "
                f"{env.get('ort_providers')}) for the rows {', '.join(onnx_cuda)}; install "
                f"onnxruntime-gpu"
                + (f", or leave them out: --impls {','.join(torch_impls)}" if torch_impls
                   else ""))
    return None


def row_task(miner: str, impl: str, n: int, device: str = "cpu",
             config: Optional[Dict[str, Any]] = None, **settings) -> Dict[str, Any]:
    """A worker task timing one row; ``settings`` override the defaults below."""
    task = {"kind": "row", "miner": miner, "impl": impl, "n": n,
            "n_actual": common.effective_n(miner, n), "device": device,
            "config": common.default_config(miner) if config is None else config,
            "d": 128, "per_class": 8, "spread": 1.25, "warmup": 3, "repeats": 20,
            "min_repeats": 3, "budget_s": 5.0, "cap_s": 60.0, "seed": n, "threads": 0}
    task.update(settings)
    return task


def plan(args, env: Dict[str, Any]):
    """(rows to run, rows already decided, export tasks)."""
    miners = parse_list(args.miners) or (QUICK_MINERS if args.quick else common.registry_order())
    known = set(common.registry_order())
    bad = [m for m in miners if m not in known]
    if bad:
        raise SystemExit(f"unknown miners {bad}; built-in miners: {sorted(known)}")
    sizes = getattr(args, "size_list", None) or parse_sizes(args.sizes)
    impls = parse_list(args.impls) or (
        ["pml", "eager", "torchscript", "ort_cpu"] if args.quick and args.device == "cpu"
        else common.DEFAULT_IMPLS[args.device])
    bad = [i for i in impls if i not in common.IMPLS]
    if bad:
        raise SystemExit(f"unknown implementations {bad}; choose from {list(common.IMPLS)}")
    onnx_problem = onnx_api_problem() if any(common.IMPLS[i].onnx for i in impls) else None
    to_run, decided, exports = [], [], {}
    for name in miners:
        config = common.default_config(name)
        for impl_key in impls:
            impl = common.IMPLS[impl_key]
            reason = skip_reason(impl, args.device, env)
            status = "skipped"
            if reason is None and impl.onnx and onnx_problem:
                status, reason = "unavailable", onnx_problem
            if reason is None and impl.onnx and args.quick and name not in QUICK_ONNX_MINERS \
                    and not args.miners:
                continue  # the smoke run keeps ONNX rows to a few miners
            row_device = "cpu" if impl.device == "cpu" else args.device if impl.device == "any" \
                else "cuda"
            for n in sizes:
                row = row_task(name, impl_key, n, device=row_device, config=config,
                               d=args.dim, per_class=args.per_class, spread=args.spread,
                               warmup=max(args.warmup, common.min_warmup(impl_key)),
                               repeats=args.repeats,
                               min_repeats=args.min_repeats, budget_s=args.budget_s,
                               cap_s=args.cap_s, seed=args.seed + n, threads=args.threads)
                if reason is not None:
                    decided.append(dict(row, status=status, reason=reason))
                    continue
                if impl.onnx:
                    row["onnx_path"] = common.onnx_path(args.out, name)
                    exports[name] = {"kind": "export", "miner": name, "config": config,
                                     "path": row["onnx_path"], "d": args.dim,
                                     "blocks_path": common.onnx_path(args.out, name,
                                                                     anchor_blocks=True),
                                     "gather_path": common.onnx_path(args.out, name,
                                                                     gather=True)
                                     if args.graphs == "gather" else None,
                                     "sizes": sorted({common.effective_n(name, s)
                                                      for s in sizes}),
                                     "cap_s": args.export_cap_s, "threads": args.threads}
                to_run.append(row)
    return to_run, decided, exports


# ------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.quick:
        shown = {k: ("all rows in one worker" if k == "rows_per_process" else v)
                 for k, v in args.quick_set.items()}
        print("[bench] --quick sets: " + (", ".join(f"{k.replace('_', '-')}={v}"
                                                   for k, v in shown.items()) or "nothing")
              + (f"; TorchScript rows get {TORCHSCRIPT_MIN_WARMUP} warm-up calls"
                 if args.warmup < TORCHSCRIPT_MIN_WARMUP else "")
              + (f" (given explicitly: {', '.join(k.replace('_', '-') for k in QUICK_DEFAULTS if k not in args.quick_set)})"
                 if len(args.quick_set) < len(QUICK_DEFAULTS) else ""))
    t_start = time.monotonic()
    env = probe_environment(args.device)
    problem = check_device(args, env)
    if problem:
        print(f"python -m benchmarks.run: error: {problem}", file=sys.stderr)
        return 2
    limit_kind = args.mem_limit_kind
    if limit_kind == "auto":
        limit_kind = "data" if args.device == "cuda" else "as"
    limit_bytes = int(args.mem_limit_gb * 2 ** 30)
    if limit_bytes <= 0:
        limit_kind = "none"
    to_run, decided, exports = plan(args, env)
    if not to_run:
        reasons = sorted({f"{r['impl']}: {r.get('status')}: {r.get('reason')}" for r in decided})
        print("python -m benchmarks.run: error: nothing to run; every row is skipped or "
              "unavailable:\n  " + "\n  ".join(reasons or ["(no rows selected)"]),
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    log = print
    log(f"[bench] device={args.device} ({env['device_name']}), {len(to_run)} rows to run, "
        f"{len(decided)} skipped/unavailable, {len(exports)} ONNX exports; "
        f"memory limit {limit_kind} {args.mem_limit_gb:g} GB, cap {args.cap_s:g} s/row")

    # ONNX exports first (one per miner); a failed export makes its rows unavailable
    export_results: Dict[str, Dict[str, Any]] = {}
    if exports:
        names = list(exports)
        per = args.rows_per_process
        for s in range(0, len(names), per):
            chunk = names[s:s + per]
            for name, res in zip(chunk, run_tasks([exports[nm] for nm in chunk], limit_kind,
                                                  limit_bytes)):
                export_results[name] = res
                log(f"[bench] export {name}: {res['status']}"
                    + (f" ({res.get('export_s')} s" + (
                        f"; the anchor-block graph for N={res['blocks_for']}: "
                        f"{res.get('blocks_export_s')} s"
                        if res.get("blocks_for") else "") + (
                        f"; the gather_positives graph: {res.get('gather_export_s')} s"
                        if res.get("gather_path") else "") + ")" if res["status"] == "ok"
                       else f" - {res.get('reason')}"))
    rows: List[Dict[str, Any]] = list(decided)
    runnable = []
    for row in to_run:
        if "onnx_path" in row and export_results.get(row["miner"], {}).get("status") != "ok":
            res = export_results.get(row["miner"], {})
            rows.append(dict(row, status="unavailable",
                             reason=f"ONNX export failed: {res.get('status')}: {res.get('reason')}"))
        else:
            if "onnx_path" in row and export_results[row["miner"]].get("blocks_path"):
                row["onnx_blocks_path"] = export_results[row["miner"]]["blocks_path"]
            if "onnx_path" in row and export_results[row["miner"]].get("gather_path"):
                row["onnx_gather_path"] = export_results[row["miner"]]["gather_path"]
            runnable.append(row)

    # rows: per miner, N ascending (a timeout skips that implementation's larger N), the
    # implementations of one (miner, N) back to back so their ratios share machine conditions
    order = common.registry_order()
    runnable.sort(key=lambda r: (order.index(r["miner"]), r["n"], list(common.IMPLS).index(r["impl"])))
    timed_out: Dict[Tuple[str, str], int] = {}
    per = max(1, args.rows_per_process)
    i = 0
    while i < len(runnable):
        chunk = []
        if args.deadline_s > 0 and time.monotonic() - t_start > args.deadline_s:
            for r in runnable[i:]:
                rows.append(dict(r, status="skipped",
                                 reason=f"deadline: --deadline-s {args.deadline_s:g} reached "
                                        f"before this row started"))
            log(f"[bench] --deadline-s {args.deadline_s:g} reached: {len(runnable) - i} rows "
                f"not run (recorded as skipped)")
            break
        room = per
        if args.deadline_s > 0:   # a chunk whose rows all run to their cap ends by the deadline
            left = args.deadline_s - (time.monotonic() - t_start)
            room = max(1, min(per, int(left // args.cap_s)))
        while i < len(runnable) and len(chunk) < room:
            r = runnable[i]
            i += 1
            first = timed_out.get((r["miner"], r["impl"]))
            if first is not None:
                rows.append(dict(r, status="skipped",
                                 reason=f"timeout at N={first}; larger N not attempted"))
                continue
            chunk.append(r)
        if not chunk:
            continue
        for r, res in zip(chunk, run_tasks(chunk, limit_kind, limit_bytes)):
            row = dict(r, **res)
            row.pop("kind", None)
            rows.append(row)
            if res["status"] == "timeout":
                timed_out.setdefault((r["miner"], r["impl"]), r["n"])
            if res["status"] == "skipped":
                log(f"[bench] {r['miner']:<36} N={r['n']:<5} {r['impl']:<16} "
                    f"skipped  {res.get('reason')}")
                continue
            detail = (f"{common.fmt_ms(res.get('median_ms'))} ms, "
                      f"{res.get('peak_mem_mb') or 0:.0f} MB" if res["status"] == "ok"
                      else common.short(res.get("reason", ""), 160))
            log(f"[bench] {r['miner']:<36} N={r['n']:<5} {r['impl']:<16} "
                f"{res['status']:<8} {detail}")
    for row in rows:
        row.pop("kind", None)

    result = {
        "meta": dict(env, args={k: v for k, v in vars(args).items()
                                if k not in ("size_list", "quick_set")},
                     sizes=list(args.size_list), quick_set=dict(args.quick_set),
                     torchscript_min_warmup=TORCHSCRIPT_MIN_WARMUP,
                     mem_limit=f"{limit_kind} {args.mem_limit_gb:g} GB",
                     exports=export_results, impls={k: v.doc for k, v in common.IMPLS.items()},
                     wall_s=round(time.monotonic() - t_start, 1)),
        "rows": rows,
    }
    from . import report
    paths = report.write_all(result, args.out, plots=not args.no_plots)
    for p in paths:
        log(f"[bench] wrote {p}")
    rc = 0
    if args.pipeline:
        rc = run_pipeline(args)
    log(f"[bench] done in {time.monotonic() - t_start:.0f} s")
    return rc


def run_pipeline(args) -> int:
    """Run the pipeline engineer's benchmark (benchmarks/bench_pipeline.py: the offline
    mining pipeline's block engine vs a torch baseline) and keep its report in --out as
    ``pipeline_<device>.txt``. Its own defaults are the H100 setting (Q = 65,536 queries
    x M = 1,048,576 bank rows); ``--quick`` passes its tiny CPU setting."""
    if args.device == "cpu" and not args.quick:
        print("[bench] --pipeline: refused on --device cpu without --quick (the full size is "
              "65,536 x 1,048,576, a GPU setting); run benchmarks/bench_pipeline.py with "
              "smaller --queries/--bank")
        return 2
    script = os.path.join(ROOT, "benchmarks", "bench_pipeline.py")
    if not os.path.isfile(script):
        print(f"[bench] --pipeline: {script} does not exist; skipped")
        return 0
    cmd = [sys.executable, script, "--device", args.device] + (["--quick"] if args.quick else [])
    print(f"[bench] pipeline: {' '.join(cmd)}")
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if args.threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(args.threads)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    text = proc.stdout + (f"\n[stderr]\n{proc.stderr}" if proc.returncode else "")
    path = os.path.join(args.out, f"pipeline_{args.device}.txt")
    with open(path, "w") as f:
        f.write(f"$ {' '.join(cmd)}\n{text}")
    print(text.rstrip())
    print(f"[bench] wrote {path} (exit code {proc.returncode})")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
