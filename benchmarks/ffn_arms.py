"""Training tokens/s and peak memory of each feed-forward arm (PEER, dense, MoE, PKM) at matched compute.

    python benchmarks/ffn_arms.py                                  # the embedded demo config, --match flops, CPU
    python benchmarks/ffn_arms.py --config configs/config.yaml --device cuda --set model_config.peer_start_layer=11
    python benchmarks/ffn_arms.py --match params --steps 5 --rounds 2

Each arm is the whole model built from the config: PEER is the config itself (the reference
cell), and dense, MoE and PKM are sized to it by `peerlab.arms.match_arm` (the rule the sweeps
use; `--match none`: the arms as the config writes them). One step = forward with the fused
LM-head loss, backward, gradient clipping and the optimizer step, as the training loop runs
them (`build_optimizer`: PEER's expert tables with row-sparse gradients and `RowSparseAdamW`
unless `train_config.sparse_experts` says otherwise; freed memory kept for reuse), on random
token ids (speed does not depend on the text).

Every arm runs in a fresh child process of its own (so each one's peak memory is its own),
the arms alternating round by round; the figures are medians over rounds of each round's
median step. Peak memory: on CUDA the allocator's peak; on CPU the child's peak resident set
(ru_maxrss) less its resident set after the imports, i.e. the model, its gradients, the
optimizer state and the step's activations. Ratios are against PEER, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("peer", "dense", "moe", "pkm")


def arm_config(args, arm: str):
    """The config the arm trains with: the base (PEER) config, or the arm sized by peerlab.arms."""
    from peerlab.arms import match_arm
    from peerlab.config import config_from_dict, load_config, to_dict
    from peerlab.tune import apply_to_config

    cfg = load_config(args.config, args.overrides)
    if arm == "peer":
        return cfg, None
    sized = match_arm(cfg, arm, None if args.match == "none" else args.match)
    return config_from_dict(apply_to_config(to_dict(cfg), sized.setting), origin=f"{arm} arm"), sized


def child(args) -> None:
    import torch

    from peerlab.model import PEER, build_model
    from peerlab.train.allocator import reuse_freed_memory
    from peerlab.train.optim import build_optimizer, clip_grad_norm, sparse_experts_on

    reuse_freed_memory()  # as the training worker does
    cfg, _ = arm_config(args, args.arm)
    device = torch.device(args.device)
    batch = args.batch or cfg.train_config.per_device_train_batch_size
    seq = cfg.dataset_config.max_seq_length  # --seq is an override of it: the arms are sized at that length
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    with device:
        model = build_model(cfg.model_config).train()
    for layer in model.modules():
        if isinstance(layer, PEER):
            layer.sparse_grad = sparse_experts_on(cfg.train_config)
    optimizer = build_optimizer(model, cfg.train_config, fused=device.type == "cuda")
    ids = torch.randint(0, cfg.model_config.vocab_size, (batch, seq + 1), device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        clip_grad_norm(model.parameters(), cfg.train_config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):  # warm-up and the optimizer state's allocation
        step()
    times = []
    for _ in range(args.steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    print(json.dumps({"seconds": statistics.median(times), "tokens": batch * seq, "peak_bytes": peak}))


def run_child(args, arm: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--arm", arm, "--config", args.config, "--match", args.match]
    cmd += ["--steps", str(args.steps), "--device", args.device]
    cmd += [x for o in args.overrides for x in ("--set", o)]
    cmd += ["--batch", str(args.batch)] if args.batch else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="default: the embedded demo config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--match", choices=["flops", "params", "active", "none"], default="flops")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per arm and round (after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every arm once, in a fresh process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: per_device_train_batch_size")
    ap.add_argument(
        "--seq", type=int, default=None, help="sequence length (sets max_seq_length; default: the config's)"
    )
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--arm", default="peer", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    import torch

    from peerlab.arms import sizes

    if args.seq:
        args.overrides.append(f"dataset_config.max_seq_length={args.seq}")

    plan = {}
    for arm in ARMS:
        cfg, sized = arm_config(args, arm)
        knob = f"{sized.knob} = {sized.size}" if sized else "the reference cell"
        plan[arm] = {"knob": knob, **sizes(cfg.model_config, cfg.dataset_config.max_seq_length)}
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.device}; {args.config}, arms sized by --match {args.match}; {args.steps} steps x {args.rounds} rounds"
    )
    runs = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        for arm in ARMS:
            runs[arm].append(run_child(args, arm))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{a} {runs[a][-1]['seconds'] * 1e3:.0f} ms" for a in ARMS))
    rows = {}
    for arm in ARMS:
        seconds = statistics.median(x["seconds"] for x in runs[arm])
        rows[arm] = {
            **plan[arm],
            "ms_per_step": seconds * 1e3,
            "tokens_per_s": runs[arm][0]["tokens"] / seconds,
            "peak_mib": max(x["peak_bytes"] for x in runs[arm]) / 2**20,
        }
    peer = rows["peer"]
    print(
        "| arm | size | params | FLOPs/token | FLOPs vs PEER | ms/step | tokens/s | tokens/s vs PEER "
        "| peak memory (MiB) | memory vs PEER |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arm, r in rows.items():
        print(
            f"| {arm} | {r['knob']} | {r['params_total']:,} | {r['flops_per_token']:,} "
            f"| {r['flops_per_token'] / peer['flops_per_token']:.3f} | {r['ms_per_step']:.1f} "
            f"| {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x "
            f"| {r['peak_mib']:,.0f} | {r['peak_mib'] / max(peer['peak_mib'], 1e-9):.2f}x |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "arms": rows, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
