"""What a logged step costs a Ray Train run: Ray Train's report poll at its 2 s default against peerlab's 0.1 s.

    python benchmarks/report_wait.py [--config configs/demo.yaml] [--steps 40] [--logging-steps 10] [--rounds 2]

Runs `experiments/train.py` on the config (one worker, held-out evaluation and saves past the end,
so only the logged steps differ), alternately with RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=2.0 (Ray 2.60's
default: its controller takes a worker's report off a one-place queue every 2 s, and
`ray.train.report` waits for it) and with peerlab's own setting (0.1 s, `peerlab.train.worker.environment`).
Prints, per arm, the median tokens/s of the logged lines after the first (the loop's clock between
lines, waits included) and the seconds those steps took themselves (`train_s`).
Needs the demo corpus (`python experiments/prepare_data.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(config: str, steps: int, logging_steps: int, interval: str | None, out: Path) -> dict:
    env = dict(os.environ)
    env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)
    if interval is not None:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = interval
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, check=False)
    overrides = {
        "train_config.max_steps": steps,
        "train_config.logging_steps": logging_steps,
        "train_config.eval_steps": steps * 10,
        "train_config.save_steps": steps * 10,
        "train_config.output_dir": out,
        "eval_config.evals": "[]",
    }
    command = [sys.executable, str(ROOT / "experiments" / "train.py"), "--config", config, "--name", "run"]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    lines = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    # tokens_per_s: the tokens between two lines over the loop's clock between them (waits included);
    # train_s: the seconds of those steps alone. The first line (warm-up) is left out.
    rates = [r["tokens_per_s"] for r in lines[1:]]
    return {"median_tokens_per_s": statistics.median(rates), "train_s": sum(r["train_s"] for r in lines[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--logging-steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    arms = {"Ray's default (2 s)": "2.0", "peerlab (0.1 s)": None}
    got: dict = {name: [] for name in arms}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, interval in arms.items():
                out = Path(tmp) / f"{round_}-{interval}"
                got[name].append(run(args.config, args.steps, args.logging_steps, interval, out))
                shutil.rmtree(out, ignore_errors=True)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.config}, {args.steps} steps, "
        f"a line every {args.logging_steps}"
    )
    for name, runs in got.items():
        rates = [r["median_tokens_per_s"] for r in runs]
        steps_s = statistics.median(r["train_s"] for r in runs)
        print(
            f"{name:>20}: {statistics.median(rates):,.0f} tokens/s (rounds: {', '.join(f'{x:,.0f}' for x in rates)}); "
            f"the steps themselves {steps_s:.1f} s"
        )
    base, ours = (statistics.median(r["median_tokens_per_s"] for r in got[n]) for n in arms)
    print(f"ratio: {ours / base:.2f}x")


if __name__ == "__main__":
    main()
