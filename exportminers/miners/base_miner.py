"""Miner base classes.

``BaseMiner`` is PML's extension point: subclass it, implement
``mine(embeddings, labels, ref_emb, ref_labels)`` and return a tuple of index tensors.
It runs eagerly, exactly like PML's.

The built-in miners derive from the kernel bases below instead. Each supplies

* ``kernel(embeddings, labels, ref_emb, ref_labels, noise) -> List[Tensor]``: the
  fixed-shape mining step (no ``nonzero``, boolean indexing, ``.item()`` or
  data-dependent control flow); ``ref_emb``/``ref_labels`` are None for self-mining.
  Kernels whose anchor rows are independent (``registry``: ``row_independent``) also
  take ``anchor_ids`` (anchor ``i`` is reference row ``anchor_ids[i]``, whose pair is
  then no positive): a block of a batch mined against the whole batch, exactly as
  self-mining (``export_onnx(..., anchor_blocks=True)``);
* ``layout``: how :func:`exportminers.decode.decode` reads the kernel outputs;
* ``noise_shape(n, m)``: the uniform noise a random miner consumes (empty otherwise).

``forward`` validates, runs the kernel and decodes; it is scriptable. The same kernel is
what :func:`exportminers.export_onnx` exports and the same layout is what
:class:`exportminers.OnnxMiner` decodes.
"""
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..decode import cat_release, decode
from ..distances import BaseDistance, DotProductSimilarity, LpDistance
from ..utils import loss_and_miner_utils as lmu
from ..utils.checks import check_inputs, check_positive_int


def resolve_distance(distance, default: BaseDistance, normalize_embeddings: Optional[bool],
                     use_similarity: bool, squared_distances: bool) -> BaseDistance:
    """Turn PML 2.x ``distance=`` or the older arguments into one distance object.

    Older API: ``use_similarity`` -> dot product of (optionally normalised) embeddings;
    ``squared_distances`` -> squared L2; ``normalize_embeddings`` applies to either.
    """
    for flag, value in (("use_similarity", use_similarity),
                        ("squared_distances", squared_distances)):
        if not isinstance(value, bool):
            raise ValueError(f"{flag} must be True or False, got {value!r}")
    if normalize_embeddings is not None and not isinstance(normalize_embeddings, bool):
        raise ValueError(f"normalize_embeddings must be True, False or None, got "
                         f"{normalize_embeddings!r}")
    legacy = normalize_embeddings is not None or use_similarity or squared_distances
    if distance is not None:
        if legacy:
            raise ValueError(
                "pass either distance= or the older normalize_embeddings / use_similarity / "
                "squared_distances arguments, not both"
            )
        if not isinstance(distance, BaseDistance):
            raise ValueError(
                f"distance must be an exportminers.distances.BaseDistance, got "
                f"{type(distance).__name__}"
            )
        return distance
    if use_similarity and squared_distances:
        raise ValueError("use_similarity and squared_distances cannot both be True")
    norm = True if normalize_embeddings is None else bool(normalize_embeddings)
    if use_similarity:
        return DotProductSimilarity(normalize_embeddings=norm)
    if squared_distances:
        return LpDistance(normalize_embeddings=norm, p=2, power=2)
    if normalize_embeddings is None:
        return default
    if default.is_inverted:
        return DotProductSimilarity(normalize_embeddings=norm, p=default.p, power=default.power)
    return type(default)(normalize_embeddings=norm, p=default.p, power=default.power)


# function behind a bound ``mine`` -> _takes_two's answer (weak: classes made on the fly
# do not accumulate)
_TAKES_TWO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _takes_two(method) -> bool:
    """Whether a custom ``mine`` has the older two-argument form ``mine(embeddings, labels)``.

    Bound methods are answered once per function (``inspect.signature`` costs about 11 us,
    a large share of a small miner call); other callables are inspected each time."""
    func = getattr(method, "__func__", None)
    if func is not None:
        try:
            cached = _TAKES_TWO.get(func)
        except TypeError:   # not hashable or not weakly referenceable: inspect each call
            func, cached = None, None
        if cached is not None:
            return cached
    import inspect
    try:
        params = list(inspect.signature(method).parameters.values())
    except (TypeError, ValueError):
        answer = False
    else:
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        answer = len(positional) == 2 and not any(p.kind == p.VAR_POSITIONAL for p in params)
    if func is not None:
        try:
            _TAKES_TWO[func] = answer
        except TypeError:
            pass
    return answer


class BaseMiner(torch.nn.Module):
    """Base of every miner.

    Args:
        distance: a :mod:`exportminers.distances` object (default: L2 on normalised
            embeddings, or the miner's own default).
        normalize_embeddings, use_similarity, squared_distances: the older API's way to
            choose the distance (see :func:`resolve_distance`).
        collect_stats: record PML's per-call statistics (e.g. ``pos_pair_dist``) as
            attributes after each call and list their names in ``_record_these_stats``
            (eager and TorchScript; costs an extra pass over the batch).
        check_finite: reject NaN/inf embeddings with a ValueError (one pass over the
            input; turn off to skip it).
    """

    num_pos_pairs: int
    num_neg_pairs: int
    num_triplets: int
    normalize_input: bool
    check_finite: bool
    collect_stats: bool
    _record_these: List[str]
    _record_these_stats: List[str]

    def __init__(self, distance: Optional[BaseDistance] = None,
                 normalize_embeddings: Optional[bool] = None, use_similarity: bool = False,
                 squared_distances: bool = False, collect_stats: bool = False,
                 check_finite: bool = True):
        super().__init__()
        self.distance = resolve_distance(distance, self.get_default_distance(),
                                         normalize_embeddings, use_similarity,
                                         squared_distances)
        self.collect_stats = bool(collect_stats)
        self.check_finite = bool(check_finite)
        # older API: BaseMiner(normalize_embeddings=True) normalised the embeddings a
        # custom mine() receives (built-in miners leave it to their distance)
        self.normalize_input = normalize_embeddings is True
        self.num_pos_pairs = 0
        self.num_neg_pairs = 0
        self.num_triplets = 0
        self._record_these = []
        self._record_these_stats = []
        self.add_to_recordable_attributes(
            list_of_names=["num_pos_pairs", "num_neg_pairs", "num_triplets"], is_stat=True)

    def get_default_distance(self) -> BaseDistance:
        return LpDistance(p=2)

    @torch.jit.unused
    def add_to_recordable_attributes(self, name: Optional[str] = None,
                                     list_of_names: Optional[List[str]] = None,
                                     is_stat: bool = False) -> None:
        """PML's registry of what a record keeper logs: names go to ``_record_these``
        (settings) or, only with ``collect_stats``, ``_record_these_stats``; an attribute
        that does not exist yet starts at 0."""
        if is_stat and not self.collect_stats:
            return
        names = ([] if name is None else [name]) + list(list_of_names or [])
        target = self._record_these_stats if is_stat else self._record_these
        for n in names:
            if n not in target:
                target.append(n)
            if not hasattr(self, n):
                setattr(self, n, 0)

    def reset_stats(self) -> None:
        self.num_pos_pairs = 0
        self.num_neg_pairs = 0
        self.num_triplets = 0
        self.reset_miner_stats()

    def reset_miner_stats(self) -> None:
        """Reset the statistics a built-in miner records (see :meth:`record_stats`)."""
        pass

    def record_stats(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                     ref_labels: Optional[Tensor], out: List[Tensor]) -> None:
        """With ``collect_stats``: set PML's statistics from a call's inputs and decoded
        outputs (never exported; built-in miners with statistics override it)."""
        pass

    def mine(self, embeddings, labels, ref_emb, ref_labels):
        raise NotImplementedError

    def output_assertion(self, output) -> None:
        if len(output) == 3:
            self.num_triplets = len(output[0])
            if not self.num_triplets == len(output[1]) == len(output[2]):
                raise ValueError("mine() returned triplet index tensors of different lengths")
        elif len(output) == 4:
            self.num_pos_pairs = len(output[0])
            self.num_neg_pairs = len(output[2])
            if self.num_pos_pairs != len(output[1]) or self.num_neg_pairs != len(output[3]):
                raise ValueError("mine() returned pair index tensors of different lengths")
        else:
            raise ValueError(
                f"mine() must return 3 (a, p, n) or 4 (a1, p, a2, n) tensors, got {len(output)}"
            )

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        """Eager path for custom miners: validate, then ``mine`` with ref set to the batch."""
        self.reset_stats()
        for n in self._record_these_stats:   # a custom miner's own statistics too, as PML
            setattr(self, n, 0)
        embeddings, labels, ref_emb, ref_labels = check_inputs(
            embeddings, labels, ref_emb, ref_labels, self.check_finite)
        if self.normalize_input:   # older API: mine() sees normalised embeddings
            embeddings = torch.nn.functional.normalize(embeddings, p=2, dim=1)
            if ref_emb is not None:
                ref_emb = torch.nn.functional.normalize(ref_emb, p=2, dim=1)
        if ref_emb is None:
            ref_emb = embeddings
        if ref_labels is None:   # the very labels object: lmu drops self-pairs, as in PML
            ref_labels = labels
        two = _takes_two(self.mine)   # older API: mine(embeddings, labels)
        if two and not (ref_emb is embeddings and ref_labels is labels):
            raise ValueError(
                f"{type(self).__name__}.mine(embeddings, labels) takes no reference set: "
                "ref_emb / ref_labels cannot be used with it (give mine() the four "
                "arguments embeddings, labels, ref_emb, ref_labels)")
        with torch.no_grad():
            if two:
                output = self.mine(embeddings, labels)
            else:
                output = self.mine(embeddings, labels, ref_emb, ref_labels)
        self.output_assertion(output)
        return output


class BasePostGradientMiner(BaseMiner):
    """Older API name: a miner returning pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``."""


class BasePreGradientMiner(BaseMiner):
    """Older API: a miner returning ``output_batch_size`` indices of the batch."""

    output_batch_size: int

    def __init__(self, output_batch_size: int, **kwargs):
        super().__init__(**kwargs)
        self.output_batch_size = check_positive_int(output_batch_size, "output_batch_size")

    def output_assertion(self, output) -> None:
        if len(output) != self.output_batch_size:
            raise ValueError(
                f"mine() returned {len(output)} indices, expected output_batch_size="
                f"{self.output_batch_size}")


def _empty_long(like: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.int64, device=like.device)


class KernelMinerMixin:
    """Pieces shared by the built-in (kernel + layout) miners."""

    layout: List[List[int]]

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor]) -> List[Tensor]:
        raise NotImplementedError

    def noise_shape(self, n: int, m: int) -> List[int]:
        """Shape of the uniform [0, 1) noise the kernel consumes ([] for none)."""
        return []

    def make_noise(self, embeddings: Tensor, n: int, m: int) -> Optional[Tensor]:
        shape = self.noise_shape(n, m)
        if len(shape) == 0:
            return None
        return torch.rand(shape, device=embeddings.device, dtype=torch.float64)

    def empty_outputs(self, like: Tensor) -> List[Tensor]:
        """One empty int64 tensor per decoded output (the layout's field count)."""
        out: List[Tensor] = []
        for part in self.layout:
            for _ in range(len(part) - 1):
                out.append(_empty_long(like))
        return out

    def mine(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
             ref_labels: Optional[Tensor]) -> List[Tensor]:
        """Kernel, then the shared decode; an empty batch or reference set gives empties."""
        n = embeddings.size(0)
        m = n if ref_emb is None else ref_emb.size(0)
        if n == 0 or m == 0:
            return self.empty_outputs(embeddings)
        noise = self.make_noise(embeddings, n, m)
        return decode(self.kernel(embeddings, labels, ref_emb, ref_labels, noise), self.layout)


class TripletKernelMiner(KernelMinerMixin, BasePostGradientMiner):
    """Base of the built-in miners returning ``(a, p, n)``."""

    def forward(self, embeddings: Optional[Tensor], labels: Optional[Tensor],
                ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Mine ``(a, p, n)``: anchors index ``embeddings``, p/n index ``ref_emb`` (or the batch)."""
        self.reset_stats()
        embeddings, labels, ref_emb, ref_labels = check_inputs(
            embeddings, labels, ref_emb, ref_labels, self.check_finite)
        with torch.no_grad():
            out = self.mine(embeddings, labels, ref_emb, ref_labels)
            if self.collect_stats:
                self.record_stats(embeddings, labels, ref_emb, ref_labels, out)
        self.num_triplets = out[0].numel()
        return out[0], out[1], out[2]


class DenseTripletKernelMiner(TripletKernelMiner):
    """Base of the dense triplet miners (N x M x M candidates): a precomputation shared by
    all anchors plus a kernel over any block of anchor rows.

    ``block_state(...)`` returns ``(rows, shared)``: tensors whose first axis is the
    anchor (sliced per block) and tensors used whole. ``kernel`` runs ``block_kernel`` on
    every row (that is what gets exported); ``forward`` runs it on anchor blocks and
    decodes each, so in eager and TorchScript the N x M x M mask never exists whole
    (blocks hold at most 2^26 mask elements). Random kernels draw noise per block.
    """

    def block_state(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                    ref_labels: Optional[Tensor],
                    anchor_ids: Optional[Tensor] = None) -> Tuple[List[Tensor], List[Tensor]]:
        raise NotImplementedError

    def block_kernel(self, rows: List[Tensor], shared: List[Tensor],
                     noise: Optional[Tensor]) -> List[Tensor]:
        raise NotImplementedError

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor],
               anchor_ids: Optional[Tensor] = None) -> List[Tensor]:
        rows, shared = self.block_state(embeddings, labels, ref_emb, ref_labels, anchor_ids)
        return self.block_kernel(rows, shared, noise)

    def mine(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
             ref_labels: Optional[Tensor]) -> List[Tensor]:
        n = embeddings.size(0)
        m = n if ref_emb is None else ref_emb.size(0)
        if n == 0 or m == 0:
            return self.empty_outputs(embeddings)
        rows, shared = self.block_state(embeddings, labels, ref_emb, ref_labels)
        pos = self.positive_mask(rows)
        if pos is None:
            return self.mine_in_blocks(embeddings, rows, shared, m)
        return self.mine_over_positives(embeddings, rows, shared, pos)

    def positive_mask(self, rows: List[Tensor]) -> Optional[Tensor]:
        """The Tensor[N, M] positive mask when :meth:`positive_block` applies, else None."""
        return None

    def positive_block(self, rows: List[Tensor], shared: List[Tensor], cols: Tensor,
                       valid: Tensor, start: int, stop: int) -> Tensor:
        """Selected triplets of anchors ``start:stop`` over their positive candidates
        ``cols`` [b, P] (``valid`` [b, P]) and every negative: Tensor[b, P, M] bool."""
        raise NotImplementedError

    def positive_budget(self) -> int:
        """Most candidates (anchors x P x M) per block in :meth:`mine_over_positives`."""
        return 67108864

    def gathers_positives(self) -> bool:
        """:meth:`gather_kernel` applies (``export_onnx(..., gather_positives=True)``):
        the miner tests (anchor, positive) pairs by :meth:`positive_block`."""
        return False

    def gather_dtypes(self) -> List[torch.dtype]:
        """Embedding dtypes whose listed-positive graphs compute exactly what the dense
        graph computes."""
        return [torch.float32, torch.float16]

    def gathered_block(self, rows: List[Tensor], shared: List[Tensor], cols: Tensor,
                       valid: Tensor) -> Tensor:
        """:meth:`positive_block` over every anchor row (what :meth:`gather_kernel`
        exports); miners whose exported arithmetic differs override it."""
        return self.positive_block(rows, shared, cols, valid, 0, rows[0].size(0))

    def gather_kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
                      ref_labels: Optional[Tensor], positive_index: Tensor,
                      anchor_ids: Optional[Tensor] = None) -> List[Tensor]:
        """The fixed-shape kernel over listed positives: [N, P, M] candidates.

        ``positive_index`` Tensor[N, P] lists each anchor's positive columns
        (:func:`exportminers.runtime.positives.positive_index`); it is checked against
        the labels (:func:`lmu.listed_positives`). Returns ``[mask Tensor[N, P, M] bool,
        cols Tensor[N, P, 1] int64, unmatched Tensor[N] int64]``, decoded with the
        layout ``[[0, -1, 1, -3]]`` (the same tuples, in the same order, as the dense
        kernel) once ``unmatched`` is checked to be zero.
        """
        rows, shared = self.block_state(embeddings, labels, ref_emb, ref_labels, anchor_ids)
        pos = self.positive_mask(rows)
        if pos is None:
            raise RuntimeError(f"{type(self).__name__}: this configuration does not mine "
                               f"over listed positives (gathers_positives() is False)")
        cols, valid, unmatched = lmu.listed_positives(pos, positive_index)
        return [self.gathered_block(rows, shared, cols, valid), cols.unsqueeze(2), unmatched]

    def mine_over_positives(self, embeddings: Tensor, rows: List[Tensor],
                            shared: List[Tensor], pos: Tensor) -> List[Tensor]:
        """Eager/TorchScript mining over [N, P, M] candidates instead of [N, M, M]: each
        anchor's positive columns are gathered first (P = the most positives of any
        anchor, :func:`lmu.positive_columns`), the miner's :meth:`positive_block` tests
        them against every negative with the kernel's own arithmetic, and each anchor
        block is decoded in row-major (a, p, n) order, as the dense kernel would be. (The
        exported kernel stays dense: P depends on the data.)"""
        cols, valid = lmu.positive_columns(pos)
        n, p, m = pos.size(0), cols.size(1), pos.size(1)
        if p == 0:
            return self.empty_outputs(embeddings)
        per = max(1, self.positive_budget() // max(1, p * m))
        a: List[Tensor] = []
        pp: List[Tensor] = []
        nn: List[Tensor] = []
        for s in range(0, n, per):
            e = min(n, s + per)
            cb = cols[s:e]
            mask = self.positive_block(rows, shared, cb, valid[s:e], s, e)
            out = decode([mask, cb.unsqueeze(2)], [[0, -1, 1, -3]])
            a.append(out[0] + s)   # anchors are block-row coordinates
            pp.append(out[1])
            nn.append(out[2])
        return [cat_release(a), cat_release(pp), cat_release(nn)]

    def mine_in_blocks(self, embeddings: Tensor, rows: List[Tensor], shared: List[Tensor],
                       m: int) -> List[Tensor]:
        """Run ``block_kernel`` and decode over blocks of anchor rows."""
        n = rows[0].size(0)
        per = max(1, 67108864 // max(1, m * m))
        a: List[Tensor] = []
        p: List[Tensor] = []
        neg: List[Tensor] = []
        for s in range(0, n, per):
            e = min(n, s + per)
            block = [t[s:e] for t in rows]
            noise = self.make_noise(embeddings, e - s, m)
            out = decode(self.block_kernel(block, shared, noise), self.layout)
            a.append(out[0] + s)   # anchors are block-row coordinates
            p.append(out[1])
            neg.append(out[2])
        return [cat_release(a), cat_release(p), cat_release(neg)]


class PairKernelMiner(KernelMinerMixin, BasePostGradientMiner):
    """Base of the built-in miners returning ``(a1, p, a2, n)``."""

    def forward(self, embeddings: Optional[Tensor], labels: Optional[Tensor],
                ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Mine ``(a1, p, a2, n)``: anchors index ``embeddings``, p/n index ``ref_emb``."""
        self.reset_stats()
        embeddings, labels, ref_emb, ref_labels = check_inputs(
            embeddings, labels, ref_emb, ref_labels, self.check_finite)
        with torch.no_grad():
            out = self.mine(embeddings, labels, ref_emb, ref_labels)
            if self.collect_stats:
                self.record_stats(embeddings, labels, ref_emb, ref_labels, out)
        self.num_pos_pairs = out[0].numel()
        self.num_neg_pairs = out[2].numel()
        return out[0], out[1], out[2], out[3]
