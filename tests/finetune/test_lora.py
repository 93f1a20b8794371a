"""LoRA: the base model's exact logits at initialisation, training that moves only A and B, a merge that
computes what the adapters computed, adapter folders that refuse the wrong base, the parameter count
in closed form, and `gptlab merge-lora`.

The reference for every adapted layer is the explicit formula y = x·Wᵀ + b + (alpha / rank)·x·Aᵀ·Bᵀ.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model as random_base_model

from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.config import GPTConfig, get_config
from gptlab.finetune.lora import (
    ADAPTER_CONFIG_FILE,
    LoRAConfig,
    LoRALinear,
    adapter_state_dict,
    apply_lora,
    count_parameters,
    load_adapter,
    lora_config_of,
    lora_modules,
    lora_parameters,
    merge_lora,
    parameter_summary,
    read_adapter,
    save_adapter,
)
from gptlab.inference.quantize import is_quantized, quantize_model
from gptlab.loading import load_model
from gptlab.model import GPTModel
from gptlab.tokenizer import CharTokenizer
from gptlab.training.dropout import DropoutSwitch

TINY = GPTConfig(vocab_size=40, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)
ALL_TARGETS = ("qkv", "out_proj", "fc", "proj", "head")
TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789 .,")  # 39 characters + end-of-text = 40 ids


def random_model(cfg: GPTConfig = TINY, seed: int = 0) -> GPTModel:
    return random_base_model(cfg, seed, noise=0.1)


def random_adapters_(model: GPTModel, seed: int = 1) -> GPTModel:
    """Non-zero B (it starts at zero), so that the adapters change the model's output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in lora_parameters(model):
            param.copy_(0.2 * torch.randn_like(param))
    return model


def ids(batch: int = 2, tokens: int = 12, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, TINY.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def logits(model: GPTModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"rank": 0}, "LoRA rank must be a positive integer"),
        ({"rank": 2.5}, "LoRA rank must be a positive integer"),
        ({"alpha": 0}, "LoRA alpha must be a positive number"),
        ({"dropout": 1.0}, r"LoRA dropout must be in \[0, 1\)"),
        ({"targets": ("qkv", "c_attn")}, "LoRA targets must be some of qkv, out_proj, fc, proj, head, got 'c_attn'"),
        ({"targets": ()}, "LoRA targets must be some of .*, got 'none'"),
    ],
)
def test_config_rejects_bad_values_in_one_line(fields, message):
    with pytest.raises(ValueError, match=message) as error:
        LoRAConfig(**fields)
    assert "\n" not in str(error.value)


def test_config_targets_are_put_in_model_order():
    assert LoRAConfig(targets=["head", "proj", "qkv", "proj"]).targets == ("qkv", "proj", "head")
    assert LoRAConfig(targets="fc") == LoRAConfig(targets=("fc",))


def test_lora_linear_computes_the_explicit_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    layer = LoRALinear(base, rank=3, alpha=12)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 8)
    expected = x @ base.weight.T + base.bias + 4.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    assert layer.lora_A.shape == (3, 8) and layer.lora_B.shape == (6, 3)
    # PEFT's (and nn.Linear's) kaiming-uniform with a = √5: U(-1/√in, 1/√in)
    assert layer.lora_A.abs().max() <= 1 / 8**0.5 and layer.lora_A.abs().max() > 0.9 / 8**0.5


def test_at_initialisation_logits_are_exactly_the_base_models():
    model = random_model()
    base_logits = logits(model, ids())
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS))
    assert len(lora_modules(model)) == 4 * TINY.n_layers + 1
    assert torch.equal(logits(model, ids()), base_logits)


def test_training_moves_only_the_adapters():
    model = apply_lora(random_model(), LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=ALL_TARGETS)).train()
    frozen = {name: param.detach().clone() for name, param in model.named_parameters() if not param.requires_grad}
    adapters = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    assert set(adapters) == set(adapter_state_dict(model))
    assert len(frozen) == len(list(random_model().parameters()))
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for step in range(3):
        tokens = ids(seed=step)
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in frozen.items())
    assert all(not torch.equal(after[name], value) for name, value in adapters.items())


def test_merged_model_computes_what_the_adapters_computed():
    model = random_adapters_(apply_lora(random_model(), LoRAConfig(rank=4, alpha=6, targets=ALL_TARGETS)))
    adapted_logits = logits(model, ids())
    qkv = model.trf_blocks[1].att.qkv
    expected_qkv = qkv.base.weight + 1.5 * qkv.lora_B @ qkv.lora_A
    merged = merge_lora(model)
    assert not lora_modules(merged)
    assert merged.state_dict().keys() == GPTModel(TINY).state_dict().keys()
    assert all(param.requires_grad for param in merged.parameters())
    torch.testing.assert_close(merged.trf_blocks[1].att.qkv.weight, expected_qkv)
    torch.testing.assert_close(logits(merged, ids()), adapted_logits, atol=1e-5, rtol=0)


def test_merging_the_head_of_a_tied_model_unties_it():
    model = random_model(TINY.replace(tie_embeddings=True))
    embedding = model.tok_emb.weight.detach().clone()
    random_adapters_(apply_lora(model, LoRAConfig(rank=2, targets=("head",))))
    adapted_logits = logits(model, ids())
    merged = merge_lora(model)
    assert not merged.cfg.tie_embeddings
    assert torch.equal(merged.tok_emb.weight, embedding)
    torch.testing.assert_close(logits(merged, ids()), adapted_logits, atol=1e-5, rtol=0)


def test_adapters_stay_float32_on_a_bfloat16_base():
    model = apply_lora(random_model().to(torch.bfloat16), LoRAConfig(rank=4, targets=("qkv", "proj")))
    assert {param.dtype for param in lora_parameters(model)} == {torch.float32}
    random_adapters_(model)
    layer = model.trf_blocks[0].ff.proj
    x = torch.randn(3, 4 * TINY.emb_dim, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = layer.base(x).float() + (x.float() @ layer.lora_A.T @ layer.lora_B.T) * layer.scale
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.01)  # bfloat16 keeps 8 bits
    model(ids()).float().logsumexp(-1).mean().backward()
    assert all(param.grad is not None and param.grad.dtype == torch.float32 for param in lora_parameters(model))


def test_an_int8_model_keeps_its_adapters_but_cannot_be_merged():
    model = random_adapters_(apply_lora(random_model(), LoRAConfig(rank=2, targets=ALL_TARGETS)))
    quantized = quantize_model(model, "int8")
    layers = lora_modules(quantized)
    assert len(layers) == len(lora_modules(model)) and is_quantized(quantized)
    assert all(type(layer.base).__name__ != "Linear" for layer in layers.values())
    layer, x = layers["trf_blocks.1.ff.fc"], torch.randn(5, TINY.emb_dim)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base(x) + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T)
    # int8 weights and 7-bit activations: close to the float model, not equal
    torch.testing.assert_close(logits(quantized, ids()), logits(model, ids()), atol=0.1, rtol=0.05)
    with pytest.raises(
        ValueError,
        match=r"^cannot merge the adapter of trf_blocks\.0\.att\.qkv into a \w+ "
        r"\(no float weight\); merge into the float model, then quantize it$",
    ):
        merge_lora(quantized)
    assert len(lora_modules(quantized)) == len(layers)  # nothing merged: the model is as it was


def test_gpt2_124m_parameter_count_in_closed_form():
    with torch.device("meta"):
        model = GPTModel(get_config("gpt2"))
    total = count_parameters(model)[1]
    rank, d, layers, vocab = 16, 768, 12, 50257
    # A is (rank, in) and B (out, rank): rank·(in + out) per adapted matrix. Fused qkv is 768 → 2304.
    per_block = rank * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d))
    apply_lora(model, LoRAConfig(rank=16, alpha=16))
    assert count_parameters(model) == (layers * per_block, total + layers * per_block) == (2_359_296, 165_368_832)
    assert parameter_summary(model) == "trainable parameters: 2,359,296 of 165,368,832 (1.43%)"

    # The textbook's 2,666,528 (appendix E) adapts every Linear of the spam classifier: separate W_query,
    # W_key, W_value (3·rank·(d + d) instead of rank·(d + 3d) for the fused qkv) and a 2-class head.
    with torch.device("meta"):
        classifier = GPTModel(get_config("gpt2"))
        classifier.out_head = torch.nn.Linear(d, 2)
    apply_lora(classifier, LoRAConfig(rank=16, alpha=16, targets=ALL_TARGETS))
    trainable = count_parameters(classifier)[0]
    assert trainable == layers * per_block + rank * (d + 2) == 2_371_616
    assert trainable + layers * (3 * rank * (d + d) - rank * (d + 3 * d)) == 2_666_528
    with torch.device("meta"):
        lm = apply_lora(GPTModel(get_config("gpt2")), LoRAConfig(targets=ALL_TARGETS))
    assert count_parameters(lm)[0] == layers * per_block + rank * (d + vocab) == 3_175_696


def test_adapter_folder_round_trip(tmp_path):
    config = LoRAConfig(rank=4, alpha=8, dropout=0.05, targets=("qkv", "proj", "head"))
    model = random_adapters_(apply_lora(random_model(), config))
    save_adapter(tmp_path / "adapter", model, config, base="runs/base/best")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter.safetensors", ADAPTER_CONFIG_FILE]
    meta = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG_FILE).read_text())
    assert meta["base"] == "runs/base/best" and meta["base_config"] == TINY.to_dict()
    assert meta["lora"] == {"rank": 4, "alpha": 8, "dropout": 0.05, "targets": ["qkv", "proj", "head"]}
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.tensors.keys() == adapter_state_dict(model).keys()
    assert "trf_blocks.0.att.qkv.lora_A" in adapter.tensors and "out_head.lora_B" in adapter.tensors

    loaded = load_adapter(tmp_path / "adapter", random_model())
    assert lora_config_of(loaded) == config
    assert torch.equal(logits(loaded, ids()), logits(model, ids()))


def test_the_dropout_switch_scales_the_models_dropout_and_leaves_the_adapters_at_their_setting(tmp_path):
    config = LoRAConfig(rank=4, alpha=8, dropout=0.25, targets=ALL_TARGETS)
    model = apply_lora(random_model(TINY.replace(drop_rate=0.1, attn_drop_rate=0.05)), config).train()
    switch = DropoutSwitch(model)
    assert sorted({rate for _, _, rate in switch.rates}) == [0.05, 0.1]  # the model's own rates only
    for scale in (0.0, 2.0):
        switch.set(scale)
        assert {module.dropout.p for module in lora_modules(model).values()} == {0.25}
        assert model.trf_blocks[0].drop_shortcut.p == pytest.approx(0.1 * scale)
        assert lora_config_of(model) == config
        save_adapter(tmp_path / "adapter", model, config, base="models/base")  # its check agrees with the model
        assert read_adapter(tmp_path / "adapter").config.dropout == 0.25


@pytest.mark.parametrize(
    "change, field",
    [
        ({"vocab_size": 41}, "vocab_size 40, but this base has vocab_size 41"),
        ({"emb_dim": 48}, "emb_dim 32, but this base has emb_dim 48"),
        ({"n_layers": 3}, "n_layers 2, but this base has n_layers 3"),
    ],
)
def test_an_adapter_refuses_another_base_in_one_line(tmp_path, change, field):
    config = LoRAConfig(rank=2, targets=ALL_TARGETS)
    save_adapter(tmp_path / "adapter", apply_lora(random_model(), config), config, base="models/base")
    with pytest.raises(
        ValueError,
        match=f"^the adapter was made for a base with {field}; load it onto the model "
        r"it was trained from \(models/base\)$",
    ):
        load_adapter(tmp_path / "adapter", random_model(TINY.replace(**change)))


def test_adapter_folders_refuse_what_they_cannot_use(tmp_path):
    config = LoRAConfig(rank=2)
    model = apply_lora(random_model(), config)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="notes exists and is not a LoRA adapter folder; choose a new folder"):
        save_adapter(tmp_path / "notes", model, config, base="b")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match=r"does not describe the model's adapters \(LoRA rank 2, alpha 16 on qkv"):
        save_adapter(tmp_path / "a", model, LoRAConfig(rank=8), base="b")
    with pytest.raises(ValueError, match="notes is not a LoRA adapter folder"):
        read_adapter(tmp_path / "notes")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / ADAPTER_CONFIG_FILE).write_text('{"peft_type": "LORA", "r": 8}')
    with pytest.raises(ValueError, match="is a Hugging Face PEFT adapter, not a gptlab LoRA adapter"):
        read_adapter(tmp_path / "peft")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, config)


@pytest.fixture
def base_and_adapter(tmp_path):
    """A saved base checkpoint, an adapter trained on it, and the adapted model's logits."""
    base = random_model()
    save_model(tmp_path / "base", base, TOKENIZER)
    config = LoRAConfig(rank=4, alpha=8, targets=("qkv", "fc", "head"))
    model = random_adapters_(apply_lora(base, config))
    save_adapter(tmp_path / "adapter", model, config, base=str(tmp_path / "base"))
    return tmp_path, logits(model, ids())


def test_merge_lora_command_writes_a_checkpoint_with_the_merged_logits(base_and_adapter, capsys):
    tmp_path, adapted_logits = base_and_adapter
    assert main(["merge-lora", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().out == (
        f"wrote {tmp_path / 'merged'}, a new checkpoint: {tmp_path / 'base'} with the adapter in "
        f"{tmp_path / 'adapter'} (LoRA rank 4, alpha 8 on qkv, fc, head) folded in, a language model without a chat "
        f"template; {tmp_path / 'base'} is unchanged\n"
    )
    merged, tokenizer = load_model(tmp_path / "merged")
    assert tokenizer.spec() == TOKENIZER.spec()
    torch.testing.assert_close(logits(merged, ids()), adapted_logits, atol=1e-5, rtol=0)
    # --base names the base explicitly: the same result
    assert (
        main(
            [
                "merge-lora",
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "again"),
                "--base",
                str(tmp_path / "base"),
            ]
        )
        == 0
    )
    torch.testing.assert_close(logits(load_model(tmp_path / "again")[0], ids()), adapted_logits, atol=1e-5, rtol=0)


def test_merge_lora_command_refuses_bad_input_in_one_line(base_and_adapter, capsys):
    tmp_path, _ = base_and_adapter
    adapter = str(tmp_path / "adapter")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    save_model(tmp_path / "other", random_model(TINY.replace(vocab_size=50)), CharTokenizer("x"))
    cases = [
        (["--adapter", str(tmp_path / "nothing"), "--out", "x"], "nothing is not a LoRA adapter folder"),
        (["--adapter", adapter, "--out", str(tmp_path / "full")], "full exists and is not empty; choose a new folder"),
        (["--adapter", adapter, "--out", str(tmp_path / "base")], "base is the base checkpoint; choose a new folder"),
        (
            ["--adapter", adapter, "--out", str(tmp_path / "m"), "--base", str(tmp_path / "other")],
            "made for a base with vocab_size 40, but this base has vocab_size 50",
        ),
    ]
    for arguments, message in cases:
        assert main(["merge-lora", *arguments]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gptlab merge-lora: error: ") and message in err and err.count("\n") == 1
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "m").exists()

    (tmp_path / "base").rename(tmp_path / "moved")
    assert main(["merge-lora", "--adapter", adapter, "--out", str(tmp_path / "m")]) == 2
    assert "the base recorded in" in capsys.readouterr().err and not (tmp_path / "m").exists()
