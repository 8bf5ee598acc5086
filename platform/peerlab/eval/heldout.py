"""The fast evaluation path: loss on each dataset's held-out documents, computed with the model directly.

`heldout_blocks` packs the first held-out documents of every dataset (never used for
training) into a fixed set of blocks once per run; `heldout_loss` gives the mean token loss
on each dataset's blocks and, with the tokenizer's byte lengths (`token_bytes(tokenizer)`), the bits
per UTF-8 byte of the text those tokens spell:

    eval_loss = sum_t -ln p(x_t | x_<t) / #tokens
    eval_bpb  = sum_t -ln p(x_t | x_<t) / ln 2 / sum_t bytes(x_t)

(the end-of-text tokens between documents are predicted and count 0 bytes). Bits per byte
do not depend on the tokenizer, so runs with different tokenizers compare. Cheap enough to
run every `eval_steps`.
"""

from __future__ import annotations

import math

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


def token_bytes(tokenizer) -> torch.Tensor:
    """(vocab,) UTF-8 bytes each token id stands for; 0 for special tokens.

    Exact for byte-level BPE (the demo's, GPT-2's): each character of a token is one byte.
    Other tokenizers: the length of the token decoded on its own (approximate where a token
    holds part of a character or decoding drops a leading space).
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    special = set(tokenizer.all_special_ids)
    vocab = tokenizer.get_vocab()  # {token string: id}
    out = torch.zeros(max(max(vocab.values()) + 1, len(tokenizer)), dtype=torch.long)
    for token, i in vocab.items():
        if i in special:
            continue
        if all(c in alphabet for c in token):
            out[i] = len(token)
        else:
            out[i] = len(tokenizer.convert_tokens_to_string([token]).encode("utf-8"))
    return out


@torch.no_grad()
def heldout_loss(
    model: nn.Module,
    blocks: dict[str, torch.Tensor],
    batch_size: int,
    device,
    autocast,
    byte_counts: torch.Tensor | None = None,
) -> dict:
    """{"eval_loss/<name>": mean token cross-entropy, "eval_bpb/<name>": bits per byte} per dataset.

    eval_bpb needs `byte_counts` (`token_bytes(tokenizer)`); without them only eval_loss.
    """
    was_training = model.training
    model.eval()
    out = {}
    for name, ids in blocks.items():
        if len(ids) == 0:
            continue
        total, count, nbytes = 0.0, 0, 0
        for start in range(0, len(ids), batch_size):
            batch = ids[start : start + batch_size].to(device)
            with autocast:
                logits = model(batch[:, :-1])
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += batch[:, 1:].numel()
            if byte_counts is not None:
                nbytes += int(byte_counts[ids[start : start + batch_size, 1:]].sum())
        out[f"eval_loss/{name}"] = total / count
        if byte_counts is not None and nbytes > 0:
            out[f"eval_bpb/{name}"] = total / math.log(2) / nbytes
    model.train(was_training)
    return out
