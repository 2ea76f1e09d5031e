"""EmbeddingsAlreadyPackagedAsTriplets: the batch is (a, p, n, a, p, n, ...)."""
from typing import List, Optional

import torch
from torch import Tensor

from .. import _ops
from ..decode import decode
from .base_miner import TripletKernelMiner


def packaged_triplets(embeddings: Tensor) -> List[Tensor]:
    """Fixed-shape kernel: ``[keep Tensor[N] bool, p Tensor[N], n Tensor[N]]`` where row i
    starts a triplet when ``i % 3 == 0``."""
    i = _ops.index_like(embeddings, 0)
    return [(i % 3) == 0, i + 1, i + 2]


class EmbeddingsAlreadyPackagedAsTriplets(TripletKernelMiner):
    """Use triplets already laid out in the batch as consecutive (anchor, positive, negative)
    rows. The batch size must be a multiple of 3; labels are not used."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.layout = [[0, -1, 1, 2]]

    def kernel(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
               ref_labels: Optional[Tensor], noise: Optional[Tensor]) -> List[Tensor]:
        return packaged_triplets(embeddings)

    def mine(self, embeddings: Tensor, labels: Tensor, ref_emb: Optional[Tensor],
             ref_labels: Optional[Tensor]) -> List[Tensor]:
        # as in PML, a reference set is ignored: the triplets index ``embeddings``
        if embeddings.size(0) % 3 != 0:
            raise ValueError(
                f"embeddings must hold whole triplets (a multiple of 3 rows), got "
                f"{embeddings.size(0)} rows")
        return decode(self.kernel(embeddings, labels, None, None, None), self.layout)
