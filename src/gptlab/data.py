"""Training data: read a text corpus, split it, tokenize it once into a cache, and cut it into windows.

The pipeline:
    corpus = read_corpus(["books/", "notes/*.md"])      # or default_corpus(): CPython's bundled docs
    tokenizer = build_tokenizer("gpt2", corpus)          # or "char": one id per character of the corpus
    cache = build_token_cache(corpus, tokenizer, "cache/tokens")
    train = TokenWindows(cache.train_tokens, context_length=256, stride=256)
    for batch in train.batches(batch_size=8, seed=123): ...
    for inputs, targets in validation_batches(cache.val_tokens, 256, batch_size=8): ...

The corpus is a list of documents (files, or the embedded default); the token stream is the documents'
tokens with the end-of-text id between consecutive documents. The held-out split is defined on the
characters of the joined text `"<|endoftext|>".join(documents)`: validation is its last 10%, the text
from character int(0.9 * n_chars) on. The two sides are tokenized separately, so no token straddles
the split. Two details of the joined-text definition: a document boundary is one end-of-text id, never
the characters of the marker, so a literal "<|endoftext|>" inside a file stays ordinary text; and if
the split point falls inside a boundary marker, the whole boundary goes to the side that holds its
first character (the marker is never cut in two).
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
import sys
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .tokenizer import EOT_TEXT, CharTokenizer, Tokenizer, load_tokenizer

TRAIN_FRACTION = 0.9
# Suffixes taken when a folder is searched; files named directly or matched by a glob are always taken.
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .adoc .org .tex .bib .html .htm .xml .json .jsonl .csv .tsv .yaml .yml "
    ".toml .ini .cfg .conf .py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .css .sh .sql".split()
)
EMBEDDED_PATH = "<pydoc_data.topics>"
READ_BLOCK_BYTES = 1 << 20
CHUNK_CHARS = 1 << 20
ENCODE_BATCH_CHUNKS = 8  # chunks handed to encode_batch at once: tiktoken encodes them on 8 threads
IGNORE_INDEX = -100  # target id that torch.nn.functional.cross_entropy leaves out (its default ignore_index)

CACHE_FORMAT = "gptlab-token-cache"
CACHE_VERSION = 1
MANIFEST_FILE = "tokens.json"
SPLIT_FILES = {"train": "tokens-train.bin", "val": "tokens-val.bin"}


class DataError(ValueError):
    """Training data that cannot be used as given; the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------
# Corpus


def default_corpus_text() -> str:
    """CPython's bundled reference documentation (the text behind help('topic')), about 466 KB."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class Document:
    """One text of the corpus. A file's text is read again in blocks when needed, so a corpus of
    many gigabytes is never held in memory; the embedded default keeps its text."""

    path: str
    n_bytes: int  # bytes on disk (the UTF-8 encoding for the embedded text)
    n_chars: int  # characters after decoding
    sha256: str  # of the bytes on disk
    mtime_ns: int | None
    errors: str = "strict"
    text: str | None = None

    def blocks(self, block_size: int = READ_BLOCK_BYTES) -> Iterator[str]:
        """The text in consecutive blocks (of block_size bytes read, or characters of the embedded text);
        raises DataError if a file changed since it was read."""
        if self.text is not None:
            for start in range(0, len(self.text), block_size):
                yield self.text[start : start + block_size]
            return
        hasher = hashlib.sha256()
        n_chars = 0
        for block in decode_file(self.path, self.errors, hasher, block_size):
            n_chars += len(block)
            yield block
        if hasher.hexdigest() != self.sha256 or n_chars != self.n_chars:
            raise DataError(f"{self.path} changed while it was being used; run the command again")

    def read_text(self) -> str:
        return "".join(self.blocks())


@dataclass(frozen=True)
class Corpus:
    documents: tuple[Document, ...]

    @property
    def n_chars(self) -> int:
        """Length of the joined text: the documents with an end-of-text marker between each two."""
        return sum(doc.n_chars for doc in self.documents) + len(EOT_TEXT) * (len(self.documents) - 1)

    def text(self) -> str:
        """The joined text (held in memory: for small corpora and tests)."""
        return EOT_TEXT.join(doc.read_text() for doc in self.documents)


def default_corpus() -> Corpus:
    text = default_corpus_text()
    data = text.encode("utf-8")
    embedded = Document(EMBEDDED_PATH, len(data), len(text), hashlib.sha256(data).hexdigest(), None, text=text)
    return Corpus((embedded,))


def decode_file(path: str, errors: str, hasher, block_bytes: int = READ_BLOCK_BYTES) -> Iterator[str]:
    """Decode a UTF-8 file block by block, feeding its bytes to `hasher`.

    Bytes are read as they are (no newline translation). Invalid UTF-8 under errors="strict" raises a
    DataError naming the file and the byte offset of the first bad byte.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    offset = 0
    with open(path, "rb") as file:
        while True:
            block = file.read(block_bytes)
            # The decoder keeps an unfinished multi-byte sequence from the previous block and reports
            # error positions relative to those pending bytes followed by the new block.
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{path}: invalid UTF-8 at byte {offset - pending + error.start}; fix the file or pass "
                    "--replace-invalid-utf8 to read bad bytes as U+FFFD"
                ) from None
            hasher.update(block)
            offset += len(block)
            if text:
                yield text
            if not block:
                return


def read_document(path: str, errors: str) -> Document:
    hasher = hashlib.sha256()
    n_chars = sum(len(block) for block in decode_file(path, errors, hasher))
    stat = os.stat(path)
    return Document(path, stat.st_size, n_chars, hasher.hexdigest(), stat.st_mtime_ns, errors)


def folder_files(folder: str) -> list[str]:
    """Text files under `folder`, recursively, skipping hidden files and folders, in sorted path order."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [
            Path(root, name)
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in TEXT_SUFFIXES
        ]
    return [str(path) for path in sorted(found, key=lambda path: path.parts)]


def expand_path(path: str) -> list[str]:
    """The files a path stands for: a file itself, a folder's text files, a glob pattern's matches."""
    if os.path.isdir(path):
        files = folder_files(path)
        if not files:
            raise DataError(
                f"folder {path} holds no text files (suffixes {' '.join(sorted(TEXT_SUFFIXES))}); "
                "name the files or use a glob pattern"
            )
        return files
    if os.path.exists(path):
        return [path]
    if any(char in path for char in "*?["):
        matches = sorted(glob.glob(path, recursive=True))
        files = [file for match in matches for file in (folder_files(match) if os.path.isdir(match) else [match])]
        if not files:
            raise DataError(f"the pattern {path!r} matches no files; check the pattern and the current folder")
        return files
    raise DataError(f"no such file or folder: {path}")


def read_corpus(paths: Sequence[str | os.PathLike], errors: str = "strict") -> Corpus:
    """Documents from files, folders (searched recursively for TEXT_SUFFIXES) and glob patterns.

    Each path contributes its files in sorted order; paths keep the order given; a file named twice is
    read once. Files must be UTF-8; errors="replace" reads invalid bytes as U+FFFD instead of failing.
    Empty files are left out.
    """
    if errors not in ("strict", "replace"):
        raise DataError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if not paths:
        raise DataError("no data paths given; name files, folders or glob patterns, or use the default corpus")
    files = list(dict.fromkeys(file for path in paths for file in expand_path(os.fspath(path))))
    documents = [read_document(file, errors) for file in files]
    nonempty = tuple(doc for doc in documents if doc.n_chars)
    if not nonempty:
        raise DataError(f"the corpus has no text: {', '.join(files)} {'is' if len(files) == 1 else 'are'} empty")
    return Corpus(nonempty)


def build_tokenizer(kind: str, corpus: Corpus, merges: int | None = None) -> Tokenizer:
    """GPT-2's tokenizer (with `merges`: only its first that many merges), or a character-level one
    whose vocabulary is every character of the corpus.

    The character vocabulary includes the validation text's characters too, so evaluation never meets
    an unknown character (the vocabulary is a fact about the alphabet, not a learned statistic).
    """
    if merges is not None and kind != "gpt2":
        raise DataError(f"merges applies to the gpt2 tokenizer only, not {kind!r}")
    if kind == "gpt2":
        return load_tokenizer("gpt2", merges)
    if kind == "char":
        chars: set[str] = set()
        for doc in corpus.documents:
            for block in doc.blocks():
                chars.update(block)
        return CharTokenizer.from_text("".join(chars))
    raise DataError(f"unknown tokenizer {kind!r}; use 'gpt2' or 'char'")


# ----------------------------------------------------------------------------------------------
# Held-out split


def split_index(n_chars: int) -> int:
    """Characters before this index are training text; the rest (the last 10%) is validation text."""
    return int(TRAIN_FRACTION * n_chars)


def split_text(text: str) -> tuple[str, str]:
    cut = split_index(len(text))
    return text[:cut], text[cut:]


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


# ----------------------------------------------------------------------------------------------
# Windows


def check_length(tokens: np.ndarray, context_length: int, name: str) -> None:
    if context_length < 1:
        raise DataError(f"context length must be >= 1, got {context_length}")
    if len(tokens) < context_length + 1:
        raise DataError(
            f"the {name} has {len(tokens)} tokens but needs at least {context_length + 1} "
            f"(context length {context_length} + 1 target); use more text or a shorter context length"
        )


def token_rows(tokens: np.ndarray, starts: np.ndarray, context_length: int) -> np.ndarray:
    """tokens[start : start + context_length + 1] for each start, as int64 rows (len(starts), context_length + 1)."""
    return tokens[np.asarray(starts, dtype=np.int64)[:, None] + np.arange(context_length + 1)].astype(np.int64)


@dataclass(frozen=True)
class Batch:
    inputs: np.ndarray  # (rows, context_length) int64
    targets: np.ndarray  # (rows, context_length) int64: inputs shifted by one token
    epoch: int
    index: int  # position of the batch's first window in this epoch's order
    resume_at: tuple[int, int]  # (epoch, index) to pass to batches() to continue right after this batch


class TokenWindows:
    """Training samples: `context_length` input tokens and the next-token targets, one window starting
    every `stride` tokens (stride == context_length: non-overlapping)."""

    def __init__(self, tokens: np.ndarray, context_length: int, stride: int, name: str = "training split"):
        check_length(tokens, context_length, name)
        if stride < 1:
            raise DataError(f"stride must be >= 1, got {stride}")
        self.tokens, self.context_length, self.stride = tokens, context_length, stride
        self.count = (len(tokens) - context_length - 1) // stride + 1

    def __len__(self) -> int:
        return self.count

    def windows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets of the given windows, each (len(indices), context_length) int64."""
        rows = token_rows(self.tokens, np.asarray(indices, dtype=np.int64) * self.stride, self.context_length)
        return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])

    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        """The windows' order in an epoch: a permutation that depends only on (seed, epoch)."""
        return np.random.default_rng([seed, epoch]).permutation(self.count)

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.count // batch_size

    def batches(
        self,
        batch_size: int,
        seed: int,
        start_epoch: int = 0,
        start_index: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> Iterator[Batch]:
        """Global batches of `batch_size` windows, endlessly, epoch after epoch in each epoch's order; the
        windows left over at an epoch's end (fewer than batch_size) are skipped that epoch.

        Resume exactly with start_epoch, start_index = batch.resume_at of the last batch used. With
        world_size > 1, rank r gets rows [r * b, (r + 1) * b) of each global batch, b = batch_size //
        world_size: the global batches are the same for any world size.
        """
        if batch_size < 1 or batch_size % world_size:
            raise DataError(f"batch size {batch_size} must be a positive multiple of the world size {world_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if batch_size > self.count:
            raise DataError(
                f"batch size {batch_size} is more than the {self.count} windows of the data; "
                "lower the batch size or the stride, or use more text"
            )
        if not 0 <= start_index <= self.count:
            raise DataError(f"start index {start_index} is outside 0..{self.count}")
        rows = batch_size // world_size
        epoch, index = start_epoch, start_index
        while True:
            order = self.epoch_order(epoch, seed)
            while index + batch_size <= self.count:
                inputs, targets = self.windows(order[index + rank * rows : index + (rank + 1) * rows])
                after = (epoch, index + batch_size) if index + 2 * batch_size <= self.count else (epoch + 1, 0)
                yield Batch(inputs, targets, epoch, index, after)
                index += batch_size
            epoch, index = epoch + 1, 0


def validation_batches(
    tokens: np.ndarray, context_length: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(inputs, targets) batches of non-overlapping windows in which every token but the first is a
    target exactly once. All windows are full length: when context_length does not divide
    len(tokens) - 1, the last window is moved back to end at the last token, and its targets already
    counted by the window before are set to IGNORE_INDEX. With world_size > 1, rank r takes windows
    r, r + world_size, ...: together the ranks count every target once.
    """
    check_length(tokens, context_length, "validation split")
    if batch_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need batch size >= 1 and 0 <= rank < world size, got {batch_size}, {rank}, {world_size}")
    n_targets = len(tokens) - 1
    starts = list(range(0, n_targets - context_length + 1, context_length))
    covered = starts[-1] + context_length  # full windows score targets tokens[1 : covered + 1]
    if covered < n_targets:
        starts.append(n_targets - context_length)
    # The moved-back last window's first `overlap` targets are already scored by the window before it.
    overlap = covered - starts[-1] if covered < n_targets else 0
    mine = starts[rank::world_size]
    for first in range(0, len(mine), batch_size):
        batch_starts = mine[first : first + batch_size]
        rows = token_rows(tokens, batch_starts, context_length)
        inputs, targets = rows[:, :-1], rows[:, 1:].copy()  # a copy: IGNORE_INDEX must not reach the inputs
        if overlap and batch_starts[-1] == starts[-1]:
            targets[-1, :overlap] = IGNORE_INDEX
        yield inputs, targets
