"""The configuration of an exported peerlab model (MLA attention; PEER, dense, MoE or PKM feed-forward layers).

A standalone file: it imports only transformers, so an exported folder loads where peerlab is
not installed (`AutoConfig.from_pretrained(folder, trust_remote_code=True)`). The keys are
peerlab's `model_config` keys, with the same names and meanings; the four sections
(`mla_config`, `peer_config`, `moe_config`, `pkm_config`) are plain dicts of their keys.
"""

from __future__ import annotations

from transformers import PretrainedConfig

FFN_TYPES = ("peer", "dense", "moe", "pkm")


class PeerlabConfig(PretrainedConfig):
    """peerlab's model_config as a transformers config (`model_type` "peerlab")."""

    model_type = "peerlab"

    vocab_size: int = 50272
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # the dense MLP's width (layers before peer_start_layer, or all of a dense model)
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    peer_start_layer: int = 2  # the first layer whose feed-forward is `ffn_type`; the ones before are dense
    ffn_type: str = "peer"  # peer, dense, moe or pkm
    mla_config: dict | None = (
        None  # q_lora_rank, kv_lora_rank, qk_rope_head_dim, v_head_dim, qk_nope_head_dim, rope_theta
    )
    peer_config: dict | None = None  # num_heads, num_experts_per_tok, query_dim, product_key_dim, batch_norm_query, ...
    moe_config: dict | None = None  # num_experts, top_k, expert_size, num_shared_experts
    pkm_config: dict | None = None  # num_heads, num_experts_per_tok, query_dim, product_key_dim, batch_norm_query
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.ffn_type not in FFN_TYPES:
            raise ValueError(f"ffn_type must be one of {', '.join(FFN_TYPES)}, got {self.ffn_type!r}")
        super().__post_init__(**kwargs)
