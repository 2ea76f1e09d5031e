"""Check an exported graph against the eager miner (used by ``exportminers export`` and the
tests).

Deterministic miners: the ONNX Runtime tuples must equal the eager tuples as multisets,
except tuples whose decision is numerically borderline. "Borderline" is measured, not
guessed per miner: the eager miner is re-run on inputs perturbed by a relative ``eps``
(:data:`PERTURBATION`); every tuple that appears or disappears under some perturbation
is sensitive, and only sensitive tuples may differ between the graph and eager. Float32
graphs differ from eager by ~1e-6, far below the 1e-4 perturbation, so real bugs still
show up as insensitive differences.

Random miners: the same check with the same noise fed to both (the kernel is
deterministic given its noise), plus validity of every tuple (labels agree/disagree,
no self-pairs in self-mining, indices in range) and reproducibility of ``seed=``.

Float16 graphs compute some steps otherwise than the eager float16 miner, on purpose
(L_p in float32, rounded once, where eager is PML's float16 arithmetic): they are
checked against torch running the graph's own arithmetic
(:func:`exportminers._ops.graph_arithmetic`), so a one-ulp distance difference cannot
move UniformHistogram's bins and reshuffle its draws.
"""
import contextlib
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import _ops
from .decode import decode
from .runtime import OnnxMiner
from .utils.checks import check_inputs

PERTURBATION = {"float32": 1e-4, "float16": 1e-2}
SYMMETRIC_PAIR_MINERS = ("PairMarginMiner", "HDCMiner")
# perturbation trials: a borderline tuple flips in about half of them. Float16 graphs run
# on ONNX Runtime's CPU EP in float32 between their casts (not rounded per op as torch
# does), so they hold more borderline differences, each of which must be found.
TRIALS = {"float32": 4, "float16": 16}
# A random miner redraws a whole bin (or window) when one distance lands an ulp on the
# other side of an edge in the graph than in eager; only a perturbation that crosses the
# same edge the same way reproduces that redraw, and each trial does so with probability
# about 1/2. Differences of a random miner that a round of trials leaves unexplained get
# up to this many more rounds (new perturbations) before they count as a mismatch.
RANDOM_EXTRA_ROUNDS = 3


def random_batch(n: int, d: int, m: Optional[int] = None, seed: int = 0,
                 dtype=np.float32, num_classes: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Normal embeddings and labels with about 4 samples per class (``m``: a ref set too)."""
    rng = np.random.default_rng(seed)
    out = {"embeddings": rng.standard_normal((n, d)).astype(dtype),
           "labels": rng.integers(0, num_classes or max(2, n // 4), n).astype(np.int64)}
    if m is not None:
        out["ref_emb"] = rng.standard_normal((m, d)).astype(dtype)
        out["ref_labels"] = rng.integers(0, num_classes or max(2, m // 4), m).astype(np.int64)
    return out


def eager_tuples(miner: torch.nn.Module, batch: Dict[str, np.ndarray],
                 noise: Optional[np.ndarray] = None, device: str = "cpu",
                 graph_math: bool = False) -> List[np.ndarray]:
    """The eager miner's index tuples as numpy arrays (random miners: from ``noise``),
    computed on ``device``; ``graph_math``: with the exported graph's arithmetic
    (:func:`exportminers._ops.graph_arithmetic`)."""
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
    args = (t["embeddings"], t["labels"], t.get("ref_emb"), t.get("ref_labels"))
    with torch.no_grad(), (_ops.graph_arithmetic() if graph_math else contextlib.nullcontext()):
        if noise is None and not graph_math:
            out = miner(*args)
        else:   # the kernel the graph was exported from, then the shared decode
            emb, lab, ref, ref_lab = check_inputs(*args)
            nz = None if noise is None else torch.from_numpy(noise).to(device)
            out = decode(miner.kernel(emb, lab, ref, ref_lab, nz), miner.layout)
    if isinstance(out, torch.Tensor):
        out = [out]
    return [o.cpu().numpy().astype(np.int64) for o in out]


def as_multisets(fields: Sequence[np.ndarray], kind: str) -> List[Counter]:
    """Tuples as multisets: one for triplets/subset, (positive, negative) pairs for pairs."""
    f = [np.asarray(x).tolist() for x in fields]
    if kind == "pairs":
        return [Counter(zip(f[0], f[1])), Counter(zip(f[2], f[3]))]
    return [Counter(zip(*f))]


def _symdiff(a: List[Counter], b: List[Counter]) -> List[Counter]:
    return [(x - y) + (y - x) for x, y in zip(a, b)]


def sensitive_tuples(miner, batch: Dict[str, np.ndarray], kind: str, eps: float,
                     noise: Optional[np.ndarray] = None, seed: int = 0,
                     base: Optional[List[Counter]] = None, device: str = "cpu",
                     graph_math: bool = False, trials: int = TRIALS["float32"]) -> List[Counter]:
    """Tuples that flip when the embeddings move by a relative ``eps`` (union of
    ``trials`` random moves)."""
    base = base if base is not None else as_multisets(
        eager_tuples(miner, batch, noise, device, graph_math), kind)
    rng = np.random.default_rng(10_000 + seed)
    union = [Counter() for _ in base]
    for _ in range(trials):
        moved = dict(batch)
        for key in ("embeddings", "ref_emb"):
            if key in batch:
                x = batch[key].astype(np.float64)
                scale = float(np.sqrt(np.mean(x * x))) if x.size else 1.0
                moved[key] = (x + eps * scale * rng.standard_normal(x.shape)).astype(batch[key].dtype)
        diff = _symdiff(base, as_multisets(eager_tuples(miner, moved, noise, device,
                                                        graph_math), kind))
        union = [u | d for u, d in zip(union, diff)]
    return union


def explain_differences(miner, batch: Dict[str, np.ndarray], kind: str, eps: float, got, want,
                        noise: Optional[np.ndarray] = None, seed: int = 0, device: str = "cpu",
                        graph_math: bool = False, trials: int = TRIALS["float32"],
                        mirrored_ties: bool = False, extra_rounds: int = 0):
    """:func:`compare` with the tuples that ``trials`` perturbations of size ``eps`` flip
    allowed to differ; while some difference stays unexplained, up to ``extra_rounds``
    more rounds of new perturbations. Returns (ok, info); info["trials"] counts them."""
    base = as_multisets(want, kind)
    sens = None
    rounds = 0
    while True:
        more = sensitive_tuples(miner, batch, kind, eps, noise, seed=seed + 7919 * rounds,
                                base=base, device=device, graph_math=graph_math, trials=trials)
        sens = more if sens is None else [a | b for a, b in zip(sens, more)]
        rounds += 1
        ok, info = compare(got, want, kind, sens, mirrored_ties=mirrored_ties)
        if ok or rounds > extra_rounds:
            info["trials"] = trials * rounds
            return ok, info


def compare(graph_fields, eager_fields, kind: str, sensitive: Optional[List[Counter]] = None,
            mirrored_ties: bool = False) -> Tuple[bool, Dict[str, Any]]:
    """Graph vs eager tuples; differences allowed only inside ``sensitive``.

    ``mirrored_ties`` (pairs mined from a batch against itself): a pair ``(a, b)`` on one
    side and ``(b, a)`` on the other is a tie between two candidates of equal distance
    (the matrix is symmetric; a graph's matmul may round the two an ulp apart), which no
    perturbation of the embeddings can reveal, since it keeps the matrix symmetric."""
    g = as_multisets(graph_fields, kind)
    e = as_multisets(eager_fields, kind)
    diff = _symdiff(g, e)
    if mirrored_ties and kind == "pairs":
        sensitive = [Counter(s) for s in (sensitive or [Counter() for _ in diff])]
        for d, s, gc, ec in zip(diff, sensitive, g, e):
            for (a, b), count in d.items():
                only_g = gc.get((a, b), 0) > ec.get((a, b), 0)
                mirror_other = (ec if only_g else gc).get((b, a), 0) > \
                    (gc if only_g else ec).get((b, a), 0)
                if a != b and mirror_other:
                    s[(a, b)] += count
    n_diff = sum(sum(d.values()) for d in diff)
    allowed = 0
    ok = True
    for d, s in zip(diff, sensitive or [Counter() for _ in diff]):
        for key, count in d.items():
            if s.get(key, 0) > 0:
                allowed += count
            else:
                ok = False
    info = {"tuples": sum(sum(c.values()) for c in e), "differ": n_diff, "borderline": allowed}
    return ok, info


def valid_tuples(fields: Sequence[np.ndarray], kind: str, batch: Dict[str, np.ndarray]) -> bool:
    """Every tuple is one PML could return: right labels, in range, no self-pairs."""
    labels = batch["labels"]
    with_ref = "ref_emb" in batch
    ref_labels = batch["ref_labels"] if with_ref else labels
    n, m = len(labels), len(ref_labels)
    f = [np.asarray(x, dtype=np.int64) for x in fields]
    if kind == "subset":
        return bool(((f[0] >= 0) & (f[0] < n)).all())

    def pair_ok(a, b, same: bool) -> bool:
        if a.size == 0:
            return True
        if a.min() < 0 or a.max() >= n or b.min() < 0 or b.max() >= m:
            return False
        eq = labels[a] == ref_labels[b]
        if not same:
            return bool((~eq).all())
        return bool(eq.all()) and (with_ref or bool((a != b).all()))

    if kind == "pairs":
        return pair_ok(f[0], f[1], True) and pair_ok(f[2], f[3], False)
    return pair_ok(f[0], f[1], True) and pair_ok(f[0], f[2], False)


def verify_graph(miner: torch.nn.Module, path: str, sizes: Sequence[int] = (12, 20),
                 ref_sizes: Sequence[int] = (15, 9), seed: int = 0,
                 providers: Optional[Sequence[str]] = None, session_options=None,
                 eager_device: str = "cpu") -> Dict[str, Any]:
    """Run an exported graph with ONNX Runtime at several batch sizes against eager.

    ``providers`` / ``session_options`` choose how ONNX Runtime runs it (default: CPU);
    the eager miner runs on ``eager_device``.

    Returns:
        ``{"ok": bool, "runs": [per size: {"n", "m", "tuples", "differ", "borderline",
        "ok", ...}], "error": message or None}``.
    """
    providers = list(providers or ["CPUExecutionProvider"])

    def load(**kw):
        return OnnxMiner(path, providers=providers, session_options=session_options, **kw)

    om = load()
    kind = om.output_kind
    d = om.embedding_dim or 8
    dtype = np.float16 if om.dtype == np.float16 else np.float32
    eps = PERTURBATION["float16" if dtype == np.float16 else "float32"]
    # float16 graphs compute some steps otherwise on purpose (L_p in float32, rounded
    # once): they are checked against torch running the graph's own arithmetic
    graph_math = dtype == np.float16
    mult = om.batch_multiple
    runs: List[Dict[str, Any]] = []
    ok_all = True
    for i, n in enumerate(sizes):
        n = -(-n // mult) * mult
        m = ref_sizes[i % len(ref_sizes)] if om.with_ref else None
        batch = random_batch(n, d, m, seed=seed + i, dtype=dtype)
        args = [batch["embeddings"], batch["labels"]]
        if om.with_ref:
            args += [batch["ref_emb"], batch["ref_labels"]]
        noise = None
        if om.is_random:
            noise = np.random.default_rng(seed + 100 + i).random(
                om.noise_shape(n, m if m is not None else n))
        got = om(*args, noise=noise)
        got = [got] if isinstance(got, np.ndarray) else list(got)
        want = eager_tuples(miner, batch, noise, eager_device, graph_math)
        # only miners whose pair selection is symmetric in (a, b) (a global threshold or
        # cut-off); per-anchor choices (BatchEasyHard, MultiSimilarity) are not ties
        mirrored = om.miner_name in SYMMETRIC_PAIR_MINERS and not om.with_ref
        ok, info = compare(got, want, kind, mirrored_ties=mirrored)
        if not ok:
            ok, info = explain_differences(
                miner, batch, kind, eps, got, want, noise, seed=seed + i, device=eager_device,
                graph_math=graph_math, trials=TRIALS["float16" if graph_math else "float32"],
                mirrored_ties=mirrored, extra_rounds=RANDOM_EXTRA_ROUNDS if om.is_random else 0)
        info.update({"n": n, "m": m if m is not None else n})
        if om.chunkable and n > 1:   # anchor blocks must give exactly the one-call result
            chunked = load(chunk_size=max(1, n // 3))(*args)
            chunked = [chunked] if isinstance(chunked, np.ndarray) else list(chunked)
            same = all(np.array_equal(x, y) for x, y in zip(chunked, got))
            info["chunked_equal"] = same
            ok = ok and same
        if om.is_random:
            valid = valid_tuples(got, kind, batch)
            again = om(*args, seed=seed + 7)
            again2 = load()(*args, seed=seed + 7)
            again = [again] if isinstance(again, np.ndarray) else list(again)
            again2 = [again2] if isinstance(again2, np.ndarray) else list(again2)
            repro = all(np.array_equal(x, y) for x, y in zip(again, again2))
            info.update({"valid": valid, "reproducible": repro})
            ok = ok and valid and repro
        info["ok"] = ok
        ok_all = ok_all and ok
        runs.append(info)
    return {"ok": ok_all, "runs": runs, "error": None}
