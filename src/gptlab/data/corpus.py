"""Training data: read a text corpus, split it, tokenize it once into a cache, and cut it into windows.

The pipeline:
    corpus = read_corpus(["books/", "notes/*.md"])      # or default_corpus(): CPython's bundled docs
    tokenizer = build_tokenizer("gpt2", corpus)          # or "char": one id per character of the corpus
    cache = build_token_cache(corpus, tokenizer, "cache/tokens")
    train = TokenWindows(cache.train_tokens, context_length=256, stride=256)
    for batch in train.batches(batch_size=8, seed=123): ...
    for inputs, targets in validation_batches(cache.val_tokens, 256, batch_size=8): ...

The corpus is a list of documents (files, or the embedded default). Reading a corpus only finds its
files (files.py: which files, and why others were left out) and stats them; their text is decoded,
counted and hashed when the token cache is built, and not at all when a cache of them is reused. A
file of records (JSON Lines, JSON, Parquet: formats.py) is one document whose records are joined the
way documents are. The token stream is the documents' tokens with the end-of-text id between
consecutive documents, and between consecutive records of one file. The
held-out split is defined on the characters of the joined text `"<|endoftext|>".join(documents)`:
validation is its last 10%, the text from character int(0.9 * n_chars) on (a cache for evaluation
puts all of it on the validation side: train_fraction 0). The two sides are tokenized separately, so
no token straddles the split. Two details of the joined-text definition: a document boundary is one
end-of-text id, never the characters of the marker, so a literal "<|endoftext|>" inside a file stays
ordinary text; and if the split point falls inside a boundary marker, the whole boundary goes to the
side that holds its first character (the marker is never cut in two).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..tokenizer import EOT_TEXT, CharTokenizer, Tokenizer, load_tokenizer, read_tokenizer_folder
from .errors import DataError
from .files import FileSearch, check_patterns, summarise
from .formats import BOUNDARY, RECORD_FORMATS, file_format, texts

TRAIN_FRACTION = 0.9
EMBEDDED_PATH = "<pydoc_data.topics>"
READ_BLOCK_BYTES = 1 << 20
NAMED_DOCUMENTS = 5  # a summary names this many documents; more are counted by file extension


# ----------------------------------------------------------------------------------------------
# Corpus


def default_corpus_text() -> str:
    """CPython's bundled reference documentation (the text behind help('topic')), about 466 KB."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class Document:
    """One text of the corpus: a file as found on disk (its size and modification time, nothing read),
    or the embedded default, which keeps its text. Files are read in blocks only when tokenized, so a
    corpus of many gigabytes is never held in memory."""

    path: str
    n_bytes: int  # bytes on disk (the UTF-8 encoding for the embedded text)
    mtime_ns: int | None  # None for the embedded text
    errors: str = "strict"
    text: str | None = None
    text_field: str | None = None  # a file of records (formats.py): the field each record's text is in

    def blocks(self, hasher=None, block_size: int = READ_BLOCK_BYTES) -> Iterator[str | None]:
        """The text in consecutive blocks (of block_size bytes read, or characters of the embedded text),
        with formats.BOUNDARY between two records of a file of records, feeding the file's bytes to `hasher`
        if given."""
        if self.text is None:
            yield from texts(self.path, self.errors, self.text_field, hasher, block_size)
            return
        for start in range(0, len(self.text), block_size):
            block = self.text[start : start + block_size]
            if hasher is not None:
                hasher.update(block.encode("utf-8"))
            yield block

    def read_text(self) -> str:
        """The text, records joined as the joined text joins documents (for small corpora and tests)."""
        return "".join(EOT_TEXT if block is BOUNDARY else block for block in self.blocks())


@dataclass(frozen=True)
class Corpus:
    """The documents to read, in order, and what was left out: `skipped` holds (path, "category: detail")
    for each file found in a folder or by a pattern but not read, or named but empty; `hidden` counts the
    hidden files and folders not searched."""

    documents: tuple[Document, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    hidden: int = 0

    @property
    def n_bytes(self) -> int:
        return sum(doc.n_bytes for doc in self.documents)

    def summary(self) -> str:
        """One line: what was read, what was skipped and why (by category), how many hidden entries."""
        count = len(self.documents)
        if count <= NAMED_DOCUMENTS:
            what = ", ".join(doc.path for doc in self.documents)
        else:
            suffixes = Counter(extension(doc.path) for doc in self.documents)
            what = ", ".join(f"{number:,} {suffix}" for suffix, number in suffixes.most_common())
        line = f"read {count} document{'s' if count != 1 else ''} ({self.n_bytes:,} bytes: {what})"
        if self.skipped:
            line += f"; skipped {summarise([reason for _, reason in self.skipped])}"
        if self.hidden:
            line += f"; left out {self.hidden} hidden {'file or folder' if self.hidden == 1 else 'files or folders'}"
        return line

    def text(self) -> str:
        """The joined text (held in memory: for small corpora and tests)."""
        return EOT_TEXT.join(doc.read_text() for doc in self.documents)


def extension(path: str) -> str:
    """What a summary counts a file by: its suffix, two for a compressed one (.jsonl.gz)."""
    suffixes = Path(path).suffixes[-2:]
    if len(suffixes) == 2 and suffixes[-1].lower() not in (".gz", ".zst"):
        suffixes = suffixes[-1:]
    return "".join(suffixes) or "without extension"


def default_corpus() -> Corpus:
    text = default_corpus_text()
    return Corpus((Document(EMBEDDED_PATH, len(text.encode("utf-8")), None, text=text),))


def read_corpus(
    paths: Sequence[str | os.PathLike],
    errors: str = "strict",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    text_field: str = "text",
) -> Corpus:
    """Documents from files, folders (searched recursively) and glob patterns, found without reading them
    whole: a stat per file, and the first block of each file found by a search to tell text from binary.

    Each path contributes its files in sorted order; paths keep the order given; a file named twice is
    read once, and so is a file reached twice through links (the second is in `skipped`). Folders and patterns give every non-hidden file that holds text (files.py says how that
    is decided, and how include/exclude patterns filter them); a file named directly is taken as it is.
    Files must be UTF-8, which is checked when they are tokenized (build_token_cache); errors="replace"
    reads invalid bytes as U+FFFD instead. Empty files are left out (in `skipped`). A file of records
    (JSON Lines, a JSON array, Parquet: formats.py) gives one document per record, from `text_field`.
    """
    if errors not in ("strict", "replace"):
        raise DataError(f"errors must be 'strict' or 'replace', got {errors!r}")
    if not paths:
        raise DataError("no data paths given; name files, folders or glob patterns, or use the default corpus")
    search = FileSearch(errors, check_patterns(include, "include"), check_patterns(exclude, "exclude"))
    for path in paths:
        search.add(os.fspath(path))
    documents, skipped, first_name = [], search.skipped, {}
    for file in dict.fromkeys(search.files):
        real = os.path.realpath(file)
        if real in first_name:  # a link to a file read already, or its second name: the same text once
            skipped.append((file, f"duplicate: the same file as {first_name[real]}"))
            continue
        first_name[real] = file
        stat = os.stat(file)
        if stat.st_size:
            field = text_field if file_format(file)[0] in RECORD_FORMATS else None
            documents.append(Document(file, stat.st_size, stat.st_mtime_ns, errors, text_field=field))
        else:
            skipped.append((file, "empty"))
    if not documents:
        empty = [file for file, reason in skipped if reason == "empty"]
        raise DataError(f"the corpus has no text: {', '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty")
    return Corpus(tuple(documents), tuple(skipped), search.hidden)


def build_tokenizer(kind: str, corpus: Corpus, merges: int | None = None) -> Tokenizer:
    """GPT-2's tokenizer (with `merges`: only its first that many merges), a character-level one whose
    vocabulary is every character of the corpus, or the one in the folder `kind` (`gptlab tokenizer train`).

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
                chars.update(block or "")
        return CharTokenizer.from_text("".join(chars))
    return read_tokenizer_folder(kind)


# ----------------------------------------------------------------------------------------------
# Held-out split


def split_index(n_chars: int, train_fraction: float = TRAIN_FRACTION) -> int:
    """Characters before this index are training text; the rest (by default the last 10%) is validation text."""
    return int(train_fraction * n_chars)


def split_text(text: str) -> tuple[str, str]:
    cut = split_index(len(text))
    return text[:cut], text[cut:]
