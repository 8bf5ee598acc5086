"""The Triton PEER kernels (peerlab.model.peer_triton) against a float64 reference, in Triton's interpreter.

Not collected by itself: tests/test_peer_triton.py runs this file in a subprocess with
TRITON_INTERPRET=1. Triton picks the interpreter when a kernel is decorated, its own helpers
(tl.sum, tl.max) included, that is when triton is first imported; set in the test session
itself, the variable would come too late wherever triton was imported already, and would
turn later compiled kernels (torch.compile on a GPU) into interpreted ones. To run it by hand:

    TRITON_INTERPRET=1 pytest tests/peer_triton_cases.py

The interpreter runs one small block configuration (`INTERPRETER_CONFIG`: several blocks of
tokens, retrievals and d, partly masked); the GPU configurations and speed are not tested here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed (it has no CPU wheels for macOS or Windows)")

from peerlab.model import peer_triton as pt

if not pt.INTERPRETED:
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)


def reference(x, idx, gate, down, up, grad_y):
    """y, hidden and the four gradients by plain indexing, in float64."""
    x, gate, down, up = (a.double().detach().requires_grad_() for a in (x, gate, down, up))
    hidden = (down[idx] * x[:, None, :]).sum(-1)  # (M, S)
    y = ((gate * F.gelu(hidden))[..., None] * up[idx]).sum(1)  # (M, d)
    y.backward(grad_y.double())
    return y.detach(), hidden.detach(), x.grad, gate.grad, down.grad, up.grad


def case(M, S, d, R, seed=0, idx=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, d, generator=g)
    if idx is None:
        idx = torch.randint(0, R, (M, S), generator=g)
    gate = torch.rand(M, S, generator=g)
    down = torch.randn(R, d, generator=g) * d**-0.5
    up = torch.randn(R, d, generator=g)
    grad_y = torch.randn(M, d, generator=g)
    return [a.to(dtype) for a in (x,)] + [idx] + [a.to(dtype) for a in (gate, down, up, grad_y)]


def hidden_size_idx(M, heads_k, h, experts, seed=0):
    """Rows as a PEER layer with expert_hidden_size h retrieves them: expert e owns rows e*h .. e*h+h-1."""
    g = torch.Generator().manual_seed(seed)
    experts_idx = torch.randint(0, experts, (M, heads_k), generator=g)
    return (experts_idx.unsqueeze(-1) * h + torch.arange(h)).flatten(1)  # (M, heads_k * h)


CASES = {
    # d not a power of two (two blocks, the second partly masked), S over two blocks, repeats by chance
    "general": {"M": 7, "S": 12, "d": 40, "R": 30},
    "d-power-of-two": {"M": 5, "S": 8, "d": 64, "R": 50},
    # every token retrieves the same row several times
    "repeats-within-token": {"M": 4, "S": 6, "d": 24, "R": 10, "idx": torch.tensor([[3, 3, 3, 5, 5, 9]] * 4)},
    # 3 rows, each retrieved by many tokens: long segments in the table kernel
    "hot-rows": {"M": 33, "S": 4, "d": 20, "R": 3},
    # expert_hidden_size 3: consecutive rows of an expert, gates repeated below
    "expert-hidden-size": {"M": 6, "S": 12, "d": 36, "R": 24, "idx": hidden_size_idx(6, 4, 3, 8)},
    "one-token": {"M": 1, "S": 5, "d": 33, "R": 40},
    "one-retrieval": {"M": 3, "S": 1, "d": 7, "R": 4},
}


def check(got, want, rel):
    scale = want.abs().max().clamp_min(1e-12)
    err = (got.double() - want).abs().max() / scale
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_gradients_match_float64(name):
    x, idx, gate, down, up, grad_y = case(**CASES[name])
    if name == "expert-hidden-size":
        gate = gate.view(6, 4, 3)[..., :1].expand(6, 4, 3).reshape(6, 12).contiguous()  # one score per expert
    y_ref, hidden_ref, *grads_ref = reference(x, idx, gate, down, up, grad_y)
    y, hidden = pt.experts_forward(x, idx, gate, down, up)
    assert y.dtype == torch.float32 and hidden.dtype == torch.float32
    check(hidden, hidden_ref, 1e-5)
    check(y, y_ref, 1e-5)
    grads = pt.experts_backward(grad_y, x, idx, gate, hidden, down, up)
    for label, got, want, inp in zip(("x", "gate", "down", "up"), grads, grads_ref, (x, gate, down, up)):
        assert got.shape == inp.shape and got.dtype == inp.dtype, label
        check(got, want, 1e-5)
    untouched = torch.ones(down.shape[0], dtype=torch.bool)
    untouched[idx.reshape(-1)] = False
    assert (grads[2][untouched] == 0).all() and (grads[3][untouched] == 0).all()


def test_row_sparse_gradients_are_the_dense_rows():
    x, idx, gate, down, up, grad_y = case(M=9, S=6, d=40, R=64, seed=1)
    _, hidden = pt.experts_forward(x, idx, gate, down, up)
    _, _, grad_down, grad_up = pt.experts_backward(grad_y, x, idx, gate, hidden, down, up)
    *_, rows, down_values, up_values = pt.experts_backward_rows(grad_y, x, idx, gate, hidden, down, up)
    assert torch.equal(rows, torch.unique(idx))
    assert torch.equal(down_values, grad_down[rows]) and torch.equal(up_values, grad_up[rows])


def test_autograd_wrapper_matches_peer_experts():
    """The same sums as the layer's own `peer_experts` (float32), through autograd."""
    from peerlab.model.peer import peer_experts

    x, idx, gate, down, up, _ = case(M=8, S=10, d=40, R=32, seed=2)
    outs = []
    for fn in (pt.peer_experts_triton, peer_experts):
        leaves = [a.clone().requires_grad_() for a in (x, gate, down, up)]
        y = fn(leaves[0], idx, leaves[1], leaves[2], leaves[3])
        y.pow(2).sum().backward()
        outs.append([y.detach()] + [a.grad for a in leaves])
    for got, want in zip(*outs):  # both float32, summed in other orders
        check(got, want.double(), 1e-5)


@pytest.mark.parametrize("sparse", [False, True])
def test_layer_dispatches_to_the_kernels(sparse, monkeypatch):
    """A PEER layer with PEERLAB_TRITON on runs these kernels inside its registered ops and gives the
    embedding-bag path's output and gradients (dense, or the row-sparse ones `sparse_experts` trains with)."""
    from peerlab.config import PeerConfig
    from peerlab.model import peer

    torch.manual_seed(0)
    config = PeerConfig(num_experts=256, product_key_dim=[16, 16], num_heads=2, num_experts_per_tok=4, query_dim=16)
    layer = peer.PEER(config, 24).train()
    layer.sparse_grad = sparse
    x = torch.randn(12, 24)
    runs, kernels = [], []
    for on in (False, True):
        monkeypatch.setattr(peer, "USE_TRITON", on)
        kernels.append(peer._triton_kernels(x.device))
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        y.pow(2).sum().backward()
        grads = [p.grad.to_dense() if p.grad.is_sparse else p.grad for p in (layer.down, layer.up)]
        runs.append([y.detach(), *grads, layer.query.weight.grad])
    assert kernels[0] is None and kernels[1] is pt
    assert layer.down.grad.is_sparse == sparse
    for got, want in zip(runs[1], runs[0]):
        check(got, want.double(), 1e-5)


def check_rounded(got, want):
    """Within one bf16 step of the float64 result, element by element: sums held in float32, rounded once.

    One step, not half: the interpreter truncates float32 to bf16 where a GPU rounds to nearest.
    """
    err = (got.double() - want).abs()
    bound = want.abs() * 2**-7 + want.abs().max() * 1e-4
    assert (err <= bound).all(), f"worst error {(err / bound).max():.2f}x the bound"


@pytest.mark.parametrize("name", ["general", "hot-rows"])
@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float32])
def test_bfloat16_sums_in_float32(name, gate_dtype):
    """bf16 tables and tokens in, bf16 out: each output one rounding from the float64 result of the same inputs."""
    x, idx, gate, down, up, grad_y = case(**CASES[name], dtype=torch.bfloat16)
    gate = gate.to(gate_dtype)
    y_ref, hidden_ref, *grads_ref = reference(x, idx, gate, down, up, grad_y)
    y, hidden = pt.experts_forward(x, idx, gate, down, up)
    assert y.dtype == torch.bfloat16 and hidden.dtype == torch.float32
    check(hidden, hidden_ref, 1e-5)  # float32 sums of bf16 products
    check_rounded(y, y_ref)
    grads = pt.experts_backward(grad_y, x, idx, gate, hidden, down, up)
    for got, want, inp in zip(grads, grads_ref, (x, gate, down, up)):
        assert got.dtype == inp.dtype
        check_rounded(got, want)


def test_no_tokens():
    x, idx, gate, down, up, grad_y = (a[:0] if a.shape[0] == 7 else a for a in case(M=7, S=3, d=8, R=5))
    y, hidden = pt.experts_forward(x, idx, gate, down, up)
    assert y.shape == (0, 8) and hidden.shape == (0, 3)
    grad_x, grad_gate, grad_down, grad_up = pt.experts_backward(grad_y, x, idx, gate, hidden, down, up)
    assert grad_x.shape == (0, 8) and grad_gate.shape == (0, 3)
    assert not grad_down.any() and not grad_up.any() and grad_down.shape == (5, 8)


def test_available_in_the_interpreter():
    assert pt.triton_available("cpu")
