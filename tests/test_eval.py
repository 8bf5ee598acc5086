"""Evaluation: the lm-eval adapter against direct computations, the offline tasks, training and the commands."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval.api.instance import Instance

from peerlab.data.corpus import DOMAINS
from peerlab.data.tokenizer import load_tokenizer
from peerlab.eval.harness import run_lm_eval, task_manager
from peerlab.eval.heldout import heldout_blocks, heldout_loss
from peerlab.eval.lm import EvalError, PeerlabLM
from peerlab.model import build_model
from peerlab.tracking import read_evals, read_metrics
from tests.conftest import ROOT, tiny_model_config
from tests.test_train import losses, run, tiny

REGISTRY = ROOT / "evals" / "registry"
OFFLINE_TASKS = ["peerlab_bpb_prose", "peerlab_bpb_code", "peerlab_bpb_docs", "peerlab_heldout_mc"]


@pytest.fixture(scope="module")
def tokenizer(demo_corpus):
    return load_tokenizer(str(demo_corpus / "tokenizer"))


@pytest.fixture(scope="module")
def texts(demo_corpus) -> list[str]:
    """Real held-out text of the demo corpus."""
    rows = [json.loads(line) for line in (demo_corpus / "evals" / "bpb_prose.jsonl").read_text().splitlines()]
    return [r["text"] for r in rows]


@pytest.fixture(scope="module")
def model64():
    """A small model over the demo tokenizer's 8,192 tokens, in float64 for exact comparisons."""
    torch.manual_seed(0)
    return build_model(tiny_model_config(vocab_size=8192, max_position_embeddings=64)).double().eval()


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@torch.no_grad()
def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1, one full forward pass of one sequence: (len - 1,)."""
    x = torch.tensor([ids])
    logp = torch.log_softmax(model(x[:, :-1])[0].double(), dim=-1)  # (T - 1, vocab)
    return logp.gather(1, x[0, 1:].unsqueeze(1)).squeeze(1)


# --------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------


def test_loglikelihood_equals_a_direct_computation(model64, tokenizer, texts):
    lm = PeerlabLM(model=model64, tokenizer=tokenizer, batch_size=3, max_length=48)
    pairs = [(t[:40], t[40:90]) for t in texts[:4]] + [("", texts[4][:30]), (texts[5][:600], texts[5][600:650])]
    # Choices of one context, as multiple choice asks them.
    cut = texts[6].rfind(" ", 0, 80)
    pairs += [(texts[6][:cut], texts[6][cut : cut + n]) for n in (6, 30, 60)] + [(texts[6][:cut], " Zebra")]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        if context:
            spaces = len(context) - len(context.rstrip())  # lm-eval moves trailing spaces to the continuation
            context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
            ctx = tokenizer(context)["input_ids"]
            whole = tokenizer(context + continuation)["input_ids"]
            cont = whole[len(ctx) :]
        else:
            ctx, cont = [tokenizer.eos_token_id], tokenizer(continuation)["input_ids"]
        seq = (ctx + cont)[-49:]  # longer than max_length + 1: the oldest context tokens go
        scores = direct_logprobs(model64, seq)[-len(cont) :]
        assert logp == pytest.approx(float(scores.sum()), rel=1e-11, abs=1e-10)
        assert greedy is False  # a random model does not produce real text greedily
    # A continuation longer than the window (48): pieces of 48 tokens, each after the 48 tokens before it.
    context, continuation = tokenizer(texts[7][:30])["input_ids"], tokenizer(texts[7][30:500])["input_ids"]
    assert len(continuation) > 2 * 48
    expected = 0.0
    for a in range(0, len(continuation), 48):
        b = min(a + 48, len(continuation))
        expected += float(direct_logprobs(model64, (context + continuation[:b])[-49:])[-(b - a) :].sum())
    [(logp, _)] = lm._loglikelihood_tokens([(("x", "y"), context, continuation)])
    assert logp == pytest.approx(expected, rel=1e-11)
    # The greedy flag: the model's own greedy tokens are greedy; change one and they are not.
    prompt = tokenizer(texts[0][:50])["input_ids"]
    out = model64.generate(torch.tensor([prompt]), max_new_tokens=6, use_cache=False)[0, len(prompt) :].tolist()
    changed = out[:3] + [(out[3] + 1) % 8192] + out[4:]
    alone = tokenizer(texts[1][:50])["input_ids"]
    alone_out = model64.generate(torch.tensor([alone]), 4, use_cache=False)[0, len(alone) :].tolist()
    got = lm._loglikelihood_tokens([(None, prompt, out), (None, prompt, changed), (None, alone, alone_out)])
    assert [greedy for _, greedy in got] == [True, False, True]


def test_multiple_choice_answers_share_one_row(model64, tokenizer, texts):
    """Answers of one question are packed into one row and score as they do alone, with fewer tokens read."""
    lm = PeerlabLM(model=model64, tokenizer=tokenizer, batch_size=2, max_length=48)
    question = texts[8][:90].rstrip()
    answers = [" " + texts[9 + i][: 8 + 9 * i] for i in range(4)]
    pairs = [(question, a) for a in answers] + [(texts[13][:60], texts[13][60:80]), (question[:40], answers[0])]
    encoded = lm.encode_pairs(pairs)
    rows = lm._pack([(None, c, x) for c, x in encoded])
    assert sorted(len(members) for _, members in rows) == [1, 1, 4]  # the four answers in one row
    read = []
    forward = model64.hidden_states
    model64.hidden_states = lambda ids, *a, **k: read.append(ids.numel()) or forward(ids, *a, **k)
    try:
        got = lm.loglikelihood(requests("loglikelihood", pairs))
    finally:
        del model64.hidden_states
    alone = sum(len(c) + len(x) - 1 for c, x in encoded)
    assert sum(read) < alone  # the question is read once, not four times (padding included)
    for (context, continuation), (logp, _) in zip(encoded, got):
        expected = float(direct_logprobs(model64, context + continuation)[-len(continuation) :].sum())
        assert logp == pytest.approx(expected, rel=1e-11)
    assert lm._loglikelihood_tokens([(None, encoded[0][0], []), (None, encoded[0][0], [])]) == [(0.0, True)] * 2
    # An empty continuation after a context longer than the window, batched with a scored request.
    long_context = tokenizer(texts[14])["input_ids"][:100]
    assert len(long_context) == 100  # longer than max_length + 1 = 65
    got = PeerlabLM(model=model64, tokenizer=tokenizer, batch_size=2, max_length=64)._loglikelihood_tokens(
        [(None, long_context, []), (None, long_context[:10], long_context[10:15])]
    )
    assert got[0] == (0.0, True)
    assert got[1][0] == pytest.approx(float(direct_logprobs(model64, long_context[:15])[-5:].sum()), rel=1e-11)
    # Answers too long to share one row of max_length tokens are spread over several rows.
    long_answers = [(question, " " + texts[10 + i][:60]) for i in range(3)]
    encoded = lm.encode_pairs(long_answers)
    assert all(len(c) + len(x) <= 49 for c, x in encoded)  # each fits the window whole, with the same context
    assert len(encoded[0][0]) + sum(len(x) - 1 for _, x in encoded) > 48  # all three do not
    assert len(lm._pack([(None, c, x) for c, x in encoded])) > 1
    for (context, continuation), (logp, _) in zip(encoded, lm.loglikelihood(requests("loglikelihood", long_answers))):
        expected = float(direct_logprobs(model64, context + continuation)[-len(continuation) :].sum())
        assert logp == pytest.approx(expected, rel=1e-11)


def test_requests_are_encoded_as_lm_eval_encodes_them(model64, tokenizer, texts):
    from lm_eval.api.model import TemplateLM

    lm = PeerlabLM(model=model64, tokenizer=tokenizer, batch_size=2, max_length=48)
    pairs = [(texts[0][:50], " " + texts[1][:20]), (texts[0][:50], texts[2][:9]), ("", texts[3][:30])]
    pairs += [("A question?  ", "answer"), ("line\n", "\nnext"), ("   ", "only spaces before"), ("x", "")]
    seen = []
    lm._loglikelihood_tokens = lambda reqs, disable_tqdm=False: seen.extend(reqs) or []
    TemplateLM.loglikelihood(lm, requests("loglikelihood", pairs), disable_tqdm=True)  # one request at a time
    assert lm.encode_pairs(pairs) == [(context, continuation) for _, context, continuation in seen]


def test_scores_are_taken_from_the_logits_in_blocks():
    from peerlab.eval.lm import HEAD_ROWS, _target_logprobs

    torch.manual_seed(0)
    logits = torch.randn(2 * HEAD_ROWS + 5, 300) * 4
    targets = torch.randint(0, 300, (len(logits),))
    targets[::3] = logits[::3].argmax(-1)  # some targets are the greedy choice
    logp, greedy = _target_logprobs(lambda a, b: logits[a:b].clone(), targets)
    expected = torch.log_softmax(logits.double(), -1).gather(1, targets.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(logp, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(greedy, logits.argmax(-1) == targets) and greedy.sum() >= len(logits) // 3
    tie = torch.tensor([[1.0, 3.0, 3.0, 0.5], [1.0, 3.0, 3.0, 0.5]])  # ties go to the first, as lm-eval's argmax
    assert _target_logprobs(lambda a, b: tie[a:b].clone(), torch.tensor([1, 2]))[1].tolist() == [True, False]


def test_rolling_loglikelihood_is_the_sum_over_windows(model64, tokenizer, texts):
    L = 16
    lm = PeerlabLM(model=model64, tokenizer=tokenizer, batch_size=4, max_length=L)
    docs = [texts[0][:400], texts[1][:20], texts[2][:250]]
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in docs]))
    for doc, value in zip(docs, got):
        tokens = [tokenizer.eos_token_id] + tokenizer(doc)["input_ids"]  # predicted: tokens[1:], each once
        n = len(tokens) - 1
        assert n > 2 * L or doc is docs[1]
        expected = 0.0
        for start in range(0, n, L):  # windows of L predictions; each sees up to L tokens of context
            end = min(start + L, n)  # predicts tokens[start + 1 : end + 1]
            window = tokens[max(0, end - L) : end + 1]
            expected += float(direct_logprobs(model64, window)[-(end - start) :].sum())
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-10)
    short = tokenizer(docs[1])["input_ids"]
    assert len(short) < L  # one window: log p(text | end-of-text), one forward pass
    assert got[1] == pytest.approx(float(direct_logprobs(model64, [tokenizer.eos_token_id] + short).sum()), rel=1e-12)


def test_cached_generation_equals_uncached_greedy_decoding(model64, tokenizer, texts):
    prompts = [texts[0][:60], texts[1][:100], texts[2][:60]]
    same = len(tokenizer(prompts[2])["input_ids"])
    prompts.append(next(p for p in (texts[3][:n] for n in range(10, 200)) if len(tokenizer(p)["input_ids"]) == same))
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert lengths[2] == lengths[3] != lengths[1]  # prompts 2 and 3 decode as one batch of two, 1 alone
    expected = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p)["input_ids"]])
        new = model64.generate(ids, max_new_tokens=8, use_cache=False)[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        expected.append(tokenizer.decode(new))
    # A stop string taken from the middle of the first expected text: generation stops there.
    stop = expected[0][len(expected[0]) // 2 : len(expected[0]) // 2 + 3]
    assert stop and stop in expected[0]
    args = [(p, {"until": [stop] if i == 0 else ["\x00never"], "max_gen_toks": 8}) for i, p in enumerate(prompts)]
    args.append((prompts[1], {"until": ["\x00never"], "max_gen_toks": 5}))
    for use_cache in (True, False):
        lm = PeerlabLM(model=model64, tokenizer=tokenizer, batch_size=4, max_length=64, use_cache=use_cache)
        got = lm.generate_until(requests("generate_until", args))
        assert got[0] == expected[0].split(stop)[0]
        assert got[1:4] == expected[1:4]
        five = model64.generate(torch.tensor([tokenizer(prompts[1])["input_ids"]]), 5, use_cache=False)
        assert got[4] == tokenizer.decode(five[0, lengths[1] :].tolist())  # max_gen_toks is honoured


def test_generation_settings_are_read_as_lm_eval_reads_them(model64, tokenizer, texts, tmp_path, caplog):
    """lm-eval's other names for max_gen_toks count; an empty stop string stops nothing; a task that sets no
    max_gen_toks keeps half the window for the prompt (a 64-token model: 32), with a warning when one is cut;
    the request's settings are left as they were, so lm-eval's response cache (keyed on them) finds them."""
    import copy

    from lm_eval.api.model import CachingLM

    def greedy(ids: list[int], new: int) -> str:  # the model's own uncached decoding
        out = model64.generate(torch.tensor([ids]), max_new_tokens=new, use_cache=False)[0, len(ids) :].tolist()
        return tokenizer.decode(out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out)

    short = texts[0][:60]
    long = next(t for t in texts if len(tokenizer(t)["input_ids"]) > 40)
    short_ids, long_ids = tokenizer(short)["input_ids"], tokenizer(long)["input_ids"]
    args = [
        (short, {"until": ["\x00never"], "max_new_tokens": 3}),
        (short, {"until": ["", "\x00never"], "max_gen_toks": 4}),
        (long, {"until": ["\x00never"]}),
    ]
    before = copy.deepcopy([a[1] for a in args])
    lm = PeerlabLM(model=model64, tokenizer=tokenizer, batch_size=4, max_length=64)
    assert lm.max_gen_toks == 32
    with caplog.at_level("WARNING", logger="peerlab.eval"):
        got = lm.generate_until(requests("generate_until", args))
    assert got == [greedy(short_ids, 3), greedy(short_ids, 4), greedy(long_ids[-32:], 32)]
    assert [a[1] for a in args] == before
    assert sum("keeps the last 32 prompt tokens" in r.getMessage() for r in caplog.records) == 1

    cached = CachingLM(lm, str(tmp_path / "cache.db"))
    first = cached.generate_until(requests("generate_until", args))
    lm.greedy = None  # a second pass must come from the cache alone
    assert cached.generate_until(requests("generate_until", args)) == first == got


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


UNICODE = "Naïve café — ünïcode ✓ 🙂 漢字\n\tx = 1;  TWO  spaces\n\n"


@torch.no_grad()
def direct_bits_per_byte(model, tokenizer, texts: list[str], length: int, blocks: int) -> tuple[float, float]:
    """(mean loss, bits per byte) of the packed held-out stream, computed here from scratch in float64.

    The stream: each text's tokens then end-of-text, cut into blocks of `length` (the last one shorter);
    position t of a block predicts token t + 1. Bytes per token: a byte-level BPE token's characters
    are one byte each (GPT-2's byte alphabet); end-of-text counts 0.
    """
    eos = tokenizer.eos_token_id
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    nbytes = {i: len(tokenizer.convert_ids_to_tokens(i)) for doc in docs for i in doc} | {eos: 0}
    assert all(sum(nbytes[i] for i in doc) == len(t.encode("utf-8")) for doc, t in zip(docs, texts))
    stream = [i for doc in docs for i in [*doc, eos]][: length * blocks]
    nll, targets, byte_total = 0.0, 0, 0
    for start in range(0, len(stream), length):
        block = torch.tensor(stream[start : start + length])
        if len(block) < 2:
            continue
        logp = torch.log_softmax(model(block[None, :-1])[0].double(), dim=-1)  # (len - 1, vocab)
        nll -= float(logp.gather(1, block[1:, None]).sum())
        targets += len(block) - 1
        byte_total += sum(nbytes[int(i)] for i in block[1:])
    return nll / targets, nll / math.log(2) / byte_total


def test_heldout_bits_per_byte_against_a_direct_float64_computation(tokenizer, texts, model64, tmp_path):
    """eval_loss and eval_bpb of the fast path against a float64 computation from the model's logits and the
    texts' own bytes: a dataset whose held-out part fills the blocks, and one that ends in a shorter block."""
    from peerlab.config import DatasetConfig, DatasetEntry

    large = texts[:12]
    # About 90 tokens: one block of 64 and a shorter one. UNICODE first, so that its characters split over two
    # tokens all lie inside the first block: the reference counts a byte per token character and peerlab gives a
    # split character to its first token, which agree over a block unless the block starts inside the character
    # (a block's first token is no target). The block boundary then falls in plain ASCII text.
    plain = next(t for t in texts if t.isascii())
    small = [UNICODE, plain[:200]]
    for name, held in (("large", large), ("small", small)):
        write_jsonl(tmp_path / name / "train.jsonl", texts[-3:])
        write_jsonl(tmp_path / name / "heldout.jsonl", held)
    data = DatasetConfig(
        datasets=[DatasetEntry(name=n, path=str(tmp_path / n), text_field="text") for n in ("large", "small")],
        max_seq_length=63,
    )
    blocks = heldout_blocks(data, tokenizer, blocks_per_dataset=6)
    assert blocks["large"].ids.shape == (6, 64) and blocks["small"].ids.shape[0] == 2  # the second one shorter
    out = heldout_loss(model64, blocks, 4, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    for name, held in (("large", large), ("small", small)):
        loss, bpb = direct_bits_per_byte(model64, tokenizer, held, 64, 6)
        assert out[f"eval_loss/{name}"] == pytest.approx(loss, rel=1e-5)
        assert out[f"eval_bpb/{name}"] == pytest.approx(bpb, rel=1e-5)


def train_wordpiece(texts: list[str]):
    """A BERT-style WordPiece (lowercasing, accents stripped, ## continuations, [UNK] for rare characters)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=700, special_tokens=["[UNK]", "[SEP]"], limit_alphabet=50)
    wp.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]", sep_token="[SEP]", eos_token="[SEP]")


def train_sentencepiece_bpe(texts: list[str]):
    """A SentencePiece-style BPE: Metaspace (▁ for spaces) and byte fallback (<0xC3><0xA9>) for rare characters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    sp.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback(), decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]  # in the vocabulary, as SentencePiece has them
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "</s>", *byte_tokens], limit_alphabet=60)
    sp.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", eos_token="</s>")


@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_bytes_of_a_documents_tokens_add_up_to_its_text_for_any_tokenizer(demo_corpus, texts, tmp_path, kind):
    from peerlab.config import DatasetConfig, DatasetEntry
    from peerlab.eval.heldout import document_tokens

    train = [json.loads(line)["text"] for line in (demo_corpus / "prose" / "train.jsonl").open()][:150]
    tok = (train_wordpiece if kind == "wordpiece" else train_sentencepiece_bpe)(train)
    eos = tok.eos_token_id
    cases = [
        *(t[:600] for t in texts[:4]),
        UNICODE,
        "  leading and trailing  \n",
        "CamelCase HTTPServer x=1",
        "   \n\t ",
    ]
    tokens = [t for text in cases for t in tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])]
    hard = ("##", "[UNK]") if kind == "wordpiece" else ("▁", "<0x")
    assert all(any(t.startswith(h) for t in tokens) for h in hard)  # the cases the token strings miscount
    for text in cases:
        ids, nbytes = document_tokens(tok, text, eos)
        assert ids == [*tok(text, add_special_tokens=False)["input_ids"], eos]
        assert sum(nbytes) == len(text.encode("utf-8")) and min(nbytes) >= 0, text
        assert nbytes[-1] == (len(text.encode("utf-8")) if len(ids) == 1 else 0)  # end-of-text: 0 bytes
        assert document_tokens(tok, text, eos, limit=5) == (ids[:5], nbytes[:5])  # what a caller keeps
    # Token by token, against bytes counted from the token strings where they spell the text exactly.
    if kind == "sentencepiece":  # every case: ▁ is a space, <0xNN> one byte; "always" prepends a ▁ (not to a space)
        for text in cases:
            ids, nbytes = document_tokens(tok, text, eos)
            strings = tok.convert_ids_to_tokens(ids[:-1])
            want = [1 if re.fullmatch(r"<0x[0-9A-F]{2}>", t) else len(t.replace("▁", " ").encode()) for t in strings]
            want[0] -= not text.startswith(" ")  # the prepended ▁ stands for no byte of the text
            # Where a token ends on a character boundary both counts agree on the bytes so far (inside a
            # character split over byte tokens, the first of them takes all its bytes)
            raw, got_sum, want_sum = text.encode("utf-8"), np.cumsum(nbytes[:-1]), np.cumsum(want)
            # (not after the prepended ▁ alone, which spells no byte and may share its offsets with the next token)
            boundary = [n > 0 and (w == len(raw) or (raw[w] & 0xC0) != 0x80) for n, w in zip(want, want_sum)]
            assert got_sum[boundary].tolist() == want_sum[boundary].tolist(), text
            assert sum(boundary) > len(strings) // 2
    else:  # lowercase words of the vocabulary's alphabet, one space apart: a word-initial token also takes its space
        words = [w for w in re.findall(r"[a-z]+", " ".join(train).lower()) if len(w) > 3][:300]
        text = " ".join(words)
        ids, nbytes = document_tokens(tok, text, eos)
        strings = tok.convert_ids_to_tokens(ids[:-1])
        assert "[UNK]" not in strings and any(t.startswith("##") for t in strings)
        want = [len(t) - 2 if t.startswith("##") else len(t) + (i > 0) for i, t in enumerate(strings)]
        assert nbytes[:-1] == want
    # Through the held-out blocks: every byte of the held-out text is a target's, but the stream's first token.
    write_jsonl(tmp_path / "d" / "train.jsonl", train[:3])
    write_jsonl(tmp_path / "d" / "heldout.jsonl", cases)
    data = DatasetConfig(datasets=[DatasetEntry(name="d", path=str(tmp_path / "d"), text_field="text")])
    held = heldout_blocks(data, tok, blocks_per_dataset=1)["d"]
    first_end = tok(cases[0], return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"][0][1]
    assert cases[0][:first_end].isalpha() and cases[0][:first_end].isascii()  # the first token: a plain word
    assert held.ids.shape[0] == 1 and held.tokens < held.labels.numel()  # everything in one shorter block
    assert held.nbytes == sum(len(t.encode("utf-8")) for t in cases) - first_end


def test_every_dataset_with_held_out_text_is_evaluated(tokenizer, texts, model64, tmp_path, caplog):
    """Three small local sources (JSON, CSV with a template, text), each with held-out documents adding up
    to less than a block: each is evaluated, warned about, and counted in the means."""
    from peerlab.config import DatasetConfig, DatasetEntry
    from peerlab.data import heldout_texts
    from peerlab.train.worker import with_means

    sentences = [s.strip()[:50] for t in texts for s in t.split(".") if len(s.strip()) > 20][:240]
    (tmp_path / "notes.json").write_text(json.dumps([{"body": s} for s in sentences[:80]]))
    rows = "".join(
        f'"{q.replace(chr(34), "")}","{a.replace(chr(34), "")}"\n'
        for q, a in zip(sentences[80:160:2], sentences[81:160:2])
    )
    (tmp_path / "qa.csv").write_text("question,answer\n" + rows)
    (tmp_path / "lines.txt").write_text("\n".join(s.replace("\n", " ") for s in sentences[160:]) + "\n")
    entries = [
        DatasetEntry(name="notes", path=str(tmp_path / "notes.json"), text_field="body", weight=0.6),
        DatasetEntry(name="qa", path=str(tmp_path / "qa.csv"), text_template="Q: {question}\nA: {answer}", weight=0.3),
        DatasetEntry(name="lines", path=str(tmp_path / "lines.txt"), text_field="text", weight=0.1),
    ]
    data = DatasetConfig(datasets=entries, max_seq_length=63, heldout_fraction=0.04)
    assert all(heldout_texts(e, 0.04) for e in entries)  # each has held-out documents...
    with caplog.at_level(logging.WARNING, logger="peerlab.eval"):
        blocks = heldout_blocks(data, tokenizer)
    assert all(blocks[e.name].tokens < 64 for e in entries), {n: b.tokens for n, b in blocks.items()}
    for e in entries:
        assert any(f"dataset '{e.name}'" in r.message and "only" in r.message for r in caplog.records)
    out = with_means(heldout_loss(model64, blocks, 8, torch.device("cpu"), torch.autocast("cpu", enabled=False)))
    per_dataset = [out[f"eval_bpb/{e.name}"] for e in entries]
    assert out["eval_bpb/mean"] == pytest.approx(sum(per_dataset) / 3)
    for e in entries:
        _, bpb = direct_bits_per_byte(model64, tokenizer, heldout_texts(e, 0.04), 64, 8)
        assert out[f"eval_bpb/{e.name}"] == pytest.approx(bpb, rel=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peerlab.eval"):  # nothing held out: said, with the fix
        assert heldout_blocks(DatasetConfig(datasets=entries[:1], heldout_fraction=0), tokenizer) == {}
    assert any("'notes' has no held-out text" in r.message and "heldout_fraction" in r.message for r in caplog.records)


# --------------------------------------------------------------------------------------
# The offline tasks through lm-eval
# --------------------------------------------------------------------------------------


def test_simple_evaluate_on_the_offline_tasks_from_another_directory(
    model64, tokenizer, demo_corpus, tmp_path, monkeypatch
):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)  # task YAML and data found without the repository as working directory
    lm = PeerlabLM(model=model64, tokenizer=tokenizer, batch_size=8, max_length=64)
    manager = TaskManager(
        include_path=str(REGISTRY), include_defaults=False, metadata={"peerlab_eval_data": str(demo_corpus / "evals")}
    )
    results = lm_eval.simple_evaluate(model=lm, tasks=OFFLINE_TASKS, task_manager=manager, limit=6, bootstrap_iters=0)
    res = results["results"]
    for domain in DOMAINS:
        bpb = res[f"peerlab_bpb_{domain}"]["bits_per_byte,none"]
        assert math.isfinite(bpb) and 1.0 < bpb < 20.0
    assert 0.0 <= res["peerlab_heldout_mc"]["acc,none"] <= 1.0
    # lm-eval's bits per byte is the adapter's rolling log-likelihood over the documents' UTF-8 bytes.
    rows = [json.loads(x) for x in (demo_corpus / "evals" / "bpb_prose.jsonl").read_text().splitlines()][:6]
    logp = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(r["text"],) for r in rows]))
    nbytes = sum(len(r["text"].encode("utf-8")) for r in rows)
    assert res["peerlab_bpb_prose"]["bits_per_byte,none"] == pytest.approx(-sum(logp) / math.log(2) / nbytes)


def test_the_demo_task_data_is_deterministic_and_from_heldout_text_only(demo_corpus, tmp_path):
    from peerlab.data.corpus import eval_task_rows

    first, again = eval_task_rows(demo_corpus), eval_task_rows(demo_corpus)
    assert first == again
    heldout = "\n".join(
        json.loads(line)["text"]
        for d in DOMAINS
        for line in (demo_corpus / d / "heldout.jsonl").read_text().splitlines()
    )

    def from_heldout(text: str) -> bool:  # passages are re-joined at blank lines: compare line by line
        return all(line in heldout for line in text.splitlines())

    for domain in DOMAINS:
        rows = first[f"bpb_{domain}.jsonl"]
        assert 16 <= len(rows) <= 64
        assert all(from_heldout(r["text"]) for r in rows)
    mc = first["heldout_mc.jsonl"]
    assert 60 <= len(mc) <= 120
    assert all(len(r["endings"]) == 4 and len(set(r["endings"])) == 4 for r in mc)
    assert all(from_heldout(r["context"] + " " + r["endings"][r["label"]]) for r in mc)
    assert len({r["label"] for r in mc}) == 4  # the true ending is not always in one place


def test_unavailable_tasks_are_skipped_with_one_warning_each(model64, tokenizer, demo_corpus, tmp_path, caplog):
    lm = PeerlabLM(model=model64, tokenizer=tokenizer, batch_size=8, max_length=64)
    with caplog.at_level(logging.WARNING, logger="peerlab.eval"):
        out = run_lm_eval(lm, ["hellaswag", "peerlab_bpb_prose"], REGISTRY, demo_corpus / "evals", limit=2)
    assert list(out.skipped) == ["hellaswag"]
    lines = [r.getMessage() for r in caplog.records if r.name == "peerlab.eval" and r.levelno == logging.WARNING]
    assert len(lines) == 1 and "'hellaswag'" in lines[0] and "hub" in lines[0] and "HF cache" in lines[0]
    assert {r["task"] for r in out.rows} == {"peerlab_bpb_prose"}
    # The registry's own task without its data file: skipped, and the line says how to write it.
    out = run_lm_eval(lm, ["peerlab_heldout_mc", "peerlab_bpb_prose"], REGISTRY, tmp_path / "empty", limit=2)
    assert set(out.skipped) == {"peerlab_heldout_mc", "peerlab_bpb_prose"} and not out.rows
    assert "experiments/prepare_data.py" in out.skipped["peerlab_heldout_mc"]


def test_eval_config_keys_are_checked(demo_corpus):
    from peerlab.config import ConfigError

    cfg = tiny(demo_corpus, "eval_config.lm_eval_steps=50", "eval_config.lm_eval_limit=10")
    assert cfg.eval_config.lm_eval_steps == 50 and cfg.eval_config.confirm_run_unsafe_code is False
    for bad, message in (
        ("eval_config.lm_eval_steps=0", r"eval_config.lm_eval_steps .*must be > 0"),
        ("eval_config.lm_eval_limit=-1", r"eval_config.lm_eval_limit .*must be > 0"),
        ("eval_config.lm_eval_step=5", "did you mean 'lm_eval_steps'"),
    ):
        with pytest.raises(ConfigError, match=message):
            tiny(demo_corpus, bad)


def test_bad_input_gives_one_line_errors(tmp_path):
    with pytest.raises(EvalError, match=r"unknown lm-eval task 'peerlab_bpb_prse'.*did you mean 'peerlab_bpb_prose'"):
        task_manager(["peerlab_bpb_prse"], REGISTRY)
    with pytest.raises(EvalError, match="does not exist"):
        PeerlabLM(checkpoint=str(tmp_path / "nowhere"))
    with pytest.raises(EvalError, match="neither a checkpoint folder"):
        PeerlabLM(checkpoint=str(tmp_path))
    with pytest.raises(EvalError, match="is not a folder of lm-eval task YAML"):
        task_manager(["peerlab_bpb_prose"], tmp_path / "no-registry")


# --------------------------------------------------------------------------------------
# In training, from a checkpoint, from the command line
# --------------------------------------------------------------------------------------


def eval_settings(demo_corpus: Path, *extra: str) -> list[str]:
    return [
        "eval_config.evals=[peerlab_bpb_prose, peerlab_heldout_mc]",
        f"eval_config.evals_registry_path={REGISTRY}",
        f"eval_config.eval_data_dir={demo_corpus / 'evals'}",
        "eval_config.lm_eval_limit=4",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(demo_corpus, tmp_path_factory) -> Path:
    """A tiny run with lm-eval every 3 steps and at the end (6 steps)."""
    run_dir = tmp_path_factory.mktemp("eval-run") / "run"
    cfg = tiny(demo_corpus, *eval_settings(demo_corpus, "eval_config.lm_eval_steps=3"))
    from peerlab.train.launch import write_resolved_config

    write_resolved_config(cfg, run_dir)
    run(cfg, run_dir)
    return run_dir


def test_training_runs_lm_eval_every_lm_eval_steps_and_at_the_end(trained, demo_corpus, tmp_path):
    rows = read_evals(trained)
    assert rows and all(list(r) == ["step", "task", "metric", "value", "stderr"] for r in rows)
    assert sorted({r["step"] for r in rows}) == [3, 6]
    at_end = {(r["task"], r["metric"]): r for r in rows if r["step"] == 6}
    assert math.isfinite(at_end[("peerlab_bpb_prose", "bits_per_byte")]["value"])
    assert 0 <= at_end[("peerlab_heldout_mc", "acc")]["value"] <= 1
    assert at_end[("peerlab_heldout_mc", "acc")]["stderr"] > 0
    assert any("eval_bpb/prose" in r for r in read_metrics(trained))
    # lm-eval reseeds the generators; the loop puts them back: the losses equal a run without lm-eval.
    run(tiny(demo_corpus), tmp_path / "plain")
    assert losses(trained) == losses(tmp_path / "plain")
    assert not (tmp_path / "plain" / "evals.jsonl").exists()  # evals: [] means no lm-eval


def test_lm_eval_results_reach_wandb(demo_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny(
        demo_corpus, *eval_settings(demo_corpus, "eval_config.lm_eval_limit=2"), "wandb_config.project=t", steps=2
    )
    run(cfg, tmp_path / "wb")
    path = next(next((tmp_path / "wb" / "wandb").glob("offline-run-*")).glob("run-*.wandb"))
    wanted = (b"lm_eval/peerlab_bpb_prose/bits_per_byte", b"lm_eval/peerlab_heldout_mc/acc")
    deadline = time.time() + 20  # wandb's writer (its own process) may still be flushing the offline file
    while not all(key in path.read_bytes() for key in wanted) and time.time() < deadline:
        time.sleep(0.5)
    record = path.read_bytes()
    assert all(key in record for key in wanted), record[:200]


def test_evaluating_a_checkpoint_appends_to_the_run(trained, demo_corpus, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "experiments"))
    import evaluate

    before = read_evals(trained)
    folder = trained / "checkpoints" / "step-000006"  # the demo config keeps the newest checkpoint only
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["--checkpoint", str(folder), "--tasks", "peerlab_bpb_prose", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "bits_per_byte" in out and "appended" in out
    after = read_evals(trained)
    assert after[: len(before)] == before  # appended, never rewritten
    new = after[len(before) :]
    assert {r["step"] for r in new} == {6} and {r["task"] for r in new} == {"peerlab_bpb_prose"}
    # The run folder means its newest checkpoint (step 6); the model loads with the run's tokenizer.
    lm = PeerlabLM(checkpoint=str(trained))
    assert lm.step == 6 and lm.max_length == 64
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(tmp_path / "nope"), "--tasks", "peerlab_bpb_prose"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0  # one line
    # A run whose config no longer describes its weights: one line that says so, not torch's traceback.
    edited = tmp_path / "edited"
    shutil.copytree(trained, edited)
    config = edited / "resolved_config.yaml"
    config.write_text(re.sub(r"hidden_size: \d+", "hidden_size: 48", config.read_text(), count=1))
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", str(edited), "--tasks", "peerlab_bpb_prose"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and "do not fit" in err, err


def test_console_script_hands_everything_to_lm_eval(trained, demo_corpus, tmp_path, capsys, monkeypatch):
    script = Path(sys.executable).parent / "peerlab-lm-eval"
    common = ["--model", "peerlab", "--tasks", "peerlab_bpb_prose", "--include_path", str(REGISTRY)]
    common += ["--limit", "2", "--metadata", json.dumps({"peerlab_eval_data": str(demo_corpus / "evals")})]
    done = subprocess.run(
        [str(script), *common, "--model_args", f"checkpoint={trained}", "--batch_size", "4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "peerlab_bpb_prose" in done.stdout and "bits_per_byte" in done.stdout
    # A missing checkpoint: one line, exit 2. The same main() the script runs, in this process (a second
    # subprocess would spend its time importing lm-eval).
    from peerlab.eval.command import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(script), *common, "--model_args", f"checkpoint={tmp_path / 'nope'}"])
    with pytest.raises(SystemExit) as missing:
        main()
    assert missing.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: checkpoint")


def test_the_console_script_finds_the_checkpoint_in_lm_evals_arguments():
    from peerlab.eval.command import checkpoint_argument

    assert checkpoint_argument(["--model", "peerlab", "--model_args", "checkpoint=/a/b,batch_size=2"]) == "/a/b"
    assert checkpoint_argument(["--model=peerlab", '--model_args={"checkpoint": "/c", "max_length": 64}']) == "/c"
    assert checkpoint_argument(["--model", "hf", "--model_args", "pretrained=gpt2"]) is None  # not ours
    assert checkpoint_argument(["--model", "peerlab", "--model_args", "{broken"]) is None  # lm-eval says why
