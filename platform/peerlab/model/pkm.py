"""A product-key memory layer (Lample et al. 2019, "Large Memory Layers with Product Keys").

For an input x, with H heads that each have their own query network and sub-keys and share the
values (Sec. 3.1-3.3, Eq. 1-3):

    q_h = BN(W_h x),  split into two halves q_h = [q_h1, q_h2]             (query; BatchNorm as in Sec. 3.3)
    I_h = top-k of (q_h1 . c_hi + q_h2 . c'_hj) over head h's n1 x n2 product keys  (Eq. 1-2)
    w   = softmax over I_h of those scores                                   (Eq. 2)
    m(x) = sum_h sum_{i in I_h} w_i v_i                                      (Eq. 3, summed over heads, Sec. 3.3)

The search is PEER's (`ProductKeys.retrieve` in model/peer.py); unlike PEER, a memory slot
is a value row v_i (N, d) alone: no per-slot activation, no down projection. The weighted
sum is one `F.embedding_bag` over the H*k retrieved rows of each token, so no
(tokens, H*k, d) tensor is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peerlab.config import PKMConfig
from peerlab.model.peer import ProductKeys


class PKM(ProductKeys):
    """`PKM(pkm_config, hidden_size)(x)` with x (..., hidden_size)."""

    def __init__(self, config: PKMConfig, hidden_size: int, initializer_range: float = 0.02):
        super().__init__(config, hidden_size, per_head_keys=True)  # Lample et al. 2019, Sec. 3.3: keys per head
        self.values = nn.Parameter(torch.empty(self.num_experts, hidden_size))  # v_i: (N, d)
        self.reset_parameters(initializer_range)

    def reset_parameters(self, initializer_range: float = 0.02) -> None:
        nn.init.normal_(self.query.weight, std=initializer_range)
        nn.init.normal_(self.values, std=initializer_range)
        self.reset_keys()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d)  # (M, d)
        scores, indices = self.retrieve(flat)  # (M, H, k) each
        weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))  # (M, H, k)
        with torch.autocast(x.device.type, enabled=False):  # the table's dtype: no copy of the values
            y = F.embedding_bag(
                indices.flatten(1), self.values, mode="sum", per_sample_weights=weights.flatten(1).to(self.values.dtype)
            )  # (M, d): sum over the H*k rows of each token
        return y.to(x.dtype).view(*lead, d)
