"""Checkpoints: everything a run needs to continue exactly, written so a crash never leaves a wrong one.

A checkpoint is a folder `<run>/checkpoints/step-000123/` with

    model.safetensors      the model's weights (tensors only)
    optimizer.pt           AdamW's state dict (tensors, numbers, lists: loaded with weights_only=True)
    scheduler.json         the learning-rate scheduler's state
    data.json              the data stream's position (peerlab.data.DataMixture.state_dict)
    rng.json, rng.safetensors   each rank's Python, NumPy and torch random states
    trainer.json           step, tokens and anything else of the loop
    checkpoint.json        written last: the step and the SHA-256 of every file above

It is written into `step-000123.tmp/` and renamed into place only when complete, and
`load` checks every file against `checkpoint.json` first: a folder left by a crash is either
absent, still named `.tmp`, or fails the check; it never loads with wrong contents. Nothing is
unpickled: tensors come from safetensors, the optimizer from `torch.load(weights_only=True)`,
the rest from JSON.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

MANIFEST = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match its manifest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of Python's, NumPy's and torch's random number generators."""
    version, state, gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return {"python": [version, list(state), gauss], "numpy": np.random.get_state(legacy=False)}, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    np.random.set_state(plain["numpy"])
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _jsonable(value):
    """numpy scalars and arrays inside a NumPy RNG state, as JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def rank_tensors(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """One rank's tensor RNG states out of a checkpoint's rng.safetensors ("<rank>/<name>" keys)."""
    prefix = f"{rank}/"
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def save(
    folder: Path,
    model_state: dict,
    optimizer_state: dict,
    scheduler_state: dict,
    data_state: dict,
    trainer: dict,
    rng: list[tuple[dict, dict[str, torch.Tensor]]] | None = None,
) -> Path:
    """Write a complete checkpoint at `folder` (atomically); returns the folder.

    `rng` holds each rank's `rng_state()` (default: this process's, as rank 0).
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    rng = rng if rng is not None else [rng_state()]
    tensor_rng = {f"{rank}/{name}": value for rank, (_, tensors) in enumerate(rng) for name, value in tensors.items()}
    files = {
        "scheduler.json": scheduler_state,
        "data.json": data_state,
        "rng.json": {"ranks": [_jsonable(plain) for plain, _ in rng]},
        "trainer.json": trainer,
    }
    for name, value in files.items():
        (tmp / name).write_text(json.dumps(value))
    save_file(tensor_rng, tmp / "rng.safetensors")
    names = ["model.safetensors", "optimizer.pt", "rng.safetensors", *files]
    manifest = {"step": trainer.get("step"), "files": {n: _sha256(tmp / n) for n in names}}
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


@dataclass
class Loaded:
    model: dict
    optimizer: dict
    scheduler: dict
    data: dict
    trainer: dict
    rng_plain: dict
    rng_tensors: dict


def verify(folder: Path) -> dict:
    """The manifest of a complete checkpoint whose files all match it; CheckpointError otherwise."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder} is not a complete checkpoint (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            raise CheckpointError(
                f"{folder}: {name} is missing or does not match {MANIFEST}; the checkpoint is damaged"
            )
    return manifest


def load(folder: Path) -> Loaded:
    folder = Path(folder)
    verify(folder)
    read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
    return Loaded(
        model=load_file(folder / "model.safetensors"),
        optimizer=torch.load(folder / "optimizer.pt", weights_only=True),
        scheduler=read("scheduler.json"),
        data=read("data.json"),
        trainer=read("trainer.json"),
        rng_plain=read("rng.json"),
        rng_tensors=load_file(folder / "rng.safetensors"),
    )


def step_of(folder: Path) -> int:
    """The training step a checkpoint was written at (its trainer.json)."""
    return int(json.loads((Path(folder) / "trainer.json").read_text()).get("step", 0))


def latest(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint under `checkpoints/` (damaged or unfinished ones are skipped)."""
    found = []
    for path in Path(checkpoints).glob("step-*"):
        if path.suffix == ".tmp" or not path.is_dir():
            continue
        try:
            found.append((verify(path)["step"], path))
        except (CheckpointError, ValueError, KeyError):
            continue
    return max(found)[1] if found else None


def resolve(path: str | Path) -> Path:
    """The complete checkpoint `path` names: a checkpoint folder (its files are checked when it
    loads), or the newest complete one of a run's `checkpoints/` folder or of a run folder.
    CheckpointError with one line for anything else."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if (p / MANIFEST).is_file():
        return p
    if p.name.startswith("step-"):
        raise CheckpointError(f"{p} is not a complete checkpoint (no {MANIFEST})")
    checkpoints = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    newest = latest(checkpoints)
    if newest is not None:
        return newest
    if checkpoints is p and p.name != "checkpoints":
        raise CheckpointError(
            f"{p} is neither a checkpoint folder (with {MANIFEST}) nor a run folder (with checkpoints/)"
        )
    raise CheckpointError(f"{checkpoints} holds no complete checkpoint")


def prune(checkpoints: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints, and remove unfinished `.tmp` folders."""
    folders = sorted(p for p in Path(checkpoints).glob("step-*") if p.is_dir() and p.suffix != ".tmp")
    for path in folders[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for path in Path(checkpoints).glob("step-*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
