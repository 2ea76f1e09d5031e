"""Mining configuration: argument checks and the per-query closeness band.

Scores are mapped to a *closeness* ``c`` so that larger always means closer:
``c = score`` for ``cosine`` / ``dot`` and ``c = -distance`` for ``l2``. Every filter
becomes an inclusive band ``neg_lo <= c <= neg_hi`` per query, computed in float32
(strict inequalities are turned into inclusive ones with ``nextafter``), so the block
graph and the numpy reference apply exactly the same test.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

METRICS = ("cosine", "dot", "l2")
STRATEGIES = ("hardest", "semihard", "multisimilarity")
SAMPLINGS = ("top", "random")
POSITIVE_REFS = ("hardest", "easiest")
F32 = np.float32


@dataclass(frozen=True)
class MineConfig:
    """What to mine for every query. See :func:`exportminers.pipeline.mine`.

    Args:
        k: negatives per query.
        metric: ``"cosine"`` (rows L2-normalised, larger = closer), ``"dot"`` or
            ``"l2"`` (Euclidean distance, smaller = closer).
        strategy: ``"hardest"`` (most similar different-label items),
            ``"semihard"`` (TripletMarginMiner semantics against the reference
            positive: farther than the positive but within ``margin``) or
            ``"multisimilarity"`` (MultiSimilarityMiner: closer than the reference
            positive minus ``epsilon``).
        margin: semihard margin (score units).
        epsilon: multisimilarity epsilon (score units).
        min_score, max_score: keep negatives whose raw score (similarity or
            distance) lies in ``[min_score, max_score]``.
        margin_pos: NV-Retriever TopK-MarginPos: drop negatives closer than
            ``reference positive - margin_pos`` (for l2: distance < pos + margin_pos).
        perc_pos: NV-Retriever TopK-PercPos: drop negatives with
            ``score > perc_pos * reference positive score`` (similarity metrics only).
        range_min, range_max: rank window over the filtered negatives, closest first
            (0-based, ``range_max`` exclusive; sentence-transformers' ``range_min`` /
            ``range_max``).
        sampling: ``"top"`` takes the first ``k`` of the window, ``"random"`` draws
            ``k`` of it without replacement, reproducibly from ``seed`` and the query's
            row (independent of block sizes); ``random`` needs ``range_max``.
        num_positives: hardest positives reported per query (0 = none).
        easiest_positive: also report each query's most similar positive.
        positive_ref: which positive the positive-aware filters use.
        exclude_same_id: a bank row with the query's id is never its positive or
            negative. ``None``: on when mining a set against itself or when both
            sides have explicit ids. When mining a set against itself, a row is never
            its own positive or negative either way; ``False`` then only stops rows
            that merely share an id (duplicate ids) from being excluded.
    """

    k: int = 10
    metric: str = "cosine"
    strategy: str = "hardest"
    margin: float = 0.2
    epsilon: float = 0.1
    min_score: Optional[float] = None
    max_score: Optional[float] = None
    margin_pos: Optional[float] = None
    perc_pos: Optional[float] = None
    range_min: int = 0
    range_max: Optional[int] = None
    sampling: str = "top"
    seed: int = 0
    num_positives: int = 1
    easiest_positive: bool = False
    positive_ref: str = "hardest"
    exclude_same_id: Optional[bool] = None

    def __post_init__(self):
        def _int(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

        def _choice(name, options):
            v = getattr(self, name)
            if v not in options:
                raise ValueError(f"{name} must be one of {list(options)}, got {v!r}")

        def _float(name, optional, positive=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                    or not np.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if positive and v < 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")

        _int("k", 1)
        _choice("metric", METRICS)
        _choice("strategy", STRATEGIES)
        _choice("sampling", SAMPLINGS)
        _choice("positive_ref", POSITIVE_REFS)
        _float("margin", False, positive=True)
        _float("epsilon", False, positive=True)
        for name in ("min_score", "max_score", "margin_pos", "perc_pos"):
            _float(name, True)
        _int("range_min", 0)
        _int("num_positives", 0)
        _int("seed", 0)
        if self.seed >= 2 ** 64:
            raise ValueError(f"seed must be below 2**64, got {self.seed!r}")
        if self.range_max is not None:
            _int("range_max", 1)
            if self.range_max < self.range_min + self.k:
                raise ValueError(
                    f"range_max ({self.range_max}) must be >= range_min + k "
                    f"({self.range_min} + {self.k}): the window must hold k negatives")
        if self.sampling == "random" and self.range_max is None:
            raise ValueError("sampling='random' needs range_max: the rank window to sample "
                             "k negatives from (e.g. range_max=50)")
        if (self.min_score is not None and self.max_score is not None
                and self.min_score > self.max_score):
            raise ValueError(f"min_score ({self.min_score}) is larger than max_score "
                             f"({self.max_score})")
        if self.perc_pos is not None and self.metric == "l2":
            raise ValueError("perc_pos (TopK-PercPos) needs a similarity metric "
                             "('cosine' or 'dot'), not 'l2'")
        if not isinstance(self.easiest_positive, bool):
            raise ValueError(f"easiest_positive must be a bool, got {self.easiest_positive!r}")
        if self.exclude_same_id is not None and not isinstance(self.exclude_same_id, bool):
            raise ValueError(f"exclude_same_id must be a bool or None, got {self.exclude_same_id!r}")

    # ------------------------------------------------------------------ derived
    @property
    def similarity(self) -> bool:
        return self.metric != "l2"

    @property
    def needs_positive(self) -> bool:
        """Do the negative filters depend on each query's positive score?"""
        return (self.strategy != "hardest" or self.margin_pos is not None
                or self.perc_pos is not None)

    @property
    def has_band(self) -> bool:
        return (self.needs_positive or self.min_score is not None
                or self.max_score is not None)

    @property
    def num_candidates(self) -> int:
        """Filtered negatives kept per query while streaming the bank."""
        if self.sampling == "random":
            return int(self.range_max)
        top = self.range_min + self.k
        return int(min(top, self.range_max) if self.range_max is not None else top)

    @property
    def window(self) -> Tuple[int, int]:
        return self.range_min, self.num_candidates

    def to_raw(self, c):
        """Closeness -> reported score (similarity, or distance for l2)."""
        c = np.asarray(c, dtype=F32)
        return c if self.similarity else -c

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def _up(x):
    return np.nextafter(x, F32(np.inf), dtype=F32)


def _down(x):
    return np.nextafter(x, F32(-np.inf), dtype=F32)


def negative_band(cfg: MineConfig, pos_c: Optional[np.ndarray], n: int):
    """Inclusive closeness band ``[lo, hi]`` (float32, shape ``[n]``) for negatives.

    ``pos_c`` is the reference positive's closeness per query (NaN where the query has
    no positive); queries that need a positive and have none get an empty band.
    """
    lo = np.full(n, -np.inf, dtype=F32)
    hi = np.full(n, np.inf, dtype=F32)
    if cfg.similarity:
        if cfg.min_score is not None:
            lo = np.maximum(lo, F32(cfg.min_score))
        if cfg.max_score is not None:
            hi = np.minimum(hi, F32(cfg.max_score))
    else:  # closeness = -distance
        if cfg.min_score is not None:
            hi = np.minimum(hi, -F32(cfg.min_score))
        if cfg.max_score is not None:
            lo = np.maximum(lo, -F32(cfg.max_score))
    if cfg.needs_positive:
        assert pos_c is not None
        cp = np.asarray(pos_c, dtype=F32)
        with np.errstate(invalid="ignore", over="ignore"):
            if cfg.strategy == "semihard":  # cp - margin <= c < cp
                lo = np.maximum(lo, cp - F32(cfg.margin))
                hi = np.minimum(hi, _down(cp))
            elif cfg.strategy == "multisimilarity":  # c > cp - epsilon
                lo = np.maximum(lo, _up(cp - F32(cfg.epsilon)))
            if cfg.margin_pos is not None:  # keep c <= cp - margin_pos
                hi = np.minimum(hi, cp - F32(cfg.margin_pos))
            if cfg.perc_pos is not None:  # keep c <= cp * perc_pos
                hi = np.minimum(hi, cp * F32(cfg.perc_pos))
        missing = ~np.isfinite(cp)
        lo[missing] = np.inf
        hi[missing] = -np.inf
    return lo.astype(F32), hi.astype(F32)


def band_to_dtype(lo: np.ndarray, hi: np.ndarray, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Round the band outward-safe into ``dtype``: smallest value >= lo, largest <= hi,
    so comparing scores of that dtype against it is exact."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return lo, hi
    lo2 = lo.astype(dtype)
    fix = lo2.astype(F32) < lo
    lo2[fix] = np.nextafter(lo2[fix], dtype.type(np.inf))
    hi2 = hi.astype(dtype)
    fix = hi2.astype(F32) > hi
    hi2[fix] = np.nextafter(hi2[fix], dtype.type(-np.inf))
    return lo2, hi2
