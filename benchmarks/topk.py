"""The sub-key search's top-k: `peerlab.model.peer.topk_by_groups` against `torch.topk` on CPU.

    python benchmarks/topk.py [--rows 4096] [--reps 20]

For each (n, k): the milliseconds of one top-k over (rows, n) random scores, median of
alternating rounds, and whether `topk_by_groups` takes its grouped path or hands over to
torch (where grouping did not pay). The figures its docstring and BENCHMARKS.md cite.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from peerlab.model.peer import search_group, topk_by_groups


def ms(fn, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096, help="rows of scores (tokens x heads)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    print(f"top-k over ({args.rows}, n) float32 scores on {platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'n':>6}{'k':>4}{'torch ms':>10}{'grouped ms':>12}{'ratio':>7}  path")
    for n in (128, 256, 512, 1024):
        for k in (4, 8, 16, 32):
            torch.manual_seed(n + k)
            scores = torch.randn(args.rows, n)
            values, columns = topk_by_groups(scores, k)
            want = scores.topk(k, dim=-1)
            # the same values; columns may differ only between exactly equal scores (ties break either way)
            assert torch.equal(values, want.values) and torch.equal(scores.gather(1, columns), values)
            ours, theirs = [], []
            for _ in range(args.rounds):
                theirs.append(ms(lambda s=scores, k=k: s.topk(k, dim=-1), args.reps))
                ours.append(ms(lambda s=scores, k=k: topk_by_groups(s, k), args.reps))
            a, b = statistics.median(theirs), statistics.median(ours)
            group = search_group(n, k)
            path = f"groups of {group}" if group else "torch"
            print(f"{n:>6}{k:>4}{a:>10.2f}{b:>12.2f}{b / a:>7.2f}  {path}")


if __name__ == "__main__":
    main()
