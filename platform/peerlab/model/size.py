"""Parameter counts and memory estimates, from the config alone (nothing is allocated).

`parameter_formulas(model_config)` gives the count of each part by formula;
`count_parameters(model)` counts a built model's parameters by the same parts, so a test
can hold one against the other. `active_parameters(model_config)` gives (all, used per token);
`training_flops_per_token(model_config, seq_len)` the model FLOPs of one training token.
"""

from __future__ import annotations

from torch import nn

from peerlab.config import ModelConfig, ffn_type

PARTS = (
    "embeddings",
    "attention",
    "dense_mlp",
    "peer_experts",
    "peer_keys_query",
    "moe_experts",  # routed and shared experts
    "moe_router",
    "pkm_values",
    "pkm_keys_query",  # query projection, two sub-key sets, BatchNorm affine
    "norms",
)


def arm_layer_count(m: ModelConfig, arm: str) -> int:
    """Layers whose feed-forward is `arm` (peer, moe or pkm): peer_start_layer to the last, where ffn_type is arm."""
    return m.num_hidden_layers - m.peer_start_layer if ffn_type(m) == arm else 0


def peer_layer_count(m: ModelConfig) -> int:
    """Layers whose MLP is a PEER layer: peer_start_layer to the last (none with another ffn_type)."""
    return arm_layer_count(m, "peer")


def _keys_query(d: int, p, key_sets: int = 1) -> int:
    """A product-key search's parameters (PEER or PKM): query projection, two sub-key sets (`key_sets` pairs of
    them: PKM has one per head), BatchNorm affine."""
    q = p.num_heads * p.query_dim
    return d * q + key_sets * sum(p.product_key_dim) * p.query_dim // 2 + (2 * q if p.batch_norm_query else 0)


def parameter_formulas(m: ModelConfig) -> dict[str, int]:
    """Parameters of each part of the model `m` describes."""
    d, H, a, p = m.hidden_size, m.num_attention_heads, m.mla_config, m.peer_config
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank:
        query = d * a.q_lora_rank + a.q_lora_rank * H * qk  # W^DQ, W^UQ
        query_norm = a.q_lora_rank
    else:
        query, query_norm = d * H * qk, 0
    attention = (
        query
        + d * (a.kv_lora_rank + a.qk_rope_head_dim)  # W^DKV, W^KR
        + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)  # W^UK, W^UV
        + H * a.v_head_dim * d  # W^O
    )
    peer_layers, moe_layers, pkm_layers = (arm_layer_count(m, arm) for arm in ("peer", "moe", "pkm"))
    dense_layers = m.num_hidden_layers - peer_layers - moe_layers - pkm_layers
    e = m.moe_config
    return {
        "embeddings": 2 * m.vocab_size * d,  # token embedding and LM head (untied)
        "attention": m.num_hidden_layers * attention,
        "dense_mlp": dense_layers * 2 * d * m.intermediate_size,
        "peer_experts": peer_layers * 2 * p.num_experts * p.expert_hidden_size * d,  # u and v of every neuron
        "peer_keys_query": peer_layers * _keys_query(d, p),  # query projection, two sub-key sets, BatchNorm affine
        "moe_experts": moe_layers * (e.num_experts + e.num_shared_experts) * 2 * d * e.expert_size,
        "moe_router": moe_layers * d * e.num_experts,
        "pkm_values": pkm_layers * m.pkm_config.num_experts * d,
        "pkm_keys_query": pkm_layers * _keys_query(d, m.pkm_config, key_sets=m.pkm_config.num_heads),
        "norms": m.num_hidden_layers * (2 * d + a.kv_lora_rank + query_norm) + d,
    }


def active_parameters(model_config) -> tuple[int, int]:
    """(all parameters, parameters used per token): a token touches heads x k experts of each PEER layer,
    its top_k routed experts and the shared ones of each MoE layer, and heads x k value rows of each PKM layer."""
    parts = parameter_formulas(model_config)
    total = sum(parts.values())
    m, p, e, v = model_config, model_config.peer_config, model_config.moe_config, model_config.pkm_config
    d = m.hidden_size
    peer = peer_layer_count(m) * p.num_heads * p.num_experts_per_tok * 2 * p.expert_hidden_size * d
    moe = arm_layer_count(m, "moe") * (e.top_k + e.num_shared_experts) * 2 * d * e.expert_size
    pkm = arm_layer_count(m, "pkm") * v.num_heads * v.num_experts_per_tok * d
    active = total
    for part, touched in (("peer_experts", peer), ("moe_experts", moe), ("pkm_values", pkm)):
        active += min(touched, parts[part]) - parts[part]
    return total, active


def _part(name: str) -> str:
    if name.startswith(("embed.", "lm_head.")):
        return "embeddings"
    if ".mlp.fc_" in name:
        return "dense_mlp"
    if name.endswith((".mlp.down", ".mlp.up")):
        return "peer_experts"
    if ".mlp." in name:
        return "peer_keys_query"
    if name.endswith("norm.weight"):  # block norms, MLA's q/kv latent norms, the final norm
        return "norms"
    return "attention"


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters of a built model by part (works on the meta device too)."""
    from peerlab.model.moe import MoE
    from peerlab.model.pkm import PKM

    arms = {f"{name}.": type(module) for name, module in model.named_modules() if isinstance(module, (MoE, PKM))}
    counts = dict.fromkeys(PARTS, 0)
    for name, param in model.named_parameters():
        arm = next((kind for prefix, kind in arms.items() if name.startswith(prefix)), None)
        if arm is MoE:
            part = "moe_router" if ".router." in name else "moe_experts"
        elif arm is PKM:
            part = "pkm_values" if name.endswith(".values") else "pkm_keys_query"
        else:
            part = _part(name)
        counts[part] += param.numel()
    return counts


def memory_estimate(total_params: int, shards: int = 1) -> dict[str, int]:
    """Bytes per worker for fp32 weights, fp32 gradients and AdamW's two fp32 moments.

    Mixed precision (fp16/bf16 autocast, Float8) keeps fp32 master weights, so the figures
    hold for it too; activations come on top and depend on batch size and sequence length.
    `shards` > 1 divides everything over FSDP workers.
    """
    per = -(-total_params // shards)
    return {"weights": 4 * per, "gradients": 4 * per, "adamw_state": 8 * per, "total": 16 * per}


def forward_flops_per_token(m: ModelConfig, seq_len: int) -> dict[str, int]:
    """Forward-pass FLOPs per token of each kind of work (a multiply-add counts 2).

    - `linear`: every matrix product with a weight (MLA's projections, dense MLPs, PEER's
      query projection, the LM head); the token embedding is a lookup and counts nothing.
    - `attention`: QK^T and AV over the whole sequence, 2*H*T*(qk + v) per token and layer,
      without the causal half (PaLM's convention, appendix B).
    - `peer_search`: scoring every sub-key, H * (n1 + n2) * query_dim/2 multiply-adds.
    - `peer_experts`: the k*h retrieved neurons of each head, down and up (2*d each).
    - `moe_experts`: the shared experts and the top_k routed ones a token runs, two matrices
      each (2*d*expert_size FLOPs each); the router (2*d*num_experts) counts under `linear`.
    - `pkm_search`: as `peer_search`, over the PKM's sub-keys (its query projection is `linear`).
    - `pkm_values`: the k retrieved value rows of each head, weighted and summed (2*d each).
    """
    d, H, a, p = m.hidden_size, m.num_attention_heads, m.mla_config, m.peer_config
    e, r = m.moe_config, m.pkm_config
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    peer_layers, moe_layers, pkm_layers = (arm_layer_count(m, arm) for arm in ("peer", "moe", "pkm"))
    parts = parameter_formulas(m)  # a weight matrix's parameters are its multiply-adds per token
    linear = (
        parts["attention"]
        + parts["dense_mlp"]
        + peer_layers * d * p.num_heads * p.query_dim
        + parts["moe_router"]
        + pkm_layers * d * r.num_heads * r.query_dim
        + d * m.vocab_size
    )
    return {
        "linear": 2 * linear,
        "attention": m.num_hidden_layers * 2 * H * seq_len * (qk + a.v_head_dim),
        "peer_search": peer_layers * 2 * p.num_heads * sum(p.product_key_dim) * (p.query_dim // 2),
        "peer_experts": peer_layers * 2 * p.num_heads * p.num_experts_per_tok * p.expert_hidden_size * 2 * d,
        "moe_experts": moe_layers * (e.num_shared_experts + e.top_k) * 2 * (2 * d * e.expert_size),
        "pkm_search": pkm_layers * 2 * r.num_heads * sum(r.product_key_dim) * (r.query_dim // 2),
        "pkm_values": pkm_layers * r.num_heads * r.num_experts_per_tok * 2 * d,
    }


def training_flops_per_token(m: ModelConfig, seq_len: int) -> int:
    """Model FLOPs of one training token: 3x the forward (backward = 2x, Kaplan et al. 2020, 2.1).

    The product-key searches (PEER's and PKM's) count once: its backward touches only the k winning scores
    (recomputed from their sub-keys), so the full scores get no gradient. This is the
    numerator of model FLOPs utilisation (MFU, PaLM appendix B).
    """
    f = forward_flops_per_token(m, seq_len)
    dense = f["linear"] + f["attention"] + f["peer_experts"] + f["moe_experts"] + f["pkm_values"]
    return 3 * dense + f["peer_search"] + f["pkm_search"]


def peer_bytes_per_token(m: ModelConfig, value_bytes: int = 4) -> int:
    """Expert-table bytes one training token moves through the PEER layers (the memory floor of PEER's work).

    Each token retrieves S = heads * k * expert_hidden_size rows of each table (`down` and
    `up`, d values each). Forward reads both tables' S rows; backward reads them again (for
    the input's and scores' gradients) and writes both tables' S gradient rows: 6 * S * d
    values per PEER layer. Rows shared by several tokens are counted for each: a retrieval is
    a random access that no cache is assumed to keep. With `value_bytes` the tables' element size
    (4 for float32 master weights), this over the memory bandwidth is the least time the
    expert work can take; bytes per token x tokens/s over the bandwidth is its bandwidth
    utilisation (MBU).
    """
    p = m.peer_config
    rows = p.num_heads * p.num_experts_per_tok * p.expert_hidden_size
    return peer_layer_count(m) * 6 * rows * m.hidden_size * value_bytes
