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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..tokenizer import EOT_TEXT, CharTokenizer, Tokenizer, load_tokenizer

TRAIN_FRACTION = 0.9
# Suffixes taken when a folder is searched; files named directly or matched by a glob are always taken.
TEXT_SUFFIXES = frozenset(
    ".txt .text .md .markdown .rst .adoc .org .tex .bib .html .htm .xml .json .jsonl .csv .tsv .yaml .yml "
    ".toml .ini .cfg .conf .py .pyi .c .h .cc .cpp .hpp .rs .go .java .js .ts .css .sh .sql".split()
)
EMBEDDED_PATH = "<pydoc_data.topics>"
READ_BLOCK_BYTES = 1 << 20


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


