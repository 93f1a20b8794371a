"""Model folders in and out: gptlab <-> Hugging Face GPT-2 folders, checked against transformers itself.

Every model here is tiny (64-dim, 2 layers, 32 positions, GPT-2's 50257-token vocabulary) and
randomly initialised in every parameter, so a misplaced bias or scale changes the logits. Nothing
touches the network: the download tests block it.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptlab import CharTokenizer, GPTModel, load_model, load_tokenizer
from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.hf_format import config_from_hf
from gptlab.inference.generate import generate
from gptlab.interop.hf import export_hf
from gptlab.report import parameter_report
from gptlab.tokenizer import GPT2Tokenizer

transformers = pytest.importorskip("transformers")

TINY = GPTConfig(vocab_size=50257, context_length=32, emb_dim=64, n_heads=4, n_layers=2)
HF_TINY = dict(vocab_size=50257, n_positions=32, n_embd=64, n_head=4, n_layer=2)
SAMPLE_TEXT = "Hello world, it's 2024!  Ünïcödé\ttabs\nand newlines   <|endoftext|> after the end"
MAX_LOGIT_GAP = 1e-4


def randomise_(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random: LayerNorm scales around 1, everything else around 0."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_norm_scale = name.endswith(("scale", "ln_1.weight", "ln_2.weight", "ln_f.weight"))
            param.copy_(1 + 0.2 * torch.randn_like(param) if is_norm_scale else 0.1 * torch.randn_like(param))
    return model.eval()


def random_gptlab_model(cfg: GPTConfig = TINY) -> GPTModel:
    return randomise_(GPTModel(cfg))


def random_hf_model(**overrides):
    # No bos/eos: transformers' greedy generation must not stop early.
    config = transformers.GPT2Config(
        **{**HF_TINY, **overrides}, bos_token_id=None, eos_token_id=None, attn_implementation="eager"
    )
    return randomise_(transformers.GPT2LMHeadModel(config))


def load_transformers(folder):
    return transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()


def logit_gap(model: GPTModel, hf_model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(ids) - hf_model(ids).logits).abs().max().item()


def random_ids(vocab_size: int = 50257) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, TINY.context_length))


def assert_same_weights(model: GPTModel, expected: GPTModel) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == expected.state_dict().keys()
    for name, tensor in expected.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def write_hf_folder(folder: Path, config: dict, tensors: dict) -> Path:
    """An HF folder made by hand: config.json and model.safetensors, no tokenizer files."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def one_line_error(match: str, load, *args):
    with pytest.raises(ValueError, match=match) as error:
        load(*args)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return random_hf_model()


@pytest.fixture(scope="module")
def hf_folder(hf_model, tmp_path_factory):
    """What transformers' own save_pretrained writes: config.json, model.safetensors (no lm_head), no tokenizer."""
    folder = tmp_path_factory.mktemp("saved_by_transformers")
    hf_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_state(hf_model):
    """The weights as a file holds them: independent tensors (the tied lm_head is its own copy here)."""
    return {name: tensor.clone() for name, tensor in hf_model.state_dict().items()}


# --- gptlab -> Hugging Face --------------------------------------------------------------------------------


@pytest.mark.parametrize("qkv_bias, tie", [(True, True), (False, False)], ids=["qkv-bias-tied", "no-qkv-bias-untied"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, qkv_bias, tie):
    torch.manual_seed(1)
    model = random_gptlab_model(TINY.replace(qkv_bias=qkv_bias, tie_embeddings=tie))
    files = export_hf(model, load_tokenizer(), tmp_path / "hf")
    assert files == [
        "config.json",
        "generation_config.json",
        "merges.txt",
        "model.safetensors",
        "tokenizer_config.json",
        "vocab.json",
    ]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert (config["n_positions"], config["n_embd"], config["n_layer"], config["n_head"]) == (32, 64, 2, 4)
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (50257, 50256, 50256)
    assert (config["activation_function"], config["layer_norm_epsilon"]) == ("gelu_new", 1e-5)
    assert config["tie_word_embeddings"] is tie
    stored = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert ("lm_head.weight" in stored) is not tie  # safetensors stores a tied tensor once

    hf_model = load_transformers(tmp_path / "hf")
    assert logit_gap(model, hf_model, random_ids()) <= MAX_LOGIT_GAP
    head, embedding = hf_model.lm_head.weight, hf_model.transformer.wte.weight
    assert (head.data_ptr() == embedding.data_ptr()) is tie
    assert torch.equal(head, model.out_head.weight)
    if not qkv_bias:  # transformers always has a c_attn bias: zeros compute the same function
        assert all(not block.attn.c_attn.bias.any() for block in hf_model.transformer.h)

    reloaded, tokenizer = load_model(tmp_path / "hf")
    assert isinstance(tokenizer, GPT2Tokenizer)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_auto_tokenizer_on_the_export_gives_gptlab_ids(tmp_path):
    export_hf(random_gptlab_model(), load_tokenizer(), tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer()
    # transformers treats <|endoftext|> in text as the special token, like gptlab's allow_special=True.
    assert auto(SAMPLE_TEXT)["input_ids"] == ours.encode(SAMPLE_TEXT, allow_special=True)
    assert auto.eos_token_id == ours.eot_id == 50256
    assert auto.model_max_length == TINY.context_length
    _, reloaded = load_model(tmp_path / "hf")  # gptlab reads the exported vocab.json + merges.txt back
    assert reloaded.encode(SAMPLE_TEXT, allow_special=True) == ours.encode(SAMPLE_TEXT, allow_special=True)


def test_char_level_model_exports_with_its_tokenizer_and_comes_back(tmp_path):
    tokenizer = CharTokenizer.from_text("hello world, a tiny corpus")
    model = random_gptlab_model(TINY.replace(vocab_size=tokenizer.vocab_size))
    files = export_hf(model, tokenizer, tmp_path / "hf")
    assert files == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == tokenizer.eot_id
    assert logit_gap(model, load_transformers(tmp_path / "hf"), random_ids(tokenizer.vocab_size)) <= MAX_LOGIT_GAP
    _, reloaded = load_model(tmp_path / "hf")
    assert isinstance(reloaded, CharTokenizer) and reloaded.chars == tokenizer.chars


def test_export_never_overwrites_other_files(tmp_path):
    model, tokenizer = random_gptlab_model(TINY.replace(qkv_bias=True)), load_tokenizer()
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    one_line_error(r"not empty.*--force", export_hf, model, tokenizer, target)
    assert [entry.name for entry in target.iterdir()] == ["notes.txt"]

    fresh = tmp_path / "fresh"
    export_hf(model, tokenizer, fresh)
    export_hf(random_gptlab_model(), tokenizer, fresh)  # an earlier export may be replaced
    (fresh / "notes.txt").write_text("mine")
    one_line_error("not empty", export_hf, model, tokenizer, fresh)  # ...unless someone added files to it
    export_hf(model, tokenizer, target, force=True)
    assert not (target / "notes.txt").exists()
    assert_same_weights(load_model(target)[0], model)


# --- Hugging Face -> gptlab --------------------------------------------------------------------------------


def test_transformers_save_pretrained_folder_loads_with_equal_logits(hf_model, hf_folder):
    model, tokenizer = load_model(hf_folder)
    assert model.cfg == config_from_hf(hf_model.config.to_dict())
    assert model.out_head.weight is model.tok_emb.weight
    assert tokenizer.encode(SAMPLE_TEXT) == load_tokenizer().encode(SAMPLE_TEXT)  # the bundled GPT-2 tokenizer
    assert logit_gap(model, hf_model, random_ids()) <= MAX_LOGIT_GAP


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_weights_are_memory_mapped_from_the_file_not_copied(hf_folder):
    model, _ = load_model(hf_folder)
    weights_file = str((hf_folder / "model.safetensors").resolve())
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(weights_file):
            start, end = (int(address, 16) for address in line.split()[0].split("-"))
            mapped.append((start, end))
    for name, param in model.named_parameters():
        assert any(start <= param.data_ptr() < end for start, end in mapped), f"{name} was copied"


def test_greedy_generation_equals_transformers(hf_model, hf_folder):
    model, _ = load_model(hf_folder)
    prompt = torch.randint(0, 50257, (1, 6))
    expected = hf_model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False, pad_token_id=0
    )
    ours = generate(model, prompt, 20)
    assert ours.tolist() == expected.tolist()
    assert len(set(ours[0, 6:].tolist())) > 1  # not a one-token loop


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pytorch_model_bin_loads(tmp_path, hf_model, hf_state, zip_format):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(hf_model.config.to_json_string())
    # transformers 5 always writes safetensors, so the .bin is written the way older versions did.
    torch.save(hf_state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    model, _ = load_model(folder)
    assert logit_gap(model, hf_model, random_ids()) <= MAX_LOGIT_GAP


def test_sharded_safetensors_load(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="2MB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    model, _ = load_model(tmp_path / "sharded")
    assert logit_gap(model, hf_model, random_ids()) <= MAX_LOGIT_GAP


def without_prefix(state):
    return {name.removeprefix("transformer."): tensor for name, tensor in state.items()}


def without_head(state):
    return {name: tensor for name, tensor in state.items() if name != "lm_head.weight"}


def with_mask_buffers(state):
    """What transformers < 4.3 saved next to the weights: the causal mask and its fill value."""
    buffers = {}
    for layer in range(HF_TINY["n_layer"]):
        buffers[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32, dtype=torch.uint8))
        buffers[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    return {**state, **buffers}


@pytest.mark.parametrize("variant", [without_prefix, without_head, with_mask_buffers], ids=lambda f: f.__name__)
def test_key_variants_load_the_same_weights(tmp_path, hf_model, hf_state, hf_folder, variant):
    folder = write_hf_folder(tmp_path / "hand", hf_model.config.to_dict(), variant(hf_state))
    assert_same_weights(load_model(folder)[0], load_model(hf_folder)[0])


def test_old_config_with_n_ctx_loads(tmp_path, hf_model, hf_state):
    config = {key: value for key, value in hf_model.config.to_dict().items() if key != "n_positions"}
    folder = write_hf_folder(tmp_path / "old", {**config, "n_ctx": 32}, hf_state)
    model, _ = load_model(folder)
    assert model.cfg.context_length == 32
    assert logit_gap(model, hf_model, random_ids()) <= MAX_LOGIT_GAP


def test_untied_transformers_model_loads(tmp_path):
    torch.manual_seed(2)
    hf_model = random_hf_model(tie_word_embeddings=False)
    hf_model.save_pretrained(tmp_path / "untied")
    model, _ = load_model(tmp_path / "untied")
    assert model.cfg.tie_embeddings is False
    assert logit_gap(model, hf_model, random_ids()) <= MAX_LOGIT_GAP


@pytest.mark.parametrize("merges_as", ["pairs", "strings"])
def test_tokenizer_json_gives_gpt2_ids(tmp_path, hf_folder, merges_as):
    export_hf(random_gptlab_model(), load_tokenizer(), tmp_path / "export")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "export").save_pretrained(tmp_path / "tok")
    tokenizer_json = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer_json["model"]["merges"]]
    tokenizer_json["model"]["merges"] = [merge.split(" ") for merge in merges] if merges_as == "pairs" else merges
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((hf_folder / name).read_bytes())
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    _, tokenizer = load_model(folder)
    ours = load_tokenizer()
    assert tokenizer.encode(SAMPLE_TEXT, allow_special=True) == ours.encode(SAMPLE_TEXT, allow_special=True)


def test_gptlab_checkpoint_loads_and_casts(tmp_path):
    model = random_gptlab_model()
    save_model(tmp_path / "ckpt", model, load_tokenizer())
    assert_same_weights(load_model(tmp_path / "ckpt")[0], model)
    half, _ = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert all(param.dtype == torch.bfloat16 for param in half.parameters())
    assert torch.equal(half.trf_blocks[1].ff.fc.weight, model.trf_blocks[1].ff.fc.weight.to(torch.bfloat16))


def test_hf_folder_loads_in_a_chosen_dtype(hf_folder, hf_model):
    model, _ = load_model(hf_folder, dtype=torch.bfloat16)
    assert all(param.dtype == torch.bfloat16 for param in model.parameters())
    conv1d_weight = hf_model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(model.trf_blocks[0].att.qkv.weight, conv1d_weight.t().to(torch.bfloat16))


# --- what bad folders get ----------------------------------------------------------------------------------


def test_wrong_shaped_tensor_is_named_with_both_shapes(tmp_path, hf_model, hf_state):
    state = {**hf_state, "transformer.h.1.mlp.c_fc.weight": torch.zeros(64, 200)}
    folder = write_hf_folder(tmp_path / "bad", hf_model.config.to_dict(), state)
    message = one_line_error(r"'h\.1\.mlp\.c_fc\.weight'", load_model, folder)
    assert "[64, 200]" in message and "[64, 256]" in message


def test_missing_weight_is_named_with_its_shape(tmp_path, hf_model, hf_state):
    state = {name: tensor for name, tensor in hf_state.items() if name != "transformer.h.0.attn.c_proj.bias"}
    folder = write_hf_folder(tmp_path / "bad", hf_model.config.to_dict(), state)
    message = one_line_error(r"missing weight 'h\.0\.attn\.c_proj\.bias'", load_model, folder)
    assert "[64]" in message


def test_weights_of_a_deeper_model_are_refused(tmp_path, hf_model, hf_state):
    config = {**hf_model.config.to_dict(), "n_layer": 1}  # config.json says 1 layer, the weights have 2
    folder = write_hf_folder(tmp_path / "bad", config, hf_state)
    one_line_error(r"'h\.1\.\S+' .*no place for", load_model, folder)


@pytest.mark.parametrize(
    "setup, match",
    [
        (lambda folder: None, "has no config.json"),
        (lambda folder: (folder / "config.json").write_text('{"model_type": "llama"}'), "neither gptlab's nor a GPT-2"),
        (lambda folder: (folder / "config.json").write_text('{"model_type": "gpt2"}'), "no weights"),
        (lambda folder: (folder / "config.json").write_text('{"model_type": "gpt2",'), "not valid JSON"),
        (
            lambda folder: (folder / "config.json").write_text('{"format": "gptlab", "config": {}, "tokenizer": {}}'),
            "gptlab checkpoint without model.safetensors",
        ),
    ],
    ids=["empty", "other-model", "no-weights", "broken-json", "gptlab-no-weights"],
)
def test_folders_that_are_not_models_say_what_was_expected(tmp_path, setup, match):
    folder = tmp_path / "folder"
    folder.mkdir()
    setup(folder)
    message = one_line_error(match, load_model, folder)
    if match != "not valid JSON":
        assert "model.safetensors" in message and "config.json" in message
    one_line_error("nowhere does not exist; check the path", load_model, tmp_path / "nowhere")


def test_damaged_weights_file_is_refused(tmp_path, hf_folder):
    folder = tmp_path / "damaged"
    folder.mkdir()
    (folder / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    (folder / "model.safetensors").write_bytes((hf_folder / "model.safetensors").read_bytes()[:1000])
    one_line_error("damaged or not safetensors", load_model, folder)


def test_config_gptlab_cannot_compute_is_refused(tmp_path, hf_model, hf_state):
    config = {**hf_model.config.to_dict(), "activation_function": "relu"}
    folder = write_hf_folder(tmp_path / "relu", config, hf_state)
    one_line_error("activation_function = 'relu'", load_model, folder)


def test_small_vocabulary_without_tokenizer_files_is_refused(tmp_path):
    random_hf_model(vocab_size=1000).save_pretrained(tmp_path / "small")
    one_line_error("tokenizer has 50257 tokens but the model's vocab_size is 1000", load_model, tmp_path / "small")


# --- command line -----------------------------------------------------------------------------------------


def test_cli_convert_writes_a_transformers_folder(tmp_path, capsys):
    model = random_gptlab_model()
    save_model(tmp_path / "ckpt", model, load_tokenizer())
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    assert f"wrote {tmp_path / 'hf'}: config.json" in capsys.readouterr().out
    assert logit_gap(model, load_transformers(tmp_path / "hf"), random_ids()) <= MAX_LOGIT_GAP
    capsys.readouterr()  # transformers' progress bar

    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "ckpt")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not empty" in error and "--force" in error
    assert load_model(tmp_path / "ckpt")[0].cfg == model.cfg  # the checkpoint is untouched


def test_cli_info_reports_a_checkpoint_from_its_config(hf_model, hf_folder, tmp_path, capsys):
    assert main(["info", "--checkpoint", str(hf_folder)]) == 0
    out = capsys.readouterr().out
    cfg = GPTConfig(
        vocab_size=50257, context_length=32, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True, tie_embeddings=True
    )
    assert (
        out == f"checkpoint {hf_folder} (Hugging Face GPT-2 folder)\n{parameter_report(cfg).format(hf_folder.name)}\n"
    )
    # the report counts what transformers counts (a tied head once)
    assert parameter_report(cfg).total == sum(param.numel() for param in hf_model.parameters())

    model = random_gptlab_model()
    save_model(tmp_path / "ckpt", model, load_tokenizer())
    assert main(["info", "--checkpoint", str(tmp_path / "ckpt")]) == 0
    report = parameter_report(model.cfg).format("ckpt")
    assert capsys.readouterr().out == f"checkpoint {tmp_path / 'ckpt'} (gptlab checkpoint)\n{report}\n"

    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["info", "--checkpoint", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no weights" in error


def block_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_cli_download_without_network_says_where_to_put_the_files(tmp_path, monkeypatch, capsys):
    block_network(monkeypatch)
    out = tmp_path / "gpt2-medium"
    assert main(["download", "gpt2-medium", "--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "openai-community/gpt2-medium" in error and f"into {out}/" in error and "model.safetensors" in error
    assert not out.exists() or not any(out.iterdir())


def test_cli_download_offline_mode_exits_1(tmp_path):
    out = tmp_path / "gpt2"
    result = subprocess.run(
        [sys.executable, "-m", "gptlab", "download", "gpt2", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and f"into {out}/" in result.stderr and result.stdout == ""


def test_cli_download_refuses_a_folder_holding_something_else(tmp_path, monkeypatch, capsys):
    block_network(monkeypatch)
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["download", "gpt2", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
