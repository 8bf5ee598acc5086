"""The mixture search on the embedded corpus: the README's example command, timed, and what it found.

    python benchmarks/mix_search.py [--name bench_mix] [ablate.py flags ...]
    python benchmarks/mix_search.py --synthetic     # the searcher alone on known responses (seconds)

Runs `experiments/ablate.py --custom-datasets configs/datasets.yaml --search-space
configs/search-mix.yaml --config configs/mix-proxy.yaml` (the README's "Mixture search" command:
80-step proxies of a shrunk demo model, measured on held-out bits per byte, no lm-eval) on a
local Ray cluster, then reads the sweep folder and prints

  wall          the whole command's seconds (corpus check, Ray start-up, every round, report)
  proxies       trials of rounds 1..K that gave a metric (anchors included)
  fit           the chosen regression and its leave-one-out Spearman (the final fit)
  arms          each validation arm's mean and 95% interval over seeds
  verdicts      the recommendation against the best tried mix and against the file's best
                hand-written mix (a difference inside the seed noise is reported as such)

and writes them to <sweep>/benchmark.json. Targets (this 2-core CPU): at most 30 minutes, at
least 16 proxies, a cross-validated Spearman of at least 0.8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [
    "experiments/ablate.py", "--custom-datasets", "configs/datasets.yaml", "--search-space", "configs/search-mix.yaml",
    "--config", "configs/mix-proxy.yaml",
]  # fmt: skip


def synthetic(seeds: int = 6, budget: int = 32, noise: float = 0.01) -> int:
    """The searcher alone (no Ray, no training) on known responses over the simplex: the total-variation
    distance of its recommendation from the true optimum after `budget` evaluations, per seed."""
    import numpy as np
    from peerlab.mixsearch import MixSearch, tv

    optima = {3: np.array([0.6, 0.3, 0.1]), 5: np.array([0.4, 0.25, 0.15, 0.12, 0.08])}
    responses = {
        "quadratic": lambda w, o: float(3 * ((w - o) ** 2).sum()),
        "cross-entropy": lambda w, o: float(-(o * np.log(w + 1e-3)).sum()),
        "abs (not smooth)": lambda w, o: float(np.abs(w - o).sum()),
    }
    print(f"searcher alone: {budget} evaluations (validation included), noise sd {noise}, {seeds} seeds")
    print("| domains | response | TV to the optimum, per seed | worst |\n| ---: | --- | --- | ---: |")
    for k, optimum in optima.items():
        for name, f in responses.items():
            dists = []
            for seed in range(seeds):
                rng = np.random.default_rng(100 + seed)
                search = MixSearch(domains=[f"d{i}" for i in range(k)], metric="m", mode="min", seed=seed)
                search.set_search_properties(None, None, {}, num_samples=budget)
                asked = 0
                while asked < budget:
                    batch = []
                    while (config := search.suggest(f"t{asked + len(batch)}")) not in (None, "FINISHED"):
                        batch.append(config)
                    if not batch:
                        break
                    for i, config in enumerate(batch):
                        w = np.array([config["mix"][d] for d in search.domains])
                        value = f(w, optimum) + noise * rng.standard_normal()
                        search.on_trial_complete(f"t{asked + i}", {"m": value})
                    asked += len(batch)
                rec = search.recommendation()
                dists.append(tv(np.array([rec["weights"][d] for d in search.domains]), optimum))
            print(f"| {k} | {name} | {', '.join(f'{d:.3f}' for d in dists)} | {max(dists):.3f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="bench_mix", help="sweep name (a new one each run: the folder is removed)")
    ap.add_argument("--synthetic", action="store_true", help="the searcher alone on known responses (no Ray)")
    args, extra = ap.parse_known_args(argv)
    if args.synthetic:
        return synthetic()
    sweep = ROOT / "output" / args.name
    if sweep.exists():
        import shutil

        shutil.rmtree(sweep)
    start = time.time()
    out = subprocess.run([sys.executable, *COMMAND, "--name", args.name, *extra], cwd=ROOT)
    wall = time.time() - start
    if out.returncode != 0:
        print(f"the mixture search ended with exit status {out.returncode}", file=sys.stderr)
        return out.returncode
    table = pd.read_parquet(sweep / "mix_search.parquet")
    fit = json.loads((sweep / "mix_fit.json").read_text())
    rec = json.loads((sweep / "recommendation.json").read_text())
    proxies = table[(table["kind"] != "validation") & table["metric"].notna()]
    final = fit["final"]
    arms = {}
    for name, body in (("recommended", rec), ("best tried", rec["best_tried"]), ("prior", rec["prior"]),
                       ("best named", rec.get("best_named") or {})):  # fmt: skip
        if body.get("validated"):
            arms[name] = {k: body["validated"][k] for k in ("mean", "lo", "hi", "n")}
    figures = {
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "wall_s": round(wall, 1),
        "proxies": len(proxies),
        "failed": int((table["status"] == "failed").sum()),
        "fit": final["chosen"],
        "spearman": final["scores"][final["chosen"]]["spearman"],
        "scores": final["scores"],
        "recommended": rec["weights"],
        "best_tried": {"id": rec["best_tried"]["id"], "weights": rec["best_tried"]["weights"]},
        "best_named": (rec.get("best_named") or {}).get("name"),
        "arms": arms,
        "verdict": rec["verdict"],
        "difference": rec.get("difference"),
        "verdict_named": rec.get("verdict_named"),
        "difference_named": rec.get("difference_named"),
    }
    (sweep / "benchmark.json").write_text(json.dumps(figures, indent=1))
    print(f"wall {wall / 60:.1f} min (target 30); {figures['proxies']} proxies (target 16), {figures['failed']} failed")
    print(f"fit: {final['chosen']}, leave-one-out Spearman {figures['spearman']:.3f} (target 0.8)")
    for name, a in arms.items():
        print(f"  {name:<12} {rec['metric']} {a['mean']:.4f} [{a['lo']:.4f}, {a['hi']:.4f}] over {a['n']} seeds")
    print(f"verdict: {rec['verdict']}; against the file's best mix: {rec.get('verdict_named')}")
    print(f"figures in {sweep / 'benchmark.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
