"""The tiny corpus the training tests share (test_train.TEXT): as a token cache and as a file."""

from pathlib import Path

import pytest
from test_train import TEXT

from gptlab.data import build_token_cache, build_tokenizer, read_corpus
from gptlab.training.sources import TrainingData


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory):
    """The character tokenizer and the training data, built once per module."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "text.txt").write_text(TEXT, encoding="utf-8")
    corpus = read_corpus([folder / "text.txt"])
    tokenizer = build_tokenizer("char", corpus)
    cache = build_token_cache(corpus, tokenizer, folder / "cache", progress=False)
    return tokenizer, TrainingData(cache.train_tokens, cache.val_tokens, cache.val_target_bytes)


@pytest.fixture
def corpus(tmp_path) -> Path:
    """The text as a file, for the command line."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path
