"""Precision: fp16 (with loss scaling), bf16, tf32, and torchao's Float8 training.

Float8 (`train_config.float8`, on by default) converts the model's linear layers that pay
(`float8_plan`: not the LM head or PEER's router, and only those large enough) with
`torchao.float8.convert_to_float8_training` where a GPU of compute capability 8.9 or newer
is there; everywhere else the run says once why it is not used, and nothing else changes.
Float8 manages precision itself, as the configuration guide notes (set fp16 and bf16 false
with it): with Float8 on and both false, bf16 autocast runs the rest of the model (attention,
the layers left out, PEER's query projection; PEER's key search and experts keep the tables'
dtype and RMSNorm computes in fp32, under any autocast), not fp32. When a config also sets fp16 or
bf16, Float8 wins for the converted layers and that dtype's autocast covers the rest. The
log says which.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from peerlab.config import TrainConfig
from peerlab.model.moe import MoE
from peerlab.model.peer import ProductKeys

log = logging.getLogger("peerlab.train")
RECIPE = "tensorwise"  # torchao's Float8 recipe: one scale per tensor


def autocast(train: TrainConfig, device: torch.device, float8: Float8Layers | None = None):
    """The autocast context of a forward pass: fp16, bf16, or none (see `autocast_dtype`)."""
    dtype = autocast_dtype(train, float8)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if dtype == "fp16" else torch.bfloat16)


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


@dataclass
class Float8Layers:
    """What Float8 training did to a model: `off` (None when on, else why not), and its linear layers,
    `converted` (names) and `skipped` (name -> why not)."""

    off: str | None
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def on(self) -> bool:
        return self.off is None


def float8_plan(model: nn.Module) -> Float8Layers:
    """Which linear layers Float8 converts (and why each other one is left in high precision).

    Kept out by role: the LM head, and every linear layer inside a PEER, PKM or MoE layer, which
    is its router: the query projection (or gate) whose top-k picks the experts or memory rows. Rounded to e4m3 it can pick
    other experts; DeepSeek-V3 keeps its gating (and output head) out of FP8 as components
    sensitive to low precision (DeepSeek-V3 technical report, Sec. 3.3.1). Kept out by size:
    torchao's own rule for the tensorwise recipe, `torchao.float8._auto_filter_for_recipe`
    (what torchtitan switches on with `filter_fqns = ["auto_filter_small_kn"]`): dimensions must
    be multiples of 16, and a layer with in_features K <= 4096 and out_features N <= 1024 stays
    out, because there casting and scaling cost more than the faster float8 product saves
    (torchao's H100 tables).
    """
    from torchao.float8 import _auto_filter_for_recipe

    pays = _auto_filter_for_recipe(RECIPE, filter_fqns=[])
    routers = {
        f"{prefix}.{name}" if prefix else name
        for prefix, peer in model.named_modules()
        if isinstance(peer, (ProductKeys, MoE))
        for name, m in peer.named_modules()
        if isinstance(m, nn.Linear)
    }
    plan = Float8Layers(off=None)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        out_features, in_features = module.weight.shape
        if name in routers:
            plan.skipped[name] = "router (its top-k picks the experts or memory rows)"
        elif name.split(".")[-1] == "lm_head":
            plan.skipped[name] = "LM head"
        elif out_features % 16 or in_features % 16:
            plan.skipped[name] = f"{out_features}x{in_features}: not multiples of 16"
        elif not pays(module, name):
            plan.skipped[name] = f"{out_features}x{in_features}: too small for Float8 to pay"
        else:
            plan.converted.append(name)
    return plan


def apply_float8(model: nn.Module, train: TrainConfig, device: torch.device, force: bool = False) -> Float8Layers:
    """Convert the linear layers of `float8_plan` to Float8 training where it applies.

    `force` applies it whatever the device (torchao emulates it on CPU: tests use this).
    """
    reason = None if force else float8_reason(train, device)
    if reason is not None:
        log.info("Float8 training is off: %s", reason)
        return Float8Layers(off=reason)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    plan = float8_plan(model)
    chosen = set(plan.converted)
    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name(RECIPE), module_filter_fn=lambda m, name: name in chosen
    )
    why = "" if train.fp16 or train.bf16 else " (fp16 and bf16 are false: Float8 manages precision)"
    log.info(
        "Float8 training is on for %d of %d linear layers (%s; the others are too small, PEER routers or the "
        "LM head: run_info.json lists them); %s autocast covers the rest%s",
        len(plan.converted),
        len(plan.converted) + len(plan.skipped),
        ", ".join(plan.converted) or "none is large enough",
        autocast_dtype(train, plan),
        why,
    )
    return plan


def autocast_dtype(train: TrainConfig, float8: Float8Layers | None = None) -> str | None:
    """The dtype autocast runs the model in, by name: fp16 or bf16 as configured; with both
    false, bf16 where Float8 is on (the guide's "torchao manages the precision"), else none (fp32)."""
    if train.fp16:
        return "fp16"
    if train.bf16 or (float8 is not None and float8.on):
        return "bf16"
    return None


def describe(train: TrainConfig, float8: Float8Layers) -> dict:
    """The precision a run trains in, for run_info.json: autocast dtype, loss scaling, tf32, Float8 (or why
    not), the layers it converted and those it left out with why."""
    return {
        "autocast": autocast_dtype(train, float8),
        "loss_scaling": train.fp16,
        "tf32": train.tf32,
        "float8": float8.on,
        "float8_off_reason": float8.off,
        "float8_layers": float8.converted,
        "float8_skipped": float8.skipped,
    }
