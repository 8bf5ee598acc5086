"""torch.compile for training (`train_config.compile`: true, false or "auto", the default).

Each transformer block is compiled on its own (`block.compile()`), as torchtitan does: the
blocks of one kind share their code, so dynamo compiles that code once per kind (dense block,
PEER block) and reuses the graph for every block of it, and the compile time does not grow
with the depth. The embedding, the final norm and the fused LM-head loss stay eager.
`nn.Module.compile` compiles the module in place, so parameter names, state dicts and
checkpoints are those of the eager model.

PEER's kernels are registered operators (`peerlab::peer_experts_forward`, ...), so a PEER
block compiles without graph breaks; with `sparse_experts` its experts run eagerly (one
graph break per PEER layer: sparse gradients have no compiled path).

Order in the worker: after Float8 conversion (torchao's scaling then fuses into the compiled
blocks) and before DDP or FSDP wrap the model. "auto" compiles on CUDA devices only: on CPU
the compile time (tens of seconds) does not pay back over a short run. Evaluation runs the
blocks eagerly (`eager()`): its shapes change from call to call and decoding goes token by
token, which would compile graph after graph up to dynamo's recompile limit.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from peerlab.config import TrainConfig

log = logging.getLogger("peerlab.train")


def compile_choice(train: TrainConfig, device: torch.device) -> tuple[bool, str]:
    """(whether to compile, why): the reason as run_info.json records it."""
    if train.compile == "auto":
        if device.type == "cuda":
            return True, "auto: CUDA"
        return False, f"auto: off on {device.type.upper()}"
    return bool(train.compile), f"train_config.compile: {str(train.compile).lower()}"


def apply_compile(
    model: nn.Module, train: TrainConfig, device: torch.device, backend: str = "inductor", mode: str | None = None
) -> dict:
    """Compile every block of `model.layers` in place where `compile_choice` says so.

    `backend`: torch.compile's (tests use "aot_eager", which traces the same graphs without
    generating code). `mode`: torch.compile's ("reduce-overhead" adds CUDA graphs; None is its
    default; benchmarks/train_step.py --compile-modes compares them). Returns what run_info.json
    records: {"compile": bool, "compile_reason": str}.
    """
    on, reason = compile_choice(train, device)
    if on:
        for block in model.layers:
            block.compile(backend=backend, mode=None if mode in (None, "default") else mode)
        log.info("torch.compile is on for each of the %d transformer blocks (%s)", len(model.layers), reason)
    else:
        log.info("torch.compile is off (%s)", reason)
    return {"compile": on, "compile_reason": reason}


def eager():
    """A context in which compiled blocks run as plain eager modules (evaluation: see the module's docstring)."""
    return torch.compiler.set_stance("force_eager")
