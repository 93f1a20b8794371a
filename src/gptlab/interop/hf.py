"""Hugging Face GPT-2 folders, written and downloaded: exports that transformers loads as GPT2LMHeadModel
or GPT2ForSequenceClassification, on the mapping of names and layouts that hf_format.py (which reads
such folders) defines, and OpenAI's GPT-2 weights fetched from the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import (
    ClassifierHead,
    read_json,
    write_folder_atomically,
)
from ..errors import DownloadError, UserError
from ..hf_format import (
    BLOCK_KEYS,
    HF_CLASSIFIER,
    HF_CONFIG_FILE,
    HF_LM,
    HF_LM_HEAD,
    HF_MERGES_FILE,
    HF_SAFETENSORS_FILE,
    HF_SAFETENSORS_INDEX,
    HF_TOKENIZER_JSON,
    HF_VOCAB_FILE,
    TOKENIZER_FILES,
    is_hf_gpt2_folder,
    state_dict_to_hf,
)
from ..model import GPTModel
from ..tokenizer import Tokenizer
from .hf_tokenizer import write_tokenizer_files

# ---------------------------------------------------------------------------------------------------
# Hugging Face GPT-2 folders: reading them, writing them, fetching them from the Hub.

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
HUB_FILES = [
    HF_CONFIG_FILE,
    HF_SAFETENSORS_FILE,
    HF_SAFETENSORS_INDEX,
    "model-*.safetensors",
    HF_VOCAB_FILE,
    HF_MERGES_FILE,
    HF_TOKENIZER_JSON,
    HF_GENERATION_CONFIG,
]


def hf_config_for(model: GPTModel, tokenizer: Tokenizer, head: ClassifierHead | None = None) -> dict:
    """transformers' GPT2Config fields for the model (config.json of an export). A classifier's name its
    labels and the padding id, end-of-text: GPT2ForSequenceClassification reads each row at its last token
    that is not padding, which is gptlab's last token (a text's own ids never hold end-of-text)."""
    cfg = model.cfg
    labels = (
        {}
        if head is None
        else {
            "id2label": dict(enumerate(head.labels)),
            "label2id": {label: index for index, label in enumerate(head.labels)},
            "pad_token_id": tokenizer.eot_id,
        }
    )
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
        raise UserError(
            f"the classifier's head has {rows} rows but {len(head.labels)} labels "
            f"({', '.join(head.labels)}); give the labels it was trained with"
        )
    if head is None and rows != model.cfg.vocab_size:
        raise UserError(
            f"the model's output head has {rows} rows, not one per token (vocab_size "
            f"{model.cfg.vocab_size}): it is a classifier; export it with its labels (load_classifier)"
        )


def export_hf(
    model: GPTModel,
    tokenizer: Tokenizer,
    outdir: Path,
    force: bool = False,
    head: ClassifierHead | None = None,
    chat_template: str | None = None,
) -> list[str]:
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
        write_tokenizer_files(
            folder, tokenizer, model.cfg.context_length, padding=head is not None, chat_template=chat_template
        )

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
