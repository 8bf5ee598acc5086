"""AdamW with the decay split, its row-sparse variant for PEER tables, clipping, and the schedule.

Weight decay applies to the matrices and tables (embeddings, projections, PEER experts and
sub-keys); it does not apply to one-dimensional parameters: RMSNorm and BatchNorm weights
and biases, whose scale decay would only fight the normalisation.

`RowSparseAdamW` (train_config.sparse_experts, on by default) is AdamW for every dense gradient and, for
the PEER expert tables, whose gradients are then sparse tensors of the retrieved rows, a
lazy update in the manner of `torch.optim.SparseAdam`: only the rows a step touched get
their moments updated, bias-corrected with the table's step count, and decayed. The
difference from plain AdamW: an untouched row stays exactly as it is (plain AdamW would
still move it by its decaying momentum and shrink it by weight decay), so a rarely used
expert keeps its moments until its next use. The work per step follows the rows touched,
not the table size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peerlab.config import TrainConfig
from peerlab.train.row_adamw import row_adamw


def total_steps(train: TrainConfig, steps_per_epoch: int | None = None) -> int:
    """Optimizer steps of the run: max_steps, or num_train_epochs x steps_per_epoch."""
    if train.max_steps is not None:
        return train.max_steps
    per_epoch = train.steps_per_epoch or steps_per_epoch
    if per_epoch is None:
        raise ValueError("num_train_epochs needs train_config.steps_per_epoch (or a dataset size to derive it from)")
    return train.num_train_epochs * per_epoch


def warmup_steps(train: TrainConfig, total: int) -> int:
    return math.ceil(train.warmup_ratio * total)


class RowSparseAdamW(torch.optim.AdamW):
    """AdamW, with lazy row updates for parameters whose gradient is sparse (see the module docstring).

    The state has AdamW's layout (step, exp_avg, exp_avg_sq), so checkpoints load either way.
    `row_kernel = False` updates the rows with torch's ops even on the CPU (for comparison).
    """

    row_kernel = True

    @torch.no_grad()
    def step(self, closure=None):
        held = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    self._row_update(p, group)
                    held.append((p, p.grad))
                    p.grad = None  # AdamW below takes the dense ones
        loss = super().step(closure)
        for p, grad in held:
            p.grad = grad
        return loss

    def _row_update(self, p: torch.Tensor, group: dict) -> None:
        """AdamW on the rows the gradient holds, in place; work and memory follow the rows touched (U), not N.

        On the CPU one compiled pass per row (`peerlab.train.row_adamw`); elsewhere, or where
        that kernel is off, the rows are gathered (three (U, d) index_selects), updated by
        torch's fused AdamW kernel and copied back (three index_copy_ passes).
        """
        grad = coalesced(p.grad)
        rows, g = grad._indices()[0], grad._values()  # (U,), (U, d)
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        hyper = {"lr": group["lr"], "beta1": beta1, "beta2": beta2, "weight_decay": group["weight_decay"]}
        hyper["eps"] = group["eps"]
        if self.row_kernel and row_adamw(
            p, state["exp_avg"], state["exp_avg_sq"], rows, g.contiguous(), float(state["step"]), **hyper
        ):
            return
        m = state["exp_avg"].index_select(0, rows)  # (U, d)
        v = state["exp_avg_sq"].index_select(0, rows)  # (U, d)
        touched = p.index_select(0, rows)  # (U, d)
        step = state["step"].to(p.device)
        torch._fused_adamw_([touched], [g], [m], [v], [], [step], amsgrad=False, maximize=False, **hyper)
        p.index_copy_(0, rows, touched)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)


def coalesced(grad: torch.Tensor) -> torch.Tensor:
    """`grad.coalesce()` for a row-sparse gradient, without its sort where the rows are already in order.

    PEER's row gradients come out sorted and unique, but autograd's accumulation drops the
    tensor's coalesced flag, and `coalesce()` would sort (U,) rows again every step. Rows in
    strictly increasing order are coalesced by definition; only others (accumulated
    micro-batches, other workers' rows) are merged.
    """
    if grad.is_coalesced():
        return grad
    rows = grad._indices()[0]
    if bool((rows[1:] > rows[:-1]).all()):
        return grad._coalesced_(True)
    return grad.coalesce()


def sparse_experts_on(train: TrainConfig) -> bool:
    """Whether the PEER tables train with row-sparse gradients and `RowSparseAdamW`.

    `train_config.sparse_experts: null` (the default) means on, as product-key memories train
    their values with sparse updates, except under FSDP, which shards dense gradients only.
    """
    return not train.fsdp if train.sparse_experts is None else train.sparse_experts


def build_optimizer(model: nn.Module, train: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if sparse_experts_on(train):
        return RowSparseAdamW(groups, lr=train.learning_rate, betas=(0.9, 0.95), eps=1e-8)
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Total gradient norm (dense and sparse gradients alike), clipped to max_norm when max_norm > 0."""
    parameters = [p for p in parameters if p.grad is not None]
    for p in parameters:
        if p.grad.is_sparse:
            p.grad = coalesced(p.grad)
    grads = [p.grad for p in parameters]
    if not any(g.is_sparse for g in grads):  # torch's own (fast, and it knows FSDP's sharded gradients)
        limit = max_norm if max_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(parameters, limit))
    norms = [torch.linalg.vector_norm(g._values() if g.is_sparse else g) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g.mul_(scale)
    return total


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total: int):
    """transformers' schedule of that name: linear, cosine, constant or constant_with_warmup (config.LR_SCHEDULERS)."""
    from transformers import get_scheduler

    return get_scheduler(
        train.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(train, total), num_training_steps=total
    )
