"""Precision: fp16 (with loss scaling), bf16, tf32, and torchao's Float8 training.

Float8 (`train_config.float8`, on by default) converts the model's linear layers that pay
(`float8_plan`: not the LM head or PEER's router, and only those large enough) with
`torchao.float8.convert_to_float8_training` where a GPU of compute capability 8.9 or newer
is there; everywhere else the run says once why it is not used, and nothing else changes.
"Large enough" is measured on the card (`measure_float8`): each distinct shape of linear layer,
forward and backward at the run's tokens per micro-batch, compiled where the run compiles, in
Float8 against bf16; a layer converts only where Float8 came out at least FLOAT8_MIN_SPEEDUP
faster, so Float8 on by default does not make a layer slower than bf16 would. The figures are
kept per machine (~/.cache/peerlab/float8-speedups.json) and taken once per card, software and
shape; with several workers rank 0 measures and every rank uses its figures.
PEERLAB_FLOAT8_FILTER=torchao uses torchao's fixed size rule instead (no measuring).
Float8 manages precision itself, as the configuration guide notes (set fp16 and bf16 false
with it): with Float8 on and both false, bf16 autocast runs the rest of the model (attention,
the layers left out, PEER's query projection; PEER's key search and experts keep the tables'
dtype and RMSNorm computes in fp32, under any autocast), not fp32. When a config also sets fp16 or
bf16, Float8 wins for the converted layers and that dtype's autocast covers the rest. The
log says which.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from peerlab.config import TrainConfig
from peerlab.model.moe import MoE
from peerlab.model.peer import ProductKeys

log = logging.getLogger("peerlab.train")
RECIPE = "tensorwise"  # torchao's Float8 recipe: one scale per tensor
FLOAT8_MIN_SPEEDUP = 1.05  # a layer converts where Float8 measured at least this much faster than bf16 (noise margin)
FILTERS = ("measured", "torchao")  # PEERLAB_FLOAT8_FILTER: which layers are large enough for Float8


def autocast(train: TrainConfig, device: torch.device, float8: Float8Layers | None = None):
    """The autocast context of a forward pass: fp16, bf16, or none (see `autocast_dtype`)."""
    dtype = autocast_dtype(train, float8)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if dtype == "fp16" else torch.bfloat16)


def grad_scaler(train: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (a no-op scaler otherwise)."""
    return torch.amp.GradScaler(device.type, enabled=train.fp16)


def optimizer_stepped(scaler: torch.amp.GradScaler, grad_norm: float) -> bool:
    """False where fp16's loss scaler skipped the step. It skips where the unscaled gradients hold an inf
    or a NaN, which makes their norm (`grad_norm`, taken after `unscale_`, the same on every worker)
    non-finite: read from that norm, not from the scale (`get_scale()` is a host sync on a GPU)."""
    return not scaler.is_enabled() or math.isfinite(grad_norm)


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
    filter: str = ""  # how "large enough" was decided, in words
    speedups: dict[str, float] = field(default_factory=dict)  # "out x in" -> Float8's measured speed over bf16

    @property
    def on(self) -> bool:
        return self.off is None


def float8_plan(model: nn.Module, speedups: dict[tuple[int, int], float] | None = None) -> Float8Layers:
    """Which linear layers Float8 converts (and why each other one is left in high precision).

    Kept out by role: the LM head, and every linear layer inside a PEER, PKM or MoE layer, which
    is its router: the query projection (or gate) whose top-k picks the experts or memory rows. Rounded to e4m3 it can pick
    other experts; DeepSeek-V3 keeps its gating (and output head) out of FP8 as components
    sensitive to low precision (DeepSeek-V3 technical report, Sec. 3.3.1). Kept out by size:
    torchao's own rule for the tensorwise recipe, `torchao.float8._auto_filter_for_recipe`
    (what torchtitan switches on with `filter_fqns = ["auto_filter_small_kn"]`): dimensions must
    be multiples of 16, and a layer with in_features K <= 4096 and out_features N <= 1024 stays
    out, because there casting and scaling cost more than the faster float8 product saves
    (torchao's H100 tables). With `speedups` ((out_features, in_features) -> Float8's measured
    speed over bf16, from `measure_float8`) the measurement decides instead: a layer converts
    where its shape came out at least FLOAT8_MIN_SPEEDUP faster.
    """
    from torchao.float8 import _auto_filter_for_recipe

    pays = _auto_filter_for_recipe(RECIPE, filter_fqns=[])
    plan = Float8Layers(off=None)
    for name, module, why_not in _linear_layers(model):
        out_features, in_features = module.weight.shape
        if why_not:
            plan.skipped[name] = why_not
            continue
        ratio = None if speedups is None else speedups[out_features, in_features]
        if ratio == 0.0:
            plan.skipped[name] = f"{out_features}x{in_features}: timing Float8 failed (the log says why)"
        elif ratio is not None and ratio < FLOAT8_MIN_SPEEDUP:
            plan.skipped[name] = (
                f"{out_features}x{in_features}: Float8 measured {ratio:.3f}x bf16 (converts from {FLOAT8_MIN_SPEEDUP}x)"
            )
        elif ratio is None and not pays(module, name):
            plan.skipped[name] = f"{out_features}x{in_features}: too small for Float8 to pay"
        else:
            plan.converted.append(name)
    return plan


def _linear_layers(model: nn.Module):
    """(name, module, why Float8 must leave it out by role or shape, or "") for each linear layer of `model`."""
    routers = {
        f"{prefix}.{name}" if prefix else name
        for prefix, peer in model.named_modules()
        if isinstance(peer, (ProductKeys, MoE))
        for name, m in peer.named_modules()
        if isinstance(m, nn.Linear)
    }
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        out_features, in_features = module.weight.shape
        if name in routers:
            yield name, module, "router (its top-k picks the experts or memory rows)"
        elif name.split(".")[-1] == "lm_head":
            yield name, module, "LM head"
        elif out_features % 16 or in_features % 16:
            yield name, module, f"{out_features}x{in_features}: not multiples of 16"
        else:
            yield name, module, ""


def float8_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """The distinct (out_features, in_features) of the linear layers Float8 may convert (not ruled out by role)."""
    return sorted({tuple(m.weight.shape) for _, m, why_not in _linear_layers(model) if not why_not})


def measure_float8(
    shapes: list[tuple[int, int]], tokens: int, device: torch.device, compiled: bool, dtype: str = "bf16"
) -> dict[tuple[int, int], float]:
    """Float8's speed over `dtype` autocast for each (out_features, in_features) shape (`_speedup`),
    rounded to 3 decimals; 0.0 for a shape whose timing failed (it stays in `dtype`).

    Taken once per machine: the figures are kept in `peerlab.native.cache_dir()` under the card's
    name, the versions of torch, CUDA, Triton and torchao, the tokens and the shape, each written
    as it is taken. A file lock makes concurrent processes (trials sharing a card) wait for one
    measurement instead of timing each other; a process that waits over LOCK_WAIT_S raises
    TimeoutError. Where the folder cannot be written, the figures are taken and not kept.
    """
    from peerlab.native import cache_dir
    from peerlab.tune import write_json  # through a temporary file: readers never see half a file

    prefix = f"{_figures_prefix(device, compiled, dtype)}|{tokens} tokens"
    keys = {shape: f"{prefix}|{shape[0]}x{shape[1]}" for shape in shapes}
    path = cache_dir() / "float8-speedups.json"
    known = _read_figures(path)
    if all(key in known for key in keys.values()):
        return {shape: known[key] for shape, key in keys.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")  # noqa: SIM115 - held across the measurement below
    except OSError as error:
        log.warning("Float8: %s cannot be written (%s); the figures are taken and not kept", path.parent, error)
        lock = None
    try:
        if lock is not None:
            _wait_for(lock, LOCK_WAIT_S)
            known = _read_figures(path)  # another process may have measured them while this one waited
        found = {}
        for shape, key in keys.items():
            if key in known:
                found[shape] = known[key]
                continue
            try:
                found[shape] = round(_speedup(*shape, tokens, device, compiled, dtype), 3)
            except Exception as error:  # noqa: BLE001 - a shape that cannot be timed stays in bf16
                log.warning("Float8: timing %dx%d failed (%s); that shape stays in %s", *shape, error, dtype)
                found[shape] = 0.0  # not kept: the next run tries again
                continue
            log.info("Float8 at %dx%d, %d tokens: %.3fx %s", *shape, tokens, found[shape], dtype)
            if lock is not None:
                known[key] = found[shape]
                write_json(path, known)  # one writer at a time: this process holds the lock
        return found
    finally:
        if lock is not None:
            lock.close()  # releases the lock


LOCK_WAIT_S = 900  # the longest a process waits for another's Float8 figures


def _figures_prefix(device: torch.device, compiled: bool, dtype: str) -> str:
    """What a figure depends on besides tokens and shape: the card and the software that times it."""
    import torchao

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type} ({os.cpu_count()} CPUs)"
    return (
        f"{name}|torch {torch.__version__}|cuda {torch.version.cuda}|triton {triton_version}"
        f"|torchao {torchao.__version__}|{RECIPE}|{dtype}|{'compiled' if compiled else 'eager'}"
    )


def _read_figures(path) -> dict:
    """The kept figures; none where the file is missing or unreadable (it is rewritten at the next figure)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("Float8: %s is unreadable (%s); measuring again", path, error)
        return {}


def _wait_for(lock, seconds: float) -> None:
    """Take the exclusive lock on the open file `lock`, or raise TimeoutError after `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lock.name}: another process held it for over {seconds:.0f} s") from None
            time.sleep(0.2)


def _speedup(
    out_features: int, in_features: int, tokens: int, device: torch.device, compiled: bool, dtype: str
) -> float:
    """Time in `dtype` over time in Float8 of one forward and backward of a (out, in) linear layer
    (fp32 weight, as the model keeps it) on a (tokens, in) input under `dtype` autocast.

    The two layers alternate round by round (each round at least ~20 ms of steps, after warm-up),
    so a drift of the card's clocks or load falls on both; the ratio is of the medians. Runs
    with its own random state: the caller's is left as it was.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    cuda = device.type == "cuda"
    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else []
    half = torch.float16 if dtype == "fp16" else torch.bfloat16
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(0)
        high = nn.Linear(in_features, out_features, bias=False, device=device)  # fp32 weight, as the model's
        low = convert_to_float8_training(
            nn.Linear(in_features, out_features, bias=False, device=device),
            config=Float8LinearConfig.from_recipe_name(RECIPE),
        )
        x = torch.randn(tokens, in_features, device=device, dtype=half, requires_grad=True)  # (M, K)
        grad = torch.randn(tokens, out_features, device=device, dtype=half)  # (M, N)
        if compiled:
            torch._dynamo.reset()  # this shape's graphs alone: no shape hits dynamo's recompile limit
        try:
            runs = {layer: torch.compile(layer) if compiled else layer for layer in (high, low)}

            def steps(layer: nn.Module, count: int) -> float:
                """Seconds per step over `count` steps."""
                sync()
                start = time.perf_counter()
                for _ in range(count):
                    x.grad = layer.weight.grad = None
                    with torch.autocast(device.type, dtype=half):
                        y = runs[layer](x)
                    y.backward(grad)
                sync()
                return (time.perf_counter() - start) / count

            for layer in (high, low):
                steps(layer, 3)  # compile, Float8's scales, the allocator
            count = max(3, min(200, int(0.02 / max(steps(high, 3), 1e-6))))  # ~20 ms a round
            times = {high: [], low: []}
            for i in range(6):
                for layer in (high, low) if i % 2 == 0 else (low, high):
                    times[layer].append(steps(layer, count))
            return statistics.median(times[high]) / statistics.median(times[low])
        finally:
            if compiled:
                torch._dynamo.reset()


def apply_float8(
    model: nn.Module,
    train: TrainConfig,
    device: torch.device,
    force: bool = False,
    tokens: int | None = None,
    compiled: bool | None = None,
    rule: str | None = None,
) -> Float8Layers:
    """Convert the linear layers of `float8_plan` to Float8 training where it applies.

    `force` applies it whatever the device (torchao emulates it on CPU: tests use this).
    `tokens` (per micro-batch) and `compiled` (None: as `train_config.compile` decides) are what
    `measure_float8` times the layers at. `rule`: "measured" or "torchao" (None: the
    PEERLAB_FLOAT8_FILTER variable, else "measured" on CUDA where `tokens` is given, else "torchao").
    """
    reason = None if force else float8_reason(train, device)
    if reason is not None:
        log.info("Float8 training is off: %s", reason)
        return Float8Layers(off=reason)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    plan = float8_filter(model, train, device, tokens, compiled, rule)
    chosen = set(plan.converted)
    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name(RECIPE), module_filter_fn=lambda m, name: name in chosen
    )
    why = "" if train.fp16 or train.bf16 else " (fp16 and bf16 are false: Float8 manages precision)"
    log.info(
        "Float8 training is on for %d of %d linear layers (%s; the others are too small, PEER routers or the "
        "LM head: run_info.json lists them; large enough by %s); %s autocast covers the rest%s",
        len(plan.converted),
        len(plan.converted) + len(plan.skipped),
        ", ".join(plan.converted) or "none is large enough",
        plan.filter,
        autocast_dtype(train, plan),
        why,
    )
    return plan


def float8_filter(model, train, device, tokens, compiled, rule) -> Float8Layers:
    """`float8_plan` by the rule asked for (see `apply_float8`). In a process group rank 0 decides
    (its rule, its figures) and every rank converts the same layers."""
    import torch.distributed as dist

    rule = rule or os.environ.get("PEERLAB_FLOAT8_FILTER") or ("measured" if device.type == "cuda" else "torchao")
    if rule not in FILTERS:
        raise ValueError(f"PEERLAB_FLOAT8_FILTER={rule!r}: use one of {', '.join(FILTERS)}")
    group = dist.is_initialized() and dist.get_world_size() > 1
    decision: list = [None]
    if not group or dist.get_rank() == 0:
        decision[0] = _decide(model, train, device, tokens, compiled, rule)
    if group:
        dist.broadcast_object_list(decision, src=0)
    words, figures = decision[0]
    plan = float8_plan(model, figures)
    plan.filter = words
    plan.speedups = {f"{out}x{inp}": ratio for (out, inp), ratio in (figures or {}).items()}
    return plan


def _decide(model, train, device, tokens, compiled, rule) -> tuple[str, dict | None]:
    """(the filter in words, the measured figures or None for torchao's size rule)."""
    if rule == "torchao":
        return "torchao's size rule", None
    if not tokens:
        return "torchao's size rule (no token count to measure at)", None
    if compiled is None:
        from peerlab.train.compiling import compile_choice

        compiled = compile_choice(train, device)[0]
    dtype = "fp16" if train.fp16 else "bf16"
    try:
        figures = measure_float8(float8_shapes(model), tokens, device, compiled, dtype)
    except Exception as error:  # noqa: BLE001 - a failed measurement must not stop the run
        log.warning("Float8: measuring the layers failed (%s); torchao's size rule decides", error)
        return f"torchao's size rule (measuring failed: {type(error).__name__}: {str(error)[:200]})", None
    words = "compiled" if compiled else "eager"
    return f"measured: forward and backward of each shape at {tokens} tokens, {words}, against {dtype}", figures


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
        "float8_filter": float8.filter,
        "float8_speedups": float8.speedups,
    }
