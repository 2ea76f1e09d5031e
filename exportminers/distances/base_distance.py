"""Distance base class: PML's constructor arguments and semantics, scriptable."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ops
from ..utils.checks import check_number, require_tensors


NORM_STATS = ["initial_avg_query_norm", "initial_avg_ref_norm", "final_avg_query_norm",
              "final_avg_ref_norm"]


class BaseDistance(torch.nn.Module):
    """Pairwise distance (or similarity) matrix between two sets of embeddings.

    Args:
        normalize_embeddings: L_p-normalise both inputs (with ``p``) before comparing.
        p: the norm's order.
        power: the matrix is raised to this power.
        is_inverted: True for similarities (larger means closer).

    ``distance(query, ref=None)`` returns Tensor[N, M] (``M = N`` when ``ref`` is None).
    """

    normalize_embeddings: bool
    p: float
    power: float
    is_inverted: bool
    collect_stats: bool
    initial_avg_query_norm: float
    initial_avg_ref_norm: float
    final_avg_query_norm: float
    final_avg_ref_norm: float
    _record_these: List[str]
    _record_these_stats: List[str]

    def __init__(self, normalize_embeddings: bool = True, p: float = 2, power: float = 1,
                 is_inverted: bool = False, collect_stats: bool = False):
        super().__init__()
        if not isinstance(normalize_embeddings, bool):
            raise ValueError(f"normalize_embeddings must be a bool, got {normalize_embeddings!r}")
        self.normalize_embeddings = normalize_embeddings
        self.p = check_number(p, "p", low=0.0)
        self.power = check_number(power, "power")
        self.is_inverted = bool(is_inverted)
        self.collect_stats = bool(collect_stats)
        # PML's record-keeper lists; with collect_stats, each call records the mean norm
        # of the inputs before and after normalisation (eager and TorchScript)
        self._record_these = ["p", "power"]
        self._record_these_stats = list(NORM_STATS) if self.collect_stats else []
        self.reset_stats()

    def reset_stats(self) -> None:
        self.initial_avg_query_norm = 0.0
        self.initial_avg_ref_norm = 0.0
        self.final_avg_query_norm = 0.0
        self.final_avg_ref_norm = 0.0

    def record_norms(self, query_emb: Tensor, ref_emb: Optional[Tensor], q: Tensor,
                     r: Optional[Tensor]) -> None:
        """PML's distance statistics: mean ``get_norm`` of the inputs and of what the
        matrix is computed from (``ref`` is the query when not given)."""
        with torch.no_grad():
            self.initial_avg_query_norm = float(self.get_norm(query_emb).mean())
            self.final_avg_query_norm = float(self.get_norm(q).mean())
            self.initial_avg_ref_norm = self.initial_avg_query_norm if ref_emb is None \
                else float(self.get_norm(ref_emb).mean())
            self.final_avg_ref_norm = self.final_avg_query_norm if r is None \
                else float(self.get_norm(r).mean())

    def forward(self, query_emb: Tensor, ref_emb: Optional[Tensor] = None) -> Tensor:
        if not torch.jit.is_scripting():
            require_tensors([("query_emb", query_emb, False), ("ref_emb", ref_emb, True)])
        if query_emb.dim() != 2:
            raise ValueError(f"query_emb must be a 2D tensor of shape (batch_size, "
                             f"embedding_size), got shape {list(query_emb.shape)}")
        if ref_emb is not None:
            if ref_emb.dim() != 2:
                raise ValueError(f"ref_emb must be a 2D tensor of shape (batch_size, "
                                 f"embedding_size), got shape {list(ref_emb.shape)}")
            if ref_emb.size(1) != query_emb.size(1):
                raise ValueError(f"ref_emb has embedding size {ref_emb.size(1)} but query_emb "
                                 f"has {query_emb.size(1)}; they must match")
        # a float16 graph computes in float32 and rounds once at the end: ONNX Runtime's
        # CPU EP runs chains of float16 ops in float32 without rounding between them, so
        # rounding each step (normalisation included) would differ from torch's
        half = query_emb.dtype == torch.float16 and _ops.is_exporting()
        if half:
            query_emb = query_emb.float()
            if ref_emb is not None:
                ref_emb = ref_emb.float()
        q = self._half_graph_normalize(query_emb) if half else self.maybe_normalize(query_emb)
        r: Optional[Tensor] = None
        if ref_emb is None:
            mat = self.compute_mat(q, q, True)
        else:
            r = self._half_graph_normalize(ref_emb) if half else self.maybe_normalize(ref_emb)
            mat = self.compute_mat(q, r, False)
        if self.collect_stats and not _ops.is_exporting():
            self.reset_stats()
            self.record_norms(query_emb, ref_emb, q, r)
        if self.power != 1:
            mat = mat ** self.power
        return mat.half() if half else mat

    def compute_mat(self, query_emb: Tensor, ref_emb: Tensor, is_self: bool) -> Tensor:
        raise NotImplementedError

    def pairwise_distance(self, query_emb: Tensor, ref_emb: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.jit.unused
    def smallest_dist(self, *args, **kwargs):
        """``torch.min`` (``torch.max`` for similarities) with any of its signatures, as
        PML's: the closest value(s)."""
        return torch.max(*args, **kwargs) if self.is_inverted else torch.min(*args, **kwargs)

    @torch.jit.unused
    def largest_dist(self, *args, **kwargs):
        """``torch.max`` (``torch.min`` for similarities), as PML's: the farthest."""
        return torch.min(*args, **kwargs) if self.is_inverted else torch.max(*args, **kwargs)

    def margin(self, x: Tensor, y: Tensor) -> Tensor:
        """How far ``x`` is beyond ``y`` in the "farther" direction."""
        return y - x if self.is_inverted else x - y

    def normalize(self, embeddings: Tensor, dim: int = 1) -> Tensor:
        if dim == 1:
            return _ops.normalize(embeddings, self.p)
        return F.normalize(embeddings, p=self.p, dim=dim)

    def maybe_normalize(self, embeddings: Tensor, dim: int = 1) -> Tensor:
        if self.normalize_embeddings:
            return self.normalize(embeddings, dim=dim)
        return embeddings

    @torch.jit.unused
    def _half_graph_normalize(self, embeddings: Tensor) -> Tensor:
        """A float16 graph's normalisation, in float32: F.normalize's eps of 1e-12 is 0 in
        float16, so a zero row gives NaN, as PML's. A subclass's own normalisation is used
        as it is. (Export only: never compiled into TorchScript.)"""
        own = type(self).normalize is not BaseDistance.normalize or \
            type(self).maybe_normalize is not BaseDistance.maybe_normalize
        if own:
            return self.maybe_normalize(embeddings)
        if self.normalize_embeddings:
            return _ops.normalize(embeddings, self.p, 0.0)
        return embeddings

    def get_norm(self, embeddings: Tensor, dim: int = 1) -> Tensor:
        return torch.linalg.vector_norm(embeddings, ord=self.p, dim=dim)

    def extra_repr(self) -> str:
        return (f"normalize_embeddings={self.normalize_embeddings}, p={self.p:g}, "
                f"power={self.power:g}, is_inverted={self.is_inverted}")
