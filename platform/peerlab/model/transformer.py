"""The PEER/MLA decoder-only language model.

A pre-norm transformer: token embedding -> num_hidden_layers blocks -> RMSNorm -> LM head.
Each block is x + MLA(RMSNorm(x)), then x + FFN(RMSNorm(x)), where FFN is, from
`peer_start_layer` on, the arm `ffn_type` names: a PEER layer (model/peer.py), a
mixture of experts (model/moe.py), a product-key memory (model/pkm.py), or the dense GELU
MLP of `intermediate_size` (`dense`, or `use_peer: false`: the dense baseline of the same
shape). Layers before `peer_start_layer` use the dense MLP in every arm.

In training, the MoE layers' balance losses are added to the language-model loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from peerlab.config import ModelConfig, ffn_type
from peerlab.model.loss import linear_cross_entropy
from peerlab.model.mla import MLA, LayerCache, RMSNorm
from peerlab.model.moe import MoE
from peerlab.model.peer import PEER
from peerlab.model.pkm import PKM


class DenseMLP(nn.Module):
    """The dense feed-forward block: W2 gelu(W1 x)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.fc_in = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.fc_out = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, ffn: str):
        super().__init__()
        eps = config.layer_norm_eps
        self.attn_norm = RMSNorm(config.hidden_size, eps)
        self.attn = MLA(
            config.mla_config, config.hidden_size, config.num_attention_heads, config.max_position_embeddings, eps
        )
        self.mlp_norm = RMSNorm(config.hidden_size, eps)
        d, std = config.hidden_size, config.initializer_range
        if ffn == "peer":
            self.mlp = PEER(config.peer_config, d, std)
        elif ffn == "moe":
            self.mlp = MoE(config.moe_config, d, std)
        elif ffn == "pkm":
            self.mlp = PKM(config.pkm_config, d, std)
        else:
            self.mlp = DenseMLP(d, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None, mask=None, at=None
    ) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d); with `at` = (rows, cols), each (N,), only those positions -> (N, d)."""
        x = x + self.attn(self.attn_norm(x), positions, cache, mask)
        if at is not None:  # the other positions' outputs are not wanted: the feed-forward skips them
            x = x[at]  # (N, d)
        return x + self.mlp(self.mlp_norm(x))


class PeerMLAModel(nn.Module):
    """`model(input_ids)` -> logits (B, T, vocab_size); `model.generate(...)` decodes greedily."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config, ffn_type(config) if i >= config.peer_start_layer else "dense")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Normal(0, initializer_range) for every matrix; norms at 1; PEER, MoE and PKM set their own."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.config.initializer_range)
            elif isinstance(module, (PEER, MoE, PKM)):
                module.reset_parameters(self.config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: list[LayerCache] | None = None,
        labels: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab). With `cache`, input_ids are the tokens after it.

        With `labels` (B, T) the mean cross-entropy instead, through the fused LM-head loss
        (`peerlab.model.loss`), which never builds the (B, T, vocab) logits; in training plus the
        MoE layers' balance losses (model/moe.py) where balance_loss_weight > 0. `segments` and
        `at` as in `hidden_states` (with `at`, logits (N, vocab) at those positions only).
        """
        h = self.hidden_states(input_ids, cache, segments, at)  # (B, T, d), or (N, d) with `at`
        if labels is not None:
            loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, labels.flatten())
            for balance in self.balance_losses():
                loss = loss + balance
            return loss
        return self.lm_head(h)  # (B, T, vocab)

    def balance_losses(self) -> list[torch.Tensor]:
        """The MoE layers' balance losses that the last training forward with labels added to its loss."""
        if not (self.training and self.config.moe_config.balance_loss_weight > 0):
            return []
        return [layer.mlp.last_balance_loss for layer in self.layers if isinstance(layer.mlp, MoE)]

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        cache: list[LayerCache] | None = None,
        segments: torch.Tensor | None = None,
        at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> the final normed hidden states (B, T, d) that the LM head reads.

        Evaluation applies the head only where it needs logits (the scored tokens, the last one).
        `at` = (rows, cols), each (N,), asks for those positions only -> (N, d): the last
        block's feed-forward (a PEER layer, mostly) then runs at those positions alone, since no
        later layer reads the others. Evaluation mode only: in training, PEER's BatchNorm takes
        its statistics from all the tokens it sees.

        `segments` (B, T) ints packs several sequences that share a beginning into one row (the
        lm-eval adapter scores a question's answers this way): segment 0 is the shared
        beginning, and a token of segment s > 0 sees the earlier tokens of segment 0 and of
        segment s only, at the positions it would have in the sequence "segment 0, then segment
        s". Each token's hidden state then equals the one it has in that sequence on its own.
        """
        T = input_ids.shape[1]
        start = cache[0].length if cache is not None else 0
        mask = None
        if segments is None:
            positions = torch.arange(start, start + T, device=input_ids.device)  # (T,)
        else:
            if cache is not None:
                raise ValueError("segments are for whole rows, not for decoding through a cache")
            mask, positions = segment_mask(segments)  # (B, T, T), (B, T)
        end = start + T if segments is None else int(positions.max()) + 1
        if end > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {end} tokens is longer than max_position_embeddings = "
                f"{self.config.max_position_embeddings}"
            )
        if at is not None and self.training:
            raise ValueError("hidden_states(at=...) is for evaluation mode (model.eval())")
        x = self.embed(input_ids)  # (B, T, d)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cache[i] if cache is not None else None, mask, at if i == last else None)
        return self.norm(x)  # (B, T, d), or (N, d) with `at`

    def new_cache(self, batch: int, max_len: int) -> list[LayerCache]:
        """An empty latent cache for `max_len` tokens: (kv_lora_rank + qk_rope_head_dim) values per token and layer."""
        mla = self.config.mla_config
        p = self.lm_head.weight
        return [
            LayerCache(batch, max_len, mla.kv_lora_rank, mla.qk_rope_head_dim, p.dtype, p.device) for _ in self.layers
        ]

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, use_cache: bool = True, eos_token_id: int | None = None
    ) -> torch.Tensor:
        """Greedy decoding: input_ids (B, T) -> (B, T + new) with new <= max_new_tokens.

        With `use_cache` the prompt is run once and each new token attends to the cached
        latents (absorbed MLA); without it the whole sequence is recomputed every step.
        Stops early when every row has produced `eos_token_id`.
        """
        was_training = self.training
        self.eval()
        out = input_ids
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens) if use_cache else None
        step_input = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self(step_input, cache) if use_cache else self(out)
            next_token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            if eos_token_id is not None:
                next_token = next_token.masked_fill(done.unsqueeze(1), eos_token_id)
                done |= next_token.squeeze(1) == eos_token_id
            out = torch.cat((out, next_token), dim=1)
            step_input = next_token
            if eos_token_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return out


def segment_mask(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segments (B, T) -> (mask (B, T, T) bool, positions (B, T)) of packed rows (see `hidden_states`).

    Query t sees key u <= t when u is in segment 0 or in t's segment. A token's position is
    its index among the tokens it sees, the tokens of segment 0 included.
    """
    same = segments.unsqueeze(2) == segments.unsqueeze(1)  # (B, T, T): query t, key u of one segment
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()  # (T, T)
    mask = causal & (same | (segments == 0).unsqueeze(1))  # (B, T, T)
    return mask, mask.sum(-1) - 1


def build_model(model_config: ModelConfig) -> PeerMLAModel:
    """The model a config describes, initialised with `initializer_range`."""
    return PeerMLAModel(model_config)
