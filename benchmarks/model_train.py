"""Training tokens/s of the whole PEER/MLA model against its dense baseline of the same shape.

    python benchmarks/model_train.py --config configs/demo.yaml                       # CPU
    python benchmarks/model_train.py --config configs/config.yaml --device cuda \\
        --set model_config.peer_start_layer=11 --amp bf16                           # GPU

One step = forward, cross-entropy, backward, gradient clipping and AdamW, on random token
ids (speed does not depend on the text). The PEER model and the dense baseline
(`use_peer: false`, the same config otherwise) alternate round by round in one process;
figures are medians over rounds. Peak memory is read from the CUDA allocator (GPU only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from peerlab.config import load_config
from peerlab.model import build_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", choices=["none", "bf16"], default="none", help="bf16 autocast over fp32 weights")
    ap.add_argument("--batch", type=int, default=None, help="default: per_device_train_batch_size")
    ap.add_argument("--seq", type=int, default=None, help="default: max_seq_length")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per round")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, args.overrides)
    batch = args.batch or cfg.train_config.per_device_train_batch_size
    seq = args.seq or cfg.dataset_config.max_seq_length
    vocab = cfg.model_config.vocab_size
    device = torch.device(args.device)
    torch.manual_seed(0)

    variants = {}
    for name, use_peer in (("peer", True), ("dense", False)):
        mcfg = load_config(
            args.config, [*args.overrides, f"model_config.use_peer={str(use_peer).lower()}"]
        ).model_config
        with device:  # build and initialise the weights where they will live
            model = build_model(mcfg)
        fused = device.type == "cuda"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=fused)
        variants[name] = (model, opt, sum(p.numel() for p in model.parameters()))

    ids = torch.randint(0, vocab, (batch, seq + 1), device=device)

    def step(model, opt):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp == "bf16"):
            logits = model(ids[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for model, opt, _ in variants.values():
        step(model, opt)  # warm-up (and AdamW state allocation)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (model, opt, _) in variants.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(model, opt)
            sync()
            times[name].append((time.perf_counter() - t0) / args.steps)
    peak = {}
    if device.type == "cuda":  # the variant's own weights, gradients, AdamW state and activations
        for name, (model, opt, _) in variants.items():
            state = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights and gradients
            moments = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
            state += sum(t.numel() * t.element_size() for t in moments)
            sync()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(model, opt)
            sync()
            peak[name] = torch.cuda.max_memory_allocated() - before + state

    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(
        f"model training step, {args.config} {' '.join(args.overrides)}: batch {batch} x {seq} tokens, "
        f"amp {args.amp}, {machine}, torch {torch.__version__}"
    )
    result = {}
    for name, (_, _, params) in variants.items():
        tps = batch * seq / statistics.median(times[name])
        result[name] = {"params": params, "tokens_per_s": tps, "peak_bytes": peak.get(name)}
        mem = f", peak {peak[name] / 2**30:.1f} GiB" if name in peak else ""
        print(f"  {name:<6} {params:>15,} parameters  {tps:>12,.0f} tokens/s{mem}")
    print(f"  peer / dense tokens/s: {result['peer']['tokens_per_s'] / result['dense']['tokens_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "batch": batch, "seq": seq, "amp": args.amp, "result": result}, f, indent=1)


if __name__ == "__main__":
    main()
