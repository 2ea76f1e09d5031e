"""Brute-force numpy reference for :func:`exportminers.pipeline.mine` (small inputs only).

Builds the full query x bank closeness matrix and applies every filter row by row with
explicit comparisons; used by the tests to prove the block engine exact.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from .config import F32, MineConfig
from .engine import normalize_rows, sample_keys


def closeness_matrix(cfg: MineConfig, q: np.ndarray, m: np.ndarray) -> np.ndarray:
    q = np.asarray(q, F32)
    m = np.asarray(m, F32)
    if cfg.metric == "cosine":
        q, m = normalize_rows(q), normalize_rows(m)
    qm = q @ m.T
    if cfg.metric == "l2":
        qn = (q * q).sum(1)[:, None]
        mn = (m * m).sum(1)[None, :]
        return -np.sqrt(np.maximum(qn + mn - F32(2) * qm, F32(0)))
    return qm


def mine_reference(cfg: MineConfig, q, q_labels, q_ids, m=None, m_labels=None, m_ids=None,
                   exclude_same_id: Optional[bool] = None) -> List[Dict]:
    """Per query: dict(neg_ids, neg_scores, neg_ranks, pos_ids, pos_scores,
    easy_pos_id, easy_pos_score, num_candidates). Rows must be finite.

    Same-id rule (MineConfig.exclude_same_id): with ``exclude_same_id`` a bank row whose
    id equals the query's is neither its positive nor its negative; when mining a set
    against itself (``m is None``) the query's own row never is, whatever the ids."""
    self_mode = m is None
    if self_mode:
        m, m_labels, m_ids = q, q_labels, q_ids
    if exclude_same_id is None:
        exclude_same_id = self_mode
    C = closeness_matrix(cfg, q, m)
    ql = np.asarray(q_labels)
    ml = np.asarray(m_labels)
    qid = np.asarray(q_ids)
    mid = np.asarray(m_ids)
    cols = np.arange(len(ml))
    out = []
    for r in range(len(ql)):
        c = C[r]
        excluded = np.zeros(len(ml), dtype=bool)
        if exclude_same_id:
            excluded |= mid == qid[r]
        if self_mode:
            excluded[r] = True
        pos_mask = (ml == ql[r]) & ~excluded
        pcols = cols[pos_mask]
        # hardest positives: least close first, ties by lower row
        hp = pcols[np.lexsort((pcols, c[pcols]))]
        ep = pcols[np.lexsort((pcols, -c[pcols]))]
        if cfg.positive_ref == "easiest":
            cp = c[ep[0]] if len(ep) else None
        else:
            cp = c[hp[0]] if len(hp) else None
        neg = (ml != ql[r]) & ~excluded
        raw = c if cfg.similarity else -c
        if cfg.min_score is not None:
            neg &= raw >= F32(cfg.min_score)
        if cfg.max_score is not None:
            neg &= raw <= F32(cfg.max_score)
        if cfg.needs_positive:
            if cp is None:
                neg &= False
            else:
                if cfg.strategy == "semihard":
                    neg &= (c < cp) & (c >= cp - F32(cfg.margin))
                elif cfg.strategy == "multisimilarity":
                    neg &= c > cp - F32(cfg.epsilon)
                if cfg.margin_pos is not None:
                    neg &= ~(c > cp - F32(cfg.margin_pos))
                if cfg.perc_pos is not None:
                    neg &= ~(c > cp * F32(cfg.perc_pos))
        ncols = cols[neg]
        ranked = ncols[np.lexsort((ncols, -c[ncols]))]
        count = min(len(ranked), cfg.num_candidates)
        lo = cfg.range_min
        hi = cfg.range_max if cfg.range_max is not None else cfg.range_min + cfg.k
        window = np.arange(lo, min(hi, len(ranked)))
        if cfg.sampling == "random" and len(window) > cfg.k:
            keys = sample_keys(cfg.seed, np.array([r]), np.arange(lo, hi))[0][: len(window)]
            window = np.sort(window[np.argsort(keys, kind="stable")[: cfg.k]])
        else:
            window = window[: cfg.k]
        chosen = ranked[window]
        kp = cfg.num_positives
        out.append({
            "neg_ids": mid[chosen].tolist(),
            "neg_scores": raw[chosen].astype(F32).tolist(),
            "neg_ranks": window.tolist(),
            "pos_ids": mid[hp[:kp]].tolist(),
            "pos_scores": (c if cfg.similarity else -c)[hp[:kp]].astype(F32).tolist(),
            "easy_pos_id": int(mid[ep[0]]) if len(ep) else None,
            "easy_pos_score": float((c if cfg.similarity else -c)[ep[0]]) if len(ep) else None,
            "num_candidates": int(count),
        })
    return out
