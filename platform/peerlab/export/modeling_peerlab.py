"""An exported peerlab model in plain torch and transformers: MLA attention; PEER, dense, MoE or PKM feed-forward.

A standalone file: it imports only torch and transformers (and its configuration next to
it), so an exported folder loads where peerlab is not installed:

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

It computes what peerlab's model computes (platform/peerlab/model/), with the same parameter
names under `model.` (the LM head stays `lm_head`), written for inference and plainness:

- a pre-norm decoder: x + MLA(RMSNorm(x)), then x + FFN(RMSNorm(x)); FFN is the dense GELU MLP
  before `peer_start_layer`, and the `ffn_type` arm from there on.
- MLA (DeepSeek-V2, Sec. 2.1, Eq. 9-19): queries through an optional low-rank path, the
  key/value latent c^KV = RMSNorm(W^DKV h) and one rotary key k^R shared by all heads. A
  prompt runs the expanded attention; the cache keeps only c^KV and k^R of each token
  (kv_lora_rank + qk_rope_head_dim values per layer: in a `DynamicCache` as its keys and values),
  and decoding absorbs the up-projections into the query and the output (Sec. 2.1.2).
- PEER (He 2024, Eq. 1-5): per head, a query (BatchNorm'd), the top-k of each half against
  its sub-keys, the top-k of the sums of the rank pairs that can win; the softmax of those
  scores weights single-neuron experts gelu(u_e . x) v_e. The search is peerlab's step for step
  (its grouped top-k too), so ties fall the same way, which matters in bfloat16. The expert
  rows are gathered, a bounded number of tokens at a time.
- MoE (DeepSeekMoE): a softmax router, the top_k routed GELU experts weighted by their
  (unnormalised) scores, plus the shared experts.
- PKM (Lample et al. 2019): PEER's product-key search; the softmax-weighted sum of value rows.

In evaluation mode (what `from_pretrained` returns) PEER's and PKM's BatchNorm use their
running statistics, so each token is computed on its own, as in peerlab's evaluation.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_peerlab import PeerlabConfig

GATHER_BYTES = 256 << 20  # gathered expert rows one chunk of tokens may hold


class PeerlabRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight (computed in float32 at least: float64 stays float64)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(x32.dtype)).to(x.dtype)


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE with half-split pairing (dimension i with i + dim/2): x (..., T, dim), positions broadcastable to (..., T).

    The angles are computed in float64 and cast to x's dtype, as peerlab's tables are.
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim))  # (dim/2,)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (..., T, dim/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # (..., T, dim/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class PeerlabMLA(nn.Module):
    """Multi-head latent attention; see the module docstring."""

    def __init__(self, config: PeerlabConfig, layer_idx: int):
        super().__init__()
        m = config.mla_config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.nope, self.rope, self.v_dim = m["qk_nope_head_dim"], m["qk_rope_head_dim"], m["v_head_dim"]
        self.kv_rank = m["kv_lora_rank"]
        self.theta = float(m["rope_theta"])
        self.scale = 1.0 / math.sqrt(self.nope + self.rope)
        d, eps = config.hidden_size, config.layer_norm_eps
        q_out = self.num_heads * (self.nope + self.rope)
        if m.get("q_lora_rank"):  # W^DQ -> RMSNorm -> W^UQ (with W^QR)
            self.q_down = nn.Linear(d, m["q_lora_rank"], bias=False)
            self.q_norm = PeerlabRMSNorm(m["q_lora_rank"], eps)
            self.q_up = nn.Linear(m["q_lora_rank"], q_out, bias=False)
            self.q_proj = None
        else:
            self.q_proj = nn.Linear(d, q_out, bias=False)
        self.kv_down = nn.Linear(d, self.kv_rank + self.rope, bias=False)  # W^DKV and W^KR
        self.kv_norm = PeerlabRMSNorm(self.kv_rank, eps)
        self.kv_up = nn.Linear(self.kv_rank, self.num_heads * (self.nope + self.v_dim), bias=False)  # W^UK, W^UV
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, d, bias=False)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None
    ) -> torch.Tensor:
        """x (B, T, d); positions (T,) or (B, T); mask None (causal) or (B, T, L) bool; cache: the model's or None."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(B, T, self.num_heads, self.nope + self.rope).transpose(1, 2)  # (B, H, T, nope+rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = rotate(q_rope, positions.unsqueeze(1) if positions.dim() == 2 else positions, self.theta)
        c, k_rope = self.kv_down(x).split([self.kv_rank, self.rope], dim=-1)  # (B, T, r), (B, T, rope)
        c, k_rope = self.kv_norm(c), rotate(k_rope, positions, self.theta)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if cache is not None:  # the cache holds the latents: c^KV as its "keys", k^R as its "values"
            c_all, k_rope_all = cache.update(c.unsqueeze(1), k_rope.unsqueeze(1), self.layer_idx)  # (B, 1, L, .)
        if past == 0:  # a whole sequence (or a prompt): the expanded form
            return self._expanded(q_nope, q_rope, c, k_rope, mask)
        return self._absorbed(q_nope, q_rope, c_all.squeeze(1), k_rope_all.squeeze(1), mask)

    def _expanded(self, q_nope, q_rope, c, k_rope, mask):
        B, H, T, _ = q_nope.shape
        kv = self.kv_up(c).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)  # (B, H, T, nope+v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rope = k_rope.unsqueeze(1).expand(B, H, T, self.rope)  # (B, H, T, rope): shared by the heads
        q = torch.cat((q_nope, q_rope), dim=-1)  # (B, H, T, nope+rope)
        k = torch.cat((k_nope, k_rope), dim=-1)  # (B, H, T, nope+rope)
        qk = self.nope + self.rope
        if self.v_dim < qk:  # as peerlab: v padded to the q/k head size, the padding dropped after
            v = F.pad(v, (0, qk - self.v_dim))
        if mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (B, H, T, .)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1), scale=self.scale)
        o = o[..., : self.v_dim]  # (B, H, T, v)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _absorbed(self, q_nope, q_rope, c, k_rope, mask):
        """Attention over the cached latents c (B, L, r) and k_rope (B, L, rope) of all tokens so far."""
        B, H, T, _ = q_nope.shape
        L = c.shape[1]
        w = self.kv_up.weight.view(H, self.nope + self.v_dim, self.kv_rank)  # (H, nope+v, r)
        w_k, w_v = w.split([self.nope, self.v_dim], dim=1)  # (H, nope, r), (H, v, r)
        q = torch.cat((torch.matmul(q_nope, w_k), q_rope), dim=-1)  # (B, H, T, r+rope): W^UK absorbed into q
        k = torch.cat((c, k_rope), dim=-1).unsqueeze(1)  # (B, 1, L, r+rope): one key head shared by all
        if mask is None and T > 1:  # new token i sits at L - T + i and sees keys 0 .. L - T + i
            mask = torch.arange(L, device=c.device) <= torch.arange(L - T, L, device=c.device).unsqueeze(1)  # (T, L)
        elif mask is not None:
            mask = mask.unsqueeze(1)  # (B, 1, T, L)
        o = F.scaled_dot_product_attention(
            q, k.expand(B, H, L, -1), c.unsqueeze(1).expand(B, H, L, -1), attn_mask=mask, scale=self.scale
        )  # (B, H, T, r)
        o = torch.matmul(o, w_v.transpose(1, 2)).transpose(1, 2)  # (B, T, H, v): W^UV after the sum
        return self.o_proj(o.reshape(B, T, H * self.v_dim))


class PeerlabDenseMLP(nn.Module):
    """W2 gelu(W1 x)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.fc_out = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


def grouped_topk_pays(n: int, k: int, group: int) -> bool:
    """Whether peerlab searches k of n by groups of `group` (on CPU) rather than with torch's top-k."""
    return n % group == 0 and n // group >= 4 * k and (k * 64 > n or k >= 16)


def topk_by_groups(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k, dim=-1)` for (R, n) scores, searched as peerlab searches (its ties fall the same way).

    The n columns form n/group groups (column c in group c mod n/group); the k best scores lie
    in the k groups with the highest maxima, so a top-k over those k * group columns finds them.
    """
    R, n = scores.shape
    group = next((g for g in (8, 4) if grouped_topk_pays(n, k, g)), None)
    if scores.device.type != "cpu" or group is None:
        return scores.topk(k, dim=-1)
    groups = n // group
    best_groups = scores.view(R, group, groups).amax(1).topk(k, dim=-1, sorted=False).indices  # (R, k)
    columns = (best_groups.unsqueeze(-1) + torch.arange(0, n, groups, device=scores.device)).view(R, k * group)
    values, pick = scores.gather(1, columns).topk(k, dim=-1)  # (R, k) of the k * group candidates
    return values, columns.gather(1, pick)


class PeerlabProductKeys(nn.Module):
    """Product-key retrieval shared by PEER and PKM: the query (+ BatchNorm) and the two sub-key sets (one pair
    shared by all heads in PEER; one pair per head in PKM: `per_head_keys`)."""

    def __init__(self, section: dict, hidden_size: int, per_head_keys: bool = False):
        super().__init__()
        self.num_heads, self.k, self.query_dim = (
            section["num_heads"],
            section["num_experts_per_tok"],
            section["query_dim"],
        )
        self.n1, self.n2 = section["product_key_dim"]
        self.num_experts = self.n1 * self.n2
        self.query = nn.Linear(hidden_size, self.num_heads * self.query_dim, bias=False)
        self.query_norm = nn.BatchNorm1d(self.num_heads * self.query_dim) if section["batch_norm_query"] else None
        half = self.query_dim // 2
        self.key_sets = self.num_heads if per_head_keys else 1
        # per key set (head h's starts at row h * (n1 + n2)): rows c_1..c_n1, then c'_1..c'_n2
        self.sub_keys = nn.Parameter(torch.empty(self.key_sets * (self.n1 + self.n2), half))
        # Only pairs of ranks (a, b) with (a+1)(b+1) <= k can be among the k best sums (every pair of lower
        # ranks scores at least as high); peerlab searches these, in this order.
        pairs = [(a, b) for a in range(self.k) for b in range(self.k) if (a + 1) * (b + 1) <= self.k]
        self.pair_ranks = ([a for a, _ in pairs], [b for _, b in pairs])  # plain lists: nothing to load

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """One pair of sub-key sets for keys per head (a PKM saved before its heads had their own): each head's."""
        shared = state_dict.get(prefix + "sub_keys")
        if shared is not None and self.key_sets > 1 and shared.shape[0] == self.n1 + self.n2:
            state_dict[prefix + "sub_keys"] = shared.repeat(self.key_sets, 1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def retrieve(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (M, d) -> (scores, indices), each (M, heads, k): the k best sums q1.c_i + q2.c'_j, highest first."""
        M = x.shape[0]
        q = self.query(x)  # (M, H*query_dim)
        if self.query_norm is not None:
            q = self.query_norm(q)
        halves = q.view(M, self.num_heads, 2, self.query_dim // 2).to(self.sub_keys.dtype)  # (M, H, 2, query_dim/2)
        if self.key_sets == 1:  # one pair of sub-key sets for every head: one product each
            s1 = halves[:, :, 0] @ self.sub_keys[: self.n1].t()  # (M, H, n1)
            s2 = halves[:, :, 1] @ self.sub_keys[self.n1 :].t()  # (M, H, n2)
        else:  # each head against its own block of sub-keys
            keys = self.sub_keys.view(self.key_sets, self.n1 + self.n2, -1)  # (H, n1+n2, query_dim/2)
            s1 = torch.einsum("mhd,hnd->mhn", halves[:, :, 0], keys[:, : self.n1])  # (M, H, n1)
            s2 = torch.einsum("mhd,hnd->mhn", halves[:, :, 1], keys[:, self.n1 :])  # (M, H, n2)
        top1, i1 = topk_by_groups(s1.reshape(M * self.num_heads, self.n1), self.k)  # (M*H, k) of n1
        top2, i2 = topk_by_groups(s2.reshape(M * self.num_heads, self.n2), self.k)  # (M*H, k) of n2
        rank1, rank2 = (torch.tensor(r, device=x.device) for r in self.pair_ranks)  # (P,) each
        sums = top1.index_select(1, rank1) + top2.index_select(1, rank2)  # (M*H, P)
        scores, best = sums.topk(self.k, dim=-1)  # (M*H, k) into the P pairs
        indices = i1.gather(1, rank1[best]) * self.n2 + i2.gather(1, rank2[best])  # expert e = i * n2 + j
        return scores.view(M, self.num_heads, self.k), indices.view(M, self.num_heads, self.k)


class PeerlabPEER(PeerlabProductKeys):
    """f(x) = sum_h sum_{e in I_h} softmax(scores)_e gelu(u_e . x) v_e (experts of expert_hidden_size neurons)."""

    def __init__(self, section: dict, hidden_size: int):
        super().__init__(section, hidden_size)
        self.expert_hidden_size = section.get("expert_hidden_size", 1)
        rows = self.num_experts * self.expert_hidden_size
        self.down = nn.Parameter(torch.empty(rows, hidden_size))  # u_e: one row per neuron
        self.up = nn.Parameter(torch.empty(rows, hidden_size))  # v_e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d)  # (M, d)
        scores, indices = self.retrieve(flat)  # (M, H, k)
        gate = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))  # (M, H, k)
        h = self.expert_hidden_size
        if h > 1:  # expert e owns neuron rows e*h .. e*h+h-1, all weighted by the expert's score
            indices = (indices.unsqueeze(-1) * h + torch.arange(h, device=x.device)).flatten(-2)  # (M, H, k*h)
            gate = gate.repeat_interleave(h, dim=-1)
        idx, gate = indices.flatten(1), gate.flatten(1).to(self.down.dtype)  # (M, S) each
        inputs = flat.to(self.down.dtype)
        chunk = max(1, GATHER_BYTES // (idx.shape[1] * d * self.down.element_size()))
        out = []
        for a in range(0, idx.shape[0], chunk):
            rows = idx[a : a + chunk]  # (C, S)
            hidden = torch.einsum("csd,cd->cs", self.down[rows], inputs[a : a + chunk])  # (C, S): u_e . x
            out.append(torch.einsum("cs,csd->cd", F.gelu(hidden) * gate[a : a + chunk], self.up[rows]))  # (C, d)
        y = torch.cat(out) if out else inputs.new_zeros(0, d)
        return y.to(x.dtype).view(*lead, d)


class PeerlabPKM(PeerlabProductKeys):
    """m(x) = sum_h sum_{i in I_h} softmax(scores)_i v_i."""

    def __init__(self, section: dict, hidden_size: int):
        super().__init__(section, hidden_size, per_head_keys=True)  # Lample et al. 2019, Sec. 3.3
        self.values = nn.Parameter(torch.empty(self.num_experts, hidden_size))  # v_i: (N, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d)  # (M, d)
        scores, indices = self.retrieve(flat)  # (M, H, k)
        weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        y = F.embedding_bag(
            indices.flatten(1), self.values, mode="sum", per_sample_weights=weights.flatten(1).to(self.values.dtype)
        )  # (M, d): the weighted sum over the H*k rows of each token
        return y.to(x.dtype).view(*lead, d)


class PeerlabMoE(nn.Module):
    """sum of the shared experts + sum over the top_k routed experts of softmax score * GELU MLP."""

    def __init__(self, section: dict, hidden_size: int):
        super().__init__()
        d, h, E = hidden_size, section["expert_size"], section["num_experts"]
        self.num_experts, self.top_k = E, section["top_k"]
        self.router = nn.Linear(d, E, bias=False)
        self.expert_in = nn.Parameter(torch.empty(E, d, h))  # (E, d, h)
        self.expert_out = nn.Parameter(torch.empty(E, h, d))  # (E, h, d)
        shared = section.get("num_shared_experts", 0) * h
        self.shared_in = nn.Linear(d, shared, bias=False) if shared else None
        self.shared_out = nn.Linear(shared, d, bias=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d)  # (T, d)
        logits = self.router(flat)  # (T, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        gate, expert = probs.topk(self.top_k, dim=-1)  # (T, K) each
        order = expert.flatten().argsort(stable=True)  # (T*K,): the assignments grouped by expert
        token = order // self.top_k  # (T*K,)
        counts = torch.bincount(expert.flatten(), minlength=self.num_experts)  # (E,)
        rows = flat[token]  # (T*K, d)
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                outs.append(F.gelu(rows[start : start + n] @ self.expert_in[e]) @ self.expert_out[e])  # (n, d)
            start += n
        routed = torch.cat(outs) if outs else rows.new_zeros(0, d)  # (T*K, d)
        weights = gate.flatten()[order]  # (T*K,)
        y = torch.zeros_like(flat).index_add_(0, token, (routed * weights[:, None]).to(flat.dtype))  # (T, d)
        if self.shared_in is not None:
            y = y + self.shared_out(F.gelu(self.shared_in(flat)))
        return y.to(x.dtype).view(*lead, d)


class PeerlabBlock(nn.Module):
    def __init__(self, config: PeerlabConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.attn_norm = PeerlabRMSNorm(d, eps)
        self.attn = PeerlabMLA(config, layer_idx)
        self.mlp_norm = PeerlabRMSNorm(d, eps)
        ffn = config.ffn_type if layer_idx >= config.peer_start_layer else "dense"
        if ffn == "peer":
            self.mlp = PeerlabPEER(config.peer_config, d)
        elif ffn == "moe":
            self.mlp = PeerlabMoE(config.moe_config, d)
        elif ffn == "pkm":
            self.mlp = PeerlabPKM(config.pkm_config, d)
        else:
            self.mlp = PeerlabDenseMLP(d, config.intermediate_size)

    def forward(self, x, positions, mask, cache):
        x = x + self.attn(self.attn_norm(x), positions, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class PeerlabPreTrainedModel(PreTrainedModel):
    config_class = PeerlabConfig
    config: PeerlabConfig
    base_model_prefix = "model"
    _input_embed_layer = "embed"
    _no_split_modules: ClassVar[list[str]] = ["PeerlabBlock"]

    def _init_weights(self, module: nn.Module) -> None:
        """peerlab's initialisation, for weights a checkpoint lacks (`from_config`, a new head).

        transformers' own covers Linear and Embedding (normal, initializer_range) and the norms
        (RMSNorm, BatchNorm: 1 and 0); the expert tables are normal(initializer_range) and the
        sub-keys normal(1/sqrt(query_dim/2)), as in peerlab.
        """
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (PeerlabPEER, PeerlabPKM)):
            for weight in (module.down, module.up) if isinstance(module, PeerlabPEER) else (module.values,):
                nn.init.normal_(weight, std=std)
            nn.init.normal_(module.sub_keys, std=1.0 / math.sqrt(module.query_dim // 2))
        elif isinstance(module, PeerlabMoE):
            nn.init.normal_(module.expert_in, std=std)
            nn.init.normal_(module.expert_out, std=std)


def with_cache(output_class, cache: Cache | None, **fields):
    """An output with its cache under the name this transformers gives it: `cache` (5.2x) or `past_key_values`."""
    name = "cache" if "cache" in output_class.__dataclass_fields__ else "past_key_values"
    return output_class(**fields, **{name: cache})


def cache_of(output) -> Cache | None:
    """The cache of an output made by `with_cache`, whichever name it has."""
    return getattr(output, "cache", None) if "cache" in type(output).__dataclass_fields__ else output.past_key_values


class PeerlabModel(PeerlabPreTrainedModel):
    """The decoder without its LM head: input_ids (B, T) -> the final normed hidden states (B, T, d)."""

    def __init__(self, config: PeerlabConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(PeerlabBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = PeerlabRMSNorm(config.hidden_size, config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """attention_mask (B, L) of 1s and 0s (0: padding) over the cached and the new tokens, L = past + T."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        T = x.shape[1]
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        padded = attention_mask is not None and not bool(attention_mask.all())
        if position_ids is None:
            if padded:  # a token's position counts the real tokens before it (left padding, as generate pads)
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]  # (B, T)
            else:
                position_ids = torch.arange(past, past + T, device=x.device)  # (T,)
        if int(position_ids.max()) + 1 > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {int(position_ids.max()) + 1} tokens is longer than max_position_embeddings = "
                f"{self.config.max_position_embeddings}"
            )
        mask = None
        if padded:  # query t sees key u <= past + t where u is not padding; always itself (no empty rows)
            keys = torch.arange(past + T, device=x.device)  # (L,)
            queries = torch.arange(past, past + T, device=x.device).unsqueeze(1)  # (T, 1)
            mask = (keys <= queries) & attention_mask.bool().unsqueeze(1)  # (B, T, L)
            mask = mask | (keys == queries)
        for layer in self.layers:
            x = layer(x, position_ids, mask, cache)
        return with_cache(BaseModelOutputWithPast, cache, last_hidden_state=self.norm(x))


class PeerlabForCausalLM(PeerlabPreTrainedModel, GenerationMixin):
    """`model(input_ids).logits` (B, T, vocab); `model.generate(...)` through the MLA latent cache."""

    def __init__(self, config: PeerlabConfig):
        super().__init__(config)
        self.model = PeerlabModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """labels (B, T): the mean next-token cross-entropy as `loss` (-100 is ignored); with `num_items_in_batch`
        (transformers' Trainer under gradient accumulation: the labels of all micro-batches of the step), the sum
        over this micro-batch divided by it, as transformers' own models do (Trainer then does not divide)."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else kwargs.pop("past_key_values", None),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        h = out.last_hidden_state  # (B, T, d)
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep else h
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)  # (B, T', vocab)
        loss = None
        if labels is not None:
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            shifted = shifted.to(torch.promote_types(shifted.dtype, torch.float32))  # (B*(T-1), vocab)
            targets = labels[:, 1:].reshape(-1).to(logits.device)
            items = kwargs.get("num_items_in_batch")
            if items is None:
                loss = F.cross_entropy(shifted, targets, ignore_index=-100)
            else:
                loss = F.cross_entropy(shifted, targets, ignore_index=-100, reduction="sum") / items
        return with_cache(CausalLMOutputWithPast, cache_of(out), loss=loss, logits=logits)


__all__ = ["PeerlabForCausalLM", "PeerlabModel", "PeerlabPreTrainedModel"]
