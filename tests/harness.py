"""One shared miner tester (STYLE.md point 5).

Pieces:

* :func:`make_batch` / :func:`make_case`: seeded float64 batches with class structure
  (class centres + noise) so that miners select non-trivial subsets, plus the edge
  batches every miner must handle (B = 1, B = 2, one class, all labels distinct, huge and
  negative label values) and self / ref mining with a different reference size.
* :func:`pml_distance` / :func:`our_distance`: the same distance config on both sides.
* :func:`run_pml` / :func:`run_ours`: call a miner the same way on both sides. Self
  mining is ``miner(x, y)``; ref mining passes *different tensor objects* for the
  reference, so PML excludes nothing (the lead's deliberate semantics).
* :func:`assert_same_multiset`: deterministic miners return PML's multiset of tuples.
* :func:`assert_same_pairs_tie_aware` / :func:`assert_same_triplets_tie_aware`: where PML
  picks one of tied candidates, compare per-anchor chosen distances instead of indices,
  and check the chosen candidates are valid.
* :class:`MinerCase`: a miner under test (our class name, config, PML factory) and
  :func:`check_against_pml`, the one entry point parity tests call.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import pytorch_metric_learning.distances as pml_distances
import pytorch_metric_learning.miners as pml_miners
import pytorch_metric_learning.utils.loss_and_miner_utils as pml_lmu

# --------------------------------------------------------------------------- inputs


def stable_seed(*parts: Any) -> int:
    """A seed derived from the parts' text: reproducible, different across cases."""
    h = hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()
    return int(h[:8], 16)


def make_batch(n: int, n_classes: int, dim: int = 8, seed: int = 0, spread: float = 0.6,
               dtype: torch.dtype = torch.float64, label_offset: int = 0,
               label_scale: int = 1, centers: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings with class structure: class centres + Gaussian noise.

    Returns (embeddings Tensor[n, dim], labels Tensor[n] int64, centres Tensor[C, dim]).
    Labels are ``label_offset + label_scale * class_id`` so huge / negative values are
    easy to produce; every class appears at least once when ``n >= n_classes``.
    """
    g = torch.Generator().manual_seed(seed)
    if centers is None:
        centers = torch.randn(n_classes, dim, generator=g, dtype=torch.float64)
    n_classes = centers.size(0)
    if n == 0:
        cls = torch.empty(0, dtype=torch.int64)
    else:
        base = torch.arange(n) % n_classes
        cls = base[torch.randperm(n, generator=g)]
    x = centers[cls] + spread * torch.randn(n, dim, generator=g, dtype=torch.float64)
    labels = label_offset + label_scale * cls
    return x.to(dtype), labels.to(torch.int64), centers


@dataclass
class Case:
    """One input configuration: query batch and (optionally) a reference batch."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    ref: Optional[torch.Tensor] = None
    ref_y: Optional[torch.Tensor] = None

    @property
    def self_mode(self) -> bool:
        return self.ref is None


# (name, n, n_classes, m (None: self mining), extra make_batch kwargs)
EDGE_SPECS: List[Tuple[str, int, int, Optional[int], Dict[str, Any]]] = [
    ("b1", 1, 1, None, {}),
    ("b2_same", 2, 1, None, {}),
    ("b2_diff", 2, 2, None, {}),
    ("one_class", 9, 1, None, {}),
    ("all_distinct", 9, 9, None, {}),
    ("huge_labels", 14, 3, None, {"label_offset": 2 ** 40, "label_scale": 2 ** 33}),
    ("negative_labels", 14, 3, None, {"label_offset": -7, "label_scale": -3}),
    ("typical", 24, 4, None, {}),
    ("typical_odd", 19, 5, None, {}),
    ("ref_smaller", 16, 4, 10, {}),
    ("ref_larger", 10, 3, 21, {}),
    ("ref_one_class", 8, 3, 6, {"ref_classes": 1}),
    ("ref_huge_neg", 12, 3, 9, {"label_offset": -(2 ** 40), "label_scale": 2 ** 35}),
]

EDGE_NAMES = [s[0] for s in EDGE_SPECS]
SELF_NAMES = [s[0] for s in EDGE_SPECS if s[3] is None]
REF_NAMES = [s[0] for s in EDGE_SPECS if s[3] is not None]


def make_case(name: str, salt: Any = "", dim: int = 8, dtype=torch.float64,
              spread: float = 0.6) -> Case:
    """Build the named case with a seed from (name, salt)."""
    spec = {s[0]: s for s in EDGE_SPECS}
    if name == "same_as_ref":
        # the reference holds the very same values as the batch, as different tensors:
        # nothing is excluded (the diagonal pairs count)
        x, y, _ = make_batch(12, 3, dim, stable_seed(name, salt), spread, dtype)
        return Case(name, x, y, x.clone(), y.clone())
    _, n, c, m, kw = spec[name]
    kw = dict(kw)
    ref_classes = kw.pop("ref_classes", None)
    seed = stable_seed(name, salt)
    x, y, centers = make_batch(n, c, dim, seed, spread, dtype, **kw)
    if m is None:
        return Case(name, x, y)
    rc = centers if ref_classes is None else centers[:ref_classes]
    ref, ry, _ = make_batch(m, c, dim, seed + 1, spread, dtype, centers=rc, **kw)
    return Case(name, x, y, ref, ry)


# ------------------------------------------------------------------------ distances

# name -> (class name, kwargs); the same kwargs build the PML object and ours
DISTANCES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "l2": ("LpDistance", {}),
    "l1": ("LpDistance", {"p": 1}),
    "l2_sq": ("LpDistance", {"power": 2}),
    "l2_raw": ("LpDistance", {"normalize_embeddings": False}),
    "l1_sq_raw": ("LpDistance", {"p": 1, "power": 2, "normalize_embeddings": False}),
    "dot": ("DotProductSimilarity", {}),
    "dot_raw": ("DotProductSimilarity", {"normalize_embeddings": False}),
    "cos": ("CosineSimilarity", {}),
    "snr": ("SNRDistance", {}),
}


def our_distance(name: str):
    import exportminers.distances as d
    cls, kw = DISTANCES[name]
    return getattr(d, cls)(**kw)


def pml_distance(name: str):
    cls, kw = DISTANCES[name]
    return getattr(pml_distances, cls)(**kw)


def legacy_to_pml_distance(default: str, normalize_embeddings=None, use_similarity=False,
                           squared_distances=False):
    """The distance object PML 2.x needs to reproduce the older constructor args."""
    norm = True if normalize_embeddings is None else normalize_embeddings
    if use_similarity:
        return pml_distances.DotProductSimilarity(normalize_embeddings=norm)
    if squared_distances:
        return pml_distances.LpDistance(normalize_embeddings=norm, p=2, power=2)
    cls, kw = DISTANCES[default]
    kw = dict(kw)
    kw["normalize_embeddings"] = norm
    if cls == "CosineSimilarity":
        cls = "DotProductSimilarity"
    return getattr(pml_distances, cls)(**kw)


def distance_matrix(dist, case: Case) -> torch.Tensor:
    """PML's matrix for the case (float64 reference)."""
    with torch.no_grad():
        return dist(case.x, case.ref)


# ------------------------------------------------------------------------- running


def run_ours(miner, case: Case):
    if case.self_mode:
        out = miner(case.x, case.y)
    else:
        out = miner(case.x, case.y, case.ref, case.ref_y)
    return tuple(out) if isinstance(out, (tuple, list)) else out


def run_pml(miner, case: Case):
    # fresh tensor objects for the reference: PML then excludes nothing
    if case.self_mode:
        out = miner(case.x, case.y)
    else:
        out = miner(case.x, case.y, case.ref.clone(), case.ref_y.clone())
    return tuple(out) if isinstance(out, (tuple, list)) else out


def check_output_format(out, arity: int, device=torch.device("cpu")) -> None:
    assert isinstance(out, tuple), f"expected a tuple, got {type(out)}"
    assert len(out) == arity, f"expected {arity} tensors, got {len(out)}"
    for t in out:
        assert isinstance(t, torch.Tensor)
        assert t.dtype == torch.int64, f"index tensors must be int64, got {t.dtype}"
        assert t.dim() == 1, f"index tensors must be 1-D, got shape {tuple(t.shape)}"
        assert t.device == device
    if arity == 3:
        assert len(out[0]) == len(out[1]) == len(out[2])
    else:
        assert len(out[0]) == len(out[1]) and len(out[2]) == len(out[3])


# ---------------------------------------------------------------------- comparisons


def tuples(*tensors: torch.Tensor) -> Counter:
    if len(tensors) == 0:
        return Counter()
    cols = [t.tolist() for t in tensors]
    return Counter(zip(*cols))


def assert_same_multiset(ours: Sequence[torch.Tensor], ref: Sequence[torch.Tensor],
                         what: str = "") -> None:
    """Pairs (a1, p, a2, n) compare the two pair sets separately; triplets as tuples;
    a subset (one index tensor) as a multiset of indices."""
    assert len(ours) == len(ref), f"{what}: arity {len(ours)} vs PML {len(ref)}"
    groups = {4: [(0, 1), (2, 3)], 3: [(0, 1, 2)], 1: [(0,)]}[len(ref)]
    for g in groups:
        o = tuples(*[ours[i] for i in g])
        r = tuples(*[ref[i].long() for i in g])
        if o != r:
            missing = list((r - o).elements())[:8]
            extra = list((o - r).elements())[:8]
            raise AssertionError(
                f"{what}: multisets differ for outputs {g}: {sum(o.values())} vs PML "
                f"{sum(r.values())}; missing (first 8) {missing}; extra (first 8) {extra}")


def _valid_pair(kind: str, a: int, o: int, case: Case) -> bool:
    ref_y = case.y if case.self_mode else case.ref_y
    same = int(case.y[a]) == int(ref_y[o])
    if kind == "pos":
        return same and not (case.self_mode and a == o)
    return not same


def _keyed(anchor: torch.Tensor, vals: List[torch.Tensor]) -> Counter:
    return Counter(zip(anchor.tolist(), *[v.tolist() for v in vals]))


def assert_same_pairs_tie_aware(ours, ref, mat: torch.Tensor, case: Case,
                                what: str = "") -> None:
    """(a1, p, a2, n): same multiset of (anchor, distance) per pair kind; ours valid."""
    for kind, (ia, io) in (("pos", (0, 1)), ("neg", (2, 3))):
        oa, oo = ours[ia], ours[io]
        ra, ro = ref[ia].long(), ref[io].long()
        for a, o in zip(oa.tolist(), oo.tolist()):
            assert _valid_pair(kind, a, o, case), f"{what}: invalid {kind} pair ({a}, {o})"
        oc = _keyed(oa, [mat[oa, oo]])
        rc = _keyed(ra, [mat[ra, ro]])
        if oc != rc:
            raise AssertionError(
                f"{what}: {kind} pairs differ as (anchor, distance) multisets: "
                f"{len(oa)} vs PML {len(ra)}; missing {list((rc - oc).elements())[:6]}; "
                f"extra {list((oc - rc).elements())[:6]}")


def assert_same_pairs_global_tie_aware(ours, ref, mat: torch.Tensor, case: Case,
                                       pool=None, what: str = "") -> None:
    """Top-k style selection (HDC): ties cross anchors (self mode has d(i, j) == d(j, i)).

    Same multiset of selected distances per pair kind, and ours is a sub-multiset of the
    candidate pool (all pairs, or the externally set pairs).
    """
    for kind, (ia, io) in (("pos", (0, 1)), ("neg", (2, 3))):
        oa, oo = ours[ia], ours[io]
        ra, ro = ref[ia].long(), ref[io].long()
        for a, o in zip(oa.tolist(), oo.tolist()):
            assert _valid_pair(kind, a, o, case), f"{what}: invalid {kind} pair ({a}, {o})"
        od = Counter(mat[oa, oo].tolist())
        rd = Counter(mat[ra, ro].tolist())
        if od != rd:
            raise AssertionError(
                f"{what}: {kind} selected distances differ: {len(oa)} vs PML {len(ra)}; "
                f"missing {sorted((rd - od).elements())[:6]}; "
                f"extra {sorted((od - rd).elements())[:6]}")
        if pool is not None:
            pc = tuples(pool[ia].long(), pool[io].long())
            oc = tuples(oa, oo)
            assert not (oc - pc), f"{what}: {kind} pairs outside the pool: {list(oc - pc)[:6]}"


def assert_same_triplets_tie_aware(ours, ref, mat: torch.Tensor, case: Case,
                                   what: str = "") -> None:
    oa, op, on = ours
    ra, rp, rn = (t.long() for t in ref)
    for a, p, n in zip(oa.tolist(), op.tolist(), on.tolist()):
        assert _valid_pair("pos", a, p, case), f"{what}: invalid positive ({a}, {p})"
        assert _valid_pair("neg", a, n, case), f"{what}: invalid negative ({a}, {n})"
    oc = _keyed(oa, [mat[oa, op], mat[oa, on]])
    rc = _keyed(ra, [mat[ra, rp], mat[ra, rn]])
    if oc != rc:
        raise AssertionError(
            f"{what}: triplets differ as (anchor, d_ap, d_an) multisets: {len(oa)} vs PML "
            f"{len(ra)}; missing {list((rc - oc).elements())[:6]}; "
            f"extra {list((oc - rc).elements())[:6]}")


# ------------------------------------------------------------------- miner factory


@dataclass
class MinerCase:
    """A miner configuration on both sides.

    ``ours`` builds our miner, ``pml`` builds PML's; ``tie_aware`` selects the tie-aware
    comparison with ``pml_dist`` (PML's distance object) giving the matrix.
    """

    name: str
    ours: Callable[[], Any]
    pml: Callable[[], Any]
    arity: int
    tie_aware: Any = False  # False, True (per anchor) or "global" (top-k over all pairs)
    pml_dist: Optional[Callable[[], Any]] = None
    label: str = ""


def check_against_pml(mc: MinerCase, case: Case, check_script: bool = True) -> None:
    """The shared check: format, PML parity (multiset or tie-aware), script == eager."""
    ours_miner = mc.ours()
    pml_miner = mc.pml()
    out = run_ours(ours_miner, case)
    check_output_format(out, mc.arity)
    ref = run_pml(pml_miner, case)
    what = f"{mc.name}[{mc.label}] on {case.name}"
    if mc.tie_aware:
        dist = mc.pml_dist() if mc.pml_dist is not None else pml_miner.distance
        mat = distance_matrix(dist, case)
        if mc.tie_aware == "global":
            ry = case.y if case.self_mode else case.ref_y
            pool = pml_lmu.get_all_pairs_indices(case.y, case.y if case.self_mode else ry)
            assert_same_pairs_global_tie_aware(out, ref, mat, case, pool, what)
        elif mc.arity == 4:
            assert_same_pairs_tie_aware(out, ref, mat, case, what)
        else:
            assert_same_triplets_tie_aware(out, ref, mat, case, what)
    else:
        assert_same_multiset(out, ref, what)
    # the stats PML records
    if mc.arity == 3:
        assert ours_miner.num_triplets == len(out[0])
    else:
        assert ours_miner.num_pos_pairs == len(out[0])
        assert ours_miner.num_neg_pairs == len(out[2])
    if check_script:
        scripted = torch.jit.script(mc.ours())
        sout = run_ours(scripted, case)
        assert len(sout) == len(out)
        for s, e in zip(sout, out):
            assert torch.equal(s, e), f"{what}: scripted output differs from eager"


def miners_module():
    import exportminers.miners as m
    return m


def our_miner_cls(name: str):
    """Our miner class; AttributeError while the lead has not added it yet."""
    return getattr(miners_module(), name)


def pml_miner_cls(name: str):
    return getattr(pml_miners, name)


def assert_valid_triplets(out, case: Case, what: str = "") -> None:
    a, p, n = out
    m = case.x.size(0) if case.self_mode else case.ref.size(0)
    for t, hi in ((a, case.x.size(0)), (p, m), (n, m)):
        if t.numel():
            assert int(t.min()) >= 0 and int(t.max()) < hi, f"{what}: index out of range"
    for ai, pi, ni in zip(a.tolist(), p.tolist(), n.tolist()):
        assert _valid_pair("pos", ai, pi, case), f"{what}: invalid positive ({ai}, {pi})"
        assert _valid_pair("neg", ai, ni, case), f"{what}: invalid negative ({ai}, {ni})"


def assert_valid_pairs(out, case: Case, what: str = "") -> None:
    a1, p, a2, n = out
    for ai, pi in zip(a1.tolist(), p.tolist()):
        assert _valid_pair("pos", ai, pi, case), f"{what}: invalid positive ({ai}, {pi})"
    for ai, ni in zip(a2.tolist(), n.tolist()):
        assert _valid_pair("neg", ai, ni, case), f"{what}: invalid negative ({ai}, {ni})"


# --------------------------------------------------------------- registry helpers


def build_registry_miner(name: str, config: Dict[str, Any]):
    """Build a registry miner; MaximumLossMiner gets our scriptable loss when its config
    has none (test_registry.py checks separately that every config builds as is)."""
    from exportminers.registry import MINERS
    config = dict(config)
    if name == "MaximumLossMiner" and "loss_function" not in config:
        from exportminers.losses import TripletMarginLoss
        config["loss_function"] = TripletMarginLoss()
    return MINERS[name].build(**config)


def registry_params(random: Optional[bool] = None, exclude=()):
    """pytest params (name, config) over every registry miner and config."""
    import pytest
    from exportminers.registry import MINERS
    return [pytest.param(name, cfg, id=f"{name}-{i}")
            for name, spec in MINERS.items() if random is None or spec.random == random
            if name not in exclude
            for i, cfg in enumerate(spec.configs)]


def registry_arity(name: str) -> int:
    from exportminers.registry import MINERS
    return {"triplets": 3, "pairs": 4, "subset": 1}[MINERS[name].output]
