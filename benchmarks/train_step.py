"""Training-step throughput of the model, against transformers' DeepseekV3ForCausalLM of the same shape.

    python benchmarks/train_step.py [--config configs/demo.yaml]

1. peerlab with `use_peer: false` against `DeepseekV3ForCausalLM` built (random init,
   nothing downloaded) with the same vocabulary, hidden size, layers, heads, MLA dimensions
   and a dense MLP of the same width in every layer (`first_k_dense_replace` = layers).
   Note: DeepSeek's MLP is SwiGLU (three matrices), peerlab's dense MLP GELU (two).
2. The full PEER model at the demo size, with expert-usage tracking on and off (its cost).
3. The optimizer step of one PEER layer at N = 1024^2 experts (dim 256, 8 heads, k = 16,
   4 x 256 tokens): plain AdamW on dense gradients against RowSparseAdamW on the sparse
   gradients of the retrieved rows (train_config.sparse_experts). Run one after the
   other (each needs about 8 GB); the medians of --opt-steps steps after a warm-up step.

One step = forward, cross-entropy, backward, clipping, AdamW, on random token ids; the
variants alternate round by round in one process and figures are medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from peerlab.config import load_config
from peerlab.model import build_model


def deepseek_like(m):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    a = m.mla_config
    cfg = DeepseekV3Config(
        vocab_size=m.vocab_size,
        hidden_size=m.hidden_size,
        intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads,
        q_lora_rank=a.q_lora_rank,
        kv_lora_rank=a.kv_lora_rank,
        qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim,
        qk_nope_head_dim=a.qk_nope_head_dim,
        first_k_dense_replace=m.num_hidden_layers,
        n_routed_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.layer_norm_eps,
        tie_word_embeddings=False,
        initializer_range=m.initializer_range,
    )
    return DeepseekV3ForCausalLM(cfg)


def stepper(model, vocab: int, batch: int, seq: int, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def step():
        if hf:  # transformers' own loss path: logits, then its cross-entropy
            loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
        else:  # peerlab's training path: the fused LM-head loss
            loss = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def race(steps: dict, tokens: int, rounds: int, reps: int) -> dict[str, float]:
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            times[name].append((time.perf_counter() - t0) / reps)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--opt-experts", type=int, default=1024 * 1024, help="experts of the optimizer-step layer")
    ap.add_argument("--opt-steps", type=int, default=3, help="optimizer steps to time (0 skips that part)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config)
    m, t = cfg.model_config, cfg.train_config
    batch, seq = t.per_device_train_batch_size, cfg.dataset_config.max_seq_length
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    print(f"training step, {args.config}: batch {batch} x {seq} tokens, float32 ({machine})")

    torch.manual_seed(0)
    dense_cfg = load_config(args.config, ["model_config.use_peer=false"]).model_config
    ours = build_model(dense_cfg)
    theirs = deepseek_like(dense_cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    rates = race(
        {
            "peerlab dense": stepper(ours, m.vocab_size, batch, seq, False),
            "DeepseekV3ForCausalLM": stepper(theirs, m.vocab_size, batch, seq, True),
        },
        batch * seq,
        args.rounds,
        args.reps,
    )
    print(f"  peerlab (use_peer: false)  {n_ours:>12,} parameters  {rates['peerlab dense']:>10,.0f} tokens/s")
    print(f"  DeepseekV3ForCausalLM      {n_theirs:>12,} parameters  {rates['DeepseekV3ForCausalLM']:>10,.0f} tokens/s")
    print(f"  peerlab / DeepseekV3: {rates['peerlab dense'] / rates['DeepseekV3ForCausalLM']:.2f}")

    torch.manual_seed(0)
    peer = build_model(m)
    quiet = build_model(load_config(args.config, ["model_config.peer_config.log_expert_usage=false"]).model_config)
    quiet.load_state_dict(peer.state_dict())
    rates = race(
        {
            "tracked": stepper(peer, m.vocab_size, batch, seq, False),
            "untracked": stepper(quiet, m.vocab_size, batch, seq, False),
        },
        batch * seq,
        args.rounds,
        args.reps,
    )
    cost = rates["untracked"] / rates["tracked"] - 1
    print(
        f"  PEER model, usage tracked    {sum(p.numel() for p in peer.parameters()):>10,} parameters  "
        f"{rates['tracked']:>10,.0f} tokens/s"
    )
    print(f"  PEER model, usage untracked  {'':>10}             {rates['untracked']:>10,.0f} tokens/s")
    print(f"  cost of tracking expert usage: {100 * cost:+.1f}% of step time")
    if args.opt_steps:
        optimizer_step(args.opt_experts, args.opt_steps)


def optimizer_step(experts: int, steps: int) -> None:
    """Optimizer step (and backward) of one large PEER layer: dense AdamW against RowSparseAdamW."""
    import gc

    from peerlab.config import PeerConfig
    from peerlab.model.peer import PEER
    from peerlab.train.optim import RowSparseAdamW

    root = int(round(experts**0.5))
    cfg = PeerConfig(
        num_experts=experts, product_key_dim=[root, root], num_experts_per_tok=16, num_heads=8, query_dim=256
    )
    x = torch.randn(4, 256, 256, generator=torch.Generator().manual_seed(0))
    print(f"optimizer step of one PEER layer, N = {experts:,}, dim 256, 8 heads, k = 16, 4 x 256 tokens:")
    results = {}
    for name in ("AdamW (dense gradients)", "RowSparseAdamW (sparse rows)"):
        torch.manual_seed(0)
        layer = PEER(cfg, 256)
        sparse = name.startswith("Row")
        layer.sparse_grad = sparse
        opt = (RowSparseAdamW if sparse else torch.optim.AdamW)(layer.parameters(), lr=1e-3, weight_decay=0.01)
        backward, stepping = [], []
        for i in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            layer(x).pow(2).mean().backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if i:  # the first step allocates the moments
                backward.append(t1 - t0)
                stepping.append(t2 - t1)
        results[name] = (statistics.median(backward), statistics.median(stepping))
        print(f"  {name:<30} forward+backward {results[name][0]:6.2f} s   optimizer step {results[name][1]:6.2f} s")
        del layer, opt
        gc.collect()
    (dense_b, dense_s), (sparse_b, sparse_s) = results.values()
    print(
        f"  optimizer step: sparse is {dense_s / sparse_s:.1f}x faster; step + backward {(dense_b + dense_s) / (sparse_b + sparse_s):.1f}x"
    )


if __name__ == "__main__":
    main()
