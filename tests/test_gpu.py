"""GPU checks: the same model on CUDA agrees with the CPU float64 reference; Float8 and a Ray Train run on the GPU.

Skipped without a GPU (CI has none): `benchmarks/gpu.sh` runs them on a lent GPU machine.
"""

from __future__ import annotations

import json
import math

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


def test_inductor_compiled_blocks_on_cuda_equal_eager():
    """train_config.compile's default on CUDA: every block compiled by inductor, loss and gradients as eager."""
    import copy

    from tests.test_compile import assert_same_step

    torch.manual_seed(0)
    eager = build_model(tiny_model_config()).cuda().train()
    compiled = copy.deepcopy(eager)
    for block in compiled.layers:
        block.compile()
    ids = torch.randint(0, 97, (4, 17), device="cuda")
    assert_same_step(eager, compiled, ids, tol=1e-4)


def test_cuda_graphs_compiled_blocks_equal_eager():
    """compile's reduce-overhead (CUDA graphs) on every block: PEER's registered ops capture without a host
    sync (a bincount in the table gradient's bag offsets did not), and three steps (warm-up, recording,
    replay) give the eager model's loss and gradients."""
    import copy

    from tests.test_compile import assert_same_step

    torch.manual_seed(0)
    eager = build_model(tiny_model_config()).cuda().train()
    compiled = copy.deepcopy(eager)
    for block in compiled.layers:
        block.compile(mode="reduce-overhead")
    ids = torch.randint(0, 97, (4, 17), device="cuda")
    for _ in range(3):
        assert_same_step(eager, compiled, ids, tol=1e-4)


def test_float8_on_a_capable_gpu_converts_trains_and_stays_close_to_bf16():
    """The guide's defaults (float8 true, fp16 and bf16 false) on the card: Float8 where it pays, bf16 elsewhere."""
    from dataclasses import replace

    from torch import nn
    from torchao.float8.float8_linear import Float8Linear

    from peerlab.config import TrainConfig
    from peerlab.train.precision import apply_float8, autocast, autocast_dtype, float8_reason

    device = torch.device("cuda")
    t = TrainConfig()
    if float8_reason(t, device) is not None:
        pytest.skip(float8_reason(t, device))
    # Wide enough for torchao's rule (out_features > 1024): every q_down (1040 x 64) and layer 0's fc_in
    # (2048 x 64); the PEER router (2 heads x 1024 = 2048 x 64) would be too, and stays out.
    cfg = tiny_model_config(hidden_size=64, intermediate_size=2048, q_lora_rank=1040)
    cfg = replace(cfg, peer_config=replace(cfg.peer_config, query_dim=1024))
    torch.manual_seed(0)
    reference = build_model(cfg).to(device)
    model = build_model(cfg).to(device)
    model.load_state_dict(reference.state_dict())
    plan = apply_float8(model, t, device)
    assert plan.on and autocast_dtype(t, plan) == "bf16"
    assert plan.converted == [
        "layers.0.attn.q_down",
        "layers.0.mlp.fc_in",
        "layers.1.attn.q_down",
        "layers.2.attn.q_down",
    ]
    kinds = {n: type(m) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {n: Float8Linear if n in plan.converted else nn.Linear for n in kinds}
    assert "router" in plan.skipped["layers.1.mlp.query"] and plan.skipped["lm_head"] == "LM head"
    ids = torch.randint(0, cfg.vocab_size, (8, 33), device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        want = reference(ids[:, :-1]).float()
    with torch.no_grad(), autocast(t, device, plan):
        got = model(ids[:, :-1]).float()
    assert ((got - want).norm() / want.norm()).item() < 0.1  # e4m3 rounding, not a wrong kernel (errors near 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    losses = []
    for _ in range(30):
        with autocast(t, device, plan):
            loss = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_ray_train_run_on_the_gpu_uses_nccl_and_float8_and_resumes(ray_cluster, demo_corpus, tmp_path):
    """One GPU worker through TorchTrainer (nccl), Float8 on by default, a checkpoint, then a resumed run."""
    from peerlab.tracking import read_metrics
    from peerlab.train.launch import fit
    from tests.test_train import FLOAT8_WIDE, tiny

    if ray_cluster.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("Ray sees no GPU")
    run_dir = tmp_path / "gpu"
    cfg = tiny(demo_corpus, "train_config.num_workers=1", *FLOAT8_WIDE, steps=6)  # the guide's precision defaults
    assert fit(cfg, run_dir, quiet=True).error is None
    info = json.loads((run_dir / "run_info.json").read_text())
    assert (info["device"], info["backend"], info["workers"], info["start_step"]) == ("cuda", "nccl", 1, 0)
    capable = torch.cuda.get_device_capability() >= (8, 9)
    assert info["float8"] is capable and info["autocast"] == ("bf16" if capable else None)
    assert info["float8_layers"] == (["layers.0.mlp.fc_in"] if capable else [])
    assert info["compile"] is True and info["compile_reason"] == "auto: CUDA"
    first = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert len(first) == 6 and all(math.isfinite(x) for x in first)
    more = tiny(demo_corpus, "train_config.num_workers=1", *FLOAT8_WIDE, steps=9)
    assert fit(more, run_dir, quiet=True).error is None  # the same run name: continues after step 6
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, 10))
    assert json.loads((run_dir / "run_info.json").read_text())["start_step"] == 6


def test_sparse_experts_on_cuda_match_dense_gradients_and_train(demo_corpus, tmp_path):
    """train_config.sparse_experts on one GPU: sparse table gradients equal dense ones; RowSparseAdamW trains."""
    from tests.test_train import losses, run, tiny

    dense = make_peer(64, 64, 8, 4, dim=64, query_dim=32, hidden=2).float().cuda().train()
    sparse = make_peer(64, 64, 8, 4, dim=64, query_dim=32, hidden=2).float().cuda().train()
    sparse.load_state_dict(dense.state_dict())
    sparse.sparse_grad = True
    x = torch.randn(200, 64, device="cuda")
    dense(x).pow(2).sum().backward()
    sparse(x).pow(2).sum().backward()
    for name in ("down", "up"):
        g = getattr(sparse, name).grad
        assert g.is_sparse and g.is_cuda
        torch.testing.assert_close(g.to_dense(), getattr(dense, name).grad, rtol=1e-4, atol=1e-5)
    run(tiny(demo_corpus, "train_config.sparse_experts=true", steps=6), tmp_path / "sp")
    assert json.loads((tmp_path / "sp" / "run_info.json").read_text())["device"] == "cuda"
    got = losses(tmp_path / "sp")
    assert len(got) == 6 and got[-1] < got[0]


def test_a_trial_sharing_the_gpu_keeps_to_its_memory_share(demo_corpus, tmp_path):
    """gpu_memory_fraction (what a trial with --gpus-per-trial 0.25 gets): the caching allocator refuses past it."""
    from tests.test_train import losses, run, tiny

    run(tiny(demo_corpus, steps=3), tmp_path / "share", gpu_memory_fraction=0.25)
    info = json.loads((tmp_path / "share" / "run_info.json").read_text())
    assert info["gpu_memory_fraction"] == 0.25 and info["peaks"]["source"]
    assert len(losses(tmp_path / "share")) == 3
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(torch.OutOfMemoryError):  # the cap is this process's from now on
        torch.empty(int(total * 0.3), dtype=torch.uint8, device="cuda")
    torch.cuda.set_per_process_memory_fraction(1.0)


def test_float8_measured_filter_on_the_card(tmp_path, monkeypatch):
    """The measured filter on a Float8 card: every candidate shape timed (eager and compiled), figures kept,
    only shapes measured at least FLOAT8_MIN_SPEEDUP faster converted, and the compiled model then trains."""
    from dataclasses import replace

    from torchao.float8.float8_linear import Float8Linear

    from peerlab.config import TrainConfig
    from peerlab.train.compiling import apply_compile
    from peerlab.train.precision import FLOAT8_MIN_SPEEDUP, apply_float8, autocast, float8_reason, float8_shapes

    device = torch.device("cuda")
    t = TrainConfig()
    if float8_reason(t, device) is not None:
        pytest.skip(float8_reason(t, device))
    monkeypatch.setenv("PEERLAB_CACHE_DIR", str(tmp_path))
    cfg = tiny_model_config(hidden_size=1024, intermediate_size=4096, q_lora_rank=512)
    for compiled in (False, True):
        model = build_model(cfg).to(device)
        shapes = float8_shapes(model)
        plan = apply_float8(model, t, device, tokens=8192, compiled=compiled)
        assert plan.filter.startswith("measured") and ("compiled" if compiled else "eager") in plan.filter
        assert set(plan.speedups) == {f"{o}x{i}" for o, i in shapes}
        assert all(0 < r < 10 for r in plan.speedups.values()), plan.speedups
        modules = dict(model.named_modules())
        for name in plan.converted:
            o, i = modules[name].weight.shape
            assert isinstance(modules[name], Float8Linear) and plan.speedups[f"{o}x{i}"] >= FLOAT8_MIN_SPEEDUP
        for name, why in plan.skipped.items():
            assert not isinstance(modules[name], Float8Linear)
            if "measured" in why:
                o, i = modules[name].weight.shape
                assert plan.speedups[f"{o}x{i}"] < FLOAT8_MIN_SPEEDUP
    apply_compile(model, replace(t, compile=True), device)  # the measurement's dynamo reset left compile usable
    ids = torch.randint(0, cfg.vocab_size, (4, 65), device=device)
    with autocast(t, device, plan):
        loss = model(ids[:, :-1], labels=ids[:, 1:])
    loss.backward()
    assert math.isfinite(loss.item())
    kept = json.loads((tmp_path / "float8-speedups.json").read_text())
    assert sum("|eager|" in k for k in kept) == sum("|compiled|" in k for k in kept) == len(plan.speedups)
