"""MLA: Multi-head Latent Attention (DeepSeek-V2, Sec. 2.1, Eq. 9-19).

For a token h_t (hidden_size d), with H heads:

    c_t^Q  = RMSNorm(W^DQ h_t)                    (Eq. 12, optional: q_lora_rank; else q_t = W^Q h_t)
    q_t^C  = W^UQ c_t^Q,  q_t^R = RoPE(W^QR c_t^Q)  per head: qk_nope_head_dim + qk_rope_head_dim
    c_t^KV = RMSNorm(W^DKV h_t)                   (Eq. 9: the latent, kv_lora_rank values)
    k_t^C  = W^UK c_t^KV,  v_t^C = W^UV c_t^KV    (Eq. 10-11, per head)
    k_t^R  = RoPE(W^KR h_t)                        (Eq. 15: one rotary key shared by all heads)
    o_t    = sum_j softmax_j(q_t . k_j / sqrt(nope + rope)) v_j ;  u_t = W^O o_t  (Eq. 17-19)

Training runs the expanded form through `scaled_dot_product_attention`. Decoding keeps only
c^KV and k^R per token (kv_lora_rank + qk_rope_head_dim values per layer) and absorbs the
up-projections (Sec. 2.1.2): q^C . (W^UK c) = (W^UK^T q^C) . c, and W^O (sum p W^UV c) =
W^O W^UV (sum p c). So attention runs over the latents themselves, as one shared key/value
head of size kv_lora_rank (+ the rope part for keys).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from peerlab.config import MLAConfig


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (computed in float32 at least: float64 stays float64)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(x32.dtype)).to(x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE) on the last dimension, half-split pairing."""

    def __init__(self, dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (dim/2,)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)  # (P, dim/2)
        # Built in float64 and kept as buffers (not saved: they follow from the config).
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x (..., T, dim), positions (T,) or broadcastable to x.shape[:-1] -> x rotated by its positions."""
        cos = self.cos[positions].to(x.dtype)  # (..., T, dim/2)
        sin = self.sin[positions].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)  # (..., T, dim/2) each
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class MLA(nn.Module):
    """Multi-head latent attention; `forward(x, positions, cache=None, mask=None)` with x (B, T, d).

    positions: (T,), or (B, T) for rows whose tokens do not sit at 0..T-1 (packed rows, see
    `PeerMLAModel.hidden_states`); mask: None for causal attention, else (B, T, T) bool, True
    where a query may see a key.
    """

    def __init__(self, config: MLAConfig, hidden_size: int, num_heads: int, max_positions: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.nope = config.qk_nope_head_dim
        self.rope = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        self.scale = 1.0 / math.sqrt(self.nope + self.rope)
        q_out = num_heads * (self.nope + self.rope)
        if config.q_lora_rank:  # W^DQ -> RMSNorm -> W^UQ (+ W^QR, fused into q_up)
            self.q_down = nn.Linear(hidden_size, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank, eps)
            self.q_up = nn.Linear(config.q_lora_rank, q_out, bias=False)
            self.q_proj = None
        else:
            self.q_proj = nn.Linear(hidden_size, q_out, bias=False)
        self.kv_down = nn.Linear(hidden_size, self.kv_rank + self.rope, bias=False)  # W^DKV and W^KR
        self.kv_norm = RMSNorm(self.kv_rank, eps)
        self.kv_up = nn.Linear(self.kv_rank, num_heads * (self.nope + self.v_dim), bias=False)  # W^UK, W^UV
        self.o_proj = nn.Linear(num_heads * self.v_dim, hidden_size, bias=False)
        self.rotary = Rotary(self.rope, max_positions, config.rope_theta)

    def _queries(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(B, T, self.num_heads, self.nope + self.rope).transpose(1, 2)  # (B, H, T, nope+rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        if positions.dim() == 2:  # (B, T) -> (B, 1, T): the same positions for every head
            positions = positions.unsqueeze(1)
        return q_nope, self.rotary(q_rope, positions)  # (B, H, T, nope), (B, H, T, rope)

    def _latent(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, k_rope = self.kv_down(x).split([self.kv_rank, self.rope], dim=-1)  # (B, T, r), (B, T, rope)
        return self.kv_norm(c), self.rotary(k_rope, positions)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: "LayerCache | None" = None, mask=None
    ) -> torch.Tensor:
        if cache is not None:
            return self._decode(x, positions, cache)
        B, T, _ = x.shape
        q_nope, q_rope = self._queries(x, positions)
        c, k_rope = self._latent(x, positions)  # (B, T, r), (B, T, rope)
        kv = self.kv_up(c).view(B, T, self.num_heads, self.nope + self.v_dim).transpose(1, 2)  # (B, H, T, nope+v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rope = k_rope.unsqueeze(1).expand(B, self.num_heads, T, self.rope)  # (B, H, T, rope): shared by heads
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, nope+rope)
        k = torch.cat((k_nope, k_rope), dim=-1)  # (B, H, T, nope+rope)
        qk = self.nope + self.rope
        if self.v_dim < qk:  # fused (flash) kernels want equal head sizes: pad v with zeros, drop them after
            v = F.pad(v, (0, qk - self.v_dim))  # (B, H, T, nope+rope)
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (B, H, T, nope+rope)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), scale=self.scale)
        o = o[..., : self.v_dim]  # (B, H, T, v)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.v_dim))

    def _decode(self, x: torch.Tensor, positions: torch.Tensor, cache: "LayerCache") -> torch.Tensor:
        """Absorbed attention over the cached latents; x holds the T new tokens at `positions`."""
        B, T, _ = x.shape
        q_nope, q_rope = self._queries(x, positions)  # (B, H, T, nope), (B, H, T, rope)
        c_new, k_rope_new = self._latent(x, positions)
        c, k_rope = cache.append(c_new, k_rope_new)  # (B, L, r), (B, L, rope); L = tokens so far
        w = self.kv_up.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_rank)  # (H, nope+v, r)
        w_k, w_v = w.split([self.nope, self.v_dim], dim=1)  # (H, nope, r), (H, v, r)
        q_latent = torch.matmul(q_nope, w_k)  # (B, H, T, r): W^UK absorbed into q
        q = torch.cat((q_latent, q_rope), dim=-1)  # (B, H, T, r+rope)
        k = torch.cat((c, k_rope), dim=-1).unsqueeze(1)  # (B, 1, L, r+rope): one head shared by all
        L = k.shape[2]
        # Token i of the new ones sits at position L - T + i and sees keys 0 .. L - T + i (one new token: all).
        mask = None
        if T > 1:
            mask = torch.arange(L, device=x.device) <= torch.arange(L - T, L, device=x.device).unsqueeze(1)  # (T, L)
        o_latent = F.scaled_dot_product_attention(
            q,
            k.expand(B, self.num_heads, L, -1),
            c.unsqueeze(1).expand(B, self.num_heads, L, -1),
            attn_mask=mask,
            scale=self.scale,
        )  # (B, H, T, r)
        o = torch.matmul(o_latent, w_v.transpose(1, 2)).transpose(1, 2)  # (B, T, H, v): W^UV applied after the sum
        return self.o_proj(o.reshape(B, T, self.num_heads * self.v_dim))


class LayerCache:
    """The decoding cache of one MLA layer: the latent c^KV and the rotated k^R of every token.

    Preallocated to `max_len` tokens: (B, max_len, kv_lora_rank) and (B, max_len, qk_rope_head_dim).
    """

    def __init__(self, batch: int, max_len: int, kv_rank: int, rope: int, dtype: torch.dtype, device):
        self.latent = torch.zeros(batch, max_len, kv_rank, dtype=dtype, device=device)
        self.rope_key = torch.zeros(batch, max_len, rope, dtype=dtype, device=device)
        self.length = 0

    def append(self, c: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + c.shape[1]
        if end > self.latent.shape[1]:
            raise ValueError(f"cache holds {self.latent.shape[1]} tokens; {end} were asked for")
        self.latent[:, self.length : end] = c
        self.rope_key[:, self.length : end] = k_rope
        self.length = end
        return self.latent[:, :end], self.rope_key[:, :end]
