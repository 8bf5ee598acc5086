"""The Triton PEER kernels: tests/peer_triton_cases.py, run in Triton's CPU interpreter in a subprocess.

The interpreter has to be switched on (TRITON_INTERPRET=1) before triton is first imported,
so the cases run in a fresh process of their own: the variable and the interpreted kernels
never reach this session's other tests (a GPU test here still gets compiled kernels).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import run_in_triton_interpreter

pytest.importorskip("triton", reason="Triton is not installed (it has no CPU wheels for macOS or Windows)")

CASES = Path(__file__).with_name("peer_triton_cases.py")


def test_kernels_match_float64_in_the_interpreter():
    run_in_triton_interpreter(CASES)


def test_compiled_kernels_only_on_cuda():
    """Imported without the interpreter, the kernels are for CUDA tensors only."""
    from peerlab.model import peer_triton

    if peer_triton.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set for the whole session")
    assert peer_triton.triton_available("cuda") and not peer_triton.triton_available("cpu")


def test_kernels_compile_for_hopper_without_a_gpu():
    """Each kernel compiles to a cubin for sm_90 (H100/H200), in bf16, with its first autotune config.

    The interpreter accepts programs the compiler refuses; this catches those on any Linux
    machine (Triton's wheel carries ptxas). Whether the kernels run right on a GPU is not tested here.
    """
    from peerlab.model import peer_triton as pt

    if pt.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set for the whole session")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # the ahead-of-time API moves between Triton versions
        pytest.skip(f"this Triton has no ASTSource/GPUTarget: {e}")

    def kind(name):
        if name in ("M", "S", "D", "U"):
            return "i32"
        if name.startswith("BLOCK_") or name == "DENSE":
            return "constexpr"
        if name in ("idx_ptr", "order_ptr", "starts_ptr", "counts_ptr", "rows_ptr"):
            return "*i64"
        return "*fp32" if name in ("hidden_ptr", "d_hidden_ptr") else "*bf16"

    kernels = [
        (pt._forward_kernel, pt.TOKEN_CONFIGS[0], {}),
        (pt._backward_tokens_kernel, pt.TOKEN_CONFIGS[0], {}),
        (pt._backward_tables_kernel, pt.TABLE_CONFIGS[0], {"DENSE": True}),
    ]
    for kernel, config, extra in kernels:
        fn = kernel.fn  # the JITFunction under the autotuner
        source = ASTSource(fn, {n: kind(n) for n in fn.arg_names}, {**config.kwargs, **extra})
        compiled = triton.compile(
            source, target=GPUTarget("cuda", 90, 32), options={"num_warps": config.num_warps, "enable_fp_fusion": True}
        )
        assert compiled.asm["cubin"], fn.__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_on_cuda_match_float64(dtype):
    """The compiled, autotuned kernels on the GPU: d not a power of two, expert_hidden_size 2, hot rows."""
    from peerlab.model import peer_triton as pt

    if pt.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set for the whole session")
    g = torch.Generator().manual_seed(0)
    M, experts, heads_k, h, d = 513, 2048, 16, 2, 200
    experts_idx = torch.randint(0, experts, (M, heads_k), generator=g)
    experts_idx[:, :4] = torch.randint(0, 8, (M, 4), generator=g)  # 8 experts retrieved by every token
    idx = (experts_idx.unsqueeze(-1) * h + torch.arange(h)).flatten(1)  # (M, S = 32)
    gate = torch.softmax(torch.randn(M, heads_k, generator=g), -1).repeat_interleave(h, -1)  # (M, S)
    x, grad_y = torch.randn(M, d, generator=g), torch.randn(M, d, generator=g)
    down, up = torch.randn(experts * h, d, generator=g) * d**-0.5, torch.randn(experts * h, d, generator=g)
    inputs = [a.to(dtype) for a in (x, gate, down, up, grad_y)]
    x, gate, down, up, grad_y = inputs

    leaves = [a.double().requires_grad_() for a in (x, gate, down, up)]
    hidden_ref = (leaves[2][idx] * leaves[0][:, None]).sum(-1)
    y_ref = ((leaves[1] * torch.nn.functional.gelu(hidden_ref))[..., None] * leaves[3][idx]).sum(1)
    y_ref.backward(grad_y.double())

    cuda = [a.cuda() for a in (x, idx, gate, down, up)]
    y, hidden = pt.experts_forward(*cuda)
    grads = pt.experts_backward(grad_y.cuda(), cuda[0], cuda[1], cuda[2], hidden, cuda[3], cuda[4])
    rows, down_values = pt.experts_backward_rows(grad_y.cuda(), cuda[0], cuda[1], cuda[2], hidden, cuda[3], cuda[4])[
        2:4
    ]
    torch.testing.assert_close(down_values, grads[2][rows], rtol=0, atol=0)
    step = 1e-5 if dtype == torch.float32 else 2**-8  # float32 sums; bf16: one rounding at the end
    for got, want in zip((hidden, y, *grads), (hidden_ref, y_ref, *(a.grad for a in leaves))):
        err = (got.double().cpu() - want.detach()).abs()
        assert (err <= want.detach().abs() * step + want.detach().abs().max() * 1e-4).all()
