"""The training stream: datasets mixed by weight at the token level, packed, seeded, resumable.

Each dataset of a mix is a `SourceStream`: a Ray Data pipeline that reads the dataset's
documents (`peerlab.data.sources`), tokenises them in Ray tasks (`tokenize_table`) and
hands them, in their fixed order, to a `Packer` that cuts blocks of `max_seq_length + 1`
tokens. Every block comes from one dataset, so a dataset's share of training tokens is its
share of blocks.

`DataMixture` picks the dataset of each next block by the deficit rule: the dataset whose
blocks so far fall furthest below its normalised weight times the blocks drawn (ties
broken in a seeded order). On every worker, after n blocks each dataset's count is within
one block of weight x n. Worker r of W reads the documents whose running index in the pass
`peerlab.data.sources.worker_of` gives it (one of each W consecutive numbers, in a seeded
order), so workers see different text, each about 1/W of it, and need no coordination.

A finite dataset that runs out starts another pass (its files in a new seeded order, the
pass logged and counted); a dataset with no text at all is an error. `state_dict()` holds,
for every dataset, the pass, the (file, row) and running index of the document the next
block starts in and how many of its tokens were already used, plus the block counts; a
stream built with that state gives exactly the blocks the uninterrupted stream would have
given next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch

from peerlab.config import DatasetEntry
from peerlab.data.packing import Packer
from peerlab.data.sources import DataError, Selection, is_local, make_datasource, tokenized_stream
from peerlab.data.tokenizer import cached_tokenizer, encoder_spec, eos_id

log = logging.getLogger("peerlab.data")
SHARES = "runs of W"  # how workers share a pass (sources.worker_of), kept with a saved position
# Bytes of token ids per Ray Data block. Ray Data joins what a read task yields into blocks of up to
# DataContext.target_max_block_size (128 MiB by default), so each block, the first included, would
# wait for tens of millions of tokens. A few tables a block keep the stream moving (BENCHMARKS.md,
# "Data pipeline"); a stream's first documents come from its head (HEAD_TOKENS below), not from Ray Data.
BLOCK_BYTES = int(os.environ.get("PEERLAB_DATA_BLOCK_BYTES", str(1 << 20)))
# Blocks the read task may yield ahead of its execution's consumption (Ray Data's default is 2).
READ_AHEAD_BLOCKS = int(os.environ.get("PEERLAB_DATA_READ_AHEAD", "2"))
BUFFER_BLOCKS = 4  # the object-store budget of a stream's execution, in blocks (Ray may exceed it to keep moving)
# Tokens of a local dataset's first documents that its stream reads and tokenises in this process, while
# Ray Data starts its read task (a new Ray worker process, seconds) at the document after them: training
# starts on them at once. 0: every document through Ray Data.
HEAD_TOKENS = int(os.environ.get("PEERLAB_DATA_HEAD_TOKENS", "32768"))
PREFETCH_BLOCKS = 2  # blocks the training process fetches ahead of its packer
# Each read task tokenises on one thread: the read tasks of all streams run side by side, one a core,
# which beat each task's own tokenizer thread pool fighting the others for the same cores (BENCHMARKS.md).
READ_TASK_ENV = {"TOKENIZERS_PARALLELISM": os.environ.get("PEERLAB_DATA_TOKENIZERS_PARALLELISM", "false")}


@dataclass
class SourcePosition:
    """Where a dataset's stream stands: plain numbers, saved in checkpoints as JSON."""

    passes: int = 0  # completed passes over the dataset before the document the next block starts in
    file: int = 0  # ordinal of that document's file in its pass's (seeded) file order
    row: int = 0  # that document's record number in its file
    # That document's running index in the pass (it decides the worker). Saved positions without it
    # (written before workers shared passes by this index) load with 0: exact on one worker.
    index: int = 0
    offset: int = 0  # tokens of that document (with its end-of-text token) already used
    blocks: int = 0  # blocks drawn from this dataset so far
    skipped: int = 0  # bad records skipped so far (skip_bad_records: true)


@dataclass
class DataOptions:
    """How streams read: the tokenizer, block length, seed, this worker's rank, and Ray's share."""

    tokenizer: str
    seq_len: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    heldout_fraction: float = 0.01
    engine: str = "ray"  # "ray": Ray Data reads and tokenises; "local": this process does (checks, tests)
    # CPUs each Ray Data task asks for: a small fraction, because every dataset of every worker keeps
    # one long-running read task, and they must all be scheduled at once or training waits on data.
    data_cpus: float = 0.1


def configure_execution(ctx) -> None:
    """Settings of one stream's Ray Data execution, on its Dataset's own DataContext (not the process's)."""
    ctx.execution_options.preserve_order = True  # documents in file and row order: the stream is deterministic
    ctx.enable_progress_bars = False  # one stream per dataset and worker: bars would flood the log
    ctx.target_max_block_size = BLOCK_BYTES
    # Little held in the object store: a source read faster than the mix takes it then waits, and
    # leaves the CPU to the sources that are behind.
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(object_store_memory=BUFFER_BLOCKS * BLOCK_BYTES)
    if hasattr(ctx, "_max_num_blocks_in_streaming_gen_buffer"):  # Ray 2.60's knob (private, no public one)
        ctx._max_num_blocks_in_streaming_gen_buffer = READ_AHEAD_BLOCKS
    # A stream waits as long as training does not take from it (a dataset of small weight, a long
    # evaluation): that is not a stalled execution.
    ctx.execution_no_progress_timeout_s = -1


def quiet_ray_data_console() -> None:
    """Ray Data's INFO lines (three per stream start and end) go to its log file only, not the console.

    The streams run in the training process, whose console is the run's log.
    """
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler" and handler.level < logging.WARNING:  # the console one
            handler.setLevel(logging.WARNING)


def data_error_in(err: BaseException) -> DataError | None:
    """The DataError a Ray task raised, from the exceptions Ray wraps it in (None if there is none)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        cause = getattr(err, "cause", None)  # RayTaskError keeps the task's own exception here
        if isinstance(cause, DataError):
            return cause
        if type(err) is DataError:
            return err
        err = cause if isinstance(cause, BaseException) else err.__cause__
    return None


def fetch_in_background(tables: Iterator, name: str) -> Future:
    """next(tables, None) in a daemon thread (a process that ends meanwhile does not wait for it)."""
    import threading

    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(next(tables, None))
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits for the table
            future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class SourceStream:
    """The packed blocks of one dataset, from a saved position on."""

    def __init__(self, entry: DatasetEntry, index: int, opts: DataOptions, position: SourcePosition | None = None):
        self.entry, self.index, self.opts = entry, index, opts
        self.position = position or SourcePosition()
        self.eos = eos_id(cached_tokenizer(opts.tokenizer))
        self.encoder = encoder_spec(opts.tokenizer)
        self.packer = Packer(opts.seq_len + 1, self.eos)
        self._docs: Iterator | None = None  # documents, read lazily from the saved position
        self._resume: tuple[int, int, int, int] | None = None  # the document the saved offset applies to
        self._first: Future | None = None  # the first document, fetched in the background by start()

    def _tables(self) -> Iterator:
        """Tokenised (pass, file, row, ids, index) tables from the saved position on, from Ray Data or here."""
        p, o = self.position, self.opts
        sel = Selection("train", o.rank, o.world, (p.file, p.row), o.heldout_fraction, p.index)
        if o.engine == "local":
            yield from tokenized_stream(self.entry, sel, o.seed, self.index, p.passes, self.encoder)
            return
        head, (passes, sel) = self._head(sel) if is_local(self.entry) and HEAD_TOKENS > 0 else ([], (p.passes, sel))
        rest = self._ray_tables(sel, passes)
        first: Future | None = None
        try:
            for k, table in enumerate(head):
                if first is None and 2 * k >= len(head) - 1:  # half the head is taken: Ray Data starts now
                    first = fetch_in_background(rest, f"ray-data-{self.entry.name}")
                yield table
            table = (first or fetch_in_background(rest, f"ray-data-{self.entry.name}")).result()
            if table is not None:
                yield table
                yield from rest
        finally:
            # A generator cannot be closed while another thread runs it: if the first Ray table is still on its
            # way (a run that ended inside the head), that thread closes the execution when it arrives.
            if first is None:
                rest.close()
            else:
                first.add_done_callback(lambda _: rest.close())

    def _head(self, sel: Selection) -> tuple[list, tuple[int, Selection]]:
        """The first tables of the stream, read here, up to HEAD_TOKENS tokens; and the pass and Selection
        of the document after them, where Ray Data's read task starts."""
        p, o = self.position, self.opts
        head, tokens = [], 0
        with contextlib.closing(
            tokenized_stream(self.entry, sel, o.seed, self.index, p.passes, self.encoder)
        ) as tables:
            for table in tables:
                head.append(table)
                tokens += sum(len(chunk.values) for chunk in table["ids"].chunks)
                if tokens >= HEAD_TOKENS:
                    break
        last = head[-1]
        n = len(last) - 1
        # The running index counts documents with text; a skipped bad record took none (sources.select).
        index = int(last["index"][n].as_py()) + (1 if last["ids"][n].is_valid else 0)
        start = (int(last["file"][n].as_py()), int(last["row"][n].as_py()) + 1)
        return head, (
            int(last["pass"][n].as_py()),
            Selection("train", o.rank, o.world, start, o.heldout_fraction, index),
        )

    def _ray_tables(self, sel: Selection, first_pass: int) -> Iterator:
        """Tokenised tables of the stream from `sel` on, read and tokenised by a Ray Data read task."""
        o = self.opts
        import ray.data  # (configures Ray Data's loggers, which quiet_ray_data_console then adjusts)

        quiet_ray_data_console()
        source = make_datasource(self.entry, sel, o.seed, self.index, first_pass, self.encoder)
        with warnings.catch_warnings():  # max_retries has no named parameter in Ray 2.60, only ray_remote_args
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            ds = ray.data.read_datasource(
                source,
                num_cpus=o.data_cpus,
                concurrency=1,
                override_num_blocks=1,  # one read task, and Ray Data must not cut its blocks into many
                runtime_env={"env_vars": READ_TASK_ENV},
                # A lost read task fails the stream (and the run, which resumes from its checkpoint)
                # instead of being rerun from the stream's start, re-reading everything up to its position.
                ray_remote_args={"max_retries": 0},
            )
        configure_execution(ds.context)
        # The execution's scheduling loop runs in a thread of this process (paused by calm_executor while
        # the stream is ahead); a coordinator actor per stream (streaming_split) cost a process each and
        # slowed the start (BENCHMARKS.md, "Data pipeline").
        try:
            yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=PREFETCH_BLOCKS)
        except Exception as err:
            bad = data_error_in(err)
            if bad is None:
                raise
            # The read task's one-line message, without Ray's traceback and the notes Ray Data adds to it.
            raise DataError(str(bad).splitlines()[0]) from None

    def _documents(self) -> Iterator[tuple[tuple[int, int, int, int], np.ndarray]]:
        """((pass, file, row, index), ids) of the documents from the saved position on, pass after pass."""
        current = self.position.passes
        with contextlib.closing(self._tables()) as tables:  # closing this generator ends the execution at once
            for table in tables:
                pass_no = table["pass"].to_numpy()
                files = table["file"].to_numpy()
                rows = table["row"].to_numpy()
                indices = table["index"].to_numpy()
                ids = table["ids"]
                for i in range(len(table)):
                    if not ids[i].is_valid:
                        self.position.skipped += 1
                        continue
                    if pass_no[i] != current:
                        current = int(pass_no[i])
                        log.info("dataset '%s' starts pass %d", self.entry.name, current + 1)
                    where = (current, int(files[i]), int(rows[i]), int(indices[i]))
                    yield where, ids[i].values.to_numpy(zero_copy_only=False)

    def start(self) -> None:
        """Begin reading now, in the background: the streams of a mix pay Ray Data's start-up together."""
        if self._docs is None:
            self._docs = self._documents()
            p = self.position
            self._resume = (p.passes, p.file, p.row, p.index)
            self._first = ThreadPoolExecutor(1, thread_name_prefix=f"data-{self.entry.name}").submit(next, self._docs)

    def _next_document(self):
        if self._first is not None:
            first, self._first = self._first, None
            return first.result()
        return next(self._docs)

    def next_block(self) -> np.ndarray:
        """The next block of seq_len + 1 tokens; updates `position`."""
        self.start()
        while not self.packer.ready():
            where, ids = self._next_document()
            skip = self.position.offset if where == self._resume else 0  # resuming inside this document
            self._resume = None
            if skip > len(ids):  # (len(ids) itself: only its end-of-text token was left)
                raise DataError(
                    f"dataset '{self.entry.name}': the saved data position (file {where[1]}, record {where[2]}, "
                    f"token {skip}) is past that document's {len(ids) + 1} tokens: the data at {self.entry.path} "
                    "changed since the checkpoint; restore it, or start a new run (another --name or output_dir)"
                )
            self.packer.add(where, ids, skip)
        block = self.packer.take()
        p = self.position
        (p.passes, p.file, p.row, p.index), p.offset = self.packer.resume_point()
        p.blocks += 1
        return block

    def close(self) -> None:
        """Stop reading (ends this dataset's Ray Data execution)."""
        if self._first is not None:
            self._first.exception()  # wait: a generator cannot be closed while another thread runs it
            self._first = None
        if self._docs is not None:
            self._docs.close()
            self._docs = None


class DataMixture:
    """Blocks from several datasets, each dataset's share of blocks following its weight."""

    def __init__(self, datasets: list[DatasetEntry], opts: DataOptions, state: dict | None = None):
        if not datasets:
            raise DataError("a mix needs at least one dataset")
        weights = np.array([d.weight for d in datasets], dtype=np.float64)
        if not (weights > 0).all():
            raise DataError("every dataset weight must be > 0")
        self.datasets = datasets
        self.weights = weights / weights.sum()
        self.opts = opts
        positions = [SourcePosition(**p) for p in state["sources"]] if state else [None] * len(datasets)
        if state and opts.world > 1 and any("index" not in p for p in state["sources"]):
            log.warning(
                "the saved data position predates the running document index by which workers share a pass: "
                "worker %d of %d continues the rest of the current pass approximately (documents may be "
                "repeated or skipped until the next pass begins)",
                opts.rank,
                opts.world,
            )
        elif state and opts.world > 1 and state.get("shares") != SHARES:
            log.warning(
                "the saved data position was written when workers took the documents whose index is their rank "
                "modulo the workers: worker %d of %d continues the rest of the current pass approximately "
                "(documents may be repeated or skipped until the next pass begins)",
                opts.rank,
                opts.world,
            )
        if state and [d["name"] for d in state["datasets"]] != [d.name for d in datasets]:
            raise DataError("the saved data position belongs to another mix of datasets")
        self.streams = [SourceStream(d, i, opts, positions[i]) for i, d in enumerate(datasets)]
        self.tie_order = np.random.default_rng([opts.seed, 7919]).permutation(len(datasets))  # seeded tie-breaks
        for stream in self.streams:
            stream.start()

    def choose(self) -> int:
        """The dataset of the next block: largest deficit weight * (n + 1) - blocks, ties in the seeded order."""
        blocks = np.array([s.position.blocks for s in self.streams], dtype=np.float64)
        deficit = self.weights * (blocks.sum() + 1) - blocks
        best = deficit.max()
        return int(next(i for i in self.tie_order if deficit[i] >= best - 1e-12))

    def next_block(self) -> tuple[int, np.ndarray]:
        i = self.choose()
        return i, self.streams[i].next_block()

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[int]]:
        """(batch_size, seq_len + 1) token ids and the dataset index of each row."""
        picked = [self.next_block() for _ in range(batch_size)]
        return torch.from_numpy(np.stack([b for _, b in picked])), [i for i, _ in picked]

    def __iter__(self):
        while True:
            yield self.next_block()

    def close(self) -> None:
        """Stop every stream, even when one of them fails to stop (its error is raised after)."""
        errors = []
        for stream in self.streams:
            try:
                stream.close()
            except Exception as err:  # noqa: BLE001 - re-raised below, once the others are stopped
                errors.append(err)
        if errors:
            raise errors[0]

    def __enter__(self) -> "DataMixture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self) -> dict:
        """Plain JSON data: enough to continue with exactly the blocks that would have come next."""
        return {
            "datasets": [{"name": d.name, "path": d.path} for d in self.datasets],
            "sources": [asdict(s.position) for s in self.streams],
            "shares": SHARES,
        }

    def stats(self) -> dict[str, float]:
        """tokens_seen/<name> (tokens taken from each dataset), passes/<name>, skipped/<name>."""
        out: dict[str, float] = {}
        for d, s in zip(self.datasets, self.streams):
            out[f"tokens_seen/{d.name}"] = s.position.blocks * (self.opts.seq_len + 1)
            out[f"passes/{d.name}"] = s.position.passes
            if s.position.skipped:
                out[f"skipped/{d.name}"] = s.position.skipped
        return out
