"""Expert usage of the PEER (and MoE) layers (`peer_config.log_expert_usage`, `log_freq`, `usage_threshold`).

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
and step. MoE layers (model/moe.py, once `track_moe` gave them counts) get the same rows, with
each expert's count of token assignments (top_k per token) as its mass and no load grid.

By data source. Every packed sequence of a batch comes from one dataset of the mix. The
training loop hands each tracking layer the batch's source ids before the forward
(`track_sources` once, then `set_sources` per micro-batch), and the layer adds the same scores
into row s of an (S, N) table as well (one more `index_add_`, on the flattened S*N table with
index s*N + expert), so the table's rows sum to the layer's (N,) sums. Evaluation forwards add
nothing. Every `log_freq` steps (`collect_by_source`) the tables are summed across workers
and `<run>/usage_by_source.parquet` gets, per step and layer, two kinds of rows:

  kind "source", one per data source s, with m = its (N,) mass and z_s = m / sum(m):
    mass_share    sum(m) over the layer's total: the source's share of the routed mass (each token
                  and head hands out a mass of 1, each MoE token top_k assignments, so it is also
                  its share of the tokens)
    usage, dead, kl_uniform, max_share_x_n   as above, of z_s (NaN KL for a source with no tokens)
    exclusive     share of the N experts that only this source reached
    load          z_s x N averaged over equal blocks of consecutive experts (at most 64 blocks, mean 1):
                  a row of the sources x experts heatmap (expert i*n2 + j: blocks follow sub-key 1)
    mi, nmi       per layer (the same on every source row of a step): with the joint p(s, e) =
                  mass[s, e] / total mass, mi = I(S; E) in nats and nmi = I(S; E) / H(S), in [0, 1]:
                  0 when every source spreads its mass over the experts alike, 1 when the expert
                  tells the source (disjoint expert sets); NaN when one source has all the mass
  kind "pair", one per pair of sources (source < other in the mix's order):
    overlap       sum_e min(z_a(e), z_b(e)): the mass the two load distributions share (1 = the same
                  distribution, 0 = no expert in common)
    jaccard       |used_a & used_b| / |used_a | used_b| over the experts each source reached
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from peerlab.model.moe import MoE
from peerlab.model.peer import PEER
from peerlab.tracking import wandb_log

MAX_HOT_IDS = 64  # hot expert ids kept per row (the count is always exact)
MAX_GRID = 64  # the load grid is pooled to at most MAX_GRID x MAX_GRID cells


def peer_layers(model: nn.Module) -> list[tuple[int, PEER]]:
    """(layer index, PEER module) of every PEER layer that tracks usage."""
    return [(i, m) for i, m in usage_layers(model) if isinstance(m, PEER)]


def usage_layers(model: nn.Module) -> list[tuple[int, PEER | MoE]]:
    """(layer index, module) of every PEER layer that tracks usage and every MoE layer given counts by `track_moe`."""
    found = []
    for name, module in model.named_modules():
        if (isinstance(module, PEER) and module.track_usage) or (isinstance(module, MoE) and module.usage is not None):
            found.append((int(name.split(".")[1]) if name.startswith("layers.") else len(found), module))
    return found


def track_moe(model: nn.Module) -> int:
    """Give every MoE layer its usage counts (E,) (they count from the next training forward); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        moe.usage = torch.zeros(moe.num_experts, device=moe.router.weight.device)
    return len(layers)


def load_grid(load: torch.Tensor, grid: tuple[int, int]) -> tuple[list[int], list[float]]:
    """The (n1 x n2) load grid averaged over blocks to at most MAX_GRID x MAX_GRID: (shape, row-major values)."""
    n1, n2 = grid
    cells = torch.nn.functional.adaptive_avg_pool2d(load.view(1, n1, n2), (min(n1, MAX_GRID), min(n2, MAX_GRID)))[0]
    return list(cells.shape), cells.flatten().tolist()


def spread(z: torch.Tensor) -> dict:
    """usage, dead, kl_uniform and max_share_x_n of shares z (N,) float64 that sum to 1 (all 0: nothing routed)."""
    n, used = z.numel(), z > 0
    kl = math.log(n) + float((z[used] * z[used].log()).sum()) if bool(used.any()) else float("nan")
    usage = float(used.double().mean())
    return {"usage": usage, "dead": 1.0 - usage, "kl_uniform": kl, "max_share_x_n": float(z.max() * n)}


def summarise(mass: torch.Tensor, threshold: float, grid: tuple[int, int] | None = None) -> dict:
    """Usage statistics of one layer's score mass (N,); `grid` = product_key_dim adds the pooled load grid."""
    n = mass.numel()
    mass = mass.double()
    total = float(mass.sum())
    z = mass / total if total > 0 else torch.zeros(n, dtype=torch.float64)
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
        **spread(z),
        "hot_count": int(hot.numel()),
        "hot_ids": hot[order][:MAX_HOT_IDS].tolist(),
    }


def collect(model: nn.Module, step: int, threshold: float, distributed: bool) -> list[dict]:
    """One row per PEER layer (and MoE layer of `track_moe`), summed across workers; the sums restart at zero."""
    rows = []
    for layer, peer in usage_layers(model):
        mass = peer.usage.detach().clone()  # on the module's device: NCCL all-reduces CUDA tensors only
        if distributed:
            dist.all_reduce(mass)
        grid = (peer.n1, peer.n2) if isinstance(peer, PEER) else None  # an MoE layer has no key grid
        rows.append({"step": step, "layer": layer, "experts": mass.numel(), **summarise(mass.cpu(), threshold, grid)})
        peer.usage.zero_()
    return rows


def append_rows(rows: list[dict], path: Path) -> None:
    """Append rows to the parquet table at `path` (made if missing)."""
    import pandas as pd

    table = pd.DataFrame(rows)
    if path.is_file():
        table = pd.concat([pd.read_parquet(path), table], ignore_index=True)
    table.to_parquet(path, index=False)


def write(rows: list[dict], run_dir: Path, wandb_run=None) -> None:
    """Append rows to <run>/usage.parquet (and log them to wandb)."""
    append_rows(rows, Path(run_dir) / "usage.parquet")
    if wandb_run is not None:
        import wandb

        for r in rows:
            prefix = f"usage/layer{r['layer']}"
            counts, edges = np.array(r["load_hist_counts"]), np.array(r["load_hist_edges"])  # of load = share x N
            values = {
                f"{prefix}/usage": r["usage"],
                f"{prefix}/kl_uniform": r["kl_uniform"],
                f"{prefix}/hot_count": r["hot_count"],
                f"{prefix}/share_x_n": wandb.Histogram(np_histogram=(counts, edges)),
            }
            wandb_log(wandb_run, values, r["step"])


# --------------------------------------------------------------------------------------
# By data source
# --------------------------------------------------------------------------------------


def track_sources(model: nn.Module, num_sources: int) -> list[PEER]:
    """Give every tracking PEER (and MoE) layer an (S, N) mass table by source; returns those layers (for
    `set_sources`)."""
    layers = [peer for _, peer in usage_layers(model)]
    for peer in layers:
        peer.usage_by_source = torch.zeros(num_sources, peer.num_experts, device=peer.usage.device)
    return layers


def set_sources(layers: list[PEER], sources) -> None:
    """The dataset index of each sequence of the next training batch (B,), on each layer of `track_sources`."""
    if not layers:
        return
    ids = torch.as_tensor(sources, dtype=torch.long).to(layers[0].usage.device, non_blocking=True)
    for peer in layers:
        peer.sources = ids


def mutual_information(mass: torch.Tensor) -> tuple[float, float]:
    """(I(S; E) in nats, I(S; E) / H(S)) of the joint p(s, e) = mass / mass.sum() of an (S, N) table."""
    p = mass.double() / mass.double().sum()
    ps, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)  # (S, 1), (1, N)
    nz = p > 0
    mi = float((p[nz] * (p[nz].log() - (ps * pe).expand_as(p)[nz].log())).sum())
    h = float(-(ps[ps > 0] * ps[ps > 0].log()).sum())
    return max(mi, 0.0), (min(max(mi / h, 0.0), 1.0) if h > 0 else float("nan"))


def pooled(load: torch.Tensor) -> list[float]:
    """An (N,) load averaged over equal blocks of consecutive experts: the most blocks, at most MAX_GRID, that
    divide N (so the blocks' mean is the load's)."""
    n = load.numel()
    bins = max(b for b in range(1, min(n, MAX_GRID) + 1) if n % b == 0)
    return load.view(bins, n // bins).mean(1).tolist()


def summarise_sources(mass: torch.Tensor, names: list[str]) -> list[dict]:
    """The "source" and "pair" rows (module docstring) of one layer's (S, N) mass table."""
    mass = mass.double()
    S, n = mass.shape
    totals = mass.sum(1)  # (S,)
    total = float(totals.sum())
    used = mass > 0  # (S, N)
    reached = used.sum(0)  # (N,) sources that reached each expert
    mi, nmi = mutual_information(mass) if total > 0 else (float("nan"), float("nan"))
    z = torch.where(totals[:, None] > 0, mass / totals.clamp_min(1e-300)[:, None], torch.zeros_like(mass))
    rows = []
    for s in range(S):
        rows.append(
            {
                "kind": "source",
                "source": names[s],
                "source_index": s,
                "mass_share": float(totals[s]) / total if total > 0 else float("nan"),
                **spread(z[s]),
                "exclusive": float((used[s] & (reached == 1)).double().mean()),
                "load": pooled(z[s] * n),
                "mi": mi,
                "nmi": nmi,
            }
        )
    for a in range(S):
        for b in range(a + 1, S):
            both = totals[a] > 0 and totals[b] > 0
            union = int((used[a] | used[b]).sum())
            rows.append(
                {
                    "kind": "pair",
                    "source": names[a],
                    "other": names[b],
                    "overlap": float(torch.minimum(z[a], z[b]).sum()) if both else float("nan"),
                    "jaccard": int((used[a] & used[b]).sum()) / union if union else float("nan"),
                }
            )
    return rows


def collect_by_source(model: nn.Module, step: int, names: list[str], distributed: bool) -> list[dict]:
    """The usage_by_source.parquet rows of every layer of `track_sources` (summed across workers); the tables
    restart at zero. Call it where `collect` is called, on every worker."""
    rows = []
    for layer, peer in usage_layers(model):
        if peer.usage_by_source is None:
            continue
        mass = peer.usage_by_source.detach().clone()
        if distributed:
            dist.all_reduce(mass)
        for row in summarise_sources(mass.cpu(), names):
            rows.append({"step": step, "layer": layer, "experts": peer.num_experts, **row})
        peer.usage_by_source.zero_()
    return rows


def write_by_source(rows: list[dict], run_dir: Path, wandb_run=None) -> None:
    """Append rows to <run>/usage_by_source.parquet (and log each source's dead share and each layer's nmi to wandb)."""
    if not rows:
        return
    append_rows(rows, Path(run_dir) / "usage_by_source.parquet")
    if wandb_run is not None:
        for r in rows:
            if r["kind"] == "source":
                prefix = f"usage/layer{r['layer']}"
                logged = {
                    f"{prefix}/{r['source']}/dead": r["dead"],
                    f"{prefix}/{r['source']}/kl_uniform": r["kl_uniform"],
                }
                wandb_log(wandb_run, {**logged, f"{prefix}/nmi_source_expert": r["nmi"]}, r["step"])
