"""The fused LM head + cross-entropy on a GPU: peerlab's against liger-kernel's, and the plain one.

    python benchmarks/lm_head_loss.py [--tokens 16384] [--hidden 768] [--vocab 50272] [--dtype bfloat16]

Variants, all computing mean cross-entropy of (hidden @ weight.T) against labels, forward and
backward (gradients of hidden and weight):
  peerlab   peerlab's chunked loop (peerlab.model.loss.LinearCrossEntropy: no full logits tensor),
            with the GPU's chunk size
  liger     liger_kernel's fused linear cross-entropy (Triton, CUDA only), called as
            peerlab.model.loss.linear_cross_entropy calls it on CUDA (weight gradient summed in float32)
  plain     F.cross_entropy(hidden @ weight.T, labels) (the full logits tensor)
Speed: variants alternate round by round; median over rounds. Memory: the CUDA allocator's
peak during one forward+backward above what was held before it. The losses must agree
(printed). CUDA only: liger-kernel has no CPU kernels, and peerlab's CPU path stays as it is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from peerlab.model.loss import LinearCrossEntropy, kernel_name


def variants() -> dict:
    out = {
        "peerlab": LinearCrossEntropy.apply,
        "plain": lambda h, w, y: F.cross_entropy((h @ w.t()).float(), y),
    }
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        # as peerlab.model.loss.linear_cross_entropy calls it on CUDA
        out["liger"] = lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y, accum_dtype=torch.float32)
    except ImportError:
        print("liger-kernel is not installed: pip install liger-kernel")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (liger-kernel's kernels are CUDA only)")
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.hidden, device="cuda", dtype=dtype, requires_grad=True)
    weight = (0.02 * torch.randn(args.vocab, args.hidden, device="cuda", dtype=dtype)).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    fns = variants()

    def step(fn) -> float:
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, labels)
        loss.backward()
        return float(loss)

    losses = {name: step(fn) for name, fn in fns.items()}  # warm-up (autotuning, kernels) and the check
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(args.reps):
                step(fn)
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) / args.reps)
    peaks = {}
    for name, fn in fns.items():
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
    print(
        f"LM head + cross-entropy, {args.tokens} tokens, hidden {args.hidden}, vocab {args.vocab}, {args.dtype} "
        f"({torch.cuda.get_device_name()}, torch {torch.__version__})"
    )
    print(f"  (peerlab.model.loss.linear_cross_entropy runs {kernel_name(hidden.device)} here)")
    ref = "liger" if "liger" in fns else "plain"
    for name in fns:
        ms = 1000 * statistics.median(times[name])
        ratio = statistics.median(times[ref]) / statistics.median(times[name])
        print(
            f"  {name:<8} {ms:8.2f} ms  {ratio:5.2f}x the speed of {ref}  peak {peaks[name] / 2**20:8.1f} MiB  "
            f"loss {losses[name]:.5f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "seconds": times, "peak_bytes": peaks, "loss": losses}, f, indent=1)


if __name__ == "__main__":
    main()
