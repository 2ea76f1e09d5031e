"""Command line for the mining pipeline: ``exportminers mine`` / ``python -m exportminers.pipeline``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

DESCRIPTION = """\
Mine hard negatives (and positives) for every query of a dataset against a bank of
embeddings, out of core, on ONNX Runtime (GPU or CPU; no PyTorch needed).

Inputs: embeddings as .npy (with --labels, optional --ids), a .parquet file or a folder
of .parquet shards (columns --embedding-column / --label-column / --id-column), or a
folder holding embeddings.npy + labels.npy (+ ids.npy); folders are read recursively
(names starting with . or _ skipped). Without --bank the queries are mined against
themselves (a row is never its own positive or negative).

Outputs in --out: mined.parquet (one row per query: ids and scores of its negatives
and positives, and a status), flat training files (--format), summary.json,
excluded.json (rows skipped for NaN/inf embeddings or missing labels) and scores.png.
A killed run resumes where it stopped when rerun with the same arguments.
"""

EXAMPLES = """\
examples:
  # built-in demo (scikit-learn's digits, no download)
  %(prog)s --demo
  # 10 hardest negatives per query, a set against itself
  %(prog)s emb.npy --labels labels.npy --out mined -k 10
  # queries against a separate bank, semihard negatives (TripletMargin semantics)
  %(prog)s queries.parquet --bank corpus/ --strategy semihard --margin 0.1 --out mined
  # NV-Retriever TopK-PercPos, 5 negatives drawn at random from ranks 10..50
  %(prog)s emb.npy --labels y.npy --perc-pos 0.95 --range-min 10 --range-max 50 \\
      --sampling random -k 5 --out mined
  # hardest negatives against a bank on a Ray cluster: 4 bank shards, 8 actors, 1 GPU each
  %(prog)s queries.parquet --bank corpus/ --out mined --engine ray --address auto \\
      --bank-shards 4 --num-actors 8 --num-gpus-per-actor 1
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("input", nargs="?", help="query embeddings: .npy, .parquet, or a folder")
    io.add_argument("--labels", help="labels .npy (for .npy input)")
    io.add_argument("--ids", help="ids .npy (for .npy input; default: row numbers)")
    io.add_argument("--bank", help="bank embeddings, same forms (default: the queries themselves)")
    io.add_argument("--bank-labels", help="bank labels .npy")
    io.add_argument("--bank-ids", help="bank ids .npy")
    io.add_argument("--embedding-column", default="embedding", help="Parquet embedding column (default: %(default)s)")
    io.add_argument("--label-column", default="label", help="Parquet label column (default: %(default)s)")
    io.add_argument("--id-column", default=None,
                    help="Parquet id column (default: 'id' where the files have it, else row "
                         "numbers; a column named here must exist; '' ignores any id column)")
    io.add_argument("-o", "--out", default=None, help="output folder (default: ./mined, or ./exportminers-demo with --demo)")
    io.add_argument("--format", default="triplets",
                    help="flat files to write, comma separated: triplets, ntuples, pairs, or none (default: %(default)s)")
    io.add_argument("--overwrite", action="store_true", help="discard results of a different earlier run in --out")
    io.add_argument("--no-plot", action="store_true", help="do not write scores.png")
    io.add_argument("--demo", action="store_true", help="mine scikit-learn's bundled digits (1,797 x 64, 10 classes) against themselves")

    m = p.add_argument_group("what to mine")
    m.add_argument("-k", "--k", type=int, default=10, help="negatives per query (default: %(default)s)")
    m.add_argument("--metric", choices=["cosine", "dot", "l2"], default="cosine", help="similarity (cosine, dot) or distance (l2) (default: %(default)s)")
    m.add_argument("--strategy", choices=["hardest", "semihard", "multisimilarity"], default="hardest",
                   help="hardest: most similar different-label items; semihard: farther than the "
                        "query's hardest positive but within --margin; multisimilarity: closer "
                        "than that positive minus --epsilon (default: %(default)s)")
    m.add_argument("--margin", type=float, default=0.2, help="semihard margin (default: %(default)s)")
    m.add_argument("--epsilon", type=float, default=0.1, help="multisimilarity epsilon (default: %(default)s)")
    m.add_argument("--min-score", type=float, help="keep negatives with score (similarity or distance) >= this")
    m.add_argument("--max-score", type=float, help="keep negatives with score <= this")
    m.add_argument("--margin-pos", type=float, help="TopK-MarginPos: drop negatives scoring above positive - margin")
    m.add_argument("--perc-pos", type=float, help="TopK-PercPos: drop negatives scoring above positive * perc (cosine/dot)")
    m.add_argument("--range-min", type=int, default=0, help="skip the first N ranked negatives (default: %(default)s)")
    m.add_argument("--range-max", type=int, help="consider ranked negatives below this rank only (exclusive)")
    m.add_argument("--sampling", choices=["top", "random"], default="top",
                   help="top: the first k of the window; random: k drawn from [range-min, range-max) (default: %(default)s)")
    m.add_argument("--seed", type=int, default=0, help="seed for --sampling random (default: %(default)s)")
    m.add_argument("--num-positives", type=int, default=1, help="hardest positives reported per query (default: %(default)s)")
    m.add_argument("--easiest-positive", action="store_true", help="also report the most similar positive")
    m.add_argument("--positive-ref", choices=["hardest", "easiest"], default="hardest",
                   help="positive used by semihard / multisimilarity / --margin-pos / --perc-pos (default: %(default)s)")
    g = m.add_mutually_exclusive_group()
    g.add_argument("--exclude-same-id", dest="exclude_same_id", action="store_true", default=None,
                   help="a bank row with the query's id is never its positive or negative "
                        "(default: on for self-mining or when both sides have ids)")
    g.add_argument("--no-exclude-same-id", dest="exclude_same_id", action="store_false",
                   help="do not exclude rows by id; when mining a set against itself a row "
                        "is still never its own positive or negative (only other rows with "
                        "the same id become eligible)")

    e = p.add_argument_group("engine")
    e.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="(default: %(default)s)")
    e.add_argument("--dtype", choices=["float16", "float32"], help="compute dtype (default: float16 on CUDA for cosine/dot, else float32)")
    e.add_argument("--block-size", help="QxM rows per query and bank block, or one number for both "
                   "(default: 4096x262144 on CUDA, 1024x8192 on CPU; Q*M < 2**31)")
    e.add_argument("--shard-size", type=int, help="queries per output shard / resume unit; with --engine ray: queries per Ray batch (default: 16 query blocks)")
    e.add_argument("--bank-cache-gb", type=float, help="keep the bank on the device up to this size (default: 4 CUDA, 1 CPU)")
    e.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (CPU)")
    e.add_argument("--positives", choices=["auto", "graph", "host"], default="auto",
                   help="where positives are found: graph (masked passes over every score "
                        "block), host (only same-label pairs, scored beside the device's "
                        "work), auto: host when classes are small (default: %(default)s)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    r = p.add_argument_group("Ray engine (--engine ray; needs pip install 'exportminers[ray]')")
    r.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: a Ray cluster, same results (default: %(default)s)")
    r.add_argument("--address", help="Ray cluster address (auto, ray://head:10001, ...; default: "
                   "RAY_ADDRESS, else a new local Ray instance)")
    r.add_argument("--num-actors", type=int, help="actors per pass, spread over the bank shards (default: --bank-shards)")
    r.add_argument("--num-gpus-per-actor", type=float, default=0,
                   help="GPUs per actor; > 0 runs the block graphs on CUDA (default: %(default)s)")
    r.add_argument("--num-cpus-per-actor", type=float, help="CPUs reserved per actor (default: 1, less on small clusters)")
    r.add_argument("--bank-shards", type=int, default=1,
                   help="split the bank into S shards, each held by its own actors (default: %(default)s)")
    r.add_argument("--max-retries", type=int, default=3,
                   help="restarts of a dead actor and retries of a failed batch (default: %(default)s)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``mine`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "mine", help="mine hard negatives for a whole dataset against a bank (ONNX Runtime)",
        description=DESCRIPTION, epilog=EXAMPLES.replace("%(prog)s", "exportminers mine"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def build_parser(prog: str = "python -m exportminers.pipeline") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION,
                                epilog=EXAMPLES.replace("%(prog)s", prog),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _demo_inputs():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("--demo needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    import numpy as np

    return d.data.astype(np.float32), d.target.astype(np.int64)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def run(args: argparse.Namespace) -> int:
    """Run the ``mine`` subcommand; returns the exit status."""
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one 'warning: ...' line, no source line
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from .mine import mine

    formats = [] if args.format.strip().lower() in ("", "none") else [
        f.strip() for f in args.format.split(",") if f.strip()]
    kw = dict(
        k=args.k, metric=args.metric, strategy=args.strategy, margin=args.margin,
        epsilon=args.epsilon, min_score=args.min_score, max_score=args.max_score,
        margin_pos=args.margin_pos, perc_pos=args.perc_pos, range_min=args.range_min,
        range_max=args.range_max, sampling=args.sampling, seed=args.seed,
        num_positives=args.num_positives, easiest_positive=args.easiest_positive,
        positive_ref=args.positive_ref, exclude_same_id=args.exclude_same_id,
        formats=formats, device=args.device, dtype=args.dtype, block_size=args.block_size,
        shard_size=args.shard_size, bank_cache_gb=args.bank_cache_gb,
        overwrite=args.overwrite, progress=not args.no_progress, plot=not args.no_plot,
        threads=args.threads, positives=args.positives, embedding_column=args.embedding_column,
        label_column=args.label_column, id_column=args.id_column)
    if args.engine == "ray":
        kw.update(engine="ray", ray_address=args.address, num_actors=args.num_actors,
                  num_gpus_per_actor=args.num_gpus_per_actor,
                  num_cpus_per_actor=args.num_cpus_per_actor, bank_shards=args.bank_shards,
                  max_retries=args.max_retries)
    else:
        given = [f for f, v, d in (("--address", args.address, None),
                                   ("--num-actors", args.num_actors, None),
                                   ("--num-gpus-per-actor", args.num_gpus_per_actor, 0),
                                   ("--num-cpus-per-actor", args.num_cpus_per_actor, None),
                                   ("--bank-shards", args.bank_shards, 1),
                                   ("--max-retries", args.max_retries, 3)) if v != d]
        if given:
            print(f"error: {', '.join(given)} apply to --engine ray only", file=sys.stderr)
            return 2
    try:
        if args.demo:
            given = [o for o, v in (("an input", args.input), ("--bank", args.bank),
                                    ("--labels", args.labels), ("--ids", args.ids),
                                    ("--bank-labels", args.bank_labels),
                                    ("--bank-ids", args.bank_ids)) if v]
            if given:
                raise ValueError(f"--demo mines built-in data: it takes no {', '.join(given)}")
            x, y = _demo_inputs()
            out = args.out or "exportminers-demo"
            print(f"demo: scikit-learn digits, {x.shape[0]} x {x.shape[1]}, "
                  f"{len(set(y.tolist()))} classes, mined against themselves", file=sys.stderr)
            res = mine(x, y, out_dir=out, **kw)
        else:
            if not args.input:
                raise ValueError("give an input (embeddings .npy / .parquet / folder), or --demo")
            res = mine(args.input, args.labels, args.ids, bank=args.bank,
                       bank_labels=args.bank_labels, bank_ids=args.bank_ids,
                       out_dir=args.out or "mined", **kw)
    except (ValueError, OSError, ImportError) as e:  # OSError covers ConnectionError
        msg = str(e).strip().splitlines()
        print(f"error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    print_report(res)
    return 0


def print_report(res) -> None:
    s = res.summary
    q = s["queries"]
    bank = s["inputs"]["bank"]
    against = "themselves" if isinstance(bank, str) else f"{bank['rows']:,} bank rows"
    eng = s["engine"]
    where = (f"with Ray ({eng['num_actors']} actor(s), {eng['bank_shards']} bank shard(s)) "
             if eng.get("name") == "ray" else "")
    print(f"mined {q['mined']:,} of {q['total']:,} queries against {against} "
          f"{where}on {eng['device']} ({eng['dtype']})")
    print(f"  ok: {q['ok']:,}  short of negatives: {q['short']:,}  no positive: "
          f"{q['no_positive']:,}  excluded: {q['excluded_nonfinite'] + q['excluded_missing_label']:,}")
    neg, pos = s["scores"]["negatives"], s["scores"]["hardest_positive"]
    if neg.get("count"):
        print(f"  negative {s['scores']['metric']} scores: mean {neg['mean']:.4g}, "
              f"median {neg['median']:.4g}, range [{neg['min']:.4g}, {neg['max']:.4g}]")
    if pos.get("count"):
        print(f"  hardest-positive scores: mean {pos['mean']:.4g}, median {pos['median']:.4g}")
    t = s["timing"]
    if t.get("queries_per_second"):
        print(f"  {t['mining_seconds']:.2f} s mining, {t['queries_per_second']:,.0f} queries/s")
    print("outputs:")
    for name, path in res.files.items():
        print(f"  {name:9s} {path}")


def main(argv: Optional[List[str]] = None) -> int:
    return run(build_parser().parse_args(argv))
