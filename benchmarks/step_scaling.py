"""Does a PEER training step cost what its tokens cost, whatever the number of experts?

    python benchmarks/step_scaling.py [--tokens 1024] [--steps 8]

1. One PEER layer's whole training step (forward, backward, clipping, optimizer step) at
   N = 128² and N = 1024² experts (8 heads, k = 16, dim 256, 1,024 tokens), the same tokens
   and retrievals' count at both sizes. Variants:
   - `today`: the path before sparse updates were the default: dense table gradients, torch's
     AdamW over every row, glibc's malloc as it comes;
   - `default`: what a run does now with default settings: row-sparse table gradients,
     `RowSparseAdamW`, freed memory kept for reuse (`peerlab.train.allocator`).
   The target: the default step at N = 1024² within 1.5x of the same step at N = 128².
2. The demo model's training step (configs/demo.yaml, batch 8 x 256), today against default:
   the embedded sweep must not be slower.

Each (variant, size) runs in its own subprocess (malloc settings are per process and cannot
be undone); the figure is the median of --steps steps after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def layer_step(variant: str, side: int, tokens: int, steps: int) -> float:
    """Median seconds of one PEER layer's training step at N = side² experts."""
    from peerlab.config import PeerConfig
    from peerlab.model import PEER
    from peerlab.train.optim import RowSparseAdamW, clip_grad_norm

    sparse = variant == "default"
    torch.manual_seed(0)
    config = PeerConfig(num_experts=side * side, num_experts_per_tok=16, num_heads=8, product_key_dim=[side, side])
    layer = PEER(config, 256).train()
    layer.sparse_grad = sparse
    make = RowSparseAdamW if sparse else torch.optim.AdamW
    optimizer = make(layer.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randn(tokens, 256)
    target = torch.randn(tokens, 256)

    def step() -> None:
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        clip_grad_norm(layer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, steps)


def model_step(variant: str, steps: int, batch: int = 8, seq: int = 256) -> float:
    """Median seconds of the demo model's training step (fused LM head and loss, clipping, optimizer)."""
    from dataclasses import replace

    from peerlab.config import load_config
    from peerlab.model import PEER, build_model
    from peerlab.train.optim import build_optimizer, clip_grad_norm

    cfg = load_config(ROOT / "configs" / "demo.yaml")
    t = replace(cfg.train_config, sparse_experts=variant == "default")
    torch.manual_seed(0)
    model = build_model(cfg.model_config).train()
    for layer in model.modules():
        if isinstance(layer, PEER):
            layer.sparse_grad = t.sparse_experts
    optimizer = build_optimizer(model, t)
    ids = torch.randint(0, cfg.model_config.vocab_size, (batch, seq + 1))

    def step() -> None:
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        clip_grad_norm(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, steps)


def timed(step, steps: int) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def child(args) -> None:
    if args.variant == "default":
        from peerlab.train.allocator import reuse_freed_memory

        reuse_freed_memory()
    if args.side:
        seconds = layer_step(args.variant, args.side, args.tokens, args.steps)
    else:
        seconds = model_step(args.variant, args.steps)
    print(json.dumps({"seconds": seconds}))


def run_child(variant: str, side: int, args) -> float:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--side", str(side)]
    cmd += ["--tokens", str(args.tokens), "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sides", default="128,1024", help="product-key sides (N = side²), smallest first")
    parser.add_argument("--no-model", action="store_true", help="skip the demo model's step")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    torch.set_num_threads(torch.get_num_threads())
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    sides = [int(s) for s in args.sides.split(",")]
    print(f"one PEER layer, 8 heads, k 16, dim 256, {args.tokens} tokens: whole step (ms)")
    print(f"{'variant':10s}" + "".join(f"{f'N={s}²':>12s}" for s in sides) + f"{'ratio':>9s}")
    for variant in ("today", "default"):
        ms = [1000 * run_child(variant, side, args) for side in sides]
        print(f"{variant:10s}" + "".join(f"{m:12.1f}" for m in ms) + f"{ms[-1] / ms[0]:8.2f}x")
    if not args.no_model:
        today, default = (1000 * run_child(v, 0, args) for v in ("today", "default"))
        print(f"demo model step, batch 8 x 256 (ms): today {today:.0f}, default {default:.0f}, {today / default:.2f}x")


if __name__ == "__main__":
    main()
