"""The language-model loss, fused with the LM head: cross-entropy without the full logits tensor.

`linear_cross_entropy(hidden, weight, labels)` equals
`F.cross_entropy(hidden @ weight.T, labels)` (mean over tokens) but works through the
tokens in chunks: each chunk's logits are made, turned into the loss and into the
gradient of the logits (softmax - one-hot) at once, and that gradient is multiplied out
into the gradients of `hidden` and `weight` right away. The (tokens x vocab) logits never
exist whole, and each chunk stays in cache; the matrix products are the same three as
unfused. The gradients are kept from the forward pass and scaled by the incoming gradient
in backward.

On CUDA the loss is liger-kernel's fused linear cross-entropy where it is installed (a
Linux dependency of peerlab), as `kernel_name` says: on an H200 it ran 13x faster than the
chunked loop here at 16k tokens, hidden 768, vocab 50k, bf16 (BENCHMARKS.md), whose small
cache-sized chunks suit a CPU, not a GPU. With fp16 autocast the chunked loop stays: liger
writes the per-token gradients in fp16, where they underflow before the loss scaler sees
them. Elsewhere (CPU, or CUDA without liger-kernel) the chunked loop runs, with chunks of
CUDA_CHUNK_ELEMENTS logits on a GPU.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

CHUNK_ELEMENTS = 2 << 20  # logits per chunk (tokens x vocab) on CPU: 8 MiB of float32, cache-sized
CUDA_CHUNK_ELEMENTS = 64 << 20  # on a GPU: 256 MiB of float32, matrix products large enough to fill the card


class LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels):
        n, vocab = hidden.shape[0], weight.shape[0]
        dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else None
        h = hidden.to(dtype) if dtype else hidden
        w = weight.to(dtype) if dtype else weight
        chunk = max(1, (CUDA_CHUNK_ELEMENTS if hidden.is_cuda else CHUNK_ELEMENTS) // vocab)
        acc = torch.promote_types(weight.dtype, torch.float32)  # softmax and sums: float32 at least
        needs_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None  # (n, d)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                rows = slice(start, start + chunk)
                logits = (h[rows] @ w.t()).to(acc)  # (c, vocab)
                target = labels[rows]
                lse = torch.logsumexp(logits, dim=-1)  # (c,)
                total += (lse - logits.gather(1, target[:, None]).squeeze(1)).sum()
                if needs_grad:
                    grad = torch.exp(logits - lse[:, None])  # softmax, (c, vocab)
                    grad[torch.arange(len(target), device=grad.device), target] -= 1.0
                    grad /= n
                    # fp16 cannot hold these small per-token gradients (the loss scaler only scales them
                    # later, in backward), so they are multiplied out in float32; bf16 has the range.
                    mm = acc if h.dtype == torch.float16 else h.dtype
                    g = grad.to(mm)
                    grad_hidden[rows] = (g @ w.to(mm)).to(hidden.dtype)
                    grad_weight += (g.t() @ h[rows].to(mm)).to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (hidden @ weight.T) against labels: hidden (n, d), weight (vocab, d), labels (n,)."""
    if kernel_name(hidden.device) == "liger-kernel":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        # accum_dtype: the weight's gradient summed over chunks in float32 (also for bf16 parameters).
        return liger_fused_linear_cross_entropy(hidden, weight, labels, accum_dtype=torch.float32)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, labels)
    with torch.no_grad():
        return LinearCrossEntropy.forward(_NoGrad(), hidden, weight, labels)


class _NoGrad:
    """Stands in for autograd's ctx when no gradient is wanted: the loss alone."""

    needs_input_grad = (False, False, False)

    def save_for_backward(self, *tensors):
        pass


def kernel_name(device: torch.device) -> str:
    """Which loss `linear_cross_entropy` runs on `device` in the current autocast state: "liger-kernel" or
    "peerlab" (the chunked loop). PEERLAB_LIGER=0 keeps the chunked loop on CUDA too; in Triton's CPU
    interpreter (TRITON_INTERPRET=1, the tests) liger-kernel runs on the CPU."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "peerlab"
    if os.environ.get("PEERLAB_LIGER", "1") == "0" or not _liger_installed():
        return "peerlab"
    fp16 = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.float16
    return "peerlab" if fp16 else "liger-kernel"


@functools.cache
def _liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None
