"""GPU checks: the same model on CUDA agrees with the CPU float64 reference. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

from peerlab.model import build_model
from tests.conftest import tiny_model_config
from tests.test_peer import make_peer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_peer_on_cuda_matches_cpu_float64_forward_and_gradients():
    cpu = make_peer(64, 64, 16, 8, dim=64, query_dim=32, hidden=2).eval()
    gpu = make_peer(64, 64, 16, 8, dim=64, query_dim=32, hidden=2).eval().float().cuda()
    gpu.load_state_dict({k: v.float() for k, v in cpu.state_dict().items()})
    x = torch.randn(300, 64, dtype=torch.float64)
    xg = x.float().cuda().requires_grad_(True)
    x.requires_grad_(True)
    y_cpu, y_gpu = cpu(x), gpu(xg)
    torch.testing.assert_close(y_gpu.double().cpu(), y_cpu, rtol=1e-3, atol=1e-5)
    y_cpu.pow(2).sum().backward()
    y_gpu.pow(2).sum().backward()
    torch.testing.assert_close(xg.grad.double().cpu(), x.grad, rtol=1e-3, atol=1e-5)
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(p_gpu.grad.double().cpu(), p_cpu.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_peer_bfloat16_on_cuda_is_close_to_float32():
    layer = make_peer(256, 256, 16, 8, dim=128, query_dim=64).eval().float().cuda()
    x = torch.randn(512, 128, device="cuda")
    with torch.no_grad():
        ref = layer(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            amp = layer(x)
        half = make_peer(256, 256, 16, 8, dim=128, query_dim=64).eval().cuda().to(torch.bfloat16)
        half.load_state_dict(layer.state_dict())
        bf = half(x.bfloat16())
    assert bf.dtype == torch.bfloat16
    rel = lambda a: ((a.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    # Rounded queries retrieve other experts for some tokens, hence loose bounds (seen on an H200:
    # 0.067 under autocast, 0.153 with bf16 weights); a broken kernel gives errors near 1.
    assert rel(amp) < 0.15 and rel(bf) < 0.3


def test_model_cached_decoding_and_generate_on_cuda():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(initializer_range=0.3)).cuda().eval()
    ids = torch.randint(0, 97, (2, 24), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 24)
        steps = [model(ids[:, :5], cache)] + [model(ids[:, t : t + 1], cache) for t in range(5, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    assert torch.equal(model.generate(ids[:, :4], 20), model.generate(ids[:, :4], 20, use_cache=False))


def test_model_trains_on_cuda_with_bf16_autocast():
    torch.manual_seed(0)
    model = build_model(tiny_model_config()).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    ids = torch.randint(0, 97, (4, 17), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
