"""The lm-eval adapter: the PEER/MLA model and its tokenizer as an `lm_eval` model named `peerlab`.

`PeerlabLM(checkpoint=PATH)` loads a run's checkpoint (a checkpoint folder, or a run folder:
its newest checkpoint) with the run's `resolved_config.yaml`; `PeerlabLM(model=m, tokenizer=t)`
wraps a model in memory (the training loop's). The three request types of lm-eval:

- `loglikelihood(context, continuation)`: log p(continuation | context) = sum_i log p(c_i | context, c_<i),
  and whether greedy decoding would produce the continuation (every c_i the argmax, the first on
  ties, as in lm-eval's HFLM);
- `loglikelihood_rolling(text)`: log p(text | end-of-text) over windows of `max_length` tokens
  (lm-eval's `get_rolling_token_windows` with context_len = 1: each token is predicted once, and
  the last window is filled up with earlier tokens as context, as `LM.loglikelihood_rolling` documents);
- `generate_until(context, {until, max_gen_toks})`: greedy decoding through the MLA latent cache,
  stopped at end-of-text, at any `until` string (cut off the returned text) or after `max_gen_toks`.

Loglikelihood requests that share their context (the answers of a multiple-choice question)
are packed into one row: the context once, then each continuation, each seeing the context and
itself only (`_pack`); that reads about half the tokens on 4-way multiple choice. Rows are
sorted by length (longest first) and batched by `batch_size` rows, so a batch pads little
(rolling windows go the same way; `generate_until` is sorted and batched by lm-eval's
`Collator`). The last block's feed-forward and the LM head run only at the positions that are
scored (the LM head at the last position when generating), never over the whole padded
(B, T, vocab) block.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from torch import nn
from tqdm import tqdm

log = logging.getLogger("peerlab.eval")


class EvalError(ValueError):
    """Evaluation cannot start (a missing checkpoint, an unknown task); the message says why in one line."""


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, run folder) for a checkpoint folder, or a run's (or its checkpoints/ folder's) newest."""
    from peerlab.train import checkpoint as ckpt

    try:
        folder = ckpt.resolve(path)
    except ckpt.CheckpointError as err:
        raise EvalError(str(err)) from None
    return folder, folder.parent.parent  # <run>/checkpoints/step-NNNNNN


def load_checkpoint(path: str | Path):
    """(model in eval mode, tokenizer, Config, step, run folder) of a checkpoint or a run's newest one."""
    from safetensors.torch import load_file

    from peerlab.config import ConfigError, config_from_dict, read_yaml
    from peerlab.data.tokenizer import load_tokenizer
    from peerlab.model import build_model
    from peerlab.train import checkpoint as ckpt

    folder, run_dir = find_checkpoint(path)
    config_path = run_dir / "resolved_config.yaml"
    if not config_path.is_file():
        raise EvalError(f"no resolved_config.yaml in {run_dir} (the run folder two levels above {folder})")
    try:
        cfg = config_from_dict(read_yaml(config_path), str(config_path))
        manifest = ckpt.verify(folder)
    except (ConfigError, ckpt.CheckpointError) as err:
        raise EvalError(str(err)) from None
    model = build_model(cfg.model_config)
    try:
        model.load_state_dict(load_file(folder / "model.safetensors"))
    except RuntimeError as err:  # a checkpoint of another model than its run's config describes
        first = " ".join(str(err).split())[:300]
        raise EvalError(f"{folder}: the weights do not fit {config_path}'s model_config ({first})") from None
    model.eval()
    return model, load_tokenizer(cfg.dataset_config.tokenizer_name), cfg, int(manifest["step"]), run_dir


HEAD_ROWS = 64  # positions whose logits are scored at a time (64 x a 32k vocabulary in float32: 8 MiB)


def _target_logprobs(logits_of, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p (N,) of each target token and whether it is greedy (N,) bool: the argmax, as in lm-eval.

    logits_of(a, b) gives the logits (b - a, vocab) of positions a..b-1; they are taken
    `HEAD_ROWS` at a time, so each block is read from cache by the passes below, and no
    log-softmax of all N positions is built. log p = z_t - m - log sum exp(z - m) with m the
    largest logit. A max decides greedy where the target's logit is below it; an argmax (first
    index wins on ties, several times slower than a max on CPUs) runs only on the rows where it
    equals it.
    """
    logp = torch.empty(len(targets), dtype=torch.float64, device=targets.device)  # holds float32 or float64 exactly
    greedy = torch.empty(len(targets), dtype=torch.bool, device=targets.device)
    for a in range(0, len(targets), HEAD_ROWS):
        b = min(a + HEAD_ROWS, len(targets))
        z = logits_of(a, b)  # (n, vocab)
        if z.dtype != torch.float64:
            z = z.float()
        top = z.amax(-1, keepdim=True)  # (n, 1)
        target = z.gather(1, targets[a:b].unsqueeze(1))  # (n, 1)
        hit = (target >= top).squeeze(1)  # (n,): the target's logit is the largest
        if hit.any():  # ties: lm-eval's argmax takes the first of them
            rows = hit.nonzero().squeeze(1)
            hit[rows] = z[rows].argmax(-1) == targets[a:b][rows]
        greedy[a:b] = hit
        lse = z.sub_(top).exp_().sum(-1, keepdim=True).log_()  # (n, 1), in place: z is not needed after
        logp[a:b] = (target - top - lse).squeeze(1)
    return logp, greedy


def _row_width(requests, context, members) -> int:
    """Tokens of a packed row: the context, then each member's continuation but its last token."""
    return len(context) + sum(max(len(requests[j][2]) - 1, 0) for j in members)


def _batch_size(value) -> int:
    """lm-eval passes batch sizes as ints or strings ("16", "auto", "auto:4"); auto means 16 here."""
    if value is None or str(value).startswith("auto"):
        return 16
    size = int(value)
    if size < 1:
        raise EvalError(f"batch_size must be >= 1, got {size}")
    return size


@register_model("peerlab")
class PeerlabLM(TemplateLM):
    """lm-eval's model interface over a PeerMLAModel; see the module docstring."""

    def __init__(
        self,
        checkpoint: str | None = None,
        model: nn.Module | None = None,
        tokenizer=None,
        batch_size: int | str | None = 16,
        max_length: int | str | None = None,
        max_gen_toks: int | str | None = None,
        device: str | None = None,
        use_cache: bool | str = True,
        autocast=None,
        max_batch_size=None,  # passed by lm-eval's command line; batches are fixed here
    ):
        super().__init__()
        from peerlab.data.tokenizer import eos_id

        self.step, self.run_dir, self.config = None, None, None
        if checkpoint is not None:
            if model is not None:
                raise EvalError("give either checkpoint=PATH or an in-memory model, not both")
            model, tokenizer, self.config, self.step, self.run_dir = load_checkpoint(checkpoint)
            if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                log.warning("device %s is not available here; evaluating on the CPU", device)  # lm-eval's default
                device = "cpu"
            if device:
                model = model.to(device)
        elif model is None or tokenizer is None:
            raise EvalError("PeerlabLM needs checkpoint=PATH, or model= and tokenizer=")
        self.model = model
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = _batch_size(batch_size)
        inner = getattr(model, "config", None)
        longest = inner.max_position_embeddings if inner is not None else None
        if max_length is None:  # the context the model was trained on, else all its positions
            max_length = self.config.dataset_config.max_seq_length if self.config is not None else longest
        if max_length is None:
            raise EvalError("max_length is needed for a model without a config")
        self.max_length = int(max_length)
        if longest is not None and self.max_length > longest:
            raise EvalError(f"max_length {self.max_length} is longer than max_position_embeddings = {longest}")
        # A task that does not say how many tokens to generate gets 256 (lm-eval's default), at most half the
        # window: a 256-token model would otherwise be left one prompt token to generate from.
        self.max_gen_toks = int(max_gen_toks) if max_gen_toks is not None else min(256, self.max_length // 2)
        self._warned_prompt_cut = False
        self.use_cache = str(use_cache).lower() not in ("false", "0", "no")
        self.autocast = autocast if autocast is not None else contextlib.nullcontext()
        eot = eos_id(tokenizer)
        if eot is None:
            raise EvalError("the tokenizer has no end-of-text token")
        self._eot = eot
        from torch.distributed.fsdp import FSDPModule

        self._sharded = isinstance(model, FSDPModule)  # FSDP2: call the root's forward so it gathers its parameters
        self._warned_truncation = False

    # ----------------------------------------------------------------------------------- tokens
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "peerlab")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids without special tokens (training joins documents with end-of-text only)."""
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ----------------------------------------------------------------------------------- model calls
    def _scored(self, ids, rows, cols, targets, segments=None) -> tuple[torch.Tensor, torch.Tensor]:
        """log p of each target and whether it is the greedy choice, at the given positions.

        ids (B, T); rows, cols, targets (N,): the next-token distribution at ids[rows, cols] and
        the token it is asked for. Returns log p (N,) and greedy (N,) bool: the target is the argmax.
        segments (B, T): packed rows (`PeerMLAModel.hidden_states`); None for plain causal rows.
        """
        with self.autocast:
            if self._sharded:  # FSDP2: through the root's forward, which gathers the parameters
                logits = self.model(ids, segments=segments, at=(rows, cols))  # (N, vocab)
                return _target_logprobs(lambda a, b: logits[a:b], targets)
            # the last feed-forward and the head only where scored
            h = self.model.hidden_states(ids, segments=segments, at=(rows, cols))  # (N, d)
            return _target_logprobs(lambda a, b: self.model.lm_head(h[a:b]), targets)

    def _last_logits(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """The next-token logits (B, vocab) after ids (B, T), through the cache when given."""
        with self.autocast:
            if self._sharded:
                return self.model(ids, cache)[:, -1]
            return self.model.lm_head(self.model.hidden_states(ids, cache)[:, -1])

    # ----------------------------------------------------------------------------------- loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's `TemplateLM.loglikelihood`, the requests tokenized in two batch calls (`encode_pairs`)."""
        pairs = [req.args for req in requests]
        encoded = self.encode_pairs(pairs)
        return self._loglikelihood_tokens(
            [(pair, context, continuation) for pair, (context, continuation) in zip(pairs, encoded)], disable_tqdm
        )

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
        """(context, continuation) strings -> token ids, exactly as `TemplateLM` encodes them one by one.

        A context's trailing spaces move to its continuation; context + continuation is encoded
        whole and split after the context's own tokens (`TemplateLM._encode_pair`); an empty
        context becomes end-of-text (`TemplateLM.loglikelihood`). Here the wholes and the
        distinct contexts (a multiple-choice question repeats its own for every answer) go to
        the fast tokenizer in one batch call each.
        """
        moved = []
        for context, continuation in pairs:
            spaces = len(context) - len(context.rstrip())
            moved.append((context[: len(context) - spaces], context[len(context) - spaces :] + continuation))
        contexts = sorted({context for context, _ in moved if context})
        wholes = [context + continuation for context, continuation in moved]
        context_ids = dict(zip(contexts, self._encode_batch(contexts)))
        out = []
        for (original, _), (context, continuation), whole in zip(pairs, moved, self._encode_batch(wholes)):
            if original == "":  # TemplateLM: end-of-text as the context, unless the continuation starts with it
                ids = self.tok_encode(continuation)
                out.append(([self.prefix_token_id], ids) if ids[:1] != [self.prefix_token_id] else (ids[:1], ids[1:]))
            else:
                context_enc = context_ids[context] if context else []
                out.append((context_enc, whole[len(context_enc) :]))
        return out

    def _encode_batch(self, strings: list[str]) -> list[list[int]]:
        if not strings:
            return []
        return self.tokenizer(strings, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (request strings or None, context ids, continuation ids) -> (log p, greedy) each.

        A continuation longer than `max_length` is scored in pieces of at most `max_length`
        tokens, each piece seeing the `max_length` tokens before it (as rolling windows do);
        its log p is the sum over the pieces, greedy when every piece is.
        """
        pieces, owners = [], []
        for k, (key, context, continuation) in enumerate(requests):
            whole = len(continuation) <= self.max_length  # one piece: _score caches it under its request
            for a in range(0, max(len(continuation), 1), self.max_length):
                b = min(a + self.max_length, len(continuation))
                pieces.append((key if whole else None, context + continuation[:a], continuation[a:b]))
                owners.append(k)
        scores = self._score(pieces, disable_tqdm)
        if len(pieces) == len(requests):
            return scores
        totals = [[0.0, True] for _ in requests]
        for k, (logp, greedy) in zip(owners, scores):
            totals[k][0] += logp
            totals[k][1] = totals[k][1] and greedy
        out = [(logp, greedy) for logp, greedy in totals]
        for (key, _, continuation), answer in zip(requests, out):
            if key is not None and len(continuation) > self.max_length:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def _score(self, requests, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Requests whose continuation fits the window, packed into rows and batched: (log p, greedy) each."""
        was_training = self.model.training
        self.model.eval()
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood (peerlab)")
        rows = self._pack(requests)
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b : b + self.batch_size]
            width = _row_width(requests, *batch[0])  # rows come longest first
            ids = torch.full((len(batch), width), self._eot, dtype=torch.long)  # right-padded
            segments = torch.zeros((len(batch), width), dtype=torch.long)
            at, cols, targets, spans = [], [], [], []  # scored (row, position), next tokens, each request's share
            for i, (context, members) in enumerate(batch):
                ids[i, : len(context)] = torch.tensor(context, dtype=torch.long)
                end = len(context)
                for s, j in enumerate(members, start=1):
                    continuation = requests[j][2]
                    inputs = continuation[:-1]  # the last token is predicted, never read
                    ids[i, end : end + len(inputs)] = torch.tensor(inputs, dtype=torch.long)
                    segments[i, end : end + len(inputs)] = s
                    if continuation:  # the context's last position predicts its first token
                        at += [i] * len(continuation)
                        cols += [len(context) - 1, *range(end, end + len(inputs))]
                        targets += continuation
                    spans.append((j, len(continuation)))
                    end += len(inputs)
                # padding: a segment of its own for each token, so it sits at a valid position
                segments[i, end:] = torch.arange(len(members) + 1, len(members) + 1 + width - end)
            packed = any(len(members) > 1 for _, members in batch)
            if not targets:  # empty continuations only: log p = 0, greedy
                chosen, hits = torch.zeros(0, dtype=torch.float64), torch.ones(0, dtype=torch.bool)
            else:
                chosen, hits = self._scored(
                    ids.to(self.device),
                    torch.tensor(at, device=self.device),
                    torch.tensor(cols, device=self.device),
                    torch.tensor(targets, device=self.device),
                    segments.to(self.device) if packed else None,  # one request a row: plain causal rows
                )  # (N,) each
            start = 0
            for j, n in spans:
                answer = (float(chosen[start : start + n].sum()), bool(hits[start : start + n].all()))
                start += n
                out[j] = answer
                if requests[j][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[j][0], answer)
                bar.update(1)
        bar.close()
        self.model.train(was_training)
        return out

    def _pack(self, requests) -> list[tuple[list[int], list[int]]]:
        """Rows of requests that share their context: (context, [request index, ...]), longest first.

        A multiple-choice question asks for log p(answer | question) for each of its answers:
        one row holds the question's tokens once and then each answer but its last token
        (`PeerMLAModel.hidden_states` with segments: every answer sees the question and itself
        only). A row stays within `max_length` tokens, so a batch of `batch_size` rows is no
        larger than one of unpacked requests; a request with a context of its own is a row by
        itself, as before. Contexts are compared after the window's cut (see `_cut`).
        """
        by_context: dict[tuple, list[int]] = {}
        for j, (_, context, continuation) in enumerate(requests):
            by_context.setdefault(tuple(self._cut(context, continuation)), []).append(j)
        rows = []
        for context, members in by_context.items():
            row = []
            for j in members:
                if row and _row_width(requests, context, row + [j]) > self.max_length:
                    rows.append((list(context), row))
                    row = []
                row.append(j)
            rows.append((list(context), row))
        return sorted(rows, key=lambda r: (-_row_width(requests, *r), r[0]))

    def _cut(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context tokens the window keeps (the input is the last max_length + 1 of context + continuation)."""
        if not context:  # a context of spaces only: after end-of-text, as lm-eval scores an empty one
            return [self._eot]
        # >= 1: a continuation longer than the window comes in pieces; an empty one still predicts nothing
        keep = self.max_length + 1 - max(len(continuation), 1)
        if len(context) > keep:
            if not self._warned_truncation:
                log.warning("requests longer than %d tokens lose their first tokens", self.max_length + 1)
                self._warned_truncation = True
            return context[-keep:]
        return context

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) per request: the sum over its rolling windows, all windows batched together."""
        windows, owners = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(k)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owners, scores):
            totals[k] += logp
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ----------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int, stops: list[str]) -> list[list[int]]:
        """Greedy continuations of equally long prompts (B lists of T ids), each stopped at end-of-text or a stop string."""
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)  # (B, T)
        B, T = ids.shape
        cache = self.model.new_cache(B, T + max_new_tokens) if self.use_cache else None
        generated = [[] for _ in range(B)]
        done = [False] * B
        step_input, sequence = ids, ids
        for _ in range(max_new_tokens):
            logits = self._last_logits(step_input if self.use_cache else sequence, cache)  # (B, vocab)
            next_token = logits.argmax(-1)  # (B,)
            for b, token in enumerate(next_token.tolist()):
                if done[b]:
                    continue
                if token == self._eot:
                    done[b] = True
                    continue
                generated[b].append(token)
                if stops and any(s in self.tok_decode(generated[b][-64:]) for s in stops):
                    done[b] = True
            if all(done):
                break
            step_input = next_token.unsqueeze(1)  # (B, 1)
            sequence = torch.cat((sequence, step_input), dim=1)  # (B, T + steps): only the uncached path reads it
        return generated

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy text after each context, cut at the first `until` string; batches of equally long prompts."""
        was_training = self.model.training
        self.model.eval()
        eos_text = self.tok_decode([self._eot])
        encoded = [(self.tok_encode(context), context, kwargs) for context, kwargs in (r.args for r in requests)]
        collator = Collator(
            encoded, sort_fn=lambda e: (-len(e[0]), tuple(e[0])), group_fn=lambda e: e[2], group_by="gen_kwargs"
        )
        out = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until (peerlab)")
        for chunk in collator.get_batched(n=self.batch_size):
            # lm-eval's reading of the settings: a deep copy (the request's own `until` stays as it is, as its
            # cache key was hashed from it) and max_gen_toks from any of its aliases (max_new_tokens, ...)
            kwargs = normalize_gen_kwargs(chunk[0][2], self.max_gen_toks)
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
                log.warning("peerlab decodes greedily; sampling settings %s are ignored", kwargs)
            until = [s for s in handle_stop_sequences(kwargs.get("until"), eos=eos_text) if s]  # "" stops nothing
            max_new = min(int(kwargs["max_gen_toks"]), self.max_length - 1)
            keep = self.max_length - max_new  # prompt tokens the window holds beside the generated ones
            if not self._warned_prompt_cut and any(len(e[0]) > keep for e in chunk):
                self._warned_prompt_cut = True
                log.warning(
                    "generate_until keeps the last %d prompt tokens (max_length %d less %d tokens to generate); "
                    "a lower max_gen_toks (the task's gen_kwargs, or model_args) keeps more",
                    keep,
                    self.max_length,
                    max_new,
                )
            prompts = [e[0][-keep:] or [self._eot] for e in chunk]
            start = 0
            while start < len(prompts):  # runs of equal length decode together (no padding in the cache)
                end = start
                while end < len(prompts) and len(prompts[end]) == len(prompts[start]):
                    end += 1
                for tokens in self.greedy(prompts[start:end], max_new, until):
                    text = self.tok_decode(tokens)
                    for stop in until:
                        text = text.split(stop)[0]
                    out.append(text)
                start = end
            for (_, context, kw), text in zip(chunk, out[-len(chunk) :]):
                self.cache_hook.add_partial("generate_until", (context, kw), text)
            bar.update(len(chunk))
        bar.close()
        self.model.train(was_training)
        return collator.get_original(out)
