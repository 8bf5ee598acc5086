"""The PEER/MLA model: cached decoding, causality, generation, sizes and config keys honoured."""

from __future__ import annotations

import math

import pytest
import torch

from peerlab.config import ModelConfig, load_config
from peerlab.model import build_model, count_parameters, parameter_formulas
from peerlab.model.mla import MLA
from peerlab.model.peer import PEER
from tests.conftest import ROOT, tiny_model_config


def float64_model(**overrides):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(**overrides)).double().eval()
    for m in model.modules():  # running statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_cached_absorbed_decoding_equals_full_forward(q_lora_rank):
    model = float64_model(q_lora_rank=q_lora_rank)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        cache = model.new_cache(2, 20)
        steps = [model(ids[:, :7], cache)]  # a prompt of 7 tokens at once, then one token at a time,
        steps += [model(ids[:, t : t + 1], cache) for t in range(7, 12)]
        steps += [model(ids[:, 12:16], cache), model(ids[:, 16:20], cache)]  # then chunks onto a filled cache
    cached = torch.cat(steps, dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-9, atol=1e-10)
    # The cache holds the latent and the rope key: kv_lora_rank + qk_rope_head_dim values per token and layer.
    assert cache[0].latent.shape == (2, 20, 16) and cache[0].rope_key.shape == (2, 20, 8)
    assert cache[0].length == 20


@pytest.mark.parametrize("use_peer,bn", [(True, True), (False, True), (True, False)])
def test_future_tokens_never_change_earlier_logits(use_peer, bn):
    model = float64_model(use_peer=use_peer, batch_norm_query=bn)
    ids = torch.randint(0, 97, (3, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, 97, (3, 7))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-12)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-6  # the later positions did see the change
    if not bn:  # without batch statistics, training mode is causal too
        model.train()
        with torch.no_grad():
            torch.testing.assert_close(model(ids)[:, :9], model(changed)[:, :9], rtol=0, atol=1e-12)


@pytest.mark.parametrize("use_peer", [True, False])
def test_packed_rows_equal_their_sequences_alone(use_peer):
    """A row "shared, a, b, c" with segments 0, 1, 2, 3: each token as in "shared + its own segment" alone."""
    model = float64_model(use_peer=use_peer)
    shared, parts = torch.randint(0, 97, (7,)), [torch.randint(0, 97, (n,)) for n in (5, 1, 9)]
    row = torch.cat([shared, *parts])  # (22,), longer than any of the sequences it holds
    segments = torch.cat(
        [torch.zeros(7, dtype=torch.long)] + [torch.full((len(p),), s + 1) for s, p in enumerate(parts)]
    )
    other = torch.randint(0, 97, (22,))  # a second row with no sharing: one segment after an empty shared part
    with torch.no_grad():
        packed = model.hidden_states(torch.stack([row, other]), segments=torch.stack([segments, segments.clamp(1, 1)]))
        start = 7
        for part in parts:
            alone = model.hidden_states(torch.cat([shared, part]).unsqueeze(0))[0]  # (7 + n, d)
            torch.testing.assert_close(packed[0, :7], alone[:7], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(packed[0, start : start + len(part)], alone[7:], rtol=1e-10, atol=1e-12)
            start += len(part)
        torch.testing.assert_close(packed[1], model.hidden_states(other.unsqueeze(0))[0], rtol=1e-10, atol=1e-12)
        # Positions come from the segments, not from the row: a row longer than max_position_embeddings is fine.
        long_row = torch.randint(0, 97, (1, 80))
        long_segments = torch.tensor([[0] * 30 + [1] * 25 + [2] * 25])  # positions 0..54 only
        assert model.hidden_states(long_row, segments=long_segments).shape == (1, 80, 32)
        with pytest.raises(ValueError, match="max_position_embeddings"):
            model.hidden_states(long_row, segments=torch.ones(1, 80, dtype=torch.long))


def test_hidden_states_at_some_positions_equal_all_of_them():
    model = float64_model()
    ids = torch.randint(0, 97, (3, 12))
    rows, cols = torch.tensor([0, 0, 2, 1, 2]), torch.tensor([11, 3, 0, 5, 0])  # any order, repeats allowed
    with torch.no_grad():
        torch.testing.assert_close(
            model.hidden_states(ids, at=(rows, cols)), model.hidden_states(ids)[rows, cols], rtol=1e-10, atol=1e-12
        )
        torch.testing.assert_close(model(ids, at=(rows, cols)), model(ids)[rows, cols], rtol=1e-10, atol=1e-12)
    model.train()  # PEER's BatchNorm would take its statistics from those positions only
    with pytest.raises(ValueError, match="evaluation mode"):
        model.hidden_states(ids, at=(rows, cols))


def test_generate_same_tokens_with_and_without_cache():
    torch.manual_seed(3)
    model = build_model(tiny_model_config(initializer_range=0.3)).eval()
    prompt = torch.randint(0, 97, (2, 5))
    with_cache = model.generate(prompt, 25, use_cache=True)
    without = model.generate(prompt, 25, use_cache=False)
    assert with_cache.shape == (2, 30)
    assert torch.equal(with_cache[:, :5], prompt)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[0, 5:].tolist())) > 1  # not a degenerate constant sequence


def test_generate_stops_at_eos():
    torch.manual_seed(3)
    model = build_model(tiny_model_config(initializer_range=0.3)).eval()
    prompt = torch.randint(0, 97, (1, 4))
    first = int(model.generate(prompt, 1)[0, -1])
    out = model.generate(prompt, 10, eos_token_id=first)
    assert out.shape == (1, 5) and int(out[0, -1]) == first


@pytest.mark.parametrize(
    "q_lora_rank,rope_interleave,rope_theta", [(24, False, 10000.0), (None, False, 10000.0), (24, True, 500.0)]
)
def test_mla_equals_transformers_deepseek_v3_attention(q_lora_rank, rope_interleave, rope_theta):
    """MLA (Eq. 9-19) against transformers' DeepseekV3Attention with the same weights, in float64.

    Rows at different positions (packed rows), causal attention. transformers' RMSNorm rounds to
    float32 (peerlab's keeps float64 in float64), so its norms run here by the same formula in
    float64. RoPE's cos and sin are computed here in float64 from the definition
    (transformers builds them in float32; they are checked against it to float32's precision).
    With `rope_interleave` transformers pairs rotary dimensions 2i and 2i + 1 (DeepSeek's own
    layout), against peerlab's half split: `deepseek_attention_weights` reorders the rows.
    """
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    from peerlab.model.deepseek import deepseek_attention_weights, deepseek_v3_config

    cfg = tiny_model_config(q_lora_rank=q_lora_rank, rope_theta=rope_theta)
    a = cfg.mla_config
    torch.manual_seed(0)
    ours = MLA(a, cfg.hidden_size, cfg.num_attention_heads, cfg.max_position_embeddings, cfg.layer_norm_eps).double()
    for norm in (ours.kv_norm, ours.q_norm if q_lora_rank else None):
        if norm is not None:
            norm.weight.data.uniform_(0.5, 2.0)
    hf_cfg = deepseek_v3_config(cfg, rope_interleave=rope_interleave)
    hf_cfg._attn_implementation = "sdpa"
    theirs = DeepseekV3Attention(hf_cfg, layer_idx=0).double().eval()
    theirs.load_state_dict(deepseek_attention_weights(ours, rope_interleave), strict=True)
    for norm in (theirs.kv_a_layernorm, theirs.q_a_layernorm if q_lora_rank else None):
        if norm is not None:  # transformers' formula, x * rsqrt(mean(x^2) + eps) * weight, without the float32 round
            norm.forward = lambda h, n=norm: (
                n.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + n.variance_epsilon))
            )
    # transformers' RMSNorm in attention has eps 1e-6 whatever the config says: tiny_model_config's eps.
    assert cfg.layer_norm_eps == theirs.kv_a_layernorm.variance_epsilon

    B, T, d = 2, 14, a.qk_rope_head_dim
    positions = torch.arange(T) + torch.tensor([[0], [9]])  # (B, T): the second row starts at position 9
    inv_freq = rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angles = positions.unsqueeze(-1).double() * inv_freq  # (B, T, d/2)
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()  # (B, T, d)
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64)
    hf_cos, hf_sin = DeepseekV3RotaryEmbedding(hf_cfg)(x.float(), positions)
    torch.testing.assert_close(hf_cos.double(), cos, rtol=0, atol=1e-5)
    torch.testing.assert_close(hf_sin.double(), sin, rtol=0, atol=1e-5)
    with torch.no_grad():
        want, _ = theirs(x, (cos, sin), attention_mask=None)  # causal (no mask): transformers' SDPA path
        got = ours(x, positions)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert math.isclose(ours.scale, theirs.scaling)  # 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)


def test_mla_gradients_pass_a_float64_gradcheck():
    """MLA's analytic gradients (input and every weight) against finite differences, in float64 throughout
    (an RMSNorm that rounded to float32 fails this at once)."""
    cfg = tiny_model_config(q_lora_rank=24)
    torch.manual_seed(0)
    mla = MLA(cfg.mla_config, cfg.hidden_size, cfg.num_attention_heads, cfg.max_position_embeddings, 1e-6).double()
    x = torch.randn(1, 5, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    weights = list(mla.parameters())
    names = [name for name, _ in mla.named_parameters()]

    def attention(x, *params):
        return torch.func.functional_call(mla, dict(zip(names, params, strict=True)), (x, torch.arange(5)))

    assert torch.autograd.gradcheck(attention, (x, *weights), fast_mode=True)


def test_max_position_embeddings_is_enforced():
    model = build_model(tiny_model_config(max_position_embeddings=16))
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_layers_use_peer_from_start_layer_and_dense_baseline():
    model = build_model(tiny_model_config(peer_start_layer=2, num_hidden_layers=4))
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["DenseMLP", "DenseMLP", "PEER", "PEER"]
    dense = build_model(tiny_model_config(use_peer=False, num_hidden_layers=4))
    assert all(type(layer.mlp).__name__ == "DenseMLP" for layer in dense.layers)
    assert dense.layers[0].mlp.fc_in.weight.shape == (64, 32)  # intermediate_size x hidden_size


def test_initializer_range_and_layer_norm_eps_are_honoured():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(initializer_range=0.1, hidden_size=64, vocab_size=4000, layer_norm_eps=0.25))
    assert abs(model.embed.weight.std().item() - 0.1) < 0.005
    assert abs(model.lm_head.weight.std().item() - 0.1) < 0.005
    assert abs(model.layers[1].mlp.down.std().item() - 0.1) < 0.01
    assert model.norm.eps == 0.25 and model.layers[0].attn_norm.eps == 0.25 and model.layers[0].attn.kv_norm.eps == 0.25
    torch.manual_seed(0)
    small = build_model(tiny_model_config(initializer_range=0.01, hidden_size=64, vocab_size=4000))
    assert abs(small.embed.weight.std().item() - 0.01) < 0.0005


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_peer": False},
        {"q_lora_rank": None},
        {"expert_hidden_size": 3},
        {"batch_norm_query": False},
        {"peer_start_layer": 0},
    ],
)
def test_parameter_counts_match_formulas(overrides):
    model = build_model(tiny_model_config(**overrides))
    counts = count_parameters(model)
    assert counts == parameter_formulas(model.config)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides", [{}, {"use_peer": False}, {"q_lora_rank": None}, {"expert_hidden_size": 3}, {"peer_start_layer": 0}]
)
def test_forward_flops_match_torch_flop_counter(overrides):
    """The MFU numerator's matrix products against what torch counts in a real forward pass.

    torch's counter sees the weight products, PEER's sub-key scoring and attention, not the
    experts (embedding_bag kernels), so those are checked against their formula alone.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from peerlab.model import forward_flops_per_token, training_flops_per_token

    torch.manual_seed(0)
    cfg = tiny_model_config(**overrides)
    model = build_model(cfg).eval()
    B, T = 2, 20
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids)  # attention as plain batched products, which the counter sees on CPU
    f = forward_flops_per_token(cfg, T)
    a = cfg.mla_config
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    padding = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * T * (qk - a.v_head_dim)  # v padded to qk for sdpa
    assert counter.get_total_flops() == B * T * (f["linear"] + f["attention"] + padding + f["peer_search"])
    p = cfg.peer_config
    layers = sum(isinstance(layer.mlp, PEER) for layer in model.layers)
    assert (
        f["peer_experts"] == layers * p.num_heads * p.num_experts_per_tok * p.expert_hidden_size * 4 * cfg.hidden_size
    )
    assert training_flops_per_token(cfg, T) == 3 * (f["linear"] + f["attention"] + f["peer_experts"]) + f["peer_search"]


def test_reference_config_sizes_on_meta_device():
    cfg = load_config(ROOT / "configs" / "config.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model_config)
    counts = count_parameters(model)
    assert counts == parameter_formulas(cfg.model_config)
    # FACTS.md: 2 x 1,048,576 x 768 per PEER layer, ten PEER layers (2..11).
    assert counts["peer_experts"] == 10 * 2 * 1048576 * 768
    peer = model.layers[2].mlp
    assert isinstance(peer, PEER) and peer.num_experts == 1048576


def test_model_trains_on_cpu():
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 97, (4, 17))
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for n, p in model.named_parameters() if "lm_head" in n or ".mlp.down" in n)


def test_default_model_config_is_the_spec():
    m = ModelConfig()
    assert (m.hidden_size, m.num_hidden_layers, m.peer_config.num_experts) == (768, 12, 1048576)
    assert m.mla_config.rope_theta == 10000.0


def test_fused_loss_equals_cross_entropy_of_logits():
    model = float64_model()
    model.train()
    ids = torch.randint(0, 97, (3, 13))
    fused = model(ids[:, :-1], labels=ids[:, 1:])
    grads = torch.autograd.grad(fused, list(model.parameters()))
    logits = model(ids[:, :-1])
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    want = torch.autograd.grad(plain, list(model.parameters()))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, :-1], labels=ids[:, 1:]), plain.detach(), rtol=1e-12, atol=1e-12)


def test_liger_loss_matches_float64_in_the_interpreter():
    """The CUDA default (liger-kernel's fused linear cross-entropy) through the model, in Triton's CPU
    interpreter, in a subprocess (tests/liger_loss_cases.py)."""
    from tests.conftest import run_in_triton_interpreter

    pytest.importorskip("triton", reason="Triton is not installed (it has no CPU wheels for macOS or Windows)")
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    run_in_triton_interpreter(ROOT / "tests" / "liger_loss_cases.py")


def test_fused_loss_gradients_survive_fp16_autocast():
    """The per-token gradients are tiny (1 / tokens); under fp16 they are multiplied out in float32."""
    from peerlab.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    n, d, vocab = 2048, 128, 4096
    h0, w0, y = torch.randn(n, d), torch.randn(vocab, d) * 0.02, torch.randint(0, vocab, (n,))

    def grads(fp16):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
            loss = linear_cross_entropy(h, w, y)
        loss.backward()
        return h.grad, w.grad

    (rh, rw), (gh, gw) = grads(False), grads(True)
    assert ((gh - rh).norm() / rh.norm()).item() < 5e-3 and ((gw - rw).norm() / rw.norm()).item() < 5e-3
    assert (gh == 0).float().mean().item() < 1e-3
