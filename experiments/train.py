"""Train one PEER/MLA model from a config.

    python experiments/train.py --config configs/demo.yaml [--set train_config.learning_rate=3e-4 ...] --dry-run

--dry-run validates the config, prints it resolved, the parameter count of each part of the
model and the memory each worker needs for weights, gradients and AdamW state, and starts
nothing. A config that cannot be used gives a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from peerlab.cli import UsageError, add_config_arguments, config_from_arguments
from peerlab.config import dump_config
from peerlab.model.size import memory_estimate, parameter_formulas

PART_NAMES = {
    "embeddings": "embeddings (token embedding + LM head)",
    "attention": "attention (MLA projections)",
    "dense_mlp": "dense MLP",
    "peer_experts": "PEER experts (down + up vectors)",
    "peer_keys_query": "PEER keys and query (+ BatchNorm)",
    "norms": "norms (RMSNorm weights)",
}


def gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def describe(cfg, workers: int) -> str:
    """The dry-run report: parameters by part and memory per worker."""
    counts = parameter_formulas(cfg.model_config)
    total = sum(counts.values())
    lines = ["parameters:"]
    for part, n in counts.items():
        lines.append(f"  {PART_NAMES[part]:<42}{n:>16,}  {100 * n / total:5.1f}%")
    lines.append(f"  {'total':<42}{total:>16,}")
    lines.append("memory per worker (fp32 weights and gradients, AdamW's two fp32 moments; activations not included):")
    for shards, label in ((1, "data-parallel (full replica)"), (workers, f"FSDP over {workers} workers")):
        if label.startswith("FSDP") and workers <= 1:
            continue
        mem = memory_estimate(total, shards)
        lines.append(
            f"  {label:<30} weights {gib(mem['weights'])}, gradients {gib(mem['gradients'])}, "
            f"AdamW state {gib(mem['adamw_state'])}, total {gib(mem['total'])}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train one PEER/MLA model from a config.")
    add_config_arguments(ap, "configs/config.yaml")
    ap.add_argument("--dry-run", action="store_true", help="validate and print sizes; start nothing")
    ap.add_argument("--workers", type=int, default=1, help="training workers (for the per-worker memory estimate)")
    args = ap.parse_args(argv)
    cfg = config_from_arguments(args)
    if args.workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.dry_run:
        print(f"# resolved config of {args.config}")
        print(dump_config(cfg).rstrip())
        print()
        print(describe(cfg, args.workers))
        return 0
    raise UsageError(
        "training on Ray Train is not built yet (issue 4); use --dry-run, or experiments/smoke.py for the smoke demo"
    )


if __name__ == "__main__":
    sys.exit(main())
