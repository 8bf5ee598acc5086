"""Expert usage of the PEER layers (`peer_config.log_expert_usage`, `log_freq`, `usage_threshold`).

Each PEER layer sums, during training, the router score every expert received (zero when
not selected), over tokens and heads: the paper's measure (Sec. 3.4). Every `log_freq` steps
the sums are added up across workers, normalised to a distribution z over the N experts,
and summarised per layer:

    usage       share of experts with z > 0
    kl_uniform  KL(z || uniform) = log N + sum z log z   (0 when perfectly even)
    dead        share of experts with z = 0 (1 - usage)
    hot         experts with z > usage_threshold / N (threshold times the mean), their count and ids
    load        z x N (1 for every expert when even): a 64-bin histogram of it, and its mean over
                blocks of the n1 x n2 product-key grid (expert i * n2 + j), pooled to at most 64 x 64

The rows go to `<run>/usage.parquet` and to wandb (with a histogram of z * N), and the sums
restart. Keeping the sums costs one `index_add_` of (tokens x heads x k) scores per layer
and step.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from peerlab.model.peer import PEER

MAX_HOT_IDS = 64  # hot expert ids kept per row (the count is always exact)
MAX_GRID = 64  # the load grid is pooled to at most MAX_GRID x MAX_GRID cells


def peer_layers(model: nn.Module) -> list[tuple[int, PEER]]:
    """(layer index, PEER module) of every PEER layer that tracks usage."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, PEER) and module.track_usage:
            found.append((int(name.split(".")[1]) if name.startswith("layers.") else len(found), module))
    return found


def load_grid(load: torch.Tensor, grid: tuple[int, int]) -> tuple[list[int], list[float]]:
    """The (n1 x n2) load grid averaged over blocks to at most MAX_GRID x MAX_GRID: (shape, row-major values)."""
    n1, n2 = grid
    cells = torch.nn.functional.adaptive_avg_pool2d(load.view(1, n1, n2), (min(n1, MAX_GRID), min(n2, MAX_GRID)))[0]
    return list(cells.shape), cells.flatten().tolist()


def summarise(mass: torch.Tensor, threshold: float, grid: tuple[int, int] | None = None) -> dict:
    """Usage statistics of one layer's score mass (N,); `grid` = product_key_dim adds the pooled load grid."""
    n = mass.numel()
    mass = mass.double()
    total = float(mass.sum())
    z = mass / total if total > 0 else torch.zeros(n, dtype=torch.float64)
    used = z > 0
    kl = math.log(n) + float((z[used] * z[used].log()).sum()) if total > 0 else float("nan")
    hot = torch.nonzero(z > threshold / n).flatten()
    order = torch.argsort(z[hot], descending=True)
    load = z * n  # (N,) mean 1
    counts, edges = np.histogram(load.numpy(), bins=64)
    out = {}
    if grid is not None:
        out["grid_shape"], out["load_grid"] = load_grid(load, grid)
    return {
        **out,
        "load_hist_counts": counts.tolist(),
        "load_hist_edges": edges.tolist(),
        "usage": float(used.double().mean()),
        "kl_uniform": kl,
        "dead": 1.0 - float(used.double().mean()),
        "hot_count": int(hot.numel()),
        "hot_ids": hot[order][:MAX_HOT_IDS].tolist(),
        "max_share_x_n": float(z.max() * n),
    }


def collect(model: nn.Module, step: int, threshold: float, distributed: bool) -> list[dict]:
    """One row per PEER layer (summed across workers); the sums restart at zero."""
    rows = []
    for layer, peer in peer_layers(model):
        device = peer.down.device  # NCCL all-reduces CUDA tensors only
        mass = peer.usage.detach().clone() if peer.usage is not None else torch.zeros(peer.num_experts, device=device)
        if distributed:
            dist.all_reduce(mass)
        rows.append(
            {
                "step": step,
                "layer": layer,
                "experts": mass.numel(),
                **summarise(mass.cpu(), threshold, (peer.n1, peer.n2)),
            }
        )
        if peer.usage is not None:
            peer.usage.zero_()
    return rows


def write(rows: list[dict], run_dir: Path, wandb_run=None) -> None:
    """Append rows to <run>/usage.parquet (and log them to wandb)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    path = Path(run_dir) / "usage.parquet"
    if path.is_file():
        table = pd.concat([pd.read_parquet(path), table], ignore_index=True)
    table.to_parquet(path, index=False)
    if wandb_run is not None:
        import wandb

        for r in rows:
            prefix = f"usage/layer{r['layer']}"
            counts, edges = np.array(r["load_hist_counts"]), np.array(r["load_hist_edges"])  # of load = share x N
            wandb_run.log(
                {
                    f"{prefix}/usage": r["usage"],
                    f"{prefix}/kl_uniform": r["kl_uniform"],
                    f"{prefix}/hot_count": r["hot_count"],
                    f"{prefix}/share_x_n": wandb.Histogram(np_histogram=(counts, edges)),
                },
                step=r["step"],
            )
