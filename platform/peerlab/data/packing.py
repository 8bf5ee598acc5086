"""Packing: documents joined with the end-of-text token, cut into blocks of equal length.

A block holds `max_seq_length + 1` tokens (inputs and the labels shifted by one). Blocks
follow each other without overlap or gap, so every token of the stream lands in exactly
one block; only the last, partial block of a finite stream is dropped.

The packer remembers where the next block starts: the document (pass, file, row, running
index in the pass) and how many of its tokens (counting its end-of-text token) earlier
blocks already took. That position, saved with a checkpoint, is enough to rebuild the
stream exactly.
"""

from __future__ import annotations

from collections import deque

import numpy as np

Position = tuple[int, int, int, int]  # (pass, file, row, running index in the pass) of a document in its source


class Packer:
    def __init__(self, length: int, eos: int):
        self.length = length
        self.eos = eos
        self.pieces: deque[tuple[Position, np.ndarray]] = deque()  # documents (with eos) not yet fully taken
        self.offset = 0  # tokens of pieces[0] already taken
        self.buffered = 0  # tokens waiting in pieces, after offset
        self.after: Position | None = None  # the position just after the last document added

    def add(self, position: Position, ids: np.ndarray, skip: int = 0) -> None:
        """Queue one document's token ids; `skip` drops its first tokens (when resuming inside it)."""
        doc = np.empty(len(ids) + 1, dtype=np.int64)  # (n + 1,): the document, then end-of-text
        doc[:-1] = ids
        doc[-1] = self.eos
        if skip:
            assert not self.pieces and 0 <= skip < len(doc), "skip applies to the first document only"
            self.offset = skip
        self.pieces.append((position, doc))
        self.buffered += len(doc) - skip
        pass_, file, row, index = position
        self.after = (pass_, file, row + 1, index + 1)  # the next record, and the next document's index

    def ready(self) -> bool:
        return self.buffered >= self.length

    def take(self) -> np.ndarray:
        """The next block of `length` tokens (call only when ready())."""
        out = np.empty(self.length, dtype=np.int64)
        filled = 0
        while filled < self.length:
            _, doc = self.pieces[0]
            n = min(self.length - filled, len(doc) - self.offset)
            out[filled : filled + n] = doc[self.offset : self.offset + n]
            filled += n
            self.offset += n
            if self.offset == len(doc):
                self.pieces.popleft()
                self.offset = 0
        self.buffered -= self.length
        return out

    def resume_point(self) -> tuple[Position, int] | None:
        """Where the next block starts: (document position, tokens of it already taken).

        None before any document was added.
        """
        if self.pieces:
            return self.pieces[0][0], self.offset
        if self.after is not None:
            return self.after, 0
        return None
