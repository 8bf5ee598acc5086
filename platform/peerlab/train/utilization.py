"""Model FLOPs utilisation (MFU) and PEER's memory-bandwidth utilisation (MBU) of a run.

MFU = model FLOPs per token x tokens/s / (peak FLOP/s x workers)          (PaLM, appendix B)
MBU = PEER table bytes per token x tokens/s / (peak bandwidth x workers)

The numerators come from the config (`peerlab.model.training_flops_per_token`,
`peerlab.model.peer_bytes_per_token`). The peaks: for a GPU in the table below, its data
sheet's dense tensor-core rate in the precision the run computes in (bf16 for bf16, fp16 and
Float8 runs, as torchtitan reports Float8's MFU; half of it for tf32; the CUDA-core rate for
plain float32) and its memory bandwidth; for any other device (a CPU, an unlisted card) a
measured rate: a float32 (bf16 on a GPU) matrix product and a large copy, timed once at the
start. `run_info.json` names the peaks and where they came from.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

TERA, GIGA = 1e12, 1e9

# (name fragment, dense bf16 tensor TFLOP/s, float32 CUDA-core TFLOP/s, memory GB/s), from NVIDIA's
# data sheets (no sparsity); the first fragment found in the device's name wins.
CARDS = [
    ("H200", 989.4, 67.0, 4800),
    ("H100 NVL", 835.0, 60.0, 3900),
    ("H100 PCIe", 756.0, 51.0, 2000),
    ("H100", 989.4, 67.0, 3350),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100-SXM4-80GB", 312.0, 19.5, 2039),
    ("A100 80GB PCIe", 312.0, 19.5, 1935),
    ("A100", 312.0, 19.5, 1555),
    ("L40S", 362.1, 91.6, 864),
    ("L4", 121.0, 30.3, 300),
]


@dataclass
class Peaks:
    flops: float  # FLOP/s of one device in the run's compute precision
    bandwidth: float  # bytes/s of one device's memory
    source: str  # where the two figures come from

    def as_dict(self) -> dict:
        return asdict(self)


def compute_precision(autocast: str | None, float8: bool, tf32: bool) -> str:
    """The precision the run's matrix products run in: bf16 (bf16, fp16 autocast, Float8), tf32 or float32."""
    if autocast or float8:
        return "bf16"
    return "tf32" if tf32 else "float32"


def device_peaks(device: torch.device, precision: str) -> Peaks:
    """The device's peaks: the data sheet's for a known GPU, otherwise measured (see the module docstring)."""
    known = card_peaks(torch.cuda.get_device_name(device), precision) if device.type == "cuda" else None
    return known or measure_peaks(device, precision)


def card_peaks(name: str, precision: str) -> Peaks | None:
    """The data sheet's peaks of the GPU called `name` (as torch names it), or None for a card not listed."""
    for fragment, bf16, fp32, gbps in CARDS:
        if fragment in name:
            tflops = {"bf16": bf16, "tf32": bf16 / 2, "float32": fp32}[precision]
            return Peaks(tflops * TERA, gbps * GIGA, f"{name} data sheet: {precision} {tflops} TFLOP/s, {gbps} GB/s")
    return None


def measure_peaks(device: torch.device, precision: str, size: int = 1024, copy_bytes: int = 64 << 20) -> Peaks:
    """Best of a few timed runs of a (size x size) matrix product and of a copy of copy_bytes."""
    dtype = torch.bfloat16 if device.type == "cuda" and precision == "bf16" else torch.float32
    # Constant operands: the rate does not depend on the values, and the run's random streams stay untouched.
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)
    b = torch.full((size, size), 0.25, device=device, dtype=dtype)
    src = torch.empty(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)

    def best(work, reps: int = 5) -> float:
        work()  # warm-up
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            work()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    flops = 2 * size**3 / best(lambda: a @ b)
    bandwidth = 2 * copy_bytes / best(lambda: dst.copy_(src))  # read + write
    what = f"{str(dtype).removeprefix('torch.')} matmul {flops / TERA:.3g} TFLOP/s, copy {bandwidth / GIGA:.3g} GB/s"
    return Peaks(flops, bandwidth, f"measured on this {device.type} ({torch.get_num_threads()} threads): {what}")


def utilization(flops_per_token: int, bytes_per_token: int, tokens_per_s: float, peaks: Peaks, world: int) -> dict:
    """{"mfu": ..., "mbu": ...} of a training rate (tokens/s of all workers); `mbu` only with PEER layers."""
    out = {"mfu": flops_per_token * tokens_per_s / (peaks.flops * world)}
    if bytes_per_token:
        out["mbu"] = bytes_per_token * tokens_per_s / (peaks.bandwidth * world)
    return out
