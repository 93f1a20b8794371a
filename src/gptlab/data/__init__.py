"""Training data: read a text corpus, split it, tokenize it once into a cache, and cut it into windows.

The pipeline:
    corpus = read_corpus(["books/", "notes/*.md"], exclude=["drafts/*"])   # or default_corpus(): CPython's docs
    print(corpus.summary())   # read 12 documents (3,410,221 bytes); skipped 2 files: 1 binary, 1 excluded
    tokenizer = build_tokenizer("gpt2", corpus)          # or "char": one id per character of the corpus
    cache = build_token_cache(corpus, tokenizer, "cache/tokens")
    train = TokenWindows(cache.train_tokens, context_length=256, stride=256)
    for batch in train.batches(batch_size=8, seed=123): ...
    for inputs, targets in validation_batches(cache.val_tokens, 256, batch_size=8): ...

To score a whole text, build its cache with train_fraction=0.0: every token is on the validation side
and cache.val_target_bytes is the bits-per-byte denominator.

files.py finds the files (by name for the formats formats.py reads, else by content; include/exclude
patterns; what was skipped and why),
corpus.py defines documents and the split, cache.py tokenizes into memory-mapped files (reused without
reading the files while they are unchanged), windows.py cuts training windows and validation batches,
order.py shuffles them per epoch in constant memory.
"""

from .cache import (
    MANIFEST_FILE,
    SPLIT_FILES,
    TokenCache,
    build_token_cache,
    default_cache_dir,
    open_token_cache,
)
from .corpus import (
    EMBEDDED_PATH,
    TRAIN_FRACTION,
    Corpus,
    Document,
    build_tokenizer,
    default_corpus,
    default_corpus_text,
    read_corpus,
    split_index,
    split_text,
)
from .errors import DataError
from .order import EpochOrder
from .tokens import CHUNK_CHARS, chunks, safe_cut, token_byte_lengths
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
    "EpochOrder",
    "IGNORE_INDEX",
    "MANIFEST_FILE",
    "SPLIT_FILES",
    "TRAIN_FRACTION",
    "TokenCache",
    "TokenWindows",
    "build_token_cache",
    "build_tokenizer",
    "check_length",
    "chunks",
    "default_cache_dir",
    "default_corpus",
    "default_corpus_text",
    "open_token_cache",
    "read_corpus",
    "safe_cut",
    "split_index",
    "split_text",
    "token_byte_lengths",
    "token_rows",
    "validation_batches",
]
