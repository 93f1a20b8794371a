"""The token cache: a corpus tokenized once, chunk by chunk, into memory-mappable files per split."""
from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from ..tokenizer import EOT_TEXT, Tokenizer
from .corpus import TRAIN_FRACTION, Corpus, DataError, split_index

CHUNK_CHARS = 1 << 20
ENCODE_BATCH_CHUNKS = 8  # chunks handed to encode_batch at once: tiktoken encodes them on 8 threads

CACHE_FORMAT = "gptlab-token-cache"
CACHE_VERSION = 1
MANIFEST_FILE = "tokens.json"
SPLIT_FILES = {"train": "tokens-train.bin", "val": "tokens-val.bin"}


# ----------------------------------------------------------------------------------------------
# Chunked tokenization


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


def chunks(blocks: Iterator[str], chunk_chars: int) -> Iterator[str]:
    """Regroup text blocks into chunks of about chunk_chars characters, each cut at a safe_cut point.

    Text with no safe cut in 4 * chunk_chars characters (no newline or space after a visible
    character) is cut there anyway, to keep memory bounded; only that boundary's tokens may differ.
    """
    buffer = ""
    for block in blocks:
        buffer += block
        while len(buffer) >= chunk_chars:
            cut = safe_cut(buffer) or (4 * chunk_chars if len(buffer) >= 4 * chunk_chars else 0)
            if not cut:
                break
            yield buffer[:cut]
            buffer = buffer[cut:]
    if buffer:
        yield buffer


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


def write_tokens(
    corpus: Corpus, tokenizer: Tokenizer, writers: dict[str, SplitWriter], chunk_chars: int, progress: tqdm
) -> int:
    """Tokenize the corpus into the writers' files, chunk by chunk; returns the split's character index."""
    split = split_index(corpus.n_chars)
    queue: list[tuple[str, str | None]] = []  # (side, text chunk), or (side, None) for an end-of-text id

    def flush() -> None:
        encoded = iter(tokenizer.encode_batch([text for _, text in queue if text is not None]))
        for side, text in queue:
            writers[side].write([tokenizer.eot_id] if text is None else next(encoded))
        queue.clear()

    position = 0  # in the joined text
    for index, doc in enumerate(corpus.documents):
        if index:
            side = "train" if position < split else "val"
            if position < split < position + len(EOT_TEXT):
                split = position + len(EOT_TEXT)  # the boundary goes whole to the side of its first char
            queue.append((side, None))
            writers[side].chars += len(EOT_TEXT)
            position += len(EOT_TEXT)
            progress.update(len(EOT_TEXT))
        local_split = min(max(split - position, 0), doc.n_chars)
        done = 0
        for chunk in chunks(doc.blocks(), chunk_chars):
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
        position += doc.n_chars
    flush()
    return split


# ----------------------------------------------------------------------------------------------
# Token cache


@dataclass(frozen=True)
class TokenCache:
    """A built token cache: both sides' tokens as read-only memory maps, and its manifest."""

    directory: Path
    manifest: dict
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    built: bool  # True when this call tokenized the corpus, False when it reused the cache

    @property
    def val_bytes(self) -> int:
        """UTF-8 bytes of the validation text (document boundaries count 0)."""
        return self.manifest["splits"]["val"]["bytes"]

    @property
    def val_target_bytes(self) -> int:
        """UTF-8 bytes that the targets of validation_batches(val_tokens, ...) stand for: val_bytes less
        the first validation token's, which is context only. The bits-per-byte denominator."""
        return self.manifest["splits"]["val"]["target_bytes"]


def cache_inputs(corpus: Corpus, tokenizer: Tokenizer) -> dict:
    sources = [
        {
            "path": doc.path if doc.text is not None else os.path.abspath(doc.path),
            "bytes": doc.n_bytes,
            "chars": doc.n_chars,
            "sha256": doc.sha256,
            "mtime_ns": doc.mtime_ns,
            "errors": doc.errors,
        }
        for doc in corpus.documents
    ]
    return {"tokenizer": tokenizer.spec(), "train_fraction": TRAIN_FRACTION, "sources": sources}


def same_inputs(recorded: dict, wanted: dict) -> bool:
    """Inputs match when everything but the modification times does: touching a file keeps the cache."""

    def without_mtimes(inputs: dict) -> dict:
        return {**inputs, "sources": [{k: v for k, v in s.items() if k != "mtime_ns"} for s in inputs["sources"]]}

    return without_mtimes(recorded) == without_mtimes(wanted)


def read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        return None
    return manifest


def open_token_cache(cache_dir: str | os.PathLike) -> TokenCache:
    """Open an existing cache without checking it against a corpus (e.g. on ranks other than 0 after
    rank 0 ran build_token_cache). Raises DataError if there is no complete cache there."""
    directory = Path(cache_dir)
    manifest = read_manifest(directory)
    if manifest is None:
        raise DataError(f"no token cache in {directory}; build one with build_token_cache")
    dtype = np.dtype(manifest["dtype"])
    arrays = {}
    for side, info in manifest["splits"].items():
        path = directory / info["file"]
        if not path.is_file() or path.stat().st_size != info["tokens"] * dtype.itemsize:
            raise DataError(f"token cache file {path} is missing or has the wrong size; delete {directory} and rebuild")
        arrays[side] = np.memmap(path, dtype=dtype, mode="r") if info["tokens"] else np.empty(0, dtype)
    return TokenCache(directory, manifest, arrays["train"], arrays["val"], built=False)


def temporary_path(directory: Path, name: str) -> Path:
    """A hidden name beside `name`, unique to this build, to write before renaming it into place."""
    return directory / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def build_token_cache(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: str | os.PathLike,
    progress: bool | None = None,
    chunk_chars: int = CHUNK_CHARS,
) -> TokenCache:
    """Tokenize the corpus into cache_dir, or reuse what is there if it was built from the same inputs
    (tokenizer spec, split, and each source's path, size and SHA-256; modification times are recorded
    but a touched, unchanged file keeps the cache).

    cache_dir holds tokens.json (the manifest) and tokens-train.bin / tokens-val.bin (raw uint16 ids,
    uint32 for vocabularies over 65536); other files there are left alone. The token files are written
    under temporary names and renamed into place, the manifest last, so an interrupted build leaves
    either the old cache or none. progress: a tqdm bar on stderr; None shows it when stderr is a tty.
    """
    directory = Path(cache_dir)
    inputs = cache_inputs(corpus, tokenizer)
    manifest = read_manifest(directory)
    if manifest is not None and same_inputs(manifest["inputs"], inputs):
        try:
            return open_token_cache(directory)
        except DataError:
            pass  # a damaged cache is rebuilt
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    temporary = {side: temporary_path(directory, name) for side, name in SPLIT_FILES.items()}
    temporary["manifest"] = temporary_path(directory, MANIFEST_FILE)
    try:
        show_progress = sys.stderr.isatty() if progress is None else progress
        bar = tqdm(total=corpus.n_chars, unit="char", unit_scale=True, desc="tokenizing", disable=not show_progress)
        with open(temporary["train"], "wb") as train_file, open(temporary["val"], "wb") as val_file, bar:
            writers = {"train": SplitWriter(train_file, dtype), "val": SplitWriter(val_file, dtype)}
            split = write_tokens(corpus, tokenizer, writers, chunk_chars, bar)
        splits = {
            side: {"file": SPLIT_FILES[side], "tokens": w.tokens, "chars": w.chars, "bytes": w.bytes}
            for side, w in writers.items()
        }
        first = writers["val"].first_token
        first_bytes = 0 if first in (None, tokenizer.eot_id) else len(tokenizer.decode_bytes([first]))
        splits["val"]["target_bytes"] = writers["val"].bytes - first_bytes
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "inputs": inputs,
            "dtype": dtype.name,
            "total_chars": corpus.n_chars,
            "split_char": split,
            "splits": splits,
        }
        temporary["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
        (directory / MANIFEST_FILE).unlink(missing_ok=True)  # no manifest: no cache, until the new one is whole
        for side, name in SPLIT_FILES.items():
            os.replace(temporary[side], directory / name)
        os.replace(temporary["manifest"], directory / MANIFEST_FILE)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    return replace(open_token_cache(directory), built=True)


