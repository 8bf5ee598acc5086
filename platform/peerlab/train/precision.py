"""Precision: fp16 (with loss scaling), bf16, tf32, and torchao's Float8 training.

Float8 (`train_config.float8`, on by default) converts the model's linear layers with
`torchao.float8.convert_to_float8_training` where a GPU of compute capability 8.9 or newer
is there; everywhere else the run says once why it is not used. Float8 manages precision
itself, as the configuration guide notes: when a config also sets fp16 or bf16, Float8 wins
for the converted linear layers and autocast still covers the rest of the model (attention,
norms, PEER's retrieval), and the run logs that combination.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from peerlab.config import TrainConfig

log = logging.getLogger("peerlab.train")


def autocast(train: TrainConfig, device: torch.device):
    """The autocast context of a forward pass: fp16, bf16, or none."""
    if train.fp16:
        return torch.autocast(device.type, dtype=torch.float16)
    if train.bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def grad_scaler(train: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (a no-op scaler otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=train.fp16)


def set_tf32(train: TrainConfig) -> None:
    torch.backends.cuda.matmul.allow_tf32 = train.tf32
    torch.backends.cudnn.allow_tf32 = train.tf32


def float8_reason(train: TrainConfig, device: torch.device) -> str | None:
    """None when Float8 applies; otherwise why not, in words."""
    if not train.float8:
        return "train_config.float8 is false"
    if device.type != "cuda":
        return f"no CUDA GPU on this worker ({device.type}); torchao's Float8 needs compute capability 8.9+"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"the GPU's compute capability is {major}.{minor}; torchao's Float8 needs 8.9 or newer"
    return None


def _float8_filter(module: nn.Module, name: str) -> bool:
    """Linear layers whose sizes Float8's scaled matmuls accept (multiples of 16); not the LM head."""
    return isinstance(module, nn.Linear) and "lm_head" not in name and all(d % 16 == 0 for d in module.weight.shape)


def apply_float8(model: nn.Module, train: TrainConfig, device: torch.device, force: bool = False) -> str | None:
    """Convert the model's linear layers to Float8 training where it applies; returns None, or why it does not.

    `force` applies it whatever the device (torchao emulates it on CPU: tests use this).
    """
    reason = None if force else float8_reason(train, device)
    if reason is not None:
        log.info("Float8 training is off: %s", reason)
        return reason
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name("tensorwise"), module_filter_fn=_float8_filter
    )
    if train.fp16 or train.bf16:
        log.info(
            "Float8 training is on for the linear layers; %s autocast covers the rest", "fp16" if train.fp16 else "bf16"
        )
    else:
        log.info("Float8 training is on for the linear layers")
    return None


def describe(train: TrainConfig, float8_off: str | None) -> dict:
    """The precision a run trains in, for run_info.json: autocast dtype, loss scaling, tf32, Float8 (or why not)."""
    return {
        "autocast": "fp16" if train.fp16 else "bf16" if train.bf16 else None,
        "loss_scaling": train.fp16,
        "tf32": train.tf32,
        "float8": float8_off is None,
        "float8_off_reason": float8_off,
    }
