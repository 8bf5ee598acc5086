"""Train one PEER/MLA model from a config, as one Ray Train job.

    python experiments/train.py --config configs/demo.yaml [--set train_config.learning_rate=3e-4 ...]
        [--name RUN] [--address ray://... | RAY_ADDRESS] [--dry-run] [--verbose]

The run's outputs go to <output_dir>/<run name>/ (the name defaults to the config file's
name): resolved_config.yaml, metrics.jsonl, evals.jsonl (lm-eval results), checkpoints/. Running the same name again
continues from its newest checkpoint. output_dir may be object storage (s3://bucket/prefix, gs://...: peerlab.storage);
it is checked for credentials and written to before Ray starts. Ray starts a local cluster bound to 127.0.0.1 unless
--address or RAY_ADDRESS names one; the dashboard URL and the folder of Ray's logs are
printed first, then a line per logged step and the lm-eval results. Ray's own output stays
in its logs unless --verbose.

--dry-run validates the config, checks that every local dataset path exists (and that an output_dir on object
storage can be written), prints the config
resolved, the parameter count of each part of the model and the memory each worker needs for
weights, gradients and AdamW state, and starts nothing. A config, data or resume_from_checkpoint
that cannot be used gives a one-line error and exit status 2; a run that stops on an error no
restart can fix (a non-finite loss, say) prints it once and exits 3 (peerlab.cli lists the statuses).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from peerlab.cli import (
    DONE,
    FAILED,
    INTERRUPTED,
    STOPPED,
    UsageError,
    add_config_arguments,
    add_verbose_argument,
    checked_continuation,
    checked_data,
    checked_evals,
    checked_paths,
    checked_resume,
    checked_storage,
    checked_weights,
    config_from_arguments,
)
from peerlab.config import dump_config
from peerlab.model.size import memory_estimate, parameter_formulas
from peerlab.storage import join

PART_NAMES = {
    "embeddings": "embeddings (token embedding + LM head)",
    "attention": "attention (MLA projections)",
    "dense_mlp": "dense MLP",
    "peer_experts": "PEER experts (down + up vectors)",
    "peer_keys_query": "PEER keys and query (+ BatchNorm)",
    "moe_experts": "MoE experts (routed + shared)",
    "moe_router": "MoE router",
    "pkm_values": "PKM values",
    "pkm_keys_query": "PKM keys and query (+ BatchNorm)",
    "norms": "norms (RMSNorm weights)",
}
NEW_ARM_PARTS = ("moe_experts", "moe_router", "pkm_values", "pkm_keys_query")


def gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def describe(cfg, workers: int) -> str:
    """The dry-run report: parameters by part and memory per worker."""
    counts = parameter_formulas(cfg.model_config)
    total = sum(counts.values())
    lines = ["parameters:"]
    for part, n in counts.items():
        if part in NEW_ARM_PARTS and n == 0:
            continue  # the MoE and PKM parts only where that arm is used
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
    add_verbose_argument(ap)
    args = ap.parse_args(argv)
    cfg = config_from_arguments(args)
    if args.workers < 1:
        raise UsageError("--workers must be >= 1")
    if args.dry_run:
        checked_storage(cfg.train_config.output_dir)  # an s3:// output_dir: credentials and bucket, as the run will
        prepared = checked_paths(cfg)
        checked_resume(cfg)
        print(f"# resolved config of {args.config}")
        print(dump_config(cfg).rstrip())
        print()
        print(describe(cfg, args.workers))
        if prepared:
            print(f"data: {', '.join(prepared)}: the embedded default corpus, prepared by the run (about 10 s)")
        return DONE

    checked_storage(cfg.train_config.output_dir)
    checked_data(cfg)
    checked_evals(cfg)
    run_dir = join(cfg.train_config.output_dir, args.name or Path(args.config).stem)  # a path, or a URI
    continues = checked_continuation(cfg, run_dir)  # from the folder's own newest checkpoint
    if not continues:  # (continuing, resume_from_checkpoint is not used: neither fetched nor checked)
        cfg = checked_resume(cfg)
        checked_weights(cfg)

    from peerlab.train.failures import not_retried
    from peerlab.train.launch import fit, start_ray

    url, logs = start_ray(args.address, verbose=args.verbose)
    print(f"Ray dashboard: {url or 'not running'}", flush=True)
    if logs and not args.verbose:
        print(f"Ray's logs: {logs} (--verbose shows them here)", flush=True)
    print(f"run folder: {run_dir}", flush=True)
    try:
        result = fit(cfg, run_dir)
    except UsageError:
        raise
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C (or a SIGTERM): Ray's signal handlers end the run with exit()
        print(
            f"interrupted: the same command continues {run_dir} (from its newest checkpoint, if it has one)",
            file=sys.stderr,
        )
        return INTERRUPTED
    except Exception as err:
        if not_retried(err):  # the worker's own one-line error; the workers were not restarted for it
            print(f"error: the run stopped: {err}", file=sys.stderr)
            return STOPPED
        message = str(err).strip().splitlines()  # Ray wraps the worker's error; its last line says what happened
        print(f"error: the run failed: {message[-1] if message else type(err).__name__}", file=sys.stderr)
        return FAILED
    if result.error is not None:
        print(f"error: the run failed: {result.error}", file=sys.stderr)
        return FAILED
    print(f"done: metrics in {join(run_dir, 'metrics.jsonl')}, checkpoints in {join(run_dir, 'checkpoints')}")
    return DONE


if __name__ == "__main__":
    sys.exit(main())
