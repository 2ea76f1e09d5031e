"""The ``exportminers`` command.

Subcommands:

* ``export``: export built-in miners to ONNX, verify each graph against eager mode on
  fresh inputs with ONNX Runtime (CPU), write ``manifest.json`` and print a table;
* ``mine``: the out-of-core mining pipeline (registered from
  :mod:`exportminers.pipeline.cli` when it is importable);
* ``demo``: export one miner to a temporary folder and run it with ONNX Runtime.

Another module can add a subcommand by providing ``add_parser(subparsers)`` that calls
``subparsers.add_parser(...)`` and ``set_defaults(func=handler)``; ``handler(args)``
returns the exit status. ``main(argv)`` is the console entry point.
"""
import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

EXPORT_DESCRIPTION = """\
Export built-in miners (every registry miner and each of its registry configurations,
or the configuration you give) to ONNX graphs with dynamic batch axes, verify every
graph against the eager miner with ONNX Runtime (CPU) at two batch sizes, and write
DIR/manifest.json (miner, configuration, file, sha256, inputs, outputs, opset, operator
counts, verification).

Deterministic miners must return the eager tuples (tuples whose decision flips under a
1e-4 relative perturbation of the inputs may differ); random miners are fed the same
noise as eager and must also return valid tuples and be reproducible under a seed.
Graphs that can be mined in anchor blocks (--with-ref or --anchor-blocks, miners with
independent anchor rows) must also give the one-call result when mined in blocks.
"""

EXPORT_EXAMPLES = """\
examples:
  exportminers export --out graphs
  exportminers export --out graphs --miners TripletMarginMiner,PairMarginMiner --embedding-dim 128
  exportminers export --out graphs --miners TripletMarginMiner --set TripletMarginMiner.margin=0.1 \\
      --set TripletMarginMiner.type_of_triplets=semihard
  exportminers export --out graphs --config miners.json --dtype float16 --with-ref
  exportminers export --out graphs --miners TripletMarginMiner,AngularMiner --anchor-blocks
  exportminers export --out graphs --miners TripletMarginMiner,AngularMiner --anchor-blocks \
      --gather-positives

--config file (JSON, or YAML if PyYAML is installed): a mapping from miner name to one
configuration or a list of configurations, e.g.
  {"TripletMarginMiner": [{"margin": 0.1}, {"type_of_triplets": "hard"}],
   "PairMarginMiner": {"pos_margin": 0.5, "neg_margin": 1.0}}
--set values are parsed as JSON when they parse (0.1, true, [0.2, 1.5], "x") and kept
as strings otherwise. A miner named in --config or --set is exported with that
configuration only; --set applies to each configuration of its miner.
"""


# ------------------------------------------------------------------------------ export


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _load_config_file(path: str) -> Dict[str, List[Dict[str, Any]]]:
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"--config {path}: cannot read it as UTF-8 text "
                         f"({type(e).__name__}: {e})") from None
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml); "
                             f"or write the file as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SystemExit(f"--config {path}: not valid YAML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SystemExit(f"--config {path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of miner name to configuration(s)")
    out: Dict[str, List[Dict[str, Any]]] = {}
    for name, cfgs in data.items():
        if isinstance(cfgs, dict):
            cfgs = [cfgs]
        if not isinstance(cfgs, list) or not all(isinstance(c, dict) for c in cfgs):
            raise SystemExit(f"--config {path}: {name}: expected a mapping or a list of mappings")
        if not cfgs:
            raise SystemExit(f"--config {path}: {name}: an empty list of configurations "
                             f"(use {{}} for the default configuration)")
        out[str(name)] = [dict(c) for c in cfgs]
    return out


def plan_exports(miners_arg: Optional[str], config_file: Optional[str],
                 sets: Sequence[str]) -> List[Tuple[str, int, Dict[str, Any], bool]]:
    """(miner, config index, config, custom) for every graph to export."""
    from . import registry
    names = list(registry.MINERS)
    if miners_arg is not None:
        names = [n.strip() for n in miners_arg.split(",") if n.strip()]
        if not names:
            raise SystemExit(f"--miners {miners_arg!r}: names no miner")
        unknown = [n for n in names if n not in registry.MINERS]
        if unknown:
            raise SystemExit(f"--miners: unknown {unknown}; built-in miners: {sorted(registry.MINERS)}")
    custom = _load_config_file(config_file) if config_file else {}
    for name in custom:
        if name not in registry.MINERS:
            raise SystemExit(f"--config: unknown miner {name!r}; built-in miners: {sorted(registry.MINERS)}")
        if miners_arg and name not in names:
            raise SystemExit(f"--config {config_file}: configures {name}, which is not among "
                             f"--miners ({', '.join(names)}); add it there or drop --miners")
    overrides: Dict[str, Dict[str, Any]] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        miner, dot, attr = key.partition(".")
        if not sep or not dot or not attr:
            raise SystemExit(f"--set {item!r}: expected Miner.key=value")
        if miner not in registry.MINERS:
            raise SystemExit(f"--set {item!r}: unknown miner {miner!r}")
        if miners_arg and miner not in names:
            raise SystemExit(f"--set {item!r}: {miner} is not among --miners")
        overrides.setdefault(miner, {})[attr] = _parse_value(value)
    plan = []
    for name in names:
        if name in custom or name in overrides:
            cfgs = custom.get(name) or [dict(registry.MINERS[name].configs[0])]
            for i, cfg in enumerate(cfgs):
                plan.append((name, i, {**cfg, **overrides.get(name, {})}, True))
        else:
            for i, cfg in enumerate(registry.MINERS[name].configs):
                plan.append((name, i, dict(cfg), False))
    return plan


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _io_description(path: str) -> Dict[str, Any]:
    import onnx
    model = onnx.load(path)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            out.append({"name": v.name,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": [d.dim_param or d.dim_value for d in t.shape.dim]})
        return out

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output),
            "opset": opset}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def run_export(args: argparse.Namespace) -> int:
    """``exportminers export``: see ``--help``."""
    import torch

    from . import __version__
    from .export import (ROW_INDEPENDENT, SELF_ONLY, SHAPE_OPS, build_miner, export_onnx,
                         op_types, require_onnx_exporter)
    from .verify import verify_graph

    try:
        require_onnx_exporter()
    except (RuntimeError, ImportError) as e:
        raise SystemExit(f"exportminers export: {e}") from None
    dtype = {"float32": torch.float32, "float16": torch.float16}[args.dtype]
    if args.with_ref and args.anchor_blocks:
        raise SystemExit("exportminers export: --with-ref and --anchor-blocks exclude each other")
    if args.gather_positives and args.compact:
        raise SystemExit("exportminers export: --gather-positives and --compact exclude each other")
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes {args.sizes!r}: expected comma-separated batch sizes, "
                         f"e.g. 13,40") from None
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--sizes {args.sizes!r}: batch sizes must be positive")
    plan = plan_exports(args.miners, args.config, args.set or [])
    built: Dict[Tuple[str, int, bool], Any] = {}   # every configuration checked up front
    bad = []
    for name, index, cfg, custom in plan:
        try:
            built[(name, index, custom)] = build_miner(name, cfg)
        except ValueError as e:
            where = f"--config/--set {name}[{index}]" if custom else f"{name}[{index}]"
            bad.append(f"{where}: {str(e).splitlines()[0]}")
    if bad:
        raise SystemExit("exportminers export: bad miner configuration(s), nothing exported:\n  "
                         + "\n  ".join(bad))
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"--out {args.out}: exists and is not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {args.out}: cannot create the folder ({e})") from None
    entries: List[Dict[str, Any]] = []
    failed = 0
    for name, index, cfg, custom in plan:
        stem = f"{name}_custom{index}" if custom else f"{name}_c{index}"
        fname = stem + ".onnx"
        path = os.path.join(args.out, fname)
        entry: Dict[str, Any] = {"name": name, "config": {k: _jsonable(v) for k, v in cfg.items()},
                                 "file": fname, "dtype": args.dtype, "with_ref": args.with_ref,
                                 "anchor_blocks": args.anchor_blocks,
                                 "gather_positives": args.gather_positives,
                                 "embedding_dim": args.embedding_dim, "compact": args.compact}
        t0 = time.perf_counter()
        if args.with_ref and name in SELF_ONLY:
            entry.update(status="skipped", error=f"{name} does not mine against a reference set")
            entries.append(entry)
            continue
        if args.anchor_blocks and name not in ROW_INDEPENDENT:
            entry.update(status="skipped",
                         error=f"{name} does not mine each anchor row independently")
            entries.append(entry)
            continue
        gathers = getattr(built[(name, index, custom)], "gathers_positives", None)
        if args.gather_positives and not (callable(gathers) and gathers()):
            entry.update(status="skipped",
                         error=f"{name} (this configuration) does not mine over listed positives")
            entries.append(entry)
            continue
        try:
            miner = built[(name, index, custom)]
            export_onnx(miner, path, embedding_dim=args.embedding_dim, with_ref=args.with_ref,
                        dtype=dtype, opset=args.opset, compact=args.compact,
                        anchor_blocks=args.anchor_blocks,
                        gather_positives=args.gather_positives)
            ops = op_types(path)
            entry.update(_io_description(path))
            entry.update(sha256=_sha256(path), op_types=ops,
                         shape_nodes=sum(c for o, c in ops.items() if o in SHAPE_OPS),
                         export_seconds=round(time.perf_counter() - t0, 2))
            if args.no_verify:
                entry.update(status="exported", verify=None)
            else:
                report = verify_graph(miner, path, sizes=sizes, seed=args.seed)
                entry.update(verify=report, status="ok" if report["ok"] else "mismatch")
                failed += not report["ok"]
        except Exception as e:  # record and go on with the next graph
            entry.update(status="failed", error=f"{type(e).__name__}: {e}".strip()[:2000])
            failed += 1
            if os.path.exists(path):
                os.remove(path)
        entries.append(entry)
        if not args.quiet:
            _print_row(entry, header=len(entries) == 1)
        elif entry["status"] in ("failed", "mismatch"):   # -q: errors only
            print(f"{fname}: {entry['status']}"
                  + (f": {entry['error']}" if entry.get("error") else ""), file=sys.stderr)
    manifest = {"exportminers_version": __version__, "torch_version": torch.__version__,
                "dtype": args.dtype, "with_ref": args.with_ref,
                "anchor_blocks": args.anchor_blocks,
                "gather_positives": args.gather_positives, "embedding_dim": args.embedding_dim,
                "opset": args.opset, "compact": args.compact, "verify_sizes": sizes,
                "graphs": entries}
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    if not args.quiet:
        ok = sum(e["status"] in ("ok", "exported") for e in entries)
        verified = all(e["status"] != "exported" for e in entries)
        skipped = sum(e["status"] == "skipped" for e in entries)
        print(f"\n{ok} of {len(entries)} graphs exported"
              + (" and verified" if verified else " (not verified: --no-verify)")
              + (f", {skipped} skipped" if skipped else "")
              + (f", {failed} FAILED" if failed else "")
              + f"; manifest: {os.path.join(args.out, 'manifest.json')}")
        for e in entries:
            if e.get("error"):
                print(f"  {e['file']}: {e['status']}: {e['error'].splitlines()[0][:300]}")
    return 1 if failed else 0


_COLUMNS = ("graph", "nodes", "shape", "verify", "tuples", "sec")


def _print_row(e: Dict[str, Any], header: bool) -> None:
    widths = (44, 6, 6, 9, 16, 6)
    if header:
        print("  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths)))
        print("  ".join("-" * w for w in widths))
    verify = e.get("verify") or {}
    tuples = ",".join(str(r.get("tuples", "")) for r in verify.get("runs", [])) if verify else ""
    cells = (e["file"], str(sum(e.get("op_types", {}).values()) or ""),
             str(e.get("shape_nodes", "")), e["status"], tuples, str(e.get("export_seconds", "")))
    print("  ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths)))


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export", help="export built-in miners to ONNX, verify them, write manifest.json",
        description=EXPORT_DESCRIPTION, epilog=EXPORT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--miners", metavar="A,B", help="comma-separated miner names (default: every registry miner)")
    p.add_argument("--config", metavar="FILE", help="JSON/YAML file: miner name -> configuration(s)")
    p.add_argument("--set", action="append", metavar="Miner.key=value",
                   help="override one constructor argument (repeatable)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="embedding dtype of the graphs (default: %(default)s)")
    p.add_argument("--with-ref", action="store_true",
                   help="export (embeddings, labels, ref_emb, ref_labels) graphs instead of self-mining")
    p.add_argument("--anchor-blocks", action="store_true",
                   help="self-mining graphs that take anchor_index, so OnnxMiner can mine a "
                        "batch in anchor blocks (miners with independent anchor rows; others "
                        "are skipped)")
    p.add_argument("--gather-positives", action="store_true",
                   help="graphs that test each anchor's listed positives against every "
                        "negative ([N, P, M] instead of [N, M, M]; TripletMarginMiner without a "
                        "cap and AngularMiner, others are skipped); OnnxMiner lists them")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 18, where every node has an ONNX Runtime CUDA kernel)")
    p.add_argument("--embedding-dim", type=int, default=None, metavar="D",
                   help="fix the embedding width (default: dynamic)")
    p.add_argument("--compact", action="store_true",
                   help="put the decoding (NonZero) into the graph so it returns index tuples")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs eager check")
    p.add_argument("--sizes", default="12,20", metavar="N1,N2",
                   help="batch sizes used to verify (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the verification inputs (default: %(default)s)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run_export)
    return p


# ------------------------------------------------------------------------------ demo


def run_demo(args: argparse.Namespace) -> int:
    """``exportminers demo``: export one miner, run it on ONNX Runtime, compare with eager."""
    import tempfile

    import numpy as np

    from .export import build_miner, export_onnx, require_onnx_exporter
    from .runtime import OnnxMiner
    from .verify import eager_tuples, random_batch

    from . import registry
    try:
        require_onnx_exporter()
    except (RuntimeError, ImportError) as e:
        raise SystemExit(f"exportminers demo: {e}") from None
    if args.miner not in registry.MINERS:
        raise SystemExit(f"--miner {args.miner!r}: unknown; built-in miners: "
                         f"{sorted(registry.MINERS)}")
    if args.batch_size < 1:
        raise SystemExit(f"--batch-size {args.batch_size}: must be positive")
    miner = build_miner(args.miner, {})
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(miner, os.path.join(tmp, "miner.onnx"), embedding_dim=16)
        om = OnnxMiner(path, seed=0)
        # a batch the miner takes (EmbeddingsAlreadyPackagedAsTriplets: whole triplets)
        args.batch_size = -(-args.batch_size // om.batch_multiple) * om.batch_multiple
        batch = random_batch(args.batch_size, 16, seed=0)
        out = om(batch["embeddings"], batch["labels"])
        out = [out] if isinstance(out, np.ndarray) else list(out)
        print(f"{args.miner} on ONNX Runtime ({om.providers[0]}), batch {args.batch_size} x 16:")
        for name, arr in zip({3: "a p n", 4: "a1 p a2 n", 1: "indices"}[len(out)].split(), out):
            print(f"  {name:8s} {len(arr):6d} indices, first: {arr[:8].tolist()}")
        if not om.is_random:
            same = all(np.array_equal(np.sort(x), np.sort(y))
                       for x, y in zip(out, eager_tuples(miner, batch)))
            print(f"  same as eager: {same}")
    return 0


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="export one miner and run it on ONNX Runtime",
                              description="Export one miner to a temporary folder, run it with "
                                          "ONNX Runtime on random data and compare with eager.")
    p.add_argument("--miner", default="TripletMarginMiner", help="registry miner (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.set_defaults(func=run_demo)
    return p


# ------------------------------------------------------------------------------ main


def _external_parsers() -> List[Any]:
    """``add_parser`` functions of optional subcommand modules that import."""
    found = []
    try:
        from .pipeline.cli import add_parser
        found.append(add_parser)
    except ImportError as e:
        if not (e.name or "").startswith("exportminers.pipeline"):
            print(f"exportminers: the 'mine' subcommand is unavailable ({e})", file=sys.stderr)
    return found


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="exportminers",
        description="Hard-example miners that script, export to ONNX and run on ONNX Runtime.",
        epilog="Run 'exportminers <command> --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"exportminers {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    add_export_parser(subparsers)
    for add in _external_parsers():
        add(subparsers)
    add_demo_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point: ``exportminers <command> ...``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
