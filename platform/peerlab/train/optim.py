"""AdamW with the decay split, and the learning-rate schedule of `train_config`.

Weight decay applies to the matrices and tables (embeddings, projections, PEER experts and
sub-keys); it does not apply to one-dimensional parameters: RMSNorm and BatchNorm weights
and biases, whose scale decay would only fight the normalisation.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from peerlab.config import TrainConfig


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


def build_optimizer(model: nn.Module, train: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total: int):
    """transformers' schedules by name: linear, cosine, constant, constant_with_warmup (and the others it has)."""
    from transformers import get_scheduler

    return get_scheduler(
        train.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(train, total), num_training_steps=total
    )
