"""Training-step throughput of the model, against transformers' DeepseekV3ForCausalLM of the same shape.

    python benchmarks/train_step.py [--config configs/demo.yaml]

1. peerlab with `use_peer: false` against `DeepseekV3ForCausalLM` built (random init,
   nothing downloaded) with the same vocabulary, hidden size, layers, heads, MLA dimensions
   and a dense MLP of the same width in every layer (`first_k_dense_replace` = layers).
   Note: DeepSeek's MLP is SwiGLU (three matrices), peerlab's dense MLP GELU (two).
2. The full PEER model at the demo size, with expert-usage tracking on and off (its cost).
3. The optimizer step of one PEER layer at N = 1024^2 experts (dim 256, 8 heads, k = 16,
   4 x 256 tokens): plain AdamW on dense gradients against RowSparseAdamW on the sparse
   gradients of the retrieved rows (train_config.sparse_experts). Run one after the
   other (each needs about 8 GB); the medians of --opt-steps steps after a warm-up step.

On a GPU (`--device cuda`, `--config configs/config.yaml`): tokens/s and model FLOPs
utilisation of the training step in bf16 autocast against torchao Float8 as the guide's note
asks (fp16 and bf16 false: bf16 autocast runs the rest), at the largest config that fits
the card: the config's model with as many of its PEER layers (counted from the last) as fit
in memory, and its dense baseline (`use_peer: false`).

    python benchmarks/train_step.py --device cuda --config configs/config.yaml

One step = forward, cross-entropy, backward, clipping, AdamW, on random token ids; the
variants alternate round by round in one process and figures are medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from dataclasses import replace

import torch

from peerlab.config import load_config
from peerlab.model import (
    build_model,
    memory_estimate,
    parameter_formulas,
    peer_layer_count,
    training_flops_per_token,
)


def deepseek_like(m):
    from transformers import DeepseekV3ForCausalLM

    from peerlab.model.deepseek import deepseek_v3_config

    return DeepseekV3ForCausalLM(deepseek_v3_config(m))


def stepper(model, vocab: int, batch: int, seq: int, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(0))

    def step():
        if hf:  # transformers' own loss path: logits, then its cross-entropy
            loss = model(ids[:, :-1], labels=ids[:, :-1]).loss
        else:  # peerlab's training path: the fused LM-head loss
            loss = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def race(steps: dict, tokens: int, rounds: int, reps: int) -> dict[str, float]:
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            times[name].append((time.perf_counter() - t0) / reps)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")


def choices(allowed):
    """An argparse type: a comma-separated list of names from `allowed`."""

    def parse(text: str) -> list[str]:
        names = text.split(",")
        if unknown := [n for n in names if n not in allowed]:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; give some of {', '.join(allowed)}")
        return names

    return parse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--opt-experts", type=int, default=1024 * 1024, help="experts of the optimizer-step layer")
    ap.add_argument("--opt-steps", type=int, default=3, help="optimizer steps to time (0 skips that part)")
    ap.add_argument("--device", default="cpu", help="cuda: the bf16 / Float8 comparison on the GPU instead")
    ap.add_argument("--batch", type=int, default=None, help="GPU: sequences per step (default: the config's)")
    ap.add_argument("--seq", type=int, default=None, help="GPU: tokens per sequence (default: the config's)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="GPU: dense bf16 peak (default: by card name)")
    ap.add_argument("--json", help="GPU: write the figures here")
    ap.add_argument("--compile", action="store_true", help="GPU: compile each block (--compile-modes default)")
    ap.add_argument(
        "--compile-modes",
        type=choices(COMPILE_MODES),
        default=None,
        help=f"GPU: comma-separated variants, of {', '.join(COMPILE_MODES)} (none: eager; reduce-overhead: CUDA graphs)",
    )
    ap.add_argument(
        "--precisions", type=choices(PRECISIONS), default=["bf16", "float8"], help="GPU: bf16, float8 or both"
    )
    ap.add_argument(
        "--set", action="append", default=[], help="GPU: a config override, e.g. model_config.hidden_size=2048"
    )
    ap.add_argument("--skip-dense", action="store_true", help="GPU: the PEER model only, not its dense baseline")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        help="GPU: after timing each model's first bf16 variant, one step under torch.profiler: its N costliest ops",
    )
    args = ap.parse_args(argv)
    args.compile_modes = args.compile_modes or ["default" if args.compile else "none"]
    if args.device != "cpu":
        gpu_precision(args)
        if args.opt_steps:
            optimizer_step(args.opt_experts, args.opt_steps, torch.device(args.device))
        return
    cfg = load_config(args.config)
    m, t = cfg.model_config, cfg.train_config
    batch, seq = t.per_device_train_batch_size, cfg.dataset_config.max_seq_length
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    print(f"training step, {args.config}: batch {batch} x {seq} tokens, float32 ({machine})")

    torch.manual_seed(0)
    dense_cfg = load_config(args.config, ["model_config.use_peer=false"]).model_config
    ours = build_model(dense_cfg)
    theirs = deepseek_like(dense_cfg)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    rates = race(
        {
            "peerlab dense": stepper(ours, m.vocab_size, batch, seq, False),
            "DeepseekV3ForCausalLM": stepper(theirs, m.vocab_size, batch, seq, True),
        },
        batch * seq,
        args.rounds,
        args.reps,
    )
    print(f"  peerlab (use_peer: false)  {n_ours:>12,} parameters  {rates['peerlab dense']:>10,.0f} tokens/s")
    print(f"  DeepseekV3ForCausalLM      {n_theirs:>12,} parameters  {rates['DeepseekV3ForCausalLM']:>10,.0f} tokens/s")
    print(f"  peerlab / DeepseekV3: {rates['peerlab dense'] / rates['DeepseekV3ForCausalLM']:.2f}")

    torch.manual_seed(0)
    peer = build_model(m)
    quiet = build_model(load_config(args.config, ["model_config.peer_config.log_expert_usage=false"]).model_config)
    quiet.load_state_dict(peer.state_dict())
    rates = race(
        {
            "tracked": stepper(peer, m.vocab_size, batch, seq, False),
            "untracked": stepper(quiet, m.vocab_size, batch, seq, False),
        },
        batch * seq,
        args.rounds,
        args.reps,
    )
    cost = rates["untracked"] / rates["tracked"] - 1
    print(
        f"  PEER model, usage tracked    {sum(p.numel() for p in peer.parameters()):>10,} parameters  "
        f"{rates['tracked']:>10,.0f} tokens/s"
    )
    print(f"  PEER model, usage untracked  {'':>10}             {rates['untracked']:>10,.0f} tokens/s")
    print(f"  cost of tracking expert usage: {100 * cost:+.1f}% of step time")
    if args.opt_steps:
        optimizer_step(args.opt_experts, args.opt_steps)


def optimizer_step(experts: int, steps: int, device=torch.device("cpu")) -> None:
    """Optimizer step (and backward) of one large PEER layer: dense AdamW against RowSparseAdamW."""
    from peerlab.config import PeerConfig
    from peerlab.model.peer import PEER
    from peerlab.train.optim import RowSparseAdamW

    root = int(round(experts**0.5))
    cfg = PeerConfig(
        num_experts=experts, product_key_dim=[root, root], num_experts_per_tok=16, num_heads=8, query_dim=256
    )
    x = torch.randn(4, 256, 256, generator=torch.Generator().manual_seed(0)).to(device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"optimizer step of one PEER layer, N = {experts:,}, dim 256, 8 heads, k = 16, 4 x 256 tokens, {device}:")
    results = {}
    for name in ("AdamW (dense gradients)", "RowSparseAdamW (sparse rows)"):
        torch.manual_seed(0)
        layer = PEER(cfg, 256).to(device)
        sparse = name.startswith("Row")
        layer.sparse_grad = sparse
        if sparse:
            opt = RowSparseAdamW(layer.parameters(), lr=1e-3, weight_decay=0.01)
        else:  # fused on a GPU, as the worker builds it there
            opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, weight_decay=0.01, fused=cuda)
        backward, stepping = [], []
        for i in range(steps + 1):
            opt.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            layer(x).pow(2).mean().backward()
            sync()
            t1 = time.perf_counter()
            opt.step()
            sync()
            t2 = time.perf_counter()
            if i:  # the first step allocates the moments
                backward.append(t1 - t0)
                stepping.append(t2 - t1)
        results[name] = (statistics.median(backward), statistics.median(stepping))
        b, o = results[name]
        print(f"  {name:<30} forward+backward {1000 * b:8.1f} ms   optimizer step {1000 * o:8.1f} ms")
        del layer, opt
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    (dense_b, dense_s), (sparse_b, sparse_s) = results.values()
    print(
        f"  optimizer step: sparse is {dense_s / sparse_s:.1f}x faster; step + backward {(dense_b + dense_s) / (sparse_b + sparse_s):.1f}x"
    )


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from NVIDIA's data sheets; Float8's is twice these.
BF16_PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
}


def bf16_peak(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


PRECISIONS = {  # (name, train_config overrides) of each variant
    "bf16": ("bf16 autocast", ["train_config.fp16=false", "train_config.bf16=true", "train_config.float8=false"]),
    # The guide's settings for Float8 (fp16 and bf16 false): bf16 autocast runs the layers Float8 leaves out.
    "float8": (
        "Float8 + bf16 autocast",
        ["train_config.fp16=false", "train_config.bf16=false", "train_config.float8=true"],
    ),
}


def step_rate(cfg, device, batch: int, seq: int, steps: int, rounds: int, compile_mode: str = "none", profile: int = 0):
    """(tokens/s, peak bytes, Float8's plan) of the platform's training step: its model, precision, AdamW, clipping.

    Float8's filter times each layer shape at this batch's tokens, compiled as the step is (`measure_float8`).
    `profile` > 0: after the timed rounds, one more step under torch.profiler, and its `profile` costliest ops
    (`print_profile`).
    """
    from peerlab.model import PEER
    from peerlab.train.optim import build_optimizer, clip_grad_norm, sparse_experts_on
    from peerlab.train.precision import apply_float8, autocast, set_tf32

    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t = cfg.train_config
    set_tf32(t)
    torch.manual_seed(0)
    model = optimizer = float8 = None

    def step():
        if compile_mode == "reduce-overhead":  # a new iteration: the CUDA graphs may reuse the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(t, device, float8):
            loss = model(ids[:, :-1], labels=ids[:, 1:])  # the worker's fused LM head + cross-entropy
        loss.backward()
        clip_grad_norm(model.parameters(), t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        if cuda:
            gc.collect()  # what a variant that ran out of memory left behind
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with device:  # build and initialise the weights where they will live
            model = build_model(cfg.model_config)
        float8 = apply_float8(model, t, device, tokens=batch * seq, compiled=compile_mode != "none")
        if compile_mode != "none":  # after Float8, as the worker does
            from peerlab.train.compiling import apply_compile

            apply_compile(model, replace(t, compile=True), device, mode=compile_mode)
        for layer in model.modules():  # as the worker's DataParallel does (one process: no exchange)
            if isinstance(layer, PEER):
                layer.sparse_grad = sparse_experts_on(t)
        optimizer = build_optimizer(model, t, fused=cuda)
        ids = torch.randint(0, cfg.model_config.vocab_size, (batch, seq + 1), device=device)
        for _ in range(2):  # warm-up: AdamW's state, kernels, Float8's scales
            step()
        times = []
        for _ in range(rounds):
            sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            sync()
            times.append((time.perf_counter() - t0) / steps)
        peak_bytes = torch.cuda.max_memory_allocated() if cuda else 0
        if profile:
            print_profile(step, sync, profile, cuda)
        return batch * seq / statistics.median(times), peak_bytes, float8
    finally:
        model = optimizer = None  # free the card for the next variant, also after running out of memory
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def print_profile(step, sync, rows: int, cuda: bool) -> None:
    """One step under torch.profiler: the `rows` ops with the most self time on the device (CPU without CUDA),
    each with its share of the step's total, so the next change goes where the time is.

    On CUDA each op's device time is that of the kernels it launched; the kernels also appear as rows of
    their own, so the total sums the kernel rows and the ranking lists the ops (user annotations, such as
    the optimizer's step, left out of both).
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if not e.is_user_annotation]
    ops = [e for e in events if e.device_type == DeviceType.CPU]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA] if cuda else ops
    total = sum(getattr(e, key) for e in kernels) or 1
    print(f"    one step under torch.profiler: {total / 1e3:.1f} ms of {'device' if cuda else 'CPU'} self time")
    for e in sorted(ops, key=lambda e: getattr(e, key), reverse=True)[:rows]:
        us = getattr(e, key)
        print(f"      {100 * us / total:5.1f}%  {us / 1e3:8.2f} ms  x{e.count:<5} {e.key[:90]}")


def gpu_precision(args) -> None:
    """bf16 against Float8 on the GPU: the PEER model with as many PEER layers as fit, and its dense baseline."""
    base = load_config(args.config, args.set)
    m = base.model_config
    batch = args.batch or base.train_config.per_device_train_batch_size
    seq = args.seq or base.dataset_config.max_seq_length
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or bf16_peak(name)
    if peak is None:
        raise SystemExit(f"no bf16 peak known for {name!r}: pass --peak-tflops")
    total = torch.cuda.get_device_properties(0).total_memory
    print(
        f"training step on {name} ({total / 2**30:.0f} GiB, bf16 peak {peak} TFLOP/s), torch {torch.__version__}, "
        f"{args.config} {' '.join(args.set)}: batch {batch} x {seq} tokens, tf32 {base.train_config.tf32}, "
        f"compile {', '.join(args.compile_modes)}; MFU is against the dense bf16 peak (Float8 peak: 2x); "
        f"PEER's experts in {'its Triton kernels' if os.environ.get('PEERLAB_TRITON') == '1' else 'torch ops'}"
    )

    # The most PEER layers whose weights, gradients and AdamW state fill at most 3/4 of the card
    # (activations take the rest); fewer when a step runs out of memory.
    def state_bytes(peer_layers: int) -> int:
        return memory_estimate(
            sum(parameter_formulas(replace(m, peer_start_layer=m.num_hidden_layers - peer_layers)).values())
        )["total"]

    fits = [n for n in range(peer_layer_count(m), 0, -1) if state_bytes(n) <= 0.75 * total]
    results: list[dict] = []

    def save(rows: list[dict]) -> None:
        """The figures so far into --json (after every variant: a run cut short keeps what it measured)."""
        if args.json:
            record = {"machine": name, "torch": torch.__version__, "batch": batch, "seq": seq}
            with open(args.json, "w") as f:
                json.dump({**record, "bf16_peak_tflops": peak, "results": results + rows}, f, indent=1)

    for n in fits:
        try:
            results = measure(args, f"model_config.peer_start_layer={m.num_hidden_layers - n}", batch, seq, peak, save)
            break
        except torch.OutOfMemoryError:
            print(f"  {n} PEER layers: out of memory; trying {n - 1}")
            results = []
    if not args.skip_dense:
        results += measure(args, "model_config.use_peer=false", batch, seq, peak, save)
    save([])


def measure(args, model_override: str, batch: int, seq: int, peak: float, save=lambda rows: None) -> list[dict]:
    """Each precision x compile mode at one model size. Only the first variant (bf16, or the first
    precision asked for) running out of memory means 'too big': a later variant that does not fit is
    reported as such. `save(rows)` after each variant."""
    rows = []
    variants = [(p, mode) for p in args.precisions for mode in args.compile_modes]
    for i, (key, mode) in enumerate(variants):
        precision, overrides = PRECISIONS[key]
        cfg = load_config(args.config, [*args.set, model_override, *overrides])
        m = cfg.model_config
        params = sum(parameter_formulas(m).values())
        peer_layers = peer_layer_count(m)
        row = {
            "model": f"{peer_layers} PEER layers" if peer_layers else "dense (use_peer: false)",
            "params": params,
            "precision": precision,
            "compile": mode,
        }
        label = f"{precision}, {'eager' if mode == 'none' else 'compile ' + mode}"
        try:
            start = time.perf_counter()
            profile = args.profile if (key, mode) == ("bf16", "none") else 0  # each model's eager bf16 step
            rate, peak_bytes, plan = step_rate(
                cfg, torch.device(args.device), batch, seq, args.reps, args.rounds, compile_mode=mode, profile=profile
            )
        except torch.OutOfMemoryError:
            if i == 0:
                raise
            rows.append({**row, "out_of_memory": True})
            print(f"  {row['model']:<24} {params / 1e9:6.2f} G params  {label:<44} out of memory")
            continue
        flops = training_flops_per_token(m, seq)
        mfu = rate * flops / (peak * 1e12)
        float8_on = plan.on
        row.update(
            float8_on=float8_on,
            float8_layers=len(plan.converted),
            float8_filter=plan.filter,
            float8_speedups=plan.speedups,
            tokens_per_s=rate,
            flops_per_token=flops,
            mfu_vs_bf16_peak=mfu,
            peak_gib=peak_bytes / 2**30,
            wall_s=time.perf_counter() - start,  # build, Float8's layer timings, compile, warm-up, timed steps
        )
        rows.append(row)
        save(rows)
        note = "" if float8_on == ("Float8" in precision) else "  (Float8 not applied)"
        if float8_on:
            note += (
                f"  (Float8 on {len(plan.converted)} layers; {plan.filter}; "
                + (", ".join(f"{shape} {ratio:.2f}x" for shape, ratio in plan.speedups.items()) or "no figures")
                + ")"
            )
        print(
            f"  {row['model']:<24} {params / 1e9:6.2f} G params  {label:<44} {rate:>10,.0f} tokens/s  "
            f"MFU {100 * mfu:5.1f}%  peak {row['peak_gib']:6.1f} GiB  ({row['wall_s']:.0f} s){note}"
        )
    base = rows[0]
    bf16 = {r["compile"]: r for r in rows if r["precision"] == "bf16 autocast" and "tokens_per_s" in r}
    for row in rows[1:]:
        if "tokens_per_s" not in row:
            continue
        line = f"    {row['precision']}, compile {row['compile']}: {row['tokens_per_s'] / base['tokens_per_s']:.2f}x"
        line += f" of {base['precision']}, compile {base['compile']}"
        if "Float8" in row["precision"] and row["compile"] in bf16:
            line += f"; {row['tokens_per_s'] / bf16[row['compile']]['tokens_per_s']:.2f}x of bf16 at the same compile"
        print(line)
    return rows


if __name__ == "__main__":
    main()
