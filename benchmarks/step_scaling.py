"""Does a PEER training step cost what its tokens cost, whatever the number of experts?

    python benchmarks/step_scaling.py [--tokens 1024] [--steps 8] [--rounds 1] [--variants today,gathered,default]

1. One PEER layer's whole training step (forward, backward, clipping, optimizer step) at
   N = 128² and N = 1024² experts (8 heads, k = 16, dim 256, 1,024 tokens), the same tokens
   and retrievals' count at both sizes. Variants:
   - `today`: the path before sparse updates were the default: dense table gradients, torch's
     AdamW over every row, glibc's malloc as it comes;
   - `gathered`: the default before the one-pass row kernel: row-sparse table gradients,
     `RowSparseAdamW` with torch's ops (gather the touched rows of the weight and both
     moments, torch's fused AdamW, copy them back), freed memory kept for reuse;
   - `default`: what a run does now with default settings: row-sparse table gradients,
     `RowSparseAdamW` with its one-pass row kernel (`peerlab.train.row_adamw`), freed memory
     kept for reuse (`peerlab.train.allocator`).
   The target: the default step at N = 1024² within 1.5x of the same step at N = 128².
   Also printed: the optimizer step's own median, and its floor: the bytes any AdamW must
   move for the touched rows (read weight, both moments and gradient, write weight and both
   moments, fp32: 28 x dim bytes a row) over this machine's copy bandwidth, measured in the
   same process (a 512 MiB tensor copied into another).
2. The demo model's training step (configs/demo.yaml, batch 8 x 256), today against default:
   the embedded sweep must not be slower.

Each (variant, size) runs in its own subprocess (malloc settings are per process and cannot
be undone); the figure is the median of --steps steps after two warm-up steps (with
--rounds R, the median of R such processes, the variants alternating).
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


def layer_step(variant: str, side: int, tokens: int, steps: int) -> dict:
    """Median seconds of one PEER layer's training step at N = side² experts, of its optimizer step, and the floor."""
    from peerlab.config import PeerConfig
    from peerlab.model import PEER
    from peerlab.train.optim import RowSparseAdamW, clip_grad_norm

    sparse = variant != "today"
    torch.manual_seed(0)
    config = PeerConfig(num_experts=side * side, num_experts_per_tok=16, num_heads=8, product_key_dim=[side, side])
    layer = PEER(config, 256).train()
    layer.sparse_grad = sparse
    make = RowSparseAdamW if sparse else torch.optim.AdamW
    optimizer = make(layer.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    optimizer.row_kernel = variant == "default"
    x = torch.randn(tokens, 256)
    target = torch.randn(tokens, 256)

    optimizer_times, rows = [], []

    def step() -> None:
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        clip_grad_norm(layer.parameters(), 1.0)
        rows.append(sum(p.grad._nnz() if p.grad.is_sparse else p.shape[0] for p in (layer.down, layer.up)))
        t0 = time.perf_counter()
        optimizer.step()
        optimizer_times.append(time.perf_counter() - t0)
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, steps)
    source = torch.ones(2**27)  # 512 MiB, far beyond the caches, whatever N
    copy = torch.zeros_like(source)  # pages touched before timing
    copies = []
    for _ in range(5):
        t0 = time.perf_counter()
        copy.copy_(source)
        copies.append(time.perf_counter() - t0)
    bandwidth = 2 * source.numel() * 4 / statistics.median(copies)  # bytes read + written per second
    touched = statistics.median(rows[2:])  # rows of both tables a step updates
    floor = touched * 7 * 4 * layer.down.shape[1] / bandwidth
    return {"seconds": seconds, "optimizer": statistics.median(optimizer_times[2:]), "floor": floor, "rows": touched,
            "bandwidth": bandwidth}  # fmt: skip


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
    if args.variant != "today":
        from peerlab.train.allocator import reuse_freed_memory

        reuse_freed_memory()
    if args.side:
        print(json.dumps(layer_step(args.variant, args.side, args.tokens, args.steps)))
    else:
        print(json.dumps({"seconds": model_step(args.variant, args.steps)}))


def run_child(variant: str, side: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--side", str(side)]
    cmd += ["--tokens", str(args.tokens), "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sides", default="128,1024", help="product-key sides (N = side²), smallest first")
    parser.add_argument(
        "--variants", default="today,gathered,default", help="comma-separated, of today,gathered,default"
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of every (variant, size), alternating; medians")
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
    variants = args.variants.split(",")
    runs = {(v, side): [] for v in variants for side in sides}
    for _ in range(args.rounds):  # variants alternate, so a busy spell on a shared machine hits them alike
        for variant in variants:
            for side in sides:
                runs[variant, side].append(run_child(variant, side, args))

    def median(variant, side, key):
        return statistics.median(r[key] for r in runs[variant, side])

    for variant in variants:
        ms = [1000 * median(variant, side, "seconds") for side in sides]
        print(f"{variant:10s}" + "".join(f"{m:12.1f}" for m in ms) + f"{ms[-1] / ms[0]:8.2f}x")
    if args.rounds > 1:
        print(f"spread over {args.rounds} rounds (min-max of each round's median, ms), and each round's ratio:")
        for variant in variants:
            spread = [sorted(1000 * r["seconds"] for r in runs[variant, side]) for side in sides]
            ratios = [b["seconds"] / a["seconds"] for a, b in zip(runs[variant, sides[0]], runs[variant, sides[-1]])]
            print(
                f"{variant:10s}"
                + "".join(f"{f'{t[0]:.0f}-{t[-1]:.0f}':>12s}" for t in spread)
                + "   "
                + " ".join(f"{q:.2f}x" for q in ratios)
            )
    for variant in variants:
        for side in sides:
            print(
                f"{variant} N={side}²: optimizer step {1000 * median(variant, side, 'optimizer'):.1f} ms "
                f"of {1000 * median(variant, side, 'seconds'):.1f}; {median(variant, side, 'rows'):,.0f} rows "
                f"touched (both tables), copy bandwidth {median(variant, side, 'bandwidth') / 1e9:.1f} GB/s "
                f"(read + write): optimizer floor {1000 * median(variant, side, 'floor'):.1f} ms"
            )
    if not args.no_model:
        today, default = (1000 * run_child(v, 0, args)["seconds"] for v in ("today", "default"))
        print(f"demo model step, batch 8 x 256 (ms): today {today:.0f}, default {default:.0f}, {today / default:.2f}x")


if __name__ == "__main__":
    main()
