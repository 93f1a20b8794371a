"""Training data: read a text corpus, split it, tokenize it once into a cache, and cut it into windows.

The pipeline:
    corpus = read_corpus(["books/", "notes/*.md"])      # or default_corpus(): CPython's bundled docs
    tokenizer = build_tokenizer("gpt2", corpus)          # or "char": one id per character of the corpus
    cache = build_token_cache(corpus, tokenizer, "cache/tokens")
    train = TokenWindows(cache.train_tokens, context_length=256, stride=256)
    for batch in train.batches(batch_size=8, seed=123): ...
    for inputs, targets in validation_batches(cache.val_tokens, 256, batch_size=8): ...

corpus.py reads documents and defines the split, cache.py tokenizes into memory-mapped files,
windows.py cuts training windows and validation batches.
"""

from .cache import (
    CHUNK_CHARS,
    MANIFEST_FILE,
    SPLIT_FILES,
    TokenCache,
    build_token_cache,
    chunks,
    open_token_cache,
    safe_cut,
)
from .corpus import (
    EMBEDDED_PATH,
    TEXT_SUFFIXES,
    TRAIN_FRACTION,
    Corpus,
    DataError,
    Document,
    build_tokenizer,
    default_corpus,
    default_corpus_text,
    read_corpus,
    split_index,
    split_text,
)
from .windows import (
    IGNORE_INDEX,
    Batch,
    TokenWindows,
    check_length,
    token_rows,
    validation_batches,
)

__all__ = [
    "Batch",
    "CHUNK_CHARS",
    "Corpus",
    "DataError",
    "Document",
    "EMBEDDED_PATH",
    "IGNORE_INDEX",
    "MANIFEST_FILE",
    "SPLIT_FILES",
    "TEXT_SUFFIXES",
    "TRAIN_FRACTION",
    "TokenCache",
    "TokenWindows",
    "build_token_cache",
    "build_tokenizer",
    "check_length",
    "chunks",
    "default_corpus",
    "default_corpus_text",
    "open_token_cache",
    "read_corpus",
    "safe_cut",
    "split_index",
    "split_text",
    "token_rows",
    "validation_batches",
]
