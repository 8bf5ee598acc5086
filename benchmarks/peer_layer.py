"""PEER layer forward+backward: tokens/s and peak memory against PEER-pytorch and a dense FFN.

    python benchmarks/peer_layer.py                      # the issue's CPU setting
    python benchmarks/peer_layer.py --device cuda --dtype bfloat16 --experts 1048576 --dim 768
    python benchmarks/peer_layer.py --grid                # peerlab against PEER-pytorch at several shapes

peerlab runs as training does by default: row-sparse table gradients (`--dense-grads` for
dense ones) and freed memory kept for reuse (`peerlab.train.allocator`, in this process, so
for every variant alike).

Variants, all with the same input, dim, heads, k and N:
  peerlab      peerlab.model.PEER (softmax scores, shared product keys, BatchNorm query)
  peer-pytorch PEER_pytorch.PEER(non_competing_scores=False), the PyPI package's layer
  dense        a dense GELU FFN of the same hidden size (dim -> 4*dim -> dim)
  peerlab-triton  peerlab's layer with the experts' sums in the fused Triton kernels
               (peerlab.model.peer_triton); CUDA only, added to the default variants there

Speed: the variants alternate round by round in one process; each figure is the median
over rounds. Memory: the peak during one forward+backward above the memory held just
before it (parameters, input): on CPU the kernel's high-water mark, each variant in a fresh
subprocess; on CUDA the allocator's peak, reset before each variant, in the same process.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from peerlab.config import PeerConfig
from peerlab.model.peer import PEER
from peerlab.model.transformer import DenseMLP
from peerlab.train.allocator import reuse_freed_memory

VARIANTS = ("peerlab", "peer-pytorch", "dense")


class TritonPEER(PEER):
    """peerlab's PEER layer with the experts (Eq. 4-5) in the fused Triton kernels; the same retrieval and gate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from peerlab.model.peer_triton import peer_experts_triton

        lead, d = x.shape[:-1], x.shape[-1]
        flat = x.reshape(-1, d)  # (M, d)
        scores, indices = self.retrieve(flat)  # (M, H, k) each
        gate = torch.softmax(scores, dim=-1, dtype=torch.float32)  # (M, H, k)
        h = self.expert_hidden_size
        if h > 1:  # expert e owns neuron rows e*h .. e*h+h-1, all weighted by the expert's score
            indices = (indices.unsqueeze(-1) * h + torch.arange(h, device=x.device)).flatten(-2)  # (M, H, k*h)
            gate = gate.repeat_interleave(h, dim=-1)  # (M, H, k*h)
        idx, gate = indices.flatten(1), gate.flatten(1)  # (M, S) each
        with torch.autocast(x.device.type, enabled=False):  # in the tables' dtype, as peer_experts
            y = peer_experts_triton(flat.to(self.down.dtype), idx, gate.to(self.down.dtype), self.down, self.up)
        return y.to(x.dtype).view(*lead, d)


def default_variants(device: str) -> tuple[str, ...]:
    """All variants; peerlab-triton only on CUDA with Triton installed."""
    if device.startswith("cuda"):
        from peerlab.model.peer_triton import triton_available

        if triton_available(device):
            return (*VARIANTS, "peerlab-triton")
    return VARIANTS


def build(variant: str, args) -> nn.Module:
    """The variant's layer, made on the device itself (a million-expert table made on the CPU and then
    copied took most of a GPU run's time limit)."""
    with torch.device(args.device):
        return _build(variant, args).to(dtype=getattr(torch, args.dtype))


def _build(variant: str, args) -> nn.Module:
    root = int(round(args.experts**0.5))
    if variant in ("peerlab", "peerlab-triton"):
        cfg = PeerConfig(
            num_experts=args.experts,
            product_key_dim=[root, root],
            num_experts_per_tok=args.k,
            num_heads=args.heads,
            query_dim=args.dim,
            batch_norm_query=True,
        )
        layer = (PEER if variant == "peerlab" else TritonPEER)(cfg, args.dim)
        layer.sparse_grad = variant == "peerlab" and not args.dense_grads  # the platform's default (sparse_experts)
    elif variant == "peer-pytorch":
        from PEER_pytorch import PEER as PeerPytorch

        # dim_key = dim/2 per half matches peerlab's query_dim = dim (two halves of dim/2).
        layer = PeerPytorch(
            dim=args.dim,
            heads=args.heads,
            num_experts=args.experts,
            num_experts_per_head=args.k,
            dim_key=args.dim // 2,
            non_competing_scores=False,
        )
    else:
        layer = DenseMLP(args.dim, 4 * args.dim)
    return layer


def make_input(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.dim, generator=g)
    return x.to(device=args.device, dtype=getattr(torch, args.dtype)).requires_grad_(True)


def step(layer: nn.Module, x: torch.Tensor) -> None:
    """One training-style step: fresh gradients (as after optimizer.zero_grad()), forward, backward."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    y = layer(x)
    y.float().pow(2).mean().backward()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def measure_memory(variant: str, args) -> dict:
    """On CPU, peak bytes of one forward+backward above what is held before it (run in a fresh process: the
    kernel's high-water mark is per process). CUDA's figures come from `cuda_peak`, in the timing process."""
    torch.manual_seed(0)
    layer = build(variant, args)
    x = make_input(args)
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    step(layer, x)  # warm-up: one-time allocations (thread pools, kernels) are not the layer's
    layer.zero_grad(set_to_none=True)
    x.grad = None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    step(layer, x)
    peak = (rss_kib("VmHWM") - base) * 1024
    return {"variant": variant, "peak_bytes": peak, "param_bytes": params}


def cuda_peak(layer: nn.Module, x: torch.Tensor) -> dict:
    """On CUDA, in this process: the allocator's peak during one forward+backward above what it held before."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(layer, x)
    torch.cuda.synchronize()
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    return {"peak_bytes": torch.cuda.max_memory_allocated() - base, "param_bytes": params}


def time_variants(args, memory: dict | None = None) -> dict[str, float]:
    """tokens/s of each variant; on CUDA, with `memory` given, each variant's peak memory into it as well."""
    torch.manual_seed(0)
    layers = {v: build(v, args) for v in args.variants}
    x = make_input(args)
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for v in args.variants:  # warm-up
        for _ in range(args.warmup):
            step(layers[v], x)
    sync(args.device)
    for _ in range(args.rounds):
        for v in args.variants:
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.reps):
                step(layers[v], x)
            sync(args.device)
            times[v].append((time.perf_counter() - t0) / args.reps)
    if memory is not None and args.device.startswith("cuda"):
        for v in args.variants:
            memory[v] = {"variant": v, **cuda_peak(layers[v], x)}
    tokens = args.batch * args.seq
    return {v: tokens / statistics.median(t) for v, t in times.items()}


# (N, heads, k, dim, batch, seq): the default shape, the ones around it, and a million experts.
GRID = [
    (256 * 256, 8, 16, 256, 4, 256),
    (512 * 512, 4, 8, 192, 2, 512),
    (128 * 128, 4, 8, 128, 8, 256),
    (512 * 512, 8, 16, 384, 2, 256),
    (1024 * 1024, 8, 16, 256, 4, 256),
]


def grid(args) -> None:
    """tokens/s of peerlab against peer-pytorch at every shape of GRID (speed only; rounds alternate)."""
    args.variants = ["peerlab", "peer-pytorch"]
    grads = "dense" if args.dense_grads else "row-sparse"
    print(f"PEER layer forward+backward, peerlab ({grads} table gradients) against peer-pytorch, {args.dtype}")
    print(f"{'N':>9}{'heads':>6}{'k':>4}{'dim':>5}{'tokens':>9}{'peerlab tok/s':>15}{'peer-pytorch':>14}{'ratio':>8}")
    for n, heads, k, dim, batch, seq in GRID:
        args.experts, args.heads, args.k, args.dim, args.batch, args.seq = n, heads, k, dim, batch, seq
        speed = time_variants(args)
        ratio = speed["peerlab"] / speed["peer-pytorch"]
        tokens = f"{batch}x{seq}"
        print(
            f"{n:>9}{heads:>6}{k:>4}{dim:>5}{tokens:>9}{speed['peerlab']:>15.0f}{speed['peer-pytorch']:>14.0f}{ratio:>7.2f}x"
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--experts", type=int, default=256 * 256)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", help="comma-separated (default: all; peerlab-triton on CUDA only)")
    ap.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: measure one variant's memory, print JSON
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument(
        "--dense-grads", action="store_true", help="peerlab with dense table gradients (sparse_experts off)"
    )
    ap.add_argument("--grid", action="store_true", help="speed of peerlab against peer-pytorch at the shapes of GRID")
    args = ap.parse_args(argv)
    reuse_freed_memory()  # as a training worker does (peerlab.train.allocator); the same process for every variant
    if args.grid:
        return grid(args)
    args.variants = args.variants.split(",") if args.variants else list(default_variants(args.device))
    if "peerlab-triton" in args.variants and "peerlab-triton" not in default_variants(args.device):
        ap.error("peerlab-triton needs a CUDA device and Triton (--device cuda)")

    if args.memory_of:
        print(json.dumps(measure_memory(args.memory_of, args)))
        return

    setting = (
        f"N={args.experts}, heads={args.heads}, k={args.k}, dim={args.dim}, tokens={args.batch}x{args.seq}, "
        f"{args.dtype} on {args.device}"
    )
    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    print(f"PEER layer forward+backward, {setting} ({machine}, torch {torch.__version__})", flush=True)

    memory: dict[str, dict] = {}
    speed = time_variants(args, memory)  # on CUDA, the memory figures too (the allocator's peak is per process)
    for v in args.variants:
        if v in memory:
            continue
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--memory-of", v]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[v] = json.loads(out.strip().splitlines()[-1])

    ref = "peer-pytorch" if "peer-pytorch" in speed else args.variants[0]
    print(f"{'variant':<14}{'tokens/s':>12}{'vs ' + ref:>18}{'peak MiB':>11}{'vs ' + ref:>18}{'params MiB':>12}")
    for v in args.variants:
        peak = memory[v]["peak_bytes"] / 2**20
        print(
            f"{v:<14}{speed[v]:>12.0f}{speed[v] / speed[ref]:>17.2f}x{peak:>11.1f}"
            f"{memory[v]['peak_bytes'] / memory[ref]['peak_bytes']:>17.2f}x{memory[v]['param_bytes'] / 2**20:>12.1f}"
        )
    floor = {}
    if (
        args.device == "cuda"
    ):  # the layer's table traffic against the card's bandwidth (peerlab.model.peer_bytes_per_token)
        from peerlab.train.utilization import card_peaks

        peaks = card_peaks(machine, "bf16")
        per_token = 6 * args.heads * args.k * args.dim * torch.finfo(getattr(torch, args.dtype)).bits // 8
        if peaks is not None:
            for v in args.variants:
                floor[v] = speed[v] * per_token / peaks.bandwidth
            print(f"share of the HBM floor ({per_token:,} table bytes per token at {peaks.bandwidth / 1e9:.0f} GB/s): "
                  + ", ".join(f"{v} {100 * f:.1f}%" for v, f in floor.items()))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            record = {"setting": setting, "machine": machine, "tokens_per_s": speed, "memory": memory}
            json.dump({**record, "hbm_floor_share": floor}, f, indent=1)


if __name__ == "__main__":
    main()
