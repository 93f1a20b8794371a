"""Training a byte-level BPE on one's own corpus (`gptlab tokenizer train`), with Hugging Face's tokenizers.

The BPE has GPT-2's shape: GPT-2's pre-tokenization (tokenizer.GPT2_PATTERN), the 256 single bytes, one id
per merge, then <|endoftext|>. `tokenizers` learns the merges from the training side of the corpus's split
(corpus.py: the joined text's first 90% by default, so validation text never shapes the vocabulary);
gptlab then runs the result with tiktoken, as it runs GPT-2's own (GPT2Tokenizer.from_merges).
tests/data/test_tokenizer_training.py checks that `tokenizers`, transformers' AutoTokenizer on the written
folder and gptlab give the same tokens.

Compression, as nanochat's tokenizer evaluation reports it: bytes per token on the held-out side, for the
trained BPE and for GPT-2's on the same text.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..tokenizer import (
    EOT_TEXT,
    GPT2_BYTES,
    TOKENIZER_FILE,
    TOKENIZER_FORMAT,
    GPT2Tokenizer,
    load_tokenizer,
)
from .corpus import TRAIN_FRACTION, Corpus, split_index
from .errors import DataError
from .formats import BOUNDARY

MIN_VOCAB = GPT2_BYTES + 2  # the bytes, one merge, end-of-text
EVAL_CHARS = 10_000_000  # compression is measured on at most this much held-out text


@dataclass(frozen=True)
class TrainedTokenizer:
    tokenizer: GPT2Tokenizer
    requested: int  # the vocabulary size asked for
    train_chars: int  # characters the merges were learned from
    held_out_bytes: int  # UTF-8 bytes of the held-out text compression was measured on
    held_out_tokens: int
    gpt2_tokens: int  # GPT-2's BPE on the same text

    def summary(self) -> str:
        made = self.tokenizer.vocab_size
        short = "" if made == self.requested else f" (of {self.requested:,} asked for: the text has no more pairs)"
        line = f"vocabulary: {made:,} ids{short}, learned from {self.train_chars:,} characters"
        if self.held_out_tokens:
            line += (
                f"; held-out compression: {self.held_out_bytes / self.held_out_tokens:.3f} bytes per token "
                f"(GPT-2's BPE: {self.held_out_bytes / self.gpt2_tokens:.3f}) on {self.held_out_bytes:,} bytes"
            )
        return line

    def record(self, corpus: Corpus, train_fraction: float) -> dict:
        """The tokenizer folder's TOKENIZER_FILE contents."""
        return {
            "format": TOKENIZER_FORMAT,
            "spec": self.tokenizer.spec(),
            "vocab_size": self.tokenizer.vocab_size,
            "trained_on": {
                "sources": [doc.path for doc in corpus.documents],
                "bytes": corpus.n_bytes,
                "train_fraction": train_fraction,
                "train_chars": self.train_chars,
            },
            "compression": {
                "held_out_bytes": self.held_out_bytes,
                "tokens": self.held_out_tokens,
                "gpt2_tokens": self.gpt2_tokens,
            },
        }


def pieces(corpus: Corpus) -> Iterator[str | None]:
    """The joined text (corpus.py) as the documents' blocks, None where a boundary marker stands."""
    for index, doc in enumerate(corpus.documents):
        if index:
            yield BOUNDARY
        yield from doc.blocks()


def split_pieces(corpus: Corpus, train_fraction: float) -> Iterator[tuple[bool, str]]:
    """(on the training side, text) for each record or block of the joined text, cut at the split."""
    total = sum(len(EOT_TEXT) if piece is BOUNDARY else len(piece) for piece in pieces(corpus))
    cut, position = split_index(total, train_fraction), 0
    for piece in pieces(corpus):
        if piece is BOUNDARY:
            position += len(EOT_TEXT)
            continue
        if position < cut < position + len(piece):
            yield True, piece[: cut - position]
            yield False, piece[cut - position :]
        elif piece:
            yield position < cut, piece
        position += len(piece)


def train_bpe(
    corpus: Corpus, vocab_size: int, train_fraction: float = TRAIN_FRACTION, min_frequency: int = 2
) -> TrainedTokenizer:
    """A byte-level BPE of at most vocab_size ids learned from the corpus's training side; fewer when its
    text has no more pairs seen min_frequency times."""
    if vocab_size < MIN_VOCAB:
        raise DataError(
            f"--vocab-size must be at least {MIN_VOCAB} (256 bytes, a merge and end-of-text), got {vocab_size}"
        )
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise DataError("training a tokenizer needs Hugging Face's tokenizers: pip install tokenizers") from None
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split
    learner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,  # end-of-text is gptlab's id after the merges, not one tokenizers learns
        min_frequency=min_frequency,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
    )
    counted = {"train": 0}
    held_out: list[str] = []

    def training_side() -> Iterator[str]:
        room = EVAL_CHARS
        for on_train_side, text in split_pieces(corpus, train_fraction):
            if on_train_side:
                counted["train"] += len(text)
                yield text
            elif room > 0:
                held_out.append(text[:room])
                room -= len(held_out[-1])

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # no warning when a process forks after training
    learner.train_from_iterator(training_side(), trainer)
    if not counted["train"]:
        raise DataError("the corpus has no text on its training side to learn a vocabulary from")
    merges = json.loads(learner.to_str())["model"]["merges"]
    lines, made = [], set()
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if left + right not in made:  # tokenizers may make one token by two merges; gptlab's id is the first's
            made.add(left + right)
            lines.append(f"{left} {right}")
    tokenizer = GPT2Tokenizer.from_merges(lines)
    return TrainedTokenizer(
        tokenizer,
        requested=vocab_size,
        train_chars=counted["train"],
        held_out_bytes=sum(len(text.encode("utf-8")) for text in held_out),
        held_out_tokens=sum(map(len, tokenizer.encode_batch(held_out))),
        gpt2_tokens=sum(map(len, load_tokenizer("gpt2").encode_batch(held_out))),
    )


def write_tokenizer_folder(folder: str | os.PathLike, record: dict) -> Path:
    """TOKENIZER_FILE in folder (made if missing), written whole under a temporary name, then renamed."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    path = Path(folder) / TOKENIZER_FILE
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, ensure_ascii=False) + "\n", "utf-8")
    partial.replace(path)
    return path
