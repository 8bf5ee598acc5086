"""Data-parallel training across workers: where a worker is, the model's replicas, one optimizer step.

`DataParallel` wraps the model as the workers train it: as it is (one worker), in DDP, or
sharded by FSDP2 (`fully_shard`). Its `step` runs one optimizer step over a worker's
micro-batches; the gradient that reaches the optimizer is the mean over all workers' tokens,
as if one process had taken the whole global batch. What the wrappers leave to us:

- Row-sparse expert gradients (`train_config.sparse_experts`). DDP's reducer accepts sparse
  gradients only from `nn.Embedding(sparse=True)`, and NCCL has no sparse all-reduce, so the
  PEER tables stay out of DDP's buckets and `exchange_rows` averages their gradients itself:
  every worker all-gathers the others' touched row ids and rows (dense tensors, padded to the
  longest, so NCCL does it too), sums them and divides by the number of workers; when the
  workers touch most of a table, one dense all-reduce of its gradient does it instead. FSDP shards
  dense tensors only and does not combine with sparse gradients (the config refuses it).
- BatchNorm's running statistics. FSDP2 does not synchronise buffers, and DDP is told not to
  (its default broadcast of rank 0's before each step would drop the other workers' updates),
  so each worker's follow its own batches. `sync_buffers` pools them over the workers before
  every evaluation and save, so every rank evaluates (and rank 0 saves) the same model. In
  training BatchNorm normalises with each worker's own micro-batch statistics (as DDP does by default and the paper's per-batch statistics), not
  with the global batch's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from peerlab.config import TrainConfig
from peerlab.model import PEER
from peerlab.train.optim import clip_grad_norm, coalesced

log = logging.getLogger("peerlab.train")


@dataclass
class Place:
    rank: int
    world: int
    device: torch.device


def where_am_i() -> Place:
    """Rank, world size and device: from Ray Train's context, else from an initialised torch.distributed
    process group (torchrun, a test's processes), else a single process."""
    rank, world, local = 0, 1, 0
    try:
        if "ray" not in sys.modules:  # a Ray worker has imported it; elsewhere that import costs seconds
            raise RuntimeError("not in Ray")
        import ray.train

        ctx = ray.train.get_context()
        rank, world, local = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    except Exception:  # noqa: BLE001 - not inside Ray Train: a direct call (RuntimeError), or Train's local
        # mode inside a Tune trial, where get_context raises a DeprecationWarning as an error (FACTS.md)
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    return Place(rank, world, device)


def gather(obj, place: Place) -> list:
    """Every rank's `obj`, on every rank."""
    if place.world == 1:
        return [obj]
    out = [None] * place.world
    dist.all_gather_object(out, obj)
    return out


def mean_across(value: float, place: Place) -> float:
    if place.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=place.device)  # NCCL reduces device tensors only
    dist.all_reduce(t)
    return t.item() / place.world


def shard(model: nn.Module) -> None:
    """FSDP2: shard every block's parameters (and then the rest) across the workers."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)


def exchange_rows(tables: list[nn.Parameter], world: int, dense_share: float = 0.5) -> None:
    """Replace each table's sparse gradient by its mean over the workers (what DDP does for dense ones).

    Each worker's gradient holds the rows its batch retrieved; the mean is a sparse gradient of
    the rows any worker retrieved, the same coalesced tensor on every worker. The workers first
    all-gather how many rows each touched (one small tensor), then, per table:

    - few rows (all workers' rows together at most `dense_share` of the table): the row ids and
      rows are all-gathered (padded to the longest, since they differ per worker), summed where
      workers touched the same row, and divided by the number of workers. Each worker receives
      workers x (most rows touched) x d values, less than a dense all-reduce moves;
    - many rows (at the guide's sizes a step retrieves nearly every row of each table): the
      gradient is made dense and all-reduced, as DDP would, and a mask of touched rows is
      all-reduced with it to keep the gradient sparse over the rows any worker retrieved. Then
      no worker ever holds more than one dense copy of the table.

    Dense collectives only (NCCL has no sparse all-reduce); the tensors stay on the tables' device.
    """
    if world == 1 or not tables:
        return
    device = tables[0].device
    local = []
    for p in tables:
        if p.grad is None:  # nothing retrieved here: an empty gradient, so the collectives still match up
            empty = torch.empty(0, p.shape[1], dtype=p.dtype, device=device)
            no_rows = torch.empty(1, 0, dtype=torch.long, device=device)
            p.grad = torch.sparse_coo_tensor(no_rows, empty, p.shape, check_invariants=False)
        g = coalesced(p.grad)
        local.append((g.indices()[0], g.values()))  # (U,), (U, d)
    counts = torch.tensor([len(rows) for rows, _ in local], device=device)  # (P,)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts)
    all_counts = torch.stack(all_counts).tolist()  # world x P
    for i, (p, (rows, values)) in enumerate(zip(tables, local)):
        sizes = [c[i] for c in all_counts]
        if sum(sizes) > dense_share * p.shape[0]:  # the same decision on every worker: sizes are shared
            p.grad = _dense_mean(p.shape, rows, values, world)
        else:
            p.grad = _gathered_mean(p.shape, rows, values, sizes, world)


def _gathered_mean(shape, rows: torch.Tensor, values: torch.Tensor, sizes: list[int], world: int) -> torch.Tensor:
    """The workers' sparse gradients (rows (U,), values (U, d) here; `sizes` every worker's U), all-gathered
    and averaged: a coalesced sparse tensor."""
    longest = max(sizes)
    padded_rows = rows.new_zeros(longest)
    padded_rows[: len(rows)] = rows
    padded_values = values.new_zeros(longest, values.shape[1])
    padded_values[: len(rows)] = values
    got_rows = [torch.empty_like(padded_rows) for _ in range(world)]
    got_values = [torch.empty_like(padded_values) for _ in range(world)]
    dist.all_gather(got_rows, padded_rows)
    dist.all_gather(got_values, padded_values)
    rows = torch.cat([r[:n] for r, n in zip(got_rows, sizes)])  # (sum of U,)
    values = torch.cat([v[:n] for v, n in zip(got_values, sizes)])  # (sum of U, d)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values / world, shape, check_invariants=False).coalesce()


def _dense_mean(shape, rows: torch.Tensor, values: torch.Tensor, world: int) -> torch.Tensor:
    """The same mean through one dense all-reduce of the table's gradient and one of a touched-rows mask."""
    dense = values.new_zeros(shape).index_add_(0, rows, values)  # (N, d)
    touched = torch.zeros(shape[0], dtype=torch.int32, device=rows.device)  # (N,)
    touched[rows] = 1
    dist.all_reduce(dense)
    dist.all_reduce(touched)
    union = touched.nonzero().squeeze(1)  # (U,) rows any worker retrieved, sorted
    return torch.sparse_coo_tensor(
        union.unsqueeze(0), dense[union] / world, shape, is_coalesced=True, check_invariants=False
    )


@torch.no_grad()
def sync_buffers(model: nn.Module, world: int) -> None:
    """Pool every BatchNorm's running statistics over the workers (all ranks must call it).

    Under FSDP2 each worker's statistics follow its own batches; evaluated as they are, the ranks'
    logits differ, and a greedy generation can stop after different steps on different ranks and
    hang the next all-gather. The pooled statistics are those of all workers' features together:
    mean = mean_r(m_r), var = mean_r(v_r) + mean_r(m_r^2) - mean^2 (the variance of a mixture of
    the workers' equal shares). The step counters are the same on every rank.
    """
    if world == 1:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            mean, var = module.running_mean, module.running_var
            stats = torch.stack((mean, var, mean * mean))  # (3, features)
            dist.all_reduce(stats)
            stats /= world
            spread = (stats[2] - stats[0] * stats[0]).clamp_(min=0)  # variance of the workers' means
            mean.copy_(stats[0])
            var.copy_(stats[1] + spread)


class DataParallel:
    """The model as `place.world` workers train it: as it is, in DDP, or sharded by FSDP2 (`fsdp`).

    Build it before the optimizer: FSDP replaces the parameters by sharded ones. `model` is the
    module itself (evaluate and save it); `module` is what the training forward runs through.
    """

    def __init__(self, model: nn.Module, place: Place, fsdp: bool = False, sparse_experts: bool = False):
        self.model, self.module, self.place = model, model, place
        self.fsdp = fsdp and place.world > 1
        self.tables: list[nn.Parameter] = []  # expert tables with sparse gradients, exchanged by exchange_rows
        if sparse_experts:
            if self.fsdp:  # load_config refuses it; a direct call gets the same answer
                raise ValueError("sparse_experts and fsdp do not combine: FSDP reduces dense gradient shards")
            for module in model.modules():
                if isinstance(module, PEER):
                    module.sparse_grad = True
                    self.tables += [module.down, module.up]
        if self.fsdp:
            shard(model)
        elif place.world > 1:
            ids = {id(p) for p in self.tables}
            ignored = [name for name, p in model.named_parameters() if id(p) in ids]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
            devices = [place.device.index] if place.device.type == "cuda" else None
            # broadcast_buffers=False: each worker's BatchNorm statistics follow its own batches and sync_buffers
            # pools them (DDP's default put rank 0's on every rank before each step, dropping the others' updates).
            self.module = nn.parallel.DistributedDataParallel(model, device_ids=devices, broadcast_buffers=False)

    def step(
        self,
        batches: Iterator[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        amp,
        train: TrainConfig,
        check: Callable[[float, float], None] | None = None,
    ) -> tuple[float, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches (ids (B, T+1) each) from `batches`.

        Returns (loss, gradient norm): the loss is the language model's cross-entropy (without MoE balance
        losses), the mean over all workers; the norm that of the averaged gradient before clipping (the
        same on every worker). `check(loss, norm)` runs before the optimizer applies the gradients (it may
        raise to stop the run).
        """
        accumulation = train.gradient_accumulation_steps
        self.module.train()
        loss_sum = 0.0
        for micro in range(accumulation):
            ids = next(batches).to(self.place.device, non_blocking=True)
            # Gradients are reduced on the last micro-batch only (FSDP's reduce-scatter, DDP's all-reduce).
            last = micro == accumulation - 1
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            ddp = self.module is not self.model
            with self.module.no_sync() if ddp and not last else contextlib.nullcontext():
                with amp:
                    loss = self.module(ids[:, :-1], labels=ids[:, 1:])  # fused LM head + cross-entropy
                scaler.scale(loss / accumulation).backward()
            # The logged loss is the language model's: the MoE balance losses are trained on, and logged apart.
            lm_loss = loss.detach() - sum(b.detach() for b in self.model.balance_losses())
            loss_sum += lm_loss.item() / accumulation
        exchange_rows(self.tables, self.place.world)
        scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(self.model.parameters(), train.max_grad_norm)
        step_loss = mean_across(loss_sum, self.place)
        if check is not None:
            check(step_loss, grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return step_loss, grad_norm
