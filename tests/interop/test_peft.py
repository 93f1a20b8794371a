"""gptlab LoRA adapters exported for Hugging Face PEFT: PeftModel on transformers' GPT2LMHeadModel (built
from gptlab's own export) computes gptlab's logits, puts adapters on exactly the layers gptlab adapted,
and merges them into the same model gptlab's merge_lora gives. No download: every model is random.
"""

import json

import pytest
import torch

from gptlab.config import GPTConfig
from gptlab.finetune.lora import (
    LoRAConfig,
    apply_lora,
    lora_modules,
    lora_parameters,
    merge_lora,
    save_adapter,
)
from gptlab.interop.hf import export_hf
from gptlab.interop.peft import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    export_peft_adapter,
    hf_module_name,
)
from gptlab.model import GPTModel
from gptlab.tokenizer import CharTokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TINY = GPTConfig(vocab_size=40, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)
TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789 .,")  # 40 ids with end-of-text
TARGET_SETS = {
    "attention-ff-head": ("qkv", "out_proj", "fc", "proj", "head"),
    "qkv-and-ff-proj": ("qkv", "proj"),  # mlp.c_proj but not attn.c_proj: the ambiguous name
    "attention-out-proj": ("out_proj",),  # attn.c_proj but not mlp.c_proj
    "head-only": ("head",),  # no Conv1D at all: fan_in_fan_out off
}
# PEFT's own notice when one fan_in_fan_out cannot fit both the Conv1D layers and the nn.Linear head
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set:UserWarning")


def random_model(cfg: GPTConfig = TINY) -> GPTModel:
    torch.manual_seed(0)
    model = GPTModel(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def adapted_model(tmp_path, targets: tuple[str, ...], cfg: GPTConfig = TINY) -> GPTModel:
    """A random model, exported to tmp_path/hf as it is, then given random adapters (B non-zero)."""
    model = random_model(cfg)
    export_hf(model, TOKENIZER, tmp_path / "hf")
    apply_lora(model, LoRAConfig(rank=4, alpha=12, dropout=0.1, targets=targets))
    with torch.no_grad():
        for param in lora_parameters(model):
            param.copy_(0.2 * torch.randn_like(param))
    return model


def peft_model(tmp_path, peft_dir):
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", attn_implementation="eager")
    return peft.PeftModel.from_pretrained(base, peft_dir).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("targets", TARGET_SETS.values(), ids=TARGET_SETS.keys())
def test_peft_computes_our_logits_with_adapters_on_the_same_layers(tmp_path, targets):
    model = adapted_model(tmp_path, targets)
    files = export_peft_adapter(model, tmp_path / "peft")
    assert files == [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE]
    theirs = peft_model(tmp_path, tmp_path / "peft")
    wrapped = {
        name.removeprefix("base_model.model.").removesuffix(".lora_A")
        for name, _ in theirs.named_modules()
        if name.endswith(".lora_A")
    }
    assert wrapped == {hf_module_name(name) for name in lora_modules(model)}
    with torch.no_grad(), theirs.disable_adapter():
        base_logits = theirs(ids()).logits
    with torch.no_grad():
        ours, peft_logits = model(ids()), theirs(ids()).logits
    assert (base_logits - ours).abs().max() > 0.05  # the adapters matter
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=0)


def test_peft_merge_gives_our_merged_model(tmp_path):
    model = adapted_model(tmp_path, TARGET_SETS["attention-ff-head"])
    export_peft_adapter(model, tmp_path / "peft")
    theirs = peft_model(tmp_path, tmp_path / "peft").merge_and_unload()
    merged = merge_lora(model)
    theirs_state = theirs.state_dict()
    for layer in range(TINY.n_layers):
        torch.testing.assert_close(
            theirs_state[f"transformer.h.{layer}.attn.c_attn.weight"].T, merged.trf_blocks[layer].att.qkv.weight
        )
        torch.testing.assert_close(
            theirs_state[f"transformer.h.{layer}.mlp.c_proj.weight"].T, merged.trf_blocks[layer].ff.proj.weight
        )
    torch.testing.assert_close(theirs_state["lm_head.weight"], merged.out_head.weight)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids()).logits, merged(ids()), atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_a_tied_head_exports_too(tmp_path):
    model = adapted_model(tmp_path, ("fc", "head"), TINY.replace(tie_embeddings=True))
    export_peft_adapter(model, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(tmp_path, tmp_path / "peft")(ids()).logits, model(ids()), atol=1e-4, rtol=0
        )


def test_export_from_an_adapter_folder_equals_export_from_the_model(tmp_path):
    config = LoRAConfig(rank=4, alpha=12, dropout=0.1, targets=TARGET_SETS["qkv-and-ff-proj"])
    model = adapted_model(tmp_path, config.targets)
    save_adapter(tmp_path / "adapter", model, config, base="runs/base")
    export_peft_adapter(model, tmp_path / "from-model")
    export_peft_adapter(tmp_path / "adapter", tmp_path / "from-folder", base_model_name_or_path=str(tmp_path / "hf"))
    for name in (PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE):
        assert (tmp_path / "from-folder" / name).exists()
    meta = json.loads((tmp_path / "from-folder" / PEFT_CONFIG_FILE).read_text())
    assert meta["base_model_name_or_path"] == str(tmp_path / "hf")
    assert (meta["r"], meta["lora_alpha"], meta["lora_dropout"], meta["fan_in_fan_out"]) == (4, 12, 0.1, True)
    assert meta["target_modules"] == ["attn.c_attn", "mlp.c_proj"]
    with torch.no_grad():
        torch.testing.assert_close(
            peft_model(tmp_path, tmp_path / "from-folder")(ids()).logits, model(ids()), atol=1e-4, rtol=0
        )


def test_export_refuses_to_replace_other_files(tmp_path):
    model = adapted_model(tmp_path, ("qkv",))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="out is not empty and is not a PEFT adapter; choose a new folder"):
        export_peft_adapter(model, tmp_path / "out")
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"
    export_peft_adapter(model, tmp_path / "peft")
    export_peft_adapter(model, tmp_path / "peft")  # an earlier export may be replaced
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        export_peft_adapter(random_model(), tmp_path / "new")
