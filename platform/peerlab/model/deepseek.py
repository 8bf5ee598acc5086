"""transformers' DeepSeek-V3 of a peerlab model's shape: the reference MLA for tests, the peer model for benchmarks.

`deepseek_v3_config` gives a `DeepseekV3Config` with the same attention (heads, MLA ranks
and head sizes, RoPE theta) and sizes, with a dense MLP of `intermediate_size` in every
layer (transformers has no PEER layer; DeepSeek's MLP is SwiGLU, peerlab's dense one GELU).
`deepseek_attention_weights` maps one peerlab `MLA` onto `DeepseekV3Attention`'s names:

    q_proj -> q_proj;  q_down, q_norm, q_up -> q_a_proj, q_a_layernorm, q_b_proj   (Eq. 12-13)
    kv_down, kv_norm, kv_up -> kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj       (Eq. 9-11, 15)
    o_proj -> o_proj                                                               (Eq. 19)

RoPE layout: peerlab pairs rotary dimension i with i + d/2 (half split), transformers'
`rope_interleave=False` does the same. DeepSeek's own checkpoints pair 2i with 2i + 1
(`rope_interleave=True`); for that layout the rows that produce the rotary part of the
queries and of the shared key are reordered (peerlab row i -> 2i, i + d/2 -> 2i + 1), after
which transformers rotates the same pairs and returns them in peerlab's half-split order.
"""

from __future__ import annotations

import torch

from peerlab.config import ModelConfig
from peerlab.model.mla import MLA


def deepseek_v3_config(model_config: ModelConfig, rope_interleave: bool = False):
    """`DeepseekV3Config` of the model's shape, every MLP dense (no routed experts)."""
    from transformers import DeepseekV3Config

    m, a = model_config, model_config.mla_config
    return DeepseekV3Config(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads,
        q_lora_rank=a.q_lora_rank,
        kv_lora_rank=a.kv_lora_rank,
        qk_rope_head_dim=a.qk_rope_head_dim,
        qk_nope_head_dim=a.qk_nope_head_dim,
        v_head_dim=a.v_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": a.rope_theta},
        rope_interleave=rope_interleave,
        first_k_dense_replace=m.num_hidden_layers,  # a dense MLP in every layer
        n_routed_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        num_mtp_layers=0,
        max_position_embeddings=m.max_position_embeddings,
        initializer_range=m.initializer_range,
        rms_norm_eps=m.layer_norm_eps,
        tie_word_embeddings=False,
    )


def deepseek_attention_weights(mla: MLA, rope_interleave: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of `DeepseekV3Attention` that computes what `mla` computes (see the module docstring)."""
    d = mla.rope
    half_split = torch.arange(d)
    # Interleaved: row 2i takes peerlab's rotary row i, row 2i + 1 takes row i + d/2.
    order = torch.stack((half_split[: d // 2], half_split[d // 2 :]), dim=-1).flatten() if rope_interleave else None

    def reorder_rope(weight: torch.Tensor, rows_per_block: int) -> torch.Tensor:
        """Reorder the last d rows of every block of `rows_per_block` rows (one block per head)."""
        if order is None:
            return weight.clone()
        blocks = weight.view(-1, rows_per_block, weight.shape[-1])  # (heads or 1, rows, in)
        rope = blocks[:, rows_per_block - d :][:, order]
        return torch.cat((blocks[:, : rows_per_block - d], rope), dim=1).reshape(weight.shape)

    qk = mla.nope + d
    out = {
        "kv_a_proj_with_mqa.weight": reorder_rope(mla.kv_down.weight.detach(), mla.kv_rank + d),
        "kv_a_layernorm.weight": mla.kv_norm.weight.detach().clone(),
        "kv_b_proj.weight": mla.kv_up.weight.detach().clone(),
        "o_proj.weight": mla.o_proj.weight.detach().clone(),
    }
    if mla.q_proj is not None:
        out["q_proj.weight"] = reorder_rope(mla.q_proj.weight.detach(), qk)
    else:
        out["q_a_proj.weight"] = mla.q_down.weight.detach().clone()
        out["q_a_layernorm.weight"] = mla.q_norm.weight.detach().clone()
        out["q_b_proj.weight"] = reorder_rope(mla.q_up.weight.detach(), qk)
    return out
