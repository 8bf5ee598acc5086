"""The PEER paper's expert-usage ablation on the embedded corpus: query BatchNorm on and off.

    python benchmarks/peer_usage.py [--steps 120] [--seeds 2] [--json out.json]

He 2024 (Sec. 3.4) sums each expert's router score over evaluation tokens, normalises the
sums to a distribution z over the N experts and reports the share of experts used (z > 0)
and KL(z || uniform) = log N + sum z log z: with query BatchNorm all experts are used and
the KL is 1.06, against 1.52 without (N = 1024², 8 heads, k = 16, C4; ../shared/FACTS.md).

Here: the demo model (configs/demo.yaml, N = 256², three PEER layers) trained for --steps
steps on the demo corpus, query BatchNorm on and off, at two heads x k settings with the same
active parameters (heads x k fixed: the demo's 4 x 8, and 8 x 4), each with --seeds seeds.
Each trained model then reads the held-out blocks of every dataset in eval mode (BatchNorm
with its running statistics), and the score mass of each PEER layer is summarised as the
paper does (`peerlab.train.usage.summarise`). The training-time usage of the last log window
(`usage.parquet`) is shown too. Figures: mean over PEER layers, then mean and spread over
seeds. Training runs in this process (`train_loop`, the local data engine: no Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"batch_norm": {"usage": 1.0, "kl_uniform": 1.06}, "no batch_norm": {"kl_uniform": 1.52}}


def settings(heads_k: list[tuple[int, int]]) -> dict[str, list[str]]:
    """{name: overrides}: BatchNorm on and off at each (heads, k)."""
    out = {}
    for heads, k in heads_k:
        for bn in (True, False):
            out[f"{'BN' if bn else 'no BN'}, {heads} heads x k {k}"] = [
                f"model_config.peer_config.batch_norm_query={str(bn).lower()}",
                f"model_config.peer_config.num_heads={heads}",
                f"model_config.peer_config.num_experts_per_tok={k}",
            ]
    return out


@torch.no_grad()
def heldout_mass(model, blocks) -> dict[int, torch.Tensor]:
    """{layer: (N,) router score mass} of every PEER layer over the held-out blocks, in eval mode."""
    from peerlab.model.peer import PEER

    masses: dict[int, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, PEER):
            layer = int(name.split(".")[1])
            masses[layer] = torch.zeros(module.num_experts, dtype=torch.float64)

            def retrieve(x, module=module, mass=masses[layer], original=module.retrieve):
                scores, indices = original(x)  # (M, H, k) each
                gate = torch.softmax(scores.double(), dim=-1)  # the router scores (Eq. 3)
                mass.index_add_(0, indices.reshape(-1), gate.reshape(-1))
                return scores, indices

            module.retrieve = retrieve
    model.eval()
    for held in blocks.values():
        for rows in held.ids.split(8):
            model(rows[:, :-1])
    return masses


def one_run(config: Path, overrides: list[str], seed: int, steps: int, folder: Path, eval_blocks: int) -> dict:
    """Train one model, then measure its expert usage on held-out text; the layers' mean figures."""
    import pandas as pd

    from peerlab.config import load_config, to_dict
    from peerlab.eval.heldout import heldout_blocks
    from safetensors.torch import load_file

    from peerlab.data.tokenizer import load_tokenizer
    from peerlab.model import build_model
    from peerlab.train import checkpoint as ckpt
    from peerlab.train.usage import summarise
    from peerlab.train.worker import train_loop

    cfg = load_config(
        config,
        [
            *overrides,
            f"train_config.seed={seed}",
            f"train_config.max_steps={steps}",
            f"train_config.save_steps={steps}",
            f"train_config.eval_steps={steps}",
            f"train_config.logging_steps={steps}",
            f"model_config.peer_config.log_freq={steps}",
            "eval_config.evals=[]",
        ],
    )
    run_dir = folder / f"seed{seed}"
    started = time.perf_counter()
    last = train_loop({"config": to_dict(cfg), "run_dir": str(run_dir), "data_engine": "local"})
    took = time.perf_counter() - started
    model = build_model(cfg.model_config)
    model.load_state_dict(load_file(ckpt.latest(run_dir / "checkpoints") / "model.safetensors"))
    tokenizer = load_tokenizer(cfg.dataset_config.tokenizer_name)
    blocks = heldout_blocks(cfg.dataset_config, tokenizer, eval_blocks)
    threshold = cfg.model_config.peer_config.usage_threshold
    masses = heldout_mass(model, blocks)
    held = [summarise(mass, threshold) for mass in masses.values()]
    p = cfg.model_config.peer_config
    tokens = sum(b.ids[:, :-1].numel() for b in blocks.values())
    train = pd.read_parquet(run_dir / "usage.parquet")
    train = train[train["step"] == train["step"].max()]
    return {
        "usage": statistics.mean(r["usage"] for r in held),
        "kl_uniform": statistics.mean(r["kl_uniform"] for r in held),
        "train_usage": float(train["usage"].mean()),
        "train_kl_uniform": float(train["kl_uniform"].mean()),
        "eval_bpb": last.get("eval_bpb/mean", float("nan")),
        "seconds": took,
        "heldout_tokens": tokens,
        "retrievals_per_expert": tokens * p.num_heads * p.num_experts_per_tok / p.num_experts,
        "layers": {
            "usage": [r["usage"] for r in held],
            "kl_uniform": [r["kl_uniform"] for r in held],
        },
    }


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    half = (max(values) - min(values)) / 2
    return f"{mean:.3f} ± {half:.3f}" if len(values) > 1 else f"{mean:.3f}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--corpus", default=str(ROOT / "data" / "demo"), help="the embedded corpus (prepared if missing)")
    ap.add_argument("--steps", type=int, default=120, help="training steps per run (the demo's 120)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--heads-k", default="4x8,8x4", help="heads x k settings, comma-separated")
    ap.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks per dataset (at most)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT)  # the demo config's paths are relative to the repository
    from peerlab.data.corpus import prepare_demo_corpus

    prepare_demo_corpus(args.corpus, quiet=True)
    torch.set_num_threads(os.cpu_count() or 1)
    pairs = [tuple(int(v) for v in hk.split("x")) for hk in args.heads_k.split(",")]
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in settings(pairs).items():
            results[name] = []
            for seed in range(42, 42 + args.seeds):
                folder = Path(tmp) / name.replace(" ", "_").replace(",", "")
                results[name].append(one_run(Path(args.config), overrides, seed, args.steps, folder, args.eval_blocks))
                r = results[name][-1]
                print(f"  {name}, seed {seed}: usage {r['usage']:.4f}, KL {r['kl_uniform']:.3f} ({r['seconds']:.0f} s)")
    first = next(iter(results.values()))[0]
    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.steps} steps, {args.seeds} seeds"
    )
    print(
        f"held-out: {first['heldout_tokens']} tokens, {first['retrievals_per_expert']:.1f} retrievals per expert and layer"
    )
    print("| setting | usage (held-out) | KL to uniform (held-out) | usage (training) | KL (training) | bits/byte |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        cols = [spread([r[key] for r in runs]) for key in ("usage", "kl_uniform", "train_usage", "train_kl_uniform")]
        print(f"| {name} | {' | '.join(cols)} | {spread([r['eval_bpb'] for r in runs])} |")
    print("| paper (N = 1024², 8 x 16, C4): BN | 1.000 | 1.06 | | | |")
    print("| paper: no BN | | 1.52 | | | |")
    verdicts = []
    for heads, k in pairs:
        on, off = results[f"BN, {heads} heads x k {k}"], results[f"no BN, {heads} heads x k {k}"]
        usage_up = statistics.mean(r["usage"] for r in on) >= statistics.mean(r["usage"] for r in off)
        kl_down = statistics.mean(r["kl_uniform"] for r in on) < statistics.mean(r["kl_uniform"] for r in off)
        verdicts.append(
            f"{heads} heads x k {k}: BatchNorm {'raises' if usage_up else 'does not raise'} usage and "
            f"{'lowers' if kl_down else 'does not lower'} KL (paper: raises, lowers)"
        )
    print("\n".join(verdicts))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "paper": PAPER, "verdicts": verdicts}, indent=1))


if __name__ == "__main__":
    main()
