"""Evaluate a checkpoint with lm-eval, with the platform's defaults from the run's config.

    python experiments/evaluate.py --checkpoint PATH [--tasks a,b] [--batch-size N] [--limit N]
        [--registry DIR] [--data-dir DIR] [--confirm-run-unsafe-code]

PATH is a checkpoint folder (<run>/checkpoints/step-NNNNNN), a run's checkpoints/ folder or a
run folder (their newest complete checkpoint), on this machine or on object storage
(s3://bucket/runs/name: fetched into a temporary folder, evals.jsonl written back). The tasks default to the run's eval_config.evals, the registry to its
evals_registry_path, the batch size to its eval_batch_size. Prints a table of the results
and appends them to the run's evals.jsonl (step = the checkpoint's step), and to wandb when
the run's config has a wandb_config. A task that cannot be loaded offline is skipped with one
warning line; a missing checkpoint or an unknown task is a one-line error with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

from peerlab import storage
from peerlab.cli import UsageError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder, a checkpoints/ folder or a run folder (the newest checkpoint)",
    )
    ap.add_argument("--tasks", help="comma-separated lm-eval task names (default: the run's eval_config.evals)")
    ap.add_argument("--batch-size", type=int, help="requests per forward pass (default: eval_batch_size)")
    ap.add_argument("--limit", type=int, help="at most this many documents per task (default: all)")
    ap.add_argument("--registry", help="folder of task YAML (default: the run's evals_registry_path)")
    ap.add_argument("--data-dir", help="the registry tasks' data folder (default: the run's eval_data_dir)")
    ap.add_argument("--device", help="torch device (default: cuda when there is one, else cpu)")
    ap.add_argument("--confirm-run-unsafe-code", action="store_true", help="run code-executing tasks (humaneval)")
    args = ap.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("peerlab").setLevel(logging.INFO)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    staging = run_uri = None
    checkpoint = args.checkpoint
    if storage.is_remote(checkpoint):  # the run's files and the checkpoint, into a temporary folder
        staging = Path(tempfile.mkdtemp(prefix="peerlab-eval-"))
        try:
            run_uri, local = storage.pull_checkpoint(checkpoint, staging)
        except storage.StorageError as err:
            shutil.rmtree(staging, ignore_errors=True)
            raise UsageError(f"--checkpoint: {err}") from None
        checkpoint = str(local)
    try:
        return evaluate(args, checkpoint, device, run_uri)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def evaluate(args: argparse.Namespace, checkpoint: str, device: str, run_uri: str | None) -> int:
    from peerlab.eval.harness import format_table, run_lm_eval, task_manager
    from peerlab.eval.lm import EvalError, PeerlabLM
    from peerlab.tracking import MetricsLog, append_evals

    try:
        lm = PeerlabLM(checkpoint=checkpoint, batch_size=args.batch_size or 1, device=device)
        e = lm.config.eval_config
        names = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else list(e.evals)
        if not names:
            raise EvalError("no tasks: the run's eval_config.evals is empty; name some with --tasks")
        registry = args.registry or e.evals_registry_path
        data_dir = args.data_dir or e.eval_data_dir
        task_manager(names, registry, data_dir)  # unknown names fail here, before any work
    except EvalError as err:
        raise UsageError(str(err)) from None
    lm.batch_size = args.batch_size or e.eval_batch_size
    print(f"evaluating {args.checkpoint} (step {lm.step}) on {', '.join(names)}", flush=True)
    outcome = run_lm_eval(
        lm,
        names,
        registry,
        data_dir=data_dir,
        limit=args.limit,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code or e.confirm_run_unsafe_code,
    )
    print(format_table(outcome.rows))
    for line in outcome.skipped.values():
        print(f"skipped: {line}")
    tracker = MetricsLog(lm.run_dir, lm.config, enabled=lm.config.wandb_config is not None)
    path = append_evals(lm.run_dir, lm.step, outcome.rows, tracker.wandb)
    tracker.close()
    if run_uri is not None:  # the run's evals.jsonl, with the new lines, back to the bucket
        path = storage.join(run_uri, path.name)
        storage.write_bytes(path, (lm.run_dir / "evals.jsonl").read_bytes())
    print(f"{len(outcome.rows)} results appended to {path} in {outcome.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
