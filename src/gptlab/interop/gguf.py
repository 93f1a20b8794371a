"""GGUF export: a gptlab model as llama.cpp's "gpt2" architecture, which llama.cpp, Ollama and LM Studio run.

The file holds what llama.cpp's own convert_hf_to_gguf.py writes for a transformers GPT-2 folder:
  tensors   the Hugging Face names (hf_format.py's key_map) renamed by the gguf package's own GPT-2 name
            map (wte -> token_embd, h.N.attn.c_attn -> blk.N.attn_qkv, ...). The converter transposes
            HF's Conv1D weights back to [out, in]; gptlab's nn.Linear weights are stored that way already.
            A tied head is left out (llama.cpp then reads token_embd for the output, as for GPT-2 itself);
            a model without qkv bias gets zero biases, which llama.cpp's GPT-2 requires.
  types     1-D tensors (norms, biases) and the position table stay F32, as the converter keeps them;
            every other matrix, the token embedding and output head included, takes the chosen type.
  metadata  gpt2.{context_length, embedding_length, feed_forward_length, block_count, attention.head_count,
            attention.layer_norm_epsilon}, general.file_type, and the tokenizer as tokenizer.ggml.model
            "gpt2", pre-tokenizer "gpt-2", tokens (byte-level strings, as in vocab.json), token types,
            merges and bos/eos = end-of-text; an instruction-tuned model's chat template as Jinja
            (tokenizer.chat_template), which llama.cpp renders and then tokenizes as one text.
A classifier is refused: llama.cpp's gpt2 architecture has no classification head.

Character-level vocabularies become a byte-level BPE that encodes exactly as CharTokenizer (char_merges).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import UserError
from ..hf_format import bpe_vocabulary, key_map
from ..model import GPTModel
from ..tokenizer import EOT_TEXT, Tokenizer, gpt2_byte_alphabet
from .hf import check_head_rows

ARCH = gguf.MODEL_ARCH.GPT2
# --outtype -> (general.file_type, the type of the matrices that are not kept in F32)
OUTTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0),  # every matrix, as llama-quantize --pure
}
# Byte 0xFF never occurs in UTF-8, so this merge never applies; it is there because llama.cpp refuses a
# "gpt2" vocabulary without tokenizer.ggml.merges and GGUF cannot store an empty array.
UNUSED_MERGE = "ÿ ÿ"


@dataclass(frozen=True)
class GGUFExport:
    """What export_gguf wrote."""

    path: Path
    outtype: str
    n_tensors: int
    n_bytes: int

    def format(self) -> str:
        return f"wrote {self.path} ({self.outtype}, {self.n_tensors} tensors, {self.n_bytes / 2**20:.1f} MiB)"


def gguf_tensors(model: GPTModel) -> dict[str, torch.Tensor]:
    """The model's weights under llama.cpp's GPT-2 names, in gptlab's [out, in] layout (ggml's layout)."""
    cfg = model.cfg
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    qkv = state["trf_blocks.0.att.qkv.weight"]
    for layer in range(cfg.n_layers):  # GPT-2 in llama.cpp needs qkv biases; zeros compute the same
        state.setdefault(f"trf_blocks.{layer}.att.qkv.bias", qkv.new_zeros(3 * cfg.emb_dim))
    hf_names = {ours: theirs for ours, (theirs, _) in key_map(cfg.replace(qkv_bias=True)).items()}
    if not cfg.tie_embeddings:
        hf_names["out_head.weight"] = "lm_head.weight"
    name_map = gguf.get_tensor_name_map(ARCH, cfg.n_layers)
    return {
        name_map.get_name(theirs, try_suffixes=(".weight", ".bias")): state[ours] for ours, theirs in hf_names.items()
    }


def stored_type(name: str, tensor: torch.Tensor, outtype: str) -> gguf.GGMLQuantizationType:
    """The converter's rule: 1-D tensors and the position table stay F32, other matrices take `outtype`."""
    keep_f32 = tensor.dim() <= 1 or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".")
    return gguf.GGMLQuantizationType.F32 if keep_f32 else OUTTYPES[outtype][1]


def encode_tensor(
    tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """(stored bytes or floats, the type they really have); like the converter, a matrix whose rows are not
    a whole number of quantisation blocks falls back to F16."""
    data = tensor.float().cpu().contiguous().numpy()
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def byte_level(text: str) -> str:
    """GPT-2's printable spelling of the UTF-8 bytes of `text`, as vocab.json and llama.cpp write tokens."""
    alphabet = gpt2_byte_alphabet()
    return "".join(alphabet[byte] for byte in text.encode("utf-8"))


def char_merges(chars: str) -> list[str]:
    """Merges that rebuild each multi-byte character from its bytes, left to right.

    llama.cpp's BPE splits a word into bytes and applies any listed merge, whether or not its result is a
    token, so each character's bytes join into exactly that character's token. No merge can join bytes of
    two characters: every right part is a UTF-8 continuation byte, which only follows bytes of its own
    character. So the tokens are CharTokenizer's, one per character (an ASCII-only vocabulary needs none).
    """
    merges: dict[str, None] = {}  # ordered and without repeats: characters share leading bytes
    for char in chars:
        letters = byte_level(char)  # one letter per byte
        for end in range(1, len(letters)):
            merges[f"{letters[:end]} {letters[end]}"] = None
    return list(merges) or [UNUSED_MERGE]


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for the tokenizer.ggml.* keys; ids past the tokenizer's (a padded
    embedding) are "[PAD<id>]" user-defined tokens, as the converter writes them."""
    spec = tokenizer.spec()
    if spec["type"] in ("gpt2", "bpe"):
        vocab, lines = bpe_vocabulary(tokenizer)
        tokens, merges = sorted(vocab, key=vocab.get), lines[1:]  # merges.txt line 0 is a version header
    else:
        tokens, merges = [byte_level(char) for char in spec["chars"]] + [EOT_TEXT], char_merges(spec["chars"])
    types = [gguf.TokenType.NORMAL] * len(tokens)
    types[tokenizer.eot_id] = gguf.TokenType.CONTROL
    padding = range(len(tokens), vocab_size)
    return (
        [*tokens, *(f"[PAD{i}]" for i in padding)],
        [*types, *(gguf.TokenType.USER_DEFINED for _ in padding)],
        merges,
    )


def check_destination(path: Path, force: bool) -> None:
    if path.is_dir():
        raise UserError(f"{path} is a folder; give the .gguf file to write, e.g. {path / 'model.gguf'}")
    if path.exists() and not force:
        raise UserError(f"{path} exists; choose another file name, or pass --force to replace it")


def export_gguf(
    model: GPTModel,
    tokenizer: Tokenizer,
    out_path: Path,
    outtype: str = "f32",
    force: bool = False,
    chat_template: str | None = None,
) -> GGUFExport:
    """Write the model and its tokenizer as one GGUF file (see the module docstring for what it holds).
    `chat_template`: Jinja (templates.jinja_template(name), without a segment mark: llama.cpp's tokenizer
    would keep it), stored as tokenizer.chat_template.

    The file is written next to `out_path` under a temporary name and renamed into place, so a failed
    export leaves nothing behind and an existing file is only replaced (with `force`) by a complete one.
    """
    out_path = Path(out_path)
    if outtype not in OUTTYPES:
        raise UserError(f"unknown GGUF outtype {outtype!r}; choose one of: {', '.join(OUTTYPES)}")
    check_destination(out_path, force)
    check_head_rows(model, None)
    cfg = model.cfg
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    tokens, token_types, merges = vocabulary(tokenizer, cfg.vocab_size)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[ARCH])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(out_path.stem)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.emb_dim)
    writer.add_feed_forward_length(4 * cfg.emb_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_layer_norm_eps(model.final_norm.eps)
    writer.add_file_type(OUTTYPES[outtype][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    if chat_template:
        writer.add_chat_template(chat_template)
    tensors = gguf_tensors(model)
    for name, tensor in tensors.items():
        data, qtype = encode_tensor(tensor, stored_type(name, tensor, outtype))
        writer.add_tensor(name, data, raw_dtype=qtype)

    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()  # flushed before it takes the final name
        os.replace(tmp, out_path)
    except OSError as error:
        raise UserError(
            f"cannot write {out_path} ({error.strerror or error}); choose a folder you can write to "
            "with room for the file"
        ) from None
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return GGUFExport(out_path, outtype, len(tensors), out_path.stat().st_size)
