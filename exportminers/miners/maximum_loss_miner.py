"""MaximumLossMiner: of several random subsets of the batch, the one with the highest loss."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ops
from ..losses import TripletMarginLoss
from ..utils.checks import check_inputs, check_positive_int
from .base_miner import BasePreGradientMiner, KernelMinerMixin


@torch.jit.unused
def _check_loss_value(value) -> None:
    """Eager: the loss function returned one real number (a 1-element tensor or a float)."""
    import numbers
    if isinstance(value, torch.Tensor):
        if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool:
            return
        what = f"a tensor of shape {list(value.shape)} and dtype {value.dtype}"
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return
    else:
        what = type(value).__name__
    raise ValueError(f"loss_function must return one number (a scalar loss) for a subset, "
                     f"got {what}")


class MaximumLossMiner(KernelMinerMixin, BasePreGradientMiner):
    """A pre-gradient miner (older PML API): draws ``num_trials`` random subsets of
    ``output_batch_size`` batch indices (with replacement), computes
    ``loss_function(subset_embeddings, subset_labels, mining_function(...) or None)``
    for each and returns the indices of the subset with the largest loss.

    Args:
        loss_function: any callable loss in eager mode; a scriptable module (e.g.
            :class:`exportminers.losses.TripletMarginLoss`) for TorchScript/ONNX. None
            means ``TripletMarginLoss()``.
        mining_function: optional post-gradient miner applied to each subset.
        num_trials: number of subsets tried.
        output_batch_size: subset size.
        normalize_embeddings: L2-normalise embeddings first (the older API's default).

    Kernel: subsets come from uniform noise ``[num_trials, output_batch_size]``;
    outputs ``[valid Tensor[B] bool, indices Tensor[B]]``.
    """

    num_trials: int
    normalize: bool

    def __init__(self, loss_function=None, mining_function=None, num_trials: int = 5,
                 output_batch_size: int = 32, normalize_embeddings: Optional[bool] = None,
                 **kwargs):
        super().__init__(output_batch_size=output_batch_size, **kwargs)
        if loss_function is None:
            loss_function = TripletMarginLoss()
        if isinstance(loss_function, type) or isinstance(mining_function, type):
            which = "loss_function" if isinstance(loss_function, type) else "mining_function"
            raise ValueError(f"{which} must be an instance, got the class "
                             f"{(loss_function if which == 'loss_function' else mining_function).__name__}"
                             f" (add parentheses)")
        if not callable(loss_function):
            raise ValueError(f"loss_function must be callable, got {loss_function!r}")
        if mining_function is not None and not callable(mining_function):
            raise ValueError(f"mining_function must be callable or None, got {mining_function!r}")
        self.loss_function = loss_function
        self.mining_function = mining_function
        self.num_trials = check_positive_int(num_trials, "num_trials")
        self.normalize = True if normalize_embeddings is None else bool(normalize_embeddings)
        self.layout = [[0, 1]]

    def noise_shape(self, n: int, m: int) -> List[int]:
        return [self.num_trials, self.output_batch_size]

    def _subset_loss(self, emb: Tensor, labels: Tensor) -> Tensor:
        if self.mining_function is None:
            return self.loss_function(emb, labels, None)
        mined = self.mining_function(emb, labels)
        indices: List[Tensor] = []
        for t in mined:
            indices.append(t)
        return self.loss_function(emb, labels, indices)

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor]) -> List[Tensor]:
        if noise is None:
            raise ValueError("MaximumLossMiner.kernel needs noise of shape [num_trials, output_batch_size]")
        # the batch size as a tensor, so an exported graph keeps N dynamic
        n = _ops.ones_int_like(labels).sum()
        subsets = torch.floor(noise * n.to(torch.float64)).to(torch.int64)
        subsets = torch.minimum(subsets, n - 1)
        losses: List[Tensor] = []
        for i in range(self.num_trials):
            idx = subsets[i]
            emb = embeddings[idx]
            if self.normalize:   # row-wise, so only the sampled rows need it
                emb = _ops.normalize(emb, 2.0)
            value = self._subset_loss(emb, labels[idx])
            if not torch.jit.is_scripting():
                _check_loss_value(value)
            losses.append(torch.as_tensor(value).reshape(()))
        best = torch.argmax(torch.stack(losses).to(torch.float64)).reshape(1)
        chosen = torch.index_select(subsets, 0, best).reshape(-1)
        return [chosen >= 0, chosen]

    def forward(self, embeddings: Optional[Tensor], labels: Optional[Tensor],
                ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tensor:
        """Indices (Tensor[output_batch_size] int64) of the highest-loss subset."""
        self.reset_stats()
        if ref_emb is not None or ref_labels is not None:
            raise ValueError("MaximumLossMiner does not take ref_emb / ref_labels")
        embeddings, labels, _r, _rl = check_inputs(embeddings, labels, None, None, self.check_finite)
        with torch.no_grad():
            out = self.mine(embeddings, labels, None, None)
        return out[0]

    @torch.jit.unused
    def export_problem(self) -> Optional[str]:
        """Why :func:`exportminers.export_onnx` cannot export this miner (None if it can)."""
        if self.mining_function is not None:
            return ("MaximumLossMiner with a mining_function cannot be exported to ONNX: the "
                    "tuples it passes to the loss have a data-dependent size. Export it "
                    "without mining_function, or save it with export_torchscript")
        return None

    @torch.jit.unused
    def export_hint(self) -> Optional[str]:
        """Likely cause of a failed ONNX export."""
        from ..losses import TripletMarginLoss as OurTripletMarginLoss
        if not isinstance(self.loss_function, OurTripletMarginLoss):
            cls = type(self.loss_function)
            return (f"loss_function {cls.__module__}.{cls.__qualname__} must compute with "
                    f"fixed shapes to export, as exportminers.losses.TripletMarginLoss does; "
                    f"losses that index with masks (PML's) do not")
        return None

    def extra_repr(self) -> str:
        return f"num_trials={self.num_trials}, output_batch_size={self.output_batch_size}"
