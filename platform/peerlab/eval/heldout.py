"""The fast evaluation path: loss on each dataset's held-out documents, computed with the model directly.

`heldout_blocks` packs the first held-out documents of every dataset (never used for
training) into a fixed set of blocks once per run, with the UTF-8 bytes of the text each
target token covers (`document_tokens`); `heldout_loss` gives, per dataset, the mean token
loss and the bits per UTF-8 byte of the text the predicted tokens cover:

    eval_loss = sum_t -ln p(x_t | x_<t) / #tokens
    eval_bpb  = sum_t -ln p(x_t | x_<t) / ln 2 / sum_t bytes(x_t)

The bytes come from the text itself (the fast tokenizer's character offsets), not from the
token strings, so for any tokenizer (byte-level BPE, WordPiece, SentencePiece with byte
fallback) the bytes of a document's tokens add up to the bytes of the document; the
end-of-text tokens between documents are predicted and count 0 bytes. Bits per byte then
do not depend on the tokenizer, and runs with different tokenizers compare. Cheap enough to
run every `eval_steps`.

Every dataset with held-out text is evaluated, a small held-out part in a shorter last
block; one under HELDOUT_WARN_TOKENS tokens is warned about (its figures are noisy), and
one with no held-out text at all gets no figures and a warning that says how to give it some.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from peerlab.config import DatasetConfig
from peerlab.data.sources import Selection, documents

log = logging.getLogger("peerlab.eval")
HELDOUT_WARN_TOKENS = 4000  # a held-out part smaller than this gives noisy figures: warned about
IGNORE = -100  # the label of padding after a shorter last block (cross_entropy's ignore_index)


@dataclass
class HeldoutBlocks:
    """One dataset's held-out blocks: built once per run, scored every eval_steps."""

    ids: torch.Tensor  # (n, max_seq_length + 1) token ids; a shorter last block is padded with end-of-text
    labels: torch.Tensor  # (n, max_seq_length) the targets ids[:, 1:], IGNORE at the padding
    target_bytes: torch.Tensor  # (n, max_seq_length) UTF-8 bytes of the text each target covers (0 at padding)
    tokens: int  # targets that count (the padding does not)
    nbytes: int  # their bytes: target_bytes.sum()


def document_tokens(tokenizer, text: str, eos: int, limit: int | None = None) -> tuple[list[int], list[int]]:
    """(token ids of `text` then `eos`, UTF-8 bytes of `text` each covers); the bytes add up to
    len(text.encode("utf-8")) for any tokenizer.

    "The text" is the document as written: its tokens' character offsets refer to it, also where
    a normaliser lowercases it or strips accents. A token covers the text from the furthest end of
    the spans before it to the end of its own span, so the characters a pre-tokeniser drops
    (WordPiece's spaces) go to the token after them and the text after the last span to the last
    token; of several tokens that share a character (byte fallback's <0xC3><0xA9> for "é", a
    byte-level BPE token holding part of a character) the first takes its bytes. The end-of-text
    token counts 0 bytes, except after a text with no tokens at all (whitespace under WordPiece).
    A tokenizer without offsets (a slow one) gives the bytes of its decoded prefixes instead.
    `limit`: the caller keeps at most this many tokens (ids and bytes are cut there); the decoded
    prefixes are then taken of those tokens only, not of a whole long document (quadratic).
    """
    raw = text.encode("utf-8")
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        char_starts = np.flatnonzero((np.frombuffer(raw, np.uint8) & 0xC0) != 0x80)  # (chars,) byte of each char
        char_to_byte = np.append(char_starts, len(raw))  # (chars + 1,)
        ends = char_to_byte[[end for _, end in enc["offset_mapping"]]] if ids else np.zeros(0, np.int64)
    else:  # transformers' slow tokenizers give no offsets
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        kept = len(ids) if limit is None else min(len(ids), limit)
        ends = np.array([len(tokenizer.decode(ids[: k + 1]).encode("utf-8")) for k in range(kept)], np.int64)
        ends = np.append(ends, np.full(len(ids) - kept, len(raw), np.int64))  # (the tokens past the limit are cut)
    ends = np.minimum(np.maximum.accumulate(ends), len(raw))  # (tokens,) furthest byte covered so far
    if len(ends):
        ends[-1] = len(raw)
    nbytes = np.diff(ends, prepend=0).tolist()
    ids, nbytes = [*ids, eos], [*nbytes, len(raw) - sum(nbytes)]
    return (ids, nbytes) if limit is None else (ids[:limit], nbytes[:limit])


def heldout_blocks(data: DatasetConfig, tokenizer, blocks_per_dataset: int = 8) -> dict[str, HeldoutBlocks]:
    """{dataset name: its held-out blocks}: up to `blocks_per_dataset` blocks of max_seq_length + 1
    tokens from its first held-out documents, the last one shorter when the held-out part runs out;
    for the training datasets and the evaluated-only ones (`eval_datasets`).

    A dataset without held-out text is left out, with a warning; one with under
    HELDOUT_WARN_TOKENS tokens in all is warned about.
    """
    from peerlab.data.tokenizer import eos_id

    eos = eos_id(tokenizer)
    length = data.max_seq_length + 1
    wanted = blocks_per_dataset * length
    out = {}
    for entry in [*data.datasets, *data.eval_datasets]:
        ids: list[int] = []
        nbytes: list[int] = []
        docs, everything = 0, True
        for _, _, text in documents(entry, Selection(part="heldout", heldout_fraction=data.heldout_fraction)):
            doc_ids, doc_bytes = document_tokens(tokenizer, text, eos, limit=wanted - len(ids))
            ids += doc_ids
            nbytes += doc_bytes
            docs += 1
            if len(ids) >= wanted:
                everything = False
                break
        ids, nbytes = ids[:wanted], nbytes[:wanted]
        if len(ids) < 2:  # no target to predict
            log.warning(
                "dataset '%s' has no held-out text, so it gets no eval_loss/%s or eval_bpb/%s and the means over "
                "datasets (eval_loss/mean, eval_bpb/mean) leave it out: give its folder heldout* or validation* "
                "files, or set dataset_config.heldout_fraction above 0 (now %g)",
                entry.name,
                entry.name,
                entry.name,
                data.heldout_fraction,
            )
            continue
        if everything and len(ids) < HELDOUT_WARN_TOKENS:
            log.warning(
                "dataset '%s': its held-out part has only %d tokens (%d documents), so eval_loss/%s and eval_bpb/%s "
                "are noisy; add held-out documents (heldout* or validation* files, or a larger "
                "dataset_config.heldout_fraction)",
                entry.name,
                len(ids),
                docs,
                entry.name,
                entry.name,
            )
        out[entry.name] = pack(ids, nbytes, length, eos)
    return out


def pack(ids: list[int], nbytes: list[int], length: int, pad: int) -> HeldoutBlocks:
    """Blocks of `length` tokens of a stream and its bytes per token, the last one padded with `pad`."""
    n = -(-len(ids) // length)
    stream = torch.full((n * length,), pad, dtype=torch.long)
    stream[: len(ids)] = torch.tensor(ids)
    counts = torch.zeros(n * length, dtype=torch.long)
    counts[: len(ids)] = torch.tensor(nbytes)
    real = torch.arange(n * length) < len(ids)  # (n * length,) false at the padding
    blocks = stream.view(n, length)
    labels = blocks[:, 1:].masked_fill(~real.view(n, length)[:, 1:], IGNORE)  # (n, length - 1)
    target_bytes = counts.view(n, length)[:, 1:]  # (n, length - 1)
    tokens = int((labels != IGNORE).sum())
    return HeldoutBlocks(blocks, labels, target_bytes, tokens, int(target_bytes.sum()))


@torch.no_grad()
def heldout_loss(model: nn.Module, blocks: dict[str, HeldoutBlocks], batch_size: int, device, autocast) -> dict:
    """{"eval_loss/<name>": mean token cross-entropy, "eval_bpb/<name>": bits per byte} per dataset."""
    was_training = model.training
    model.eval()
    out = {}
    for name, held in blocks.items():
        total = 0.0
        for start in range(0, len(held.ids), batch_size):
            batch = held.ids[start : start + batch_size].to(device)
            labels = held.labels[start : start + batch_size].to(device)
            with autocast:
                logits = model(batch[:, :-1])  # (b, length - 1, vocab): position t predicts token t + 1
            total += nn.functional.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
            ).item()
        out[f"eval_loss/{name}"] = total / held.tokens
        if held.nbytes > 0:
            out[f"eval_bpb/{name}"] = total / math.log(2) / held.nbytes
    model.train(was_training)
    return out
