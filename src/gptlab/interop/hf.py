"""Hugging Face GPT-2 layout <-> gptlab: the one place that knows how the two name and store weights,
and the reading, writing and downloading of Hugging Face GPT-2 folders built on that mapping.

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
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file, save_file

from ..checkpoint import (
    ClassifierHead,
    model_from_state_dict,
    read_json,
    write_folder_atomically,
)
from ..config import GPTConfig
from ..errors import DownloadError, UserError
from ..model import GPTModel
from ..tokenizer import Tokenizer
from .hf_tokenizer import (
    HF_MERGES_FILE,
    HF_TOKENIZER_JSON,
    HF_VOCAB_FILE,
    TOKENIZER_FILES,
    load_hf_tokenizer,
    write_tokenizer_files,
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
        raise UserError(f"config.json's id2label must number the labels 0 to {len(id2label) - 1}, got ids "
                         f"{', '.join(map(str, id2label))}; fix config.json")
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


def state_dict_from_hf(hf_state: Mapping[str, torch.Tensor], cfg: GPTConfig,
                       head: ClassifierHead | None = None) -> dict[str, torch.Tensor]:
    """Rename and transpose an HF GPT-2 state dict into gptlab's names (with `head`, a classifier's: its score
    weight becomes out_head.weight).

    Accepts keys with or without the 'transformer.' prefix, with or without lm_head.weight (tied),
    and ignores the old attn.bias / attn.masked_bias mask buffers.
    """
    hf = {key.removeprefix("transformer."): value for key, value in hf_state.items()}
    state: dict[str, torch.Tensor] = {}
    for ours, (theirs, transposed) in key_map(cfg).items():
        if theirs not in hf:
            raise UserError(f"checkpoint is missing weight {theirs!r} (for {ours}); is it a GPT-2 checkpoint of this shape?")
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


def state_dict_to_hf(state: Mapping[str, torch.Tensor], cfg: GPTConfig,
                     head: ClassifierHead | None = None) -> dict[str, torch.Tensor]:
    """gptlab names -> HF GPT2LMHeadModel names (with the 'transformer.' prefix and lm_head.weight), or with
    `head` GPT2ForSequenceClassification's (score.weight in place of lm_head.weight)."""
    hf: dict[str, torch.Tensor] = {}
    for ours, (theirs, transposed) in key_map(cfg).items():
        tensor = state[ours]
        hf[f"transformer.{theirs}"] = (tensor.t() if transposed else tensor).contiguous()
    head_name = HF_LM_HEAD if head is None else HF_SCORE
    hf[head_name] = state["tok_emb.weight" if cfg.tie_embeddings else "out_head.weight"]
    return hf


# ---------------------------------------------------------------------------------------------------
# Hugging Face GPT-2 folders: reading them, writing them, fetching them from the Hub.

HF_CONFIG_FILE = "config.json"
HF_SAFETENSORS_FILE = "model.safetensors"
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"  # transformers shards big models over several files
HF_PICKLE_FILE = "pytorch_model.bin"
HF_GENERATION_CONFIG = "generation_config.json"
# config.json field marking a folder as written by export_hf, so a later export may replace it.
EXPORT_MARKER_FIELD = "exported_by"
EXPORT_FILES = {HF_CONFIG_FILE, HF_GENERATION_CONFIG, HF_SAFETENSORS_FILE, *TOKENIZER_FILES}
HUB_REPOS = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
HUB_FILES = [HF_CONFIG_FILE, HF_SAFETENSORS_FILE, HF_SAFETENSORS_INDEX, "model-*.safetensors", HF_VOCAB_FILE,
             HF_MERGES_FILE, HF_TOKENIZER_JSON, HF_GENERATION_CONFIG]
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
    expected = {theirs: shapes[ours][::-1] if transposed else shapes[ours]
                for ours, (theirs, transposed) in key_map(cfg).items()}
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


def hf_config_for(model: GPTModel, tokenizer: Tokenizer, head: ClassifierHead | None = None) -> dict:
    """transformers' GPT2Config fields for the model (config.json of an export). A classifier's name its
    labels and the padding id, end-of-text: GPT2ForSequenceClassification reads each row at its last token
    that is not padding, which is gptlab's last token (a text's own ids never hold end-of-text)."""
    cfg = model.cfg
    labels = {} if head is None else {
        "id2label": dict(enumerate(head.labels)),
        "label2id": {label: index for index, label in enumerate(head.labels)},
        "pad_token_id": tokenizer.eot_id,
    }
    return {
        "model_type": "gpt2",
        "architectures": [HF_LM if head is None else HF_CLASSIFIER],
        **labels,
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.attention_drop_rate,
        "layer_norm_epsilon": model.final_norm.eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
        EXPORT_MARKER_FIELD: "gptlab",
    }


def hf_export_tensors(model: GPTModel, head: ClassifierHead | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under GPT2LMHeadModel's names (GPT2ForSequenceClassification's with `head`),
    filled in where GPT-2 has more than gptlab: a model without qkv bias gets zero c_attn biases (the same
    function); a tied head is left out (safetensors refuses a tensor stored twice; transformers re-ties it
    from tie_word_embeddings)."""
    cfg = model.cfg
    tensors = state_dict_to_hf(model.state_dict(), cfg, head)
    if cfg.tie_embeddings:
        del tensors[HF_LM_HEAD]
    if not cfg.qkv_bias:
        qkv_bias_name = BLOCK_KEYS["att.qkv.bias"][0]
        weight = model.trf_blocks[0].att.qkv.weight
        for layer in range(cfg.n_layers):
            tensors[f"transformer.h.{layer}.{qkv_bias_name}"] = torch.zeros(
                3 * cfg.emb_dim, dtype=weight.dtype, device=weight.device
            )
    return {name: tensor.detach().cpu() for name, tensor in tensors.items()}


def is_previous_export(folder: Path) -> bool:
    """A folder export_hf wrote and nobody added files to: replacing it loses nothing."""
    try:
        marked = read_json(folder / HF_CONFIG_FILE).get(EXPORT_MARKER_FIELD) == "gptlab"
    except (OSError, ValueError):
        return False
    return marked and {entry.name for entry in folder.iterdir()} <= EXPORT_FILES


def check_head_rows(model: GPTModel, head: ClassifierHead | None) -> None:
    """The output head has a row per token (a language model) or, with `head`, one per label; else a one-line
    ValueError, before anything is written in a shape transformers would refuse to load."""
    rows = model.out_head.out_features
    if head is not None and rows != len(head.labels):
        raise UserError(f"the classifier's head has {rows} rows but {len(head.labels)} labels "
                         f"({', '.join(head.labels)}); give the labels it was trained with")
    if head is None and rows != model.cfg.vocab_size:
        raise UserError(f"the model's output head has {rows} rows, not one per token (vocab_size "
                         f"{model.cfg.vocab_size}): it is a classifier; export it with its labels (load_classifier)")


def export_hf(model: GPTModel, tokenizer: Tokenizer, outdir: Path, force: bool = False,
              head: ClassifierHead | None = None, chat_template: str | None = None) -> list[str]:
    """Write the model as a Hugging Face GPT-2 folder that transformers' GPT2LMHeadModel.from_pretrained
    (with `head`, a classifier: GPT2ForSequenceClassification, AutoModelForSequenceClassification and
    pipeline("text-classification")) and AutoTokenizer.from_pretrained load offline. Returns the file names.
    `chat_template` (Jinja, templates.jinja_template(name, hf_tokenizer.SEGMENT_MARK)) goes into
    tokenizer_config.json, for apply_chat_template (hf_tokenizer.py says why the mark).

    A model without qkv bias is written with zero c_attn biases (GPT-2 always has them; zeros compute the
    same function), so it loads back as a qkv_bias=True model with those zeros.
    The tokenizer files (hf_tokenizer.py) encode as gptlab does, for GPT-2's BPE, a truncated one, or characters.
    An existing non-empty `outdir` is only replaced when it is an earlier export or `force` is set.
    """
    outdir = Path(outdir)
    if outdir.exists() and not force:
        if not outdir.is_dir():
            raise UserError(f"{outdir} exists and is not a folder; choose a new folder to export to")
        if any(outdir.iterdir()) and not is_previous_export(outdir):
            raise UserError(
                f"{outdir} is not empty and is not an earlier gptlab export; choose a new folder, "
                "or pass --force to replace it"
            )
    check_head_rows(model, head)
    config = hf_config_for(model, tokenizer, head)
    tensors = hf_export_tensors(model, head)

    def write(folder: Path) -> None:
        (folder / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
        (folder / HF_GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")
        save_file(tensors, str(folder / HF_SAFETENSORS_FILE), metadata={"format": "pt"})
        write_tokenizer_files(folder, tokenizer, model.cfg.context_length, padding=head is not None,
                              chat_template=chat_template)

    write_folder_atomically(outdir, write)
    return sorted(entry.name for entry in outdir.iterdir())


def download_gpt2(name: str, outdir: Path) -> Path:
    """Fetch one of OpenAI's GPT-2 sizes from the Hugging Face Hub into `outdir` (a folder load_model reads)."""
    if name not in HUB_REPOS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(HUB_REPOS)}")
    outdir = Path(outdir)
    if outdir.exists() and any(outdir.iterdir()) and not is_hf_gpt2_folder(outdir):
        raise UserError(f"{outdir} is not empty and is not a GPT-2 folder; choose a new folder with --out")
    repo = HUB_REPOS[name]
    by_hand = (
        f"without a network, put config.json, model.safetensors, vocab.json and merges.txt from "
        f"https://huggingface.co/{repo} into {outdir}/ by hand, then pass that folder to --checkpoint"
    )
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise DownloadError(f"huggingface_hub is not installed (pip install 'gptlab[hub]'); or, {by_hand}") from None
    try:
        snapshot_download(repo, allow_patterns=HUB_FILES, local_dir=outdir)
    except (OSError, HfHubHTTPError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise DownloadError(f"cannot download {repo} ({reason}); {by_hand}") from None
    return outdir
