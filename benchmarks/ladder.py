"""The scale ladder's promotion against every cell at every scale, on the embedded corpus.

    python benchmarks/ladder.py [--name bench_ladder] [ablate.py flags ...]

Runs the README's ladder example (`experiments/ablate.py --custom-datasets configs/datasets.yaml
--config configs/mix-proxy.yaml --search-space configs/search-ladder.yaml`: the demo's mixes x
{PEER, dense} at 0.5, 1 and 2 times the proxy's compute) twice on a local Ray cluster, one after
the other: with `--promote 1` (every cell at every scale, the peer) and as configured (the better
half of each scale's cells promoted). From each sweep's ladder.parquet it prints

  wall       the command's seconds
  trials     training runs, and the training FLOPs they spent (the plan's, summed)
  winners    each scale's first-ranked cell
  agreement  decision accuracy and Kendall's tau of each scale against the largest (full run)

and whether the promoted ladder picks the full ladder's largest-scale winner, with the ratio of
compute spent. Figures go to output/<name>/benchmark.json.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT))
COMMAND = [
    "experiments/ablate.py", "--custom-datasets", "configs/datasets.yaml", "--config", "configs/mix-proxy.yaml",
    "--search-space", "configs/search-ladder.yaml",
]  # fmt: skip


def run(name: str, extra: list[str]) -> dict:
    """One ladder sweep, timed; its figures from ladder.parquet."""
    from analysis.scales import rank_agreement, scale_boards, winners

    sweep = ROOT / "output" / name
    if sweep.exists():
        shutil.rmtree(sweep)
    start = time.time()
    out = subprocess.run([sys.executable, *COMMAND, "--name", name, *extra], cwd=ROOT)
    wall = time.time() - start
    if out.returncode != 0:
        raise SystemExit(f"{name}: the ladder ended with exit status {out.returncode}")
    table = pd.read_parquet(sweep / "ladder.parquet")
    meta = json.loads((sweep / "sweep.json").read_text())
    metric, mode = meta["metric"], meta["mode"]
    boards = scale_boards(table, metric, mode)
    agreement = rank_agreement(table, metric)
    return {
        "wall_s": round(wall, 1),
        "trials": len(table),
        "flops": float(table["flops"].sum()),
        "train_s": float(pd.read_parquet(sweep / "trials.parquet")["train_s"].sum()),
        "per_scale": table.groupby("scale")["cell"].nunique().to_dict(),
        "winners": winners(boards),
        "largest": boards["scale"].iloc[-1],
        "boards": boards[["scale", "rank", "cell", metric]].to_dict("records"),
        "agreement": agreement.to_dict("records"),
        "metric": metric,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--name", default="bench_ladder", help="prefix of the two sweeps' names (their folders are removed)"
    )
    args, extra = ap.parse_known_args(argv)
    full = run(f"{args.name}_full", ["--promote", "1", *extra])
    promoted = run(f"{args.name}_promoted", extra)
    top = full["largest"]
    same = promoted["winners"].get(top) == full["winners"].get(top)
    figures = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "full": full,
        "promoted": promoted,
        "same_winner": same,
        "flops_ratio": promoted["flops"] / full["flops"],
        "wall_ratio": promoted["wall_s"] / full["wall_s"],
    }
    folder = ROOT / "output" / args.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "benchmark.json").write_text(json.dumps(figures, indent=1, default=str))
    for name, f in (("every cell at every scale", full), ("promoted (better half)", promoted)):
        cells = ", ".join(f"{s} {n}" for s, n in sorted(f["per_scale"].items(), key=lambda kv: kv[0]))
        print(f"{name}: {f['trials']} trials ({cells} cells), {f['flops']:.3g} FLOPs, wall {f['wall_s'] / 60:.1f} min")
        print("  winners: " + ", ".join(f"{s} {c}" for s, c in f["winners"].items()))
    for a in full["agreement"]:
        print(
            f"  {a['scale']} against {a['against']}: decision accuracy {a['decision_accuracy']:.2f}, "
            f"Kendall tau {a['kendall_tau']:.2f} over {a['cells']} cells"
        )
    print(
        f"promotion spent {figures['flops_ratio']:.2f}x the FLOPs and {figures['wall_ratio']:.2f}x the wall time of "
        f"the full ladder; the largest scale's winner is {'the same' if same else 'NOT the same'} "
        f"({promoted['winners'].get(top)} against {full['winners'].get(top)})"
    )
    print(f"figures in {folder / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
