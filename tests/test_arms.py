"""Feed-forward arms (ffn_type moe and pkm): slow float64 references, sizes, config errors, tiny training runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from peerlab.config import ConfigError, MoEConfig, PKMConfig, load_config
from peerlab.model import build_model, count_parameters, forward_flops_per_token, parameter_formulas
from peerlab.model.moe import MoE
from peerlab.model.pkm import PKM

from tests.conftest import ROOT, tiny_model_config

# --------------------------------------------------------------------------------------
# MoE
# --------------------------------------------------------------------------------------


def make_moe(experts=6, top_k=2, size=5, shared=1, weight=0.1, dim=8, seed=0) -> MoE:
    torch.manual_seed(seed)
    cfg = MoEConfig(
        num_experts=experts, top_k=top_k, expert_size=size, num_shared_experts=shared, balance_loss_weight=weight
    )
    layer = MoE(cfg, dim, initializer_range=0.5).double()
    return layer


def moe_reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax scores, the top_k experts weighted by their scores, plus the shared MLP."""
    out = []
    for t in range(x.shape[0]):
        s = torch.softmax(x[t] @ layer.router.weight.t(), dim=-1)  # (E,)
        chosen = s.topk(layer.top_k).indices
        y = torch.zeros_like(x[t])
        for e in chosen.tolist():
            y = y + s[e] * (F.gelu(x[t] @ layer.expert_in[e]) @ layer.expert_out[e])
        if layer.shared_in is not None:
            y = y + layer.shared_out.weight @ F.gelu(layer.shared_in.weight @ x[t])
        out.append(y)
    return torch.stack(out)


@pytest.mark.parametrize("shared,top_k", [(1, 2), (0, 1), (2, 3)])
def test_moe_matches_per_token_reference_with_gradients(shared, top_k):
    layer = make_moe(shared=shared, top_k=top_k)
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad((y * grad_out).sum(), [x, *layer.parameters()])
    ref = moe_reference(layer, x.view(-1, 8)).view_as(x)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_moe_balance_loss_and_load_follow_the_formula():
    """alpha * N/(K T) * sum_i (count_i) * (1/T sum_t s_it), computed here in float64 with plain loops."""
    layer = make_moe(experts=5, top_k=2, weight=0.03)
    layer.train()
    x = torch.randn(40, 8, dtype=torch.float64)
    layer(x)
    T, K, N = 40, 2, 5
    s = torch.softmax(x @ layer.router.weight.t(), dim=-1).detach()  # (T, N)
    counts = [0] * N
    for t in range(T):
        for e in s[t].topk(K).indices.tolist():
            counts[e] += 1
    P = [sum(float(s[t, i]) for t in range(T)) / T for i in range(N)]
    expected = 0.03 * sum(N / (K * T) * counts[i] * P[i] for i in range(N))
    assert math.isclose(layer.last_balance_loss.item(), expected, rel_tol=1e-12)
    assert layer.last_load.tolist() == pytest.approx([c / (T * K) for c in counts], abs=1e-15)
    # its gradient reaches the router through P_i (f_i is a count)
    (g,) = torch.autograd.grad(layer.last_balance_loss, layer.router.weight)
    assert g.abs().sum() > 0


def test_moe_is_capacity_free():
    """Every token reaches exactly top_k routed experts (and the shared ones), however skewed the router."""
    layer = make_moe(experts=4, top_k=2, shared=1)
    with torch.no_grad():
        layer.router.weight[0] += 5.0  # every token (all of whose features are near 1) prefers expert 0
    x = 1.0 + 0.1 * torch.randn(50, 8, dtype=torch.float64)
    expert = layer.route(x)[2]  # (T, K)
    assert expert.shape == (50, 2) and all(len(set(row)) == 2 for row in expert.tolist())
    layer.train()
    y = layer(x)
    assert layer.last_load.sum().item() == pytest.approx(1.0)
    assert layer.last_load[0].item() == pytest.approx(0.5)  # expert 0 took all 50 tokens: half the assignments
    torch.testing.assert_close(y, moe_reference(layer, x), rtol=1e-10, atol=1e-12)


def test_model_loss_adds_balance_loss_in_training_only():
    cfg = moe_model_config(weight=0.05)
    model = build_model(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    model.train()
    loss = model(ids, labels=ids)
    lm = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())  # logits: the same forward, no aux
    aux = sum(layer.mlp.last_balance_loss for layer in model.layers if isinstance(layer.mlp, MoE))
    torch.testing.assert_close(loss, lm + aux)
    model.eval()
    torch.testing.assert_close(model(ids, labels=ids), F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()))


def test_the_logged_loss_of_an_moe_step_is_the_language_models():
    """A training step trains on the cross-entropy plus the balance losses, and reports the cross-entropy
    alone (the balance losses have lines of their own), so an MoE arm's loss compares with the others'."""
    from peerlab.config import TrainConfig
    from peerlab.train.distributed import DataParallel, Place
    from peerlab.train.precision import autocast, grad_scaler

    cfg = moe_model_config(weight=0.5)
    model = build_model(cfg).double()
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        lm = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()  # same weights
    train = TrainConfig(learning_rate=1e-3, max_grad_norm=1.0, gradient_accumulation_steps=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    parallel = DataParallel(model, Place(0, 1, torch.device("cpu")))
    loss, _ = parallel.step(
        iter([ids]), optimizer, grad_scaler(train, torch.device("cpu")), autocast(train, torch.device("cpu")), train
    )
    aux = sum(float(layer.mlp.last_balance_loss) for layer in model.layers if isinstance(layer.mlp, MoE))
    assert aux > 1e-3 and loss == pytest.approx(lm, rel=1e-9)


# --------------------------------------------------------------------------------------
# PKM
# --------------------------------------------------------------------------------------


def make_pkm(n1=6, n2=7, k=4, heads=3, dim=8, query_dim=10, bn=True, seed=0) -> PKM:
    torch.manual_seed(seed)
    cfg = PKMConfig(
        num_experts=n1 * n2,
        product_key_dim=[n1, n2],
        num_experts_per_tok=k,
        num_heads=heads,
        query_dim=query_dim,
        batch_norm_query=bn,
    )
    layer = PKM(cfg, dim, initializer_range=0.5).double()
    if bn:  # non-trivial BatchNorm statistics and affine terms
        layer.query_norm.running_mean.normal_()
        layer.query_norm.running_var.uniform_(0.5, 2.0)
        layer.query_norm.weight.data.uniform_(0.5, 1.5)
    return layer


def pkm_brute_force(layer: PKM, x: torch.Tensor):
    """Score all n1*n2 keys of every head and take the top k (tests/test_peer.py's search); values by a direct sum."""
    from tests.test_peer import brute_force

    scores, indices = brute_force(layer, x)  # (M, H, k) each
    w = torch.softmax(scores, dim=-1)  # (M, H, k)
    y = (w.unsqueeze(-1) * layer.values[indices]).sum((1, 2))  # (M, d)
    return scores, indices, y


@pytest.mark.parametrize("bn", [True, False])
def test_pkm_retrieval_and_output_match_brute_force(bn):
    """Each head searches its own sub-keys (Lample et al. 2019, Sec. 3.3; XLM's mem_use_different_keys) and all
    heads share the values."""
    layer = make_pkm(bn=bn).eval()
    assert layer.sub_keys.shape == (3 * (6 + 7), 5)  # three heads' pairs of sub-key sets
    x = torch.randn(20, 8, dtype=torch.float64)
    scores, indices = layer.retrieve(x)
    ref_scores, ref_indices, ref_y = pkm_brute_force(layer, x)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-12, atol=1e-12)
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(layer(x), ref_y, rtol=1e-10, atol=1e-12)


def test_a_pkm_saved_with_shared_sub_keys_loads_with_them_in_every_head():
    """A PKM checkpoint from before keys per head (one pair of sub-key sets) loads into the PKM of today with
    that pair in every head: the same search as the shared keys (the brute force over one pair for all heads)."""
    from tests.test_peer import brute_force

    layer = make_pkm().eval()
    state = layer.state_dict()
    shared = state["sub_keys"][: layer.n1 + layer.n2].clone()
    layer.load_state_dict({**state, "sub_keys": shared})
    x = torch.randn(20, 8, dtype=torch.float64)
    scores, indices = layer.retrieve(x)
    q = layer.query_norm(layer.query(x)).view(20, layer.num_heads, layer.query_dim)
    probe = make_pkm(heads=1, bn=False).eval()  # one head whose query is the identity, keys the one pair
    probe.sub_keys.data, probe.query.weight.data = shared, torch.eye(layer.query_dim, dtype=torch.float64)
    for h in range(layer.num_heads):
        want_scores, want_indices = brute_force(probe, q[:, h])  # head h's query against the one pair
        assert torch.equal(indices[:, h], want_indices[:, 0])
        torch.testing.assert_close(scores[:, h], want_scores[:, 0], rtol=1e-12, atol=1e-12)


def test_pkm_gradients_match_brute_force():
    layer = make_pkm().train()
    x = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_out = torch.randn_like(y)
    params = [x, layer.values, layer.query.weight, layer.sub_keys]
    grads = torch.autograd.grad((y * grad_out).sum(), params)
    _, _, ref = pkm_brute_force(layer, x.view(-1, 8))
    ref_grads = torch.autograd.grad((ref.view_as(y) * grad_out).sum(), params)
    torch.testing.assert_close(y, ref.view_as(y), rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------


def moe_model_config(weight=0.01, **overrides):
    moe = MoEConfig(num_experts=4, top_k=2, expert_size=12, num_shared_experts=1, balance_loss_weight=weight)
    return tiny_model_config(ffn_type="moe", use_peer=None, moe_config=moe, **overrides)


def pkm_model_config(bn=True, **overrides):
    pkm = PKMConfig(
        num_experts=48, product_key_dim=[6, 8], num_experts_per_tok=3, num_heads=2, query_dim=6, batch_norm_query=bn
    )
    return tiny_model_config(ffn_type="pkm", use_peer=None, pkm_config=pkm, **overrides)


@pytest.mark.parametrize(
    "cfg",
    [
        moe_model_config(),
        moe_model_config(peer_start_layer=0),
        pkm_model_config(),
        pkm_model_config(bn=False),
    ],
    ids=["moe", "moe_from_0", "pkm", "pkm_no_bn"],
)
def test_parameter_formulas_match_built_arms(cfg):
    model = build_model(cfg)
    counts = count_parameters(model)
    assert counts == parameter_formulas(cfg)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    arm = {"moe": MoE, "pkm": PKM}[cfg.ffn_type]
    start = cfg.peer_start_layer
    assert [isinstance(layer.mlp, arm) for layer in model.layers] == [False] * start + [True] * (3 - start)


def test_active_flops_of_the_arms():
    m = moe_model_config()
    f = forward_flops_per_token(m, 16)
    e, d, layers = m.moe_config, m.hidden_size, 2
    assert f["moe_experts"] == layers * (e.top_k + e.num_shared_experts) * 2 * 2 * d * e.expert_size
    assert f["peer_experts"] == f["peer_search"] == f["pkm_values"] == 0
    dense = forward_flops_per_token(tiny_model_config(use_peer=False), 16)
    assert f["linear"] - dense["linear"] == 2 * layers * (d * e.num_experts - 2 * d * m.intermediate_size)
    p = pkm_model_config()
    f = forward_flops_per_token(p, 16)
    r = p.pkm_config
    assert f["pkm_values"] == layers * r.num_heads * r.num_experts_per_tok * 2 * d
    assert f["pkm_search"] == layers * 2 * r.num_heads * (6 + 8) * r.query_dim // 2


# --------------------------------------------------------------------------------------
# Config errors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["model_config.ffn_type=mlp"], "model_config.ffn_type (from --set): must be one of peer, dense, moe, pkm"),
        (["model_config.ffn_type=moe", "model_config.moe_config.top_k=9"], "model_config.moe_config.top_k"),
        (["model_config.ffn_type=peer", "model_config.use_peer=false"], "model_config.use_peer (from --set): false"),
        (["model_config.ffn_type=moe", "model_config.use_peer=false"], "contradicts model_config.ffn_type = moe"),
        (["model_config.ffn_type=dense", "model_config.use_peer=true"], "contradicts model_config.ffn_type = dense"),
        (["model_config.pkm_config.num_experts=100"], "model_config.pkm_config.product_key_dim"),
    ],
)
def test_arm_config_errors_are_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "demo.yaml", overrides)
    message = str(err.value)
    assert "\n" not in message and expected in message


def test_use_peer_maps_onto_ffn_type():
    from peerlab.config import ffn_type

    def arm(*overrides):
        m = load_config(ROOT / "configs" / "demo.yaml", list(overrides)).model_config
        return ffn_type(m), m.use_peer

    assert arm() == ("peer", True)
    assert arm("model_config.use_peer=false") == ("dense", False)
    assert arm("model_config.use_peer=null", "model_config.ffn_type=dense") == ("dense", False)
    assert arm("model_config.ffn_type=moe") == ("moe", True)  # use_peer: true (the spec default) defers
    assert arm("model_config.use_peer=null", "model_config.ffn_type=pkm") == ("pkm", True)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arm",
    [
        [
            "model_config.ffn_type=moe",
            "model_config.moe_config.num_experts=4",
            "model_config.moe_config.expert_size=64",
        ],
        [
            "model_config.ffn_type=pkm",
            "model_config.pkm_config.num_experts=1024",
            "model_config.pkm_config.product_key_dim=[32, 32]",
            "model_config.pkm_config.num_heads=2",
            "model_config.pkm_config.num_experts_per_tok=8",
            "model_config.pkm_config.query_dim=32",
        ],
    ],
    ids=["moe", "pkm"],
)
def test_tiny_arm_trains(demo_corpus, tmp_path, arm):
    """A run of each arm trains, is evaluated by lm-eval at its end, and continues from its checkpoint."""
    from peerlab.tracking import read_evals, read_metrics
    from tests.test_train import lm_eval_settings, losses, run, tiny

    cfg = tiny(demo_corpus, *arm, "train_config.eval_steps=100", *lm_eval_settings(demo_corpus))
    run(cfg, tmp_path / "run")
    got = losses(tmp_path / "run")
    assert len(got) == 6 and all(math.isfinite(v) for v in got) and got[-1] < got[0]
    evals = read_evals(tmp_path / "run")
    assert {r["task"] for r in evals} >= {"peerlab_bpb_prose", "peerlab_heldout_mc"}
    assert all(math.isfinite(r["value"]) for r in evals)
    run(tiny(demo_corpus, *arm, "train_config.eval_steps=100", steps=8), tmp_path / "run")  # from step 6's checkpoint
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == list(range(1, 9))

    lines = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    moe = [key for key in lines[-1] if key.startswith("moe_load/")]
    if "model_config.ffn_type=moe" in arm:  # the MoE layer's per-expert load and balance loss, every line
        assert moe == ["moe_load/1"]
        for r in lines:
            assert len(r["moe_load/1"]) == cfg.model_config.moe_config.num_experts
            assert sum(r["moe_load/1"]) == pytest.approx(1, abs=1e-4) and r["moe_balance_loss/1"] > 0
        import pandas as pd

        table = pd.read_parquet(tmp_path / "run" / "usage.parquet")  # expert usage over each log_freq window
        assert set(table["layer"]) == {1} and (table["experts"] == 4).all() and table["usage"].between(0, 1).all()
        by_source = pd.read_parquet(tmp_path / "run" / "usage_by_source.parquet")
        src = by_source[by_source["kind"] == "source"]
        assert set(src["step"]) == set(table["step"]) and src.groupby("step")["source"].nunique().eq(3).all()
        assert (src.groupby("step")["mass_share"].sum() - 1).abs().lt(1e-9).all()
    else:
        assert moe == []


@pytest.mark.parametrize("make", [moe_model_config, pkm_model_config], ids=["moe", "pkm"])
def test_arms_keep_causality_and_run_under_bf16_autocast(make):
    """In eval mode every token is computed on its own: later tokens never change earlier logits.
    Under CPU bf16 autocast (the mixed-precision path) both arms give finite losses and gradients."""
    torch.manual_seed(0)
    model = build_model(make()).double().eval()
    ids = torch.randint(0, 97, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = torch.randint(0, 97, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :8], model(changed)[:, :8], rtol=1e-12, atol=1e-12)
    model = build_model(make()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("arm", ["moe", "pkm"])
def test_float8_leaves_each_arms_router_out(arm):
    """The MoE gate and the PKM query pick experts or memory rows: Float8 keeps them in high precision, by role."""
    from torch import nn

    from peerlab.train.precision import float8_plan

    cfg = load_config(ROOT / "configs" / "config.yaml", [f"model_config.ffn_type={arm}"]).model_config
    with torch.device("meta"):
        model = build_model(cfg)
    plan = float8_plan(model)
    router = "router" if arm == "moe" else "query"
    layers = [i for i, block in enumerate(model.layers) if isinstance(block.mlp, MoE if arm == "moe" else PKM)]
    assert layers
    for i in layers:
        assert "router" in plan.skipped[f"layers.{i}.mlp.{router}"]
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert sorted(plan.converted + list(plan.skipped)) == sorted(linear)


def test_active_parameters_count_what_a_token_uses_in_each_arm():
    """Against the built models: MoE leaves num_experts - top_k routed experts per layer idle, PKM all but
    heads x k value rows; the rest of the model is used whole."""
    from peerlab.model.size import active_parameters

    moe_cfg, pkm_cfg = moe_model_config(), pkm_model_config()
    moe, pkm = build_model(moe_cfg), build_model(pkm_cfg)
    total, active = active_parameters(moe_cfg)
    assert total == sum(t.numel() for t in moe.parameters())
    idle = 0
    for layer in (b.mlp for b in moe.layers if isinstance(b.mlp, MoE)):
        per_expert = layer.expert_in[0].numel() + layer.expert_out[0].numel()
        idle += (layer.expert_in.shape[0] - moe_cfg.moe_config.top_k) * per_expert
    assert idle > 0 and active == total - idle
    total, active = active_parameters(pkm_cfg)
    assert total == sum(t.numel() for t in pkm.parameters())
    v = pkm_cfg.pkm_config
    idle = sum(
        layer.values.numel() - v.num_heads * v.num_experts_per_tok * layer.values.shape[1]
        for layer in (b.mlp for b in pkm.layers if isinstance(b.mlp, PKM))
    )
    assert idle > 0 and active == total - idle
