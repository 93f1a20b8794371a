"""Tokenizer files of Hugging Face model folders, written (hf_format.py reads them).

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
from pathlib import Path

from ..hf_format import (
    HF_MERGES_FILE,
    HF_TOKENIZER_CONFIG,
    HF_TOKENIZER_JSON,
    HF_VOCAB_FILE,
    bpe_vocabulary,
)
from ..tokenizer import (
    EOT_TEXT,
    Tokenizer,
)

# Where an export's chat template parts the pieces gptlab encodes apart; its tokenizer splits there and drops it.
SEGMENT_MARK = "<|gptlab:piece|>"
# Not in the vocabulary (which holds single characters), so transformers refuses an unknown character the
# way CharTokenizer does instead of mapping it to some id.
UNKNOWN_CHARACTER = "<|character not in the vocabulary|>"


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
        "model": {
            "type": "WordLevel",
            "vocab": {char: index for index, char in enumerate(chars)},
            "unk_token": UNKNOWN_CHARACTER,
        },
    }


def end_of_text_token(eot_id: int) -> dict:
    """tokenizer.json's entry for <|endoftext|>: a special token, matched before any pre-tokenizer runs."""
    return {
        "id": eot_id,
        "content": EOT_TEXT,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


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
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [line.split(" ") for line in merges],
        },
    }


def write_tokenizer_files(
    folder: Path,
    tokenizer: Tokenizer,
    context_length: int | None,
    padding: bool = False,
    chat_template: str | None = None,
) -> None:
    """The tokenizer's files for AutoTokenizer.from_pretrained(folder) (see the module docstring). `padding`:
    end-of-text is the padding token too (a classifier's batches are right-padded with it, as gptlab's are).
    `context_length` None (a tokenizer folder, no model): transformers' own limit, none.
    `chat_template`: the Jinja of an instruction-tuned model's template, written with SEGMENT_MARK
    (templates.jinja_template(name, SEGMENT_MARK)); the tokenizer then drops the mark."""
    spec = tokenizer.spec()
    settings = {
        **({"model_max_length": context_length} if context_length is not None else {}),
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        **({"pad_token": EOT_TEXT, "padding_side": "right"} if padding else {}),
        "clean_up_tokenization_spaces": False,  # True would turn a decoded "a ," into "a,"
    }
    if spec["type"] in ("gpt2", "bpe"):
        vocab, merges = bpe_vocabulary(tokenizer)
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
