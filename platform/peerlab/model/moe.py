"""A token-choice mixture-of-experts feed-forward layer (DeepSeekMoE, Dai et al. 2024).

For an input u_t (Sec. 3, Eq. 3-5 with the shared experts of Eq. 9):

    s_{i,t} = softmax_i(u_t . e_i)                                   (router scores over the N routed experts)
    g_{i,t} = s_{i,t} if s_{i,t} is among the top_k of token t, else 0   (no renormalisation)
    h_t     = sum_{i shared} FFN_i(u_t) + sum_{i routed} g_{i,t} FFN_i(u_t)

Each expert is a GELU MLP of width `expert_size`, like the model's dense MLP. The shared
experts run on every token with weight 1, so they are one MLP of width
num_shared_experts * expert_size. Routing is capacity-free: every token reaches its top_k
experts, none is dropped. The (token, expert) assignments are sorted by expert, so each
expert's tokens are one contiguous slice, multiplied by that expert's slice of the stacked
weights (E, d, h) and (E, h, d).

Expert-level balance loss (Eq. 12-14; Switch Transformer's loss for top_k = 1), over the T
tokens of the forward:

    f_i = N / (K T) * sum_t 1[token t chose expert i]     P_i = 1/T * sum_t s_{i,t}
    L_bal = alpha * sum_i f_i P_i                         (alpha = balance_loss_weight)

In training mode the layer keeps `last_balance_loss` (with its gradient, which flows
through P) and `last_load` (the share of the T*K assignments each expert got, (N,), summing
to 1); the model adds the layers' balance losses to the language-model loss.

Expert usage (peerlab.train.usage.track_moe, called by the training loop when
peer_config.log_expert_usage is on): `usage` (E,) counts each expert's token assignments over
the training forwards since the last read, and `usage_by_source` (S, E) the same by the data
source of each token (`sources`, one id per sequence of the batch), as the PEER layer does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peerlab.config import MoEConfig
from peerlab.model.peer import CountsUsage


class MoE(CountsUsage):
    """`MoE(moe_config, hidden_size)(x)` with x (..., hidden_size)."""

    def __init__(self, config: MoEConfig, hidden_size: int, initializer_range: float = 0.02):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.balance_loss_weight = config.balance_loss_weight
        d, h, E = hidden_size, config.expert_size, config.num_experts
        self.router = nn.Linear(d, E, bias=False)  # e_i: one row per routed expert
        self.expert_in = nn.Parameter(torch.empty(E, d, h))  # (E, d, h)
        self.expert_out = nn.Parameter(torch.empty(E, h, d))  # (E, h, d)
        shared = config.num_shared_experts * h
        self.shared_in = nn.Linear(d, shared, bias=False) if shared else None
        self.shared_out = nn.Linear(shared, d, bias=False) if shared else None
        self.last_load: torch.Tensor | None = None  # (E,) share of assignments per expert, last training forward
        self.last_balance_loss: torch.Tensor | None = None  # alpha * sum_i f_i P_i of the last training forward
        self.usage: torch.Tensor | None = None  # (E,) float32 assignments per expert since the last read, if tracked
        self.usage_by_source: torch.Tensor | None = None  # (S, E) the same by data source
        self.sources: torch.Tensor | None = None  # (B,) data source of each sequence of the next training batch
        self.reset_parameters(initializer_range)

    def reset_parameters(self, initializer_range: float = 0.02) -> None:
        for weight in self.parameters():
            nn.init.normal_(weight, std=initializer_range)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (T, d) -> (probs (T, E) float32 at least, gate (T, K), expert (T, K)): scores, top_k weights and ids."""
        logits = self.router(x)  # (T, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # (T, E)
        gate, expert = probs.topk(self.top_k, dim=-1)  # (T, K) each
        return probs, gate, expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d)  # (T, d)
        T, K = flat.shape[0], self.top_k
        probs, gate, expert = self.route(flat)
        # Group the T*K assignments by expert: after a stable sort, expert e's are counts[e] consecutive rows.
        order = expert.flatten().argsort(stable=True)  # (T*K,)
        token = order // K  # (T*K,) token of each sorted assignment
        counts = torch.bincount(expert.flatten(), minlength=self.num_experts)  # (E,)
        rows = flat[token]  # (T*K, d) grouped by expert
        outs = []
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                part = rows[start : start + n]  # (n, d), contiguous
                outs.append(F.gelu(part @ self.expert_in[e]) @ self.expert_out[e])  # (n, d)
            start += n
        routed = torch.cat(outs) if outs else rows.new_zeros(0, d)  # (T*K, d)
        weights = gate.flatten()[order]  # (T*K,) g of each sorted assignment
        y = torch.zeros_like(flat).index_add_(0, token, (routed * weights[:, None]).to(flat.dtype))  # (T, d)
        if self.shared_in is not None:
            y = y + self.shared_out(F.gelu(self.shared_in(flat)))
        if self.training:
            load = counts.to(probs.dtype) / (T * K)  # (E,) f_i / N
            f = load * self.num_experts  # (E,) f_i of Eq. 13
            P = probs.mean(0)  # (E,) P_i of Eq. 14
            self.last_load = load.detach()
            self.last_balance_loss = self.balance_loss_weight * (f * P).sum()
            if self.usage is not None:
                self.usage += counts.float()
                if self.usage_by_source is not None and self.sources is not None:
                    B = self.sources.numel()  # the batch's sequences, each from one data source
                    if T % B:
                        raise ValueError(f"{B} source ids for {T} tokens: set one per sequence of the batch")
                    source = self.sources.view(B, 1).expand(B, T // B).reshape(T, 1)  # (T, 1)
                    cells = (source * self.num_experts + expert).flatten()  # (T*K,) into (S*E)
                    self.usage_by_source += torch.bincount(cells, minlength=self.usage_by_source.numel()).view_as(
                        self.usage_by_source
                    )
        return y.to(x.dtype).view(*lead, d)
