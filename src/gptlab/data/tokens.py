"""Tokenizing a corpus in bounded memory: chunks cut where GPT-2's BPE cannot merge across the cut, and
the two passes of a token cache build over the documents.

The first pass (scan_source) decodes each document to count its characters, which the split needs,
and hashes its bytes; the second (write_tokens) tokenizes it and hashes it again, so a file that
changed in between is reported rather than half-read.
"""

from __future__ import annotations

import hashlib
import os
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from ..tokenizer import EOT_TEXT, Tokenizer
from .corpus import Corpus, DataError, Document
from .formats import BOUNDARY

CHUNK_CHARS = 1 << 20
ENCODE_BATCH_CHUNKS = 8  # chunks handed to encode_batch at once: tiktoken encodes them on 8 threads


def safe_cut(text: str) -> int:
    r"""The largest p > 0 at which `text` can be cut so that encoding the two parts separately gives the
    same GPT-2 tokens as encoding the whole; 0 if there is none.

    GPT-2's pre-tokenizer ('s|'t|... | ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) never
    puts a non-space character and a following whitespace character in one piece, and its only
    look-ahead, (?!\S), belongs to whitespace-only pieces. So a cut just before a newline or space
    whose previous character is not whitespace is a piece boundary in both encodings. Cutting after a
    newline is NOT safe in general: in "x\n\nA" the newlines are two pieces (\s+(?!\S) backs off
    before the A), but at the end of the text "x\n\n" they are one. str.isspace() accepts every
    character regex \s does (and a few more), so "not isspace" is a safe test for "not \s".
    """
    for separator in ("\n", " "):
        cut = text.rfind(separator)
        while cut > 0:
            if not text[cut - 1].isspace():
                return cut
            cut = text.rfind(separator, 0, cut)
    return 0


def chunks(blocks: Iterator[str | None], chunk_chars: int) -> Iterator[str | None]:
    """Regroup text blocks into chunks of about chunk_chars characters, each cut at a safe_cut point; a
    record boundary (formats.BOUNDARY) passes through, after the text before it.

    Text with no safe cut in 4 * chunk_chars characters (no newline or space after a visible
    character) is cut there anyway, to keep memory bounded; only that boundary's tokens may differ.
    """
    buffer = ""
    for block in blocks:
        if block is BOUNDARY:
            if buffer:
                yield buffer
            buffer = ""
            yield BOUNDARY
            continue
        buffer += block
        while len(buffer) >= chunk_chars:
            cut = safe_cut(buffer) or (4 * chunk_chars if len(buffer) >= 4 * chunk_chars else 0)
            if not cut:
                break
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """The UTF-8 bytes each token id stands for (vocab_size,), end-of-text 0: what a scored target adds
    to a bits-per-byte denominator, as a token cache counts them."""
    lengths = np.array([len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)], dtype=np.int64)
    lengths[tokenizer.eot_id] = 0
    return lengths


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class SplitWriter:
    """Appends one side's tokens to its file and counts them, and its characters and UTF-8 bytes."""

    def __init__(self, file, dtype: np.dtype):
        self.file, self.dtype = file, dtype
        self.tokens = self.chars = self.bytes = 0
        self.first_token: int | None = None

    def write(self, ids: list[int]) -> None:
        if self.first_token is None and ids:
            self.first_token = ids[0]
        np.asarray(ids, dtype=self.dtype).tofile(self.file)
        self.tokens += len(ids)


class ProgressHasher:
    """SHA-256 of the bytes fed to it, counting them and advancing a progress bar by them."""

    def __init__(self, progress: tqdm):
        self.sha256, self.progress, self.n_bytes = hashlib.sha256(), progress, 0

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        self.n_bytes += len(data)
        self.progress.update(len(data))


def source_path(doc: Document) -> str:
    return doc.path if doc.text is not None else os.path.abspath(doc.path)


def current_state(doc: Document) -> tuple[int, int | None]:
    """(size, modification time) of a document's file now; the embedded text has no time."""
    if doc.text is not None:
        return doc.n_bytes, None
    try:
        stat = os.stat(doc.path)
    except OSError as error:
        raise DataError(f"cannot read {doc.path}: {error.strerror}; check the data paths") from None
    return stat.st_size, stat.st_mtime_ns


def scan_source(doc: Document, progress: tqdm) -> dict:
    """Read a document once: its characters, the SHA-256 of its bytes, and the size and modification time
    it had while read (a manifest's record of one source)."""
    size, mtime_ns = current_state(doc)
    hasher = ProgressHasher(progress)
    chars = sum(len(EOT_TEXT) if block is BOUNDARY else len(block) for block in doc.blocks(hasher))
    if current_state(doc) != (size, mtime_ns) or hasher.n_bytes != size:
        raise DataError(f"{doc.path} changed while it was being read; run the command again")
    record = {
        "path": source_path(doc),
        "bytes": size,
        "mtime_ns": mtime_ns,
        "errors": doc.errors,
        "chars": chars,
        "sha256": hasher.sha256.hexdigest(),
    }
    return record if doc.text_field is None else {**record, "text_field": doc.text_field}


def write_tokens(
    corpus: Corpus,
    sources: list[dict],
    split: int,
    tokenizer: Tokenizer,
    writers: dict[str, SplitWriter],
    chunk_chars: int,
    progress: tqdm,
    start: tuple[int, int] = (0, 0),
    checkpoint: tuple[int, Callable[[int, int, int], None]] | None = None,
) -> int:
    """Tokenize the corpus into the writers' files, chunk by chunk, the text before character `split` of
    the joined text to "train" and the rest to "val"; returns the split's character index (moved to the
    end of a document boundary that it fell inside). `sources` are the first pass's records.

    start: (documents already written, their end in the joined text), to go on with an interrupted build
    whose writers hold those documents' tokens. checkpoint: (every, save): at the end of a document, once
    `every` characters have been tokenized since the last call, every token so far is handed to the
    writers and save(documents written, their end, split) is called."""
    queue: list[tuple[str, str | None]] = []  # (side, text chunk), or (side, None) for an end-of-text id

    def flush() -> None:
        encoded = iter(tokenizer.encode_batch([text for _, text in queue if text is not None]))
        for side, text in queue:
            writers[side].write([tokenizer.eot_id] if text is None else next(encoded))
        queue.clear()

    def boundary(at: int) -> int:
        """An end-of-text id at character `at` of the joined text (between two documents, or two records of
        one file); the split, moved past it if it fell inside (the boundary goes whole to the side of its
        first character)."""
        side = "train" if at < split else "val"
        queue.append((side, None))
        writers[side].chars += len(EOT_TEXT)
        progress.update(len(EOT_TEXT))
        return at + len(EOT_TEXT) if at < split < at + len(EOT_TEXT) else split

    first, position = start  # position: in the joined text
    saved = position
    for index, (doc, source) in enumerate(zip(corpus.documents, sources)):
        if index < first:
            continue
        if index:
            split = boundary(position)
            position += len(EOT_TEXT)
        done = 0
        hasher = hashlib.sha256()
        for chunk in chunks(doc.blocks(hasher), chunk_chars):
            if chunk is BOUNDARY:
                split = boundary(position + done)
                done += len(EOT_TEXT)
                continue
            local_split = min(max(split - position, 0), source["chars"])
            train_part = chunk[: max(local_split - done, 0)]
            for side, text in (("train", train_part), ("val", chunk[len(train_part) :])):
                if text:
                    queue.append((side, text))
                    writers[side].chars += len(text)
                    writers[side].bytes += len(text.encode("utf-8"))
            done += len(chunk)
            progress.update(len(chunk))
            if sum(len(text) for _, text in queue if text) >= ENCODE_BATCH_CHUNKS * chunk_chars:
                flush()
        if (hasher.hexdigest(), done) != (source["sha256"], source["chars"]):
            raise DataError(f"{doc.path} changed while it was being tokenized; run the command again")
        position += done
        if checkpoint is not None and position - saved >= checkpoint[0]:
            flush()
            checkpoint[1](index + 1, position, split)
            saved = position
    flush()
    return split
