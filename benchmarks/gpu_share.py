"""Trials per hour when small trials share a GPU: `--gpus-per-trial 0.25` against one trial at a time.

    python benchmarks/gpu_share.py [--share 0.25] [--steps 120] [--out output/bench-share] [ablate.py flags ...]
    python benchmarks/gpu_share.py --unit cpu --share 0.5 --steps 10     # the same path on a CPU machine

Runs one demo sweep of 8 trials (configs/datasets.yaml's prose_heavy and code_heavy mixes x
the demo's k = 4 and 16 x 2 seeds, on configs/demo.yaml, lm-eval off) twice on one local Ray
cluster: first with `--gpus-per-trial SHARE` (1/SHARE trials at once, each with its CUDA memory
capped to its share), then with a whole GPU per trial (`--gpus-per-trial 1`: one trial at a
time on one card). Before either, a process of its own takes the Float8 figures the trials
would otherwise take on the first one's start (`peerlab.train.precision.measure_float8`, kept
per machine), so neither run pays for them (skipped where the `--set` overrides turn Float8 off;
add `--set train_config.bf16=true` to keep the bf16 autocast it brings, as gpu.sh does). The
shared run goes first so that it, not the run it is compared with, pays what else a machine
does once (inductor's cold compiles): the ratio errs against sharing. For each it prints the wall time of the whole `ablate.py` run (Ray's
start and the report included, the same in both), the trials that finished, trials per hour,
the trials' mean wall time each, and the trials' median held-out loss (eval_loss/mean) (the same work: the
shared run must train as well). Then the ratio of trials per hour, shared over one at a time.

With `--unit cpu` it compares `--max-concurrent 1` against `--max-concurrent 1/SHARE` on the
machine's CPUs, to check the script end to end where there is no GPU; the CPU figures say
nothing about a GPU.

Target (issue 19): at least 3x the trials per hour of one trial at a time, 8 trials at 0.25.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["--custom-datasets", "configs/datasets.yaml", "--config", "configs/demo.yaml",
         "--mixes", "prose_heavy,code_heavy", "--seeds", "2", "--no-report"]  # fmt: skip


def ablate():
    spec = importlib.util.spec_from_file_location("ablate", ROOT / "experiments" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, out: Path, resources: list[str], steps: int, extra: list[str]) -> dict:
    """One sweep; its wall time, trials and held-out loss."""
    argv = [*SWEEP, *resources, "--name", name, "--set", f"train_config.output_dir={out}",
            "--set", f"train_config.max_steps={steps}", "--set", "eval_config.evals=[]", *extra]  # fmt: skip
    start = time.perf_counter()
    code = ablate().main(argv)
    wall = time.perf_counter() - start
    trials = pd.read_parquet(out / name / "trials.parquet")
    plan = json.loads((out / name / "sweep.json").read_text())
    finished = trials[trials["status"] == "finished"]
    return {
        "name": name,
        "resources": " ".join(resources),
        "exit": code,
        "wall_s": wall,
        "at_once": plan["resources"]["max_concurrent"],
        "trials": len(trials),
        "finished": len(finished),
        "trials_per_hour": 3600 * len(finished) / wall,
        "trial_wall_s": float(finished["wall_s"].mean()),
        "eval_loss": float(finished["eval_loss/mean"].median()) if len(finished) else float("nan"),
    }


def warm_float8() -> None:
    """Take the demo trials' Float8 figures, as their worker would at its start (same tokens, compile and dtype)."""
    import torch

    from peerlab.config import load_config
    from peerlab.model import build_model
    from peerlab.train.precision import float8_filter, float8_reason

    if not torch.cuda.is_available():
        raise SystemExit("--warm-float8: no CUDA GPU here")
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    t, device = cfg.train_config, torch.device("cuda")
    if float8_reason(t, device):
        print(f"Float8 off for the demo trials: {float8_reason(t, device)}")
        return
    with torch.device("meta"):
        model = build_model(cfg.model_config)
    tokens = t.per_device_train_batch_size * cfg.dataset_config.max_seq_length  # the worker's micro-batch
    plan = float8_filter(model, t, device, tokens, None, None)
    print(f"Float8 for the demo trials: {len(plan.converted)} layers; {plan.filter}; {plan.speedups}")


def float8_on(extra: list[str]) -> bool:
    """Whether the demo trials train with Float8 under the sweep's own `--set` overrides (in `extra`)."""
    from peerlab.config import load_config

    sets = argparse.ArgumentParser(add_help=False)
    sets.add_argument("--set", action="append", default=[])
    overrides = sets.parse_known_args(extra)[0].set
    return bool(load_config(ROOT / "configs" / "demo.yaml", overrides).train_config.float8)


def fraction(text: str) -> float:
    """An argparse type: a share of one GPU, above 0 and below 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a fraction of one GPU, e.g. 0.25")
    return value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--share", type=fraction, default=0.25, help="the shared run's --gpus-per-trial (or CPU share)")
    ap.add_argument("--steps", type=int, default=120, help="training steps per trial (the demo's 120)")
    ap.add_argument("--unit", choices=["gpu", "cpu"], default="gpu", help="cpu: the CPU stand-in, see above")
    ap.add_argument("--out", default="output/bench-share", help="folder for both sweeps (emptied first)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--warm-float8", action="store_true", help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args(argv)
    if args.warm_float8:
        return warm_float8()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    if args.unit == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run on a GPU machine, or --unit cpu to check the script")
        card = torch.cuda.get_device_name()
        if float8_on(extra):
            start = time.perf_counter()  # in a process of its own: this one keeps no CUDA context while trials run
            done = subprocess.run([sys.executable, __file__, "--warm-float8"]).returncode == 0
            took = time.perf_counter() - start
            print(f"Float8 figures taken before timing: {took:.0f} s{'' if done else ' (failed)'}")
        one, shared = ["--gpus-per-trial", "1"], ["--gpus-per-trial", f"{args.share:g}"]
    else:
        card = f"{platform.machine()}, {os.cpu_count()} CPUs (CPU stand-in)"
        one, shared = ["--max-concurrent", "1"], ["--max-concurrent", str(round(1 / args.share))]
    print(f"8 demo trials of {args.steps} steps, one at a time against {args.share:g} of a {args.unit} each; {card}")
    rows = [run("shared", out, shared, args.steps, extra), run("one_at_a_time", out, one, args.steps, extra)]
    print()
    print("| run | resources | at once | wall | finished | trials/hour | trial wall (mean) | eval loss (median) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['name']} | {r['resources']} | {r['at_once']} | {r['wall_s']:.0f} s | {r['finished']}/{r['trials']} "
              f"| {r['trials_per_hour']:.0f} | {r['trial_wall_s']:.1f} s | {r['eval_loss']:.4f} |")  # fmt: skip
    ratio = rows[0]["trials_per_hour"] / rows[1]["trials_per_hour"]
    print(f"shared / one at a time, trials per hour: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": card, "share": args.share, "steps": args.steps,
                                               "runs": rows, "ratio": ratio}, indent=1))  # fmt: skip
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
