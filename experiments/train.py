"""Train one PEER/MLA model from a config, as one Ray Train job.

    python experiments/train.py --config configs/demo.yaml [--set train_config.learning_rate=3e-4 ...]
        [--name RUN] [--address ray://... | RAY_ADDRESS] [--dry-run]

The run's outputs go to <output_dir>/<run name>/ (the name defaults to the config file's
name): resolved_config.yaml, metrics.jsonl, evals.jsonl (lm-eval results), checkpoints/. Running the same name again
continues from its newest checkpoint. Ray starts a local cluster bound to 127.0.0.1 unless
--address or RAY_ADDRESS names one; the dashboard URL is printed first.

--dry-run validates the config, prints it resolved, the parameter count of each part of the
model and the memory each worker needs for weights, gradients and AdamW state, and starts
nothing. A config or data that cannot be used gives a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peerlab.cli import UsageError, add_config_arguments, checked_data, checked_evals, config_from_arguments
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
    ap.add_argument("--workers", type=int, default=1, help="training workers (for the dry run's memory estimate)")
    ap.add_argument("--name", help="run name: outputs go to <output_dir>/<name> (default: the config file's name)")
    ap.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster)")
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

    checked_data(cfg)
    checked_evals(cfg)
    run_dir = Path(cfg.train_config.output_dir) / (args.name or Path(args.config).stem)

    from peerlab.train.launch import fit, start_ray

    print(f"Ray dashboard: {start_ray(args.address) or 'not running'}", flush=True)
    print(f"run folder: {run_dir}", flush=True)
    try:
        result = fit(cfg, run_dir)
    except Exception as err:  # Ray wraps the worker's error; its first line says what happened
        message = str(err).strip().splitlines()
        print(f"error: the run failed: {message[-1] if message else type(err).__name__}", file=sys.stderr)
        return 1
    if result.error is not None:
        print(f"error: the run failed: {result.error}", file=sys.stderr)
        return 1
    print(f"done: metrics in {run_dir / 'metrics.jsonl'}, checkpoints in {run_dir / 'checkpoints'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
