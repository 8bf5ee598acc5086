"""Export a checkpoint to the Hugging Face format: a folder transformers loads without peerlab.

    python experiments/export.py --checkpoint PATH --out DIR [--overwrite] [--max-shard-size 2GB] [--tokenizer T]
    python experiments/export.py --sweep SWEEP_DIR --out DIR [--metric M --mode min|max]

PATH is a checkpoint folder (<run>/checkpoints/step-NNNNNN), a run's checkpoints/ folder or a
run folder (its newest complete checkpoint). With --sweep, the sweep's best cell on its own
metric and mode (sweep.json; --metric/--mode choose others) is exported: of that cell's trials
the best one that has a checkpoint, at its newest checkpoint. The tokenizer is the run's
(dataset_config.tokenizer_name); --tokenizer names it where the run's is a relative folder elsewhere.

DIR then holds config.json, model.safetensors (sharded above --max-shard-size), the tokenizer,
modeling_peerlab.py and configuration_peerlab.py (torch and transformers only) and a model card
(README.md) with the run's config, data mix, tokens, held-out bits per byte and lm-eval results:

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(DIR)

A path that is not a checkpoint, a checkpoint that does not match its manifest, or an output
folder that exists and is not empty (without --overwrite) is a one-line error, exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from peerlab.cli import UsageError

ROOT = Path(__file__).resolve().parents[1]


def best_checkpoint(sweep_dir: Path, metric: str | None = None, mode: str | None = None) -> tuple[Path, str, str]:
    """(newest checkpoint of the best trial of the best cell, the cell, a line saying why) of a sweep folder.

    Cells are ranked by `analysis.compare.leaderboard` (mean over seeds) on the sweep's metric and
    mode; within the winning cell the trial with the best value of the metric that has a complete
    checkpoint is taken. UsageError when the folder is not a sweep or no ranked trial has a checkpoint.
    """
    sys.path.insert(0, str(ROOT))  # analysis/ is not installed: it is read from the repository
    from peerlab.train import checkpoint as ckpt
    from peerlab.tune import trial_dir

    from analysis.compare import leaderboard
    from analysis.load import load_sweep
    from peerlab.tables import trial_column

    try:
        sweep = load_sweep(sweep_dir)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    metric, mode = trial_column(metric) if metric else sweep.metric, mode or sweep.mode
    trials = sweep.trials
    if metric not in trials:
        raise UsageError(f"{sweep_dir}: trials.parquet has no column {metric!r} to rank on")
    board = leaderboard(trials, metric, mode)
    for _, row in board[board["rank"].notna()].iterrows():
        cell = trials[(trials["cell"] == row["cell"]) & (trials["status"] != "failed") & trials[metric].notna()]
        for _, trial in cell.sort_values(metric, ascending=mode == "min").iterrows():
            newest = ckpt.latest(trial_dir(sweep.path, trial["trial_id"]) / "checkpoints")
            if newest is not None:
                why = (
                    f"best cell of {sweep.path.name} on {metric} ({mode}): {row['cell']} "
                    f"(rank {row['rank']}, mean {row[metric]:.4g}); trial {trial['trial_id']} ({trial[metric]:.4g})"
                )
                return newest, row["cell"], why
    raise UsageError(f"{sweep_dir}: no trial ranked on {metric} has a complete checkpoint")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a checkpoint folder, a checkpoints/ folder or a run folder (its newest)")
    source.add_argument("--sweep", help="a sweep folder: export its best cell's newest checkpoint")
    ap.add_argument("--out", required=True, help="the folder to write (must be empty or absent, see --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an output folder that is not empty")
    ap.add_argument("--max-shard-size", default="2GB", help="largest weights file before sharding (default: 2GB)")
    ap.add_argument("--tokenizer", help="tokenizer name or folder (default: the run's dataset_config.tokenizer_name)")
    ap.add_argument("--metric", help="with --sweep: rank on this trials.parquet column (default: the sweep's)")
    ap.add_argument("--mode", choices=("min", "max"), help="with --sweep: lower or higher is better")
    args = ap.parse_args(argv)
    if (args.metric or args.mode) and not args.sweep:
        raise UsageError("--metric and --mode choose the best cell of a --sweep")
    shard_size = args.max_shard_size.strip()
    if shard_size.isdigit():  # bytes
        shard_size = int(shard_size)
    elif not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]B", shard_size, flags=re.IGNORECASE):  # as save_pretrained reads it
        raise UsageError(f"--max-shard-size {args.max_shard_size}: give a size like 2GB or 500MB, or a number of bytes")

    from peerlab.export import ExportError, export_checkpoint

    path = args.checkpoint
    if args.sweep:
        path, _, why = best_checkpoint(Path(args.sweep), args.metric, args.mode)
        print(why, flush=True)
    try:
        out = export_checkpoint(
            path, args.out, overwrite=args.overwrite, max_shard_size=shard_size, tokenizer=args.tokenizer
        )
    except ExportError as err:
        raise UsageError(str(err)) from None
    print(f"exported {path} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
