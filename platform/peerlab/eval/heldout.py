"""The fast evaluation path: loss on each dataset's held-out documents, computed with the model directly.

`heldout_blocks` packs the first held-out documents of every dataset (never used for
training) into a fixed set of blocks once per run; `heldout_loss` gives the mean token loss
on each dataset's blocks. Cheap enough to run every `eval_steps`.
"""

from __future__ import annotations

import torch
from torch import nn

from peerlab.config import DatasetConfig
from peerlab.data.sources import heldout_texts


def heldout_blocks(data: DatasetConfig, tokenizer, blocks_per_dataset: int = 8) -> dict[str, torch.Tensor]:
    """{dataset name: (n, max_seq_length + 1) token ids} from its held-out documents (n may be 0)."""
    length = data.max_seq_length + 1
    out = {}
    for entry in data.datasets:
        ids: list[int] = []
        for text in heldout_texts(entry, data.heldout_fraction, limit=4 * blocks_per_dataset + 16):
            ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            if len(ids) >= blocks_per_dataset * length:
                break
        n = min(blocks_per_dataset, len(ids) // length)
        out[entry.name] = torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)
    return out


@torch.no_grad()
def heldout_loss(model: nn.Module, blocks: dict[str, torch.Tensor], batch_size: int, device, autocast) -> dict:
    """{"eval_loss/<name>": mean token cross-entropy} for each dataset with held-out blocks."""
    was_training = model.training
    model.eval()
    out = {}
    for name, ids in blocks.items():
        if len(ids) == 0:
            continue
        total, count = 0.0, 0
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size].to(device)
            with autocast:
                logits = model(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += batch[:, 1:].numel()
        out[f"eval_loss/{name}"] = total / count
    model.train(was_training)
    return out
