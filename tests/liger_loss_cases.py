"""The LM-head loss through liger-kernel (the CUDA default), against float64, in Triton's interpreter.

Not collected by itself: tests/test_model.py runs this file in a subprocess with TRITON_INTERPRET=1
(see tests/peer_triton_cases.py for why the variable must be set before triton is imported). To run
it by hand:

    TRITON_INTERPRET=1 pytest tests/liger_loss_cases.py
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from peerlab.model import build_model
from peerlab.model.loss import kernel_name, linear_cross_entropy
from tests.conftest import tiny_model_config


def test_the_model_loss_runs_through_liger_and_matches_float64():
    """The whole model's training loss and every parameter's gradient, against its float64 logits' cross-entropy."""
    assert kernel_name(torch.device("cpu")) == "liger-kernel"
    torch.manual_seed(0)
    model = build_model(tiny_model_config()).train()
    reference = build_model(tiny_model_config()).double().train()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (2, 13))

    loss = model(ids[:, :-1], labels=ids[:, 1:])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = reference(ids[:, :-1])  # (B, T, vocab), float64
    want = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    want_grads = torch.autograd.grad(want, list(reference.parameters()))

    assert loss.grad_fn is not None and "Liger" in type(loss.grad_fn).__name__
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    for (name, _), g, w in zip(model.named_parameters(), grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_uses_liger_and_fp16_keeps_the_chunked_loss():
    """bf16 autocast with float32 weights (the training setting): liger, loss and gradients within bf16's
    precision of float64, the incoming gradient applied (a loss scaled as gradient accumulation and the
    loss scaler scale it); fp16: the chunked loop (its per-token gradients in float32)."""
    torch.manual_seed(0)
    n, d, vocab = 64, 32, 200
    h64, w64 = torch.randn(n, d, dtype=torch.float64), 0.1 * torch.randn(vocab, d, dtype=torch.float64)
    labels = torch.randint(0, vocab, (n,))
    want_h, want_w = h64.clone().requires_grad_(), w64.clone().requires_grad_()
    want = F.cross_entropy(want_h @ want_w.t(), labels)
    (3.0 * want).backward()

    hidden, weight = h64.float().requires_grad_(), w64.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernel_name(hidden.device) == "liger-kernel"
        loss = linear_cross_entropy(hidden, weight, labels)
    assert loss.grad_fn is not None and "Liger" in type(loss.grad_fn).__name__
    (3.0 * loss).backward()
    assert weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(hidden.grad.double(), want_h.grad, rtol=3e-2, atol=3e-3)
    torch.testing.assert_close(weight.grad.double(), want_w.grad, rtol=3e-2, atol=3e-3)
    with torch.autocast("cpu", dtype=torch.float16):
        assert kernel_name(hidden.device) == "peerlab"
