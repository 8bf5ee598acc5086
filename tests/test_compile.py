"""torch.compile: PEER's registered ops, no graph breaks, compiled equals eager, a compiled run, the config key."""

from __future__ import annotations

import copy
import json
import math
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from peerlab.config import ConfigError, TrainConfig, load_config
from peerlab.model import PEER, build_model
from peerlab.model.peer import experts_forward
from peerlab.train.compiling import compile_choice, eager
from tests.conftest import ROOT, tiny_model_config


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def experts_inputs(seed: int = 0, M: int = 6, S: int = 5, d: int = 4, R: int = 11):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, R, (M, S), generator=g)
    idx[0, 1] = idx[0, 0]  # the same row twice in one bag, and rows shared across tokens
    x = torch.randn(M, d, generator=g, requires_grad=True)
    gate = torch.rand(M, S, generator=g, requires_grad=True)
    down = torch.randn(R, d, generator=g, requires_grad=True)
    up = torch.randn(R, d, generator=g, requires_grad=True)
    return x, idx, gate, down, up


def test_opcheck_every_peer_op():
    """Schema, fake (meta) version, registered autograd and AOT tracing, with gradients, of each op."""
    x, idx, gate, down, up = experts_inputs()
    ops = torch.ops.peerlab
    torch.library.opcheck(ops.peer_experts_forward.default, (x, idx, gate, down, up, False))
    torch.library.opcheck(ops.gather_dot.default, (down, idx, x))
    plain = [t.detach() for t in (x, gate, down, up)]
    torch.library.opcheck(ops.peer_experts_infer.default, (plain[0], idx, *plain[1:]))
    y, hidden, order = experts_forward(plain[0], idx, *plain[1:])
    assert order.shape == (idx.numel(),) and hidden.shape == idx.shape
    grad_y = torch.randn_like(y)
    torch.library.opcheck(
        ops.peer_experts_backward.default, (grad_y, plain[0], idx, plain[1], hidden, *plain[2:], order)
    )
    torch.library.opcheck(ops.gather_dot_backward.default, (torch.randn(idx.shape), plain[2], idx, plain[0]))
    pairs = [(a, b) for a in range(4) for b in range(4) if (a + 1) * (b + 1) <= 4]
    ranks = torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])
    torch.library.opcheck(ops.product_key_search.default, (torch.randn(9, 16), torch.randn(9, 12), 4, *ranks))


def tiny_inputs(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(tiny_model_config()).train()
    ids = torch.randint(0, 97, (2, 13))
    return model, ids


def test_peer_block_forward_and_backward_compile_without_graph_breaks():
    model, _ = tiny_inputs()
    block = model.layers[1]
    assert isinstance(block.mlp, PEER)
    x = torch.randn(2, 12, 32, requires_grad=True)
    positions = torch.arange(12)
    explained = torch._dynamo.explain(block)(x, positions)
    assert explained.graph_break_count == 0, explained.break_reasons
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(block, backend=counter, fullgraph=True)  # fullgraph: a graph break raises
    compiled(x, positions).pow(2).sum().backward()
    assert counter.frame_count == 1
    assert x.grad is not None and block.mlp.down.grad is not None


def train_step(model, ids, sparse: bool = False) -> tuple[torch.Tensor, dict]:
    for module in model.modules():
        if isinstance(module, PEER):
            module.sparse_grad = sparse
    loss = model(ids[:, :-1], labels=ids[:, 1:])
    loss.backward()
    grads = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads


def assert_same_step(eager, compiled, ids, sparse: bool = False, tol: float = 1e-5) -> None:
    want_loss, want = train_step(eager, ids, sparse)
    got_loss, got = train_step(compiled, ids, sparse)
    torch.testing.assert_close(got_loss, want_loss, rtol=tol, atol=tol)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tol, atol=tol, msg=name)
    for (name, a), b in zip(eager.named_modules(), compiled.modules()):
        if isinstance(a, PEER):  # the usage sums and BatchNorm statistics the compiled forward updated
            torch.testing.assert_close(b.usage, a.usage, msg=name)
            torch.testing.assert_close(b.query_norm.running_mean, a.query_norm.running_mean, msg=name)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse_grad"])
def test_compiled_blocks_equal_eager(sparse):
    """aot_eager: the traced graphs of every block (dense and PEER) against the eager model, two steps."""
    eager, ids = tiny_inputs()
    compiled = copy.deepcopy(eager)
    for block in compiled.layers:
        block.compile(backend="aot_eager")
    assert_same_step(eager, compiled, ids, sparse)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their names
    for model in (eager, compiled):
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * (p.grad.to_dense() if p.grad.is_sparse else p.grad)
                p.grad = None
    assert_same_step(eager, compiled, ids.flip(0), sparse)
    eager.eval()
    compiled.eval()
    with torch.no_grad():  # evaluation goes through peerlab::peer_experts_infer
        torch.testing.assert_close(compiled(ids), eager(ids), rtol=1e-5, atol=1e-5)


def test_evaluation_under_eager_compiles_nothing():
    """Training compiles one graph per kind of block; evaluation and decoding under `eager()` add none."""
    model, ids = tiny_inputs()
    reference = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    for block in model.layers:
        block.compile(backend=counter)
    for m in (model, reference):  # the same BatchNorm statistics in both
        m(ids[:, :-1], labels=ids[:, 1:]).backward()
        m.eval()
    assert counter.frame_count == 2  # the dense block and the PEER block
    with eager(), torch.no_grad():
        for length in (5, 9):
            torch.testing.assert_close(model(ids[:, :length]), reference(ids[:, :length]))
        assert torch.equal(model.generate(ids[:, :4], 6), reference.generate(ids[:, :4], 6))
    assert counter.frame_count == 2


@pytest.mark.skipif(
    not os.environ.get("PEERLAB_SLOW_TESTS"),
    reason="inductor's first C++ compile takes about 30 s on 2 cores (7 s cached): PEERLAB_SLOW_TESTS=1 runs it",
)
def test_inductor_peer_layer_equals_eager():
    """One case through inductor (generated C++ around the registered ops): a PEER layer, forward and backward."""
    eager, ids = tiny_inputs()
    compiled = copy.deepcopy(eager)
    compiled.layers[1].mlp.compile(backend="inductor")
    assert_same_step(eager, compiled, ids, tol=1e-4)


def test_training_run_with_compile_on_cpu(demo_corpus, tmp_path):
    """The training loop with compile: true (through aot_eager, which traces what inductor would compile)."""
    from tests.test_train import losses, run, tiny

    run(tiny(demo_corpus, "train_config.compile=true", steps=2), tmp_path / "c", compile_backend="aot_eager")
    info = json.loads((tmp_path / "c" / "run_info.json").read_text())
    assert info["compile"] is True and info["compile_reason"] == "train_config.compile: true"
    got = losses(tmp_path / "c")
    assert len(got) == 2 and all(math.isfinite(x) for x in got)


def test_compile_key_defaults_to_auto_and_refuses_other_values():
    assert TrainConfig().compile == "auto"
    assert load_config(ROOT / "configs" / "demo.yaml").train_config.compile == "auto"
    for value, want in (("true", True), ("false", False), ("auto", "auto")):
        assert (
            load_config(ROOT / "configs" / "demo.yaml", [f"train_config.compile={value}"]).train_config.compile == want
        )
    for bad in ("yes please", "1", "Auto", "null"):
        with pytest.raises(ConfigError, match=r"train_config\.compile.*expected true, false or \"auto\""):
            load_config(ROOT / "configs" / "demo.yaml", [f"train_config.compile={bad}"])
    auto = TrainConfig()
    assert compile_choice(auto, torch.device("cuda")) == (True, "auto: CUDA")
    assert compile_choice(auto, torch.device("cpu")) == (False, "auto: off on CPU")
    assert compile_choice(TrainConfig(compile=False), torch.device("cuda")) == (False, "train_config.compile: false")
