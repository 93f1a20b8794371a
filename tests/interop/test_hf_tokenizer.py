"""Every export carries tokenizer files that transformers' AutoTokenizer loads offline and that give gptlab's
ids and text back: GPT-2's BPE, GPT-2's BPE cut after its first N merges, and a character-level tokenizer.
transformers' own tokenizer and model classes are the reference; nothing touches the network."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_interop_io import randomise_

from gptlab import CharTokenizer, GPTModel, load_model, load_tokenizer
from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.data.corpus import default_corpus_text
from gptlab.inference.generate import generate
from gptlab.interop.hf import export_hf
from gptlab.tokenizer import EOT_TEXT, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world, it's 2024!",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "runs   of    spaces,\ttabs\t\tand trailing spaces   ",
    "Ünïcödé: 日本語, emoji 🙂👍🏽, combining e\u0301",
    f"before{EOT_TEXT}after{EOT_TEXT}",
    "a , b . c ! don ' t",  # what transformers' clean_up_tokenization_spaces would rewrite when decoding
]
TOKENIZERS = {
    "gpt2": lambda: load_tokenizer("gpt2"),
    "gpt2-512-merges": lambda: load_tokenizer("gpt2", merges=512),
    "gpt2-0-merges": lambda: load_tokenizer("gpt2", merges=0),
    "char": lambda: CharTokenizer.from_text("".join(TEXTS)),
}
PROMPT = "Hello world"
NEW_TOKENS = 12


@dataclass
class Export:
    tokenizer: Tokenizer
    model: GPTModel
    folder: Path


def export_tiny_model(tokenizer: Tokenizer, folder: Path) -> Export:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, emb_dim=32, n_heads=2, n_layers=2)
    model = randomise_(GPTModel(cfg))
    export_hf(model, tokenizer, folder)
    return Export(tokenizer, model, folder)


@pytest.fixture(scope="module", params=TOKENIZERS.values(), ids=TOKENIZERS.keys())
def export(request, tmp_path_factory) -> Export:
    return export_tiny_model(request.param(), tmp_path_factory.mktemp("export") / "hf")


def test_auto_tokenizer_encodes_and_decodes_like_gptlab(export):
    auto = transformers.AutoTokenizer.from_pretrained(export.folder)
    assert len(auto) == export.tokenizer.vocab_size == export.model.cfg.vocab_size
    assert auto.eos_token_id == auto.bos_token_id == export.tokenizer.eot_id
    for text in TEXTS:
        # transformers reads <|endoftext|> in text as the special token, like gptlab's allow_special=True.
        ids = export.tokenizer.encode(text, allow_special=True)
        assert auto(text)["input_ids"] == ids, text
        assert auto.decode(ids) == export.tokenizer.decode(ids) == text


def test_transformers_generates_what_gptlab_generates(export):
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(export.folder, attn_implementation="eager").eval()
    hf_model.generation_config.eos_token_id = None  # both sides produce all NEW_TOKENS
    auto = transformers.AutoTokenizer.from_pretrained(export.folder)
    prompt = auto(PROMPT, return_tensors="pt")["input_ids"]
    expected = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=export.tokenizer.eot_id,
    )
    ours = generate(export.model, torch.tensor([export.tokenizer.encode(PROMPT)]), NEW_TOKENS)
    assert ours.tolist() == expected.tolist()
    assert auto.decode(expected[0]) == export.tokenizer.decode(ours[0].tolist())


def test_load_model_restores_the_exported_tokenizer(export):
    _, loaded = load_model(export.folder)
    assert loaded.spec() == export.tokenizer.spec()
    for text in TEXTS:
        assert loaded.encode(text, allow_special=True) == export.tokenizer.encode(text, allow_special=True)


def test_truncated_vocabulary_is_gpt2s_first_ids(tmp_path):
    full = transformers.AutoTokenizer.from_pretrained(export_tiny_model(load_tokenizer(), tmp_path / "full").folder)
    export = export_tiny_model(load_tokenizer("gpt2", merges=512), tmp_path / "512")
    truncated = transformers.AutoTokenizer.from_pretrained(export.folder)
    first_ids = {token: index for token, index in full.get_vocab().items() if index < 256 + 512}
    assert truncated.get_vocab() == {**first_ids, EOT_TEXT: 256 + 512}
    merges = (export.folder / "merges.txt").read_text("utf-8").splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 512


@pytest.mark.parametrize("merges", [1, 512, 20000])
def test_truncated_bpe_gives_the_same_ids_over_a_long_text(tmp_path, merges):
    text = default_corpus_text()[:100_000]
    tokenizer = load_tokenizer("gpt2", merges=merges)
    auto = transformers.AutoTokenizer.from_pretrained(export_tiny_model(tokenizer, tmp_path / "hf").folder)
    auto.model_max_length = len(text)  # only to keep its too-long warning quiet
    assert auto(text)["input_ids"] == tokenizer.encode(text)


def test_unknown_character_is_refused_on_both_sides(tmp_path):
    export = export_tiny_model(TOKENIZERS["char"](), tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(export.folder)
    with pytest.raises(ValueError, match="'Q' is not in this character-level vocabulary"):
        export.tokenizer.encode("Hello Q")
    with pytest.raises(Exception, match="WordLevel"):  # not silently mapped to some other id
        auto("Hello Q")


@pytest.mark.parametrize("name", ["char", "gpt2-512-merges"])
def test_earlier_exports_without_tokenizer_files_still_load(tmp_path, name):
    """Exports made before tokenizer files were written kept a non-GPT-2 tokenizer's spec in config.json."""
    export = export_tiny_model(TOKENIZERS[name](), tmp_path / "hf")
    for file in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"):
        (export.folder / file).unlink(missing_ok=True)
    config = json.loads((export.folder / "config.json").read_text())
    (export.folder / "config.json").write_text(json.dumps({**config, "gptlab_tokenizer": export.tokenizer.spec()}))
    _, loaded = load_model(export.folder)
    assert loaded.spec() == export.tokenizer.spec()


@pytest.mark.parametrize(
    "damage, match",
    [
        (
            lambda document: document["model"]["vocab"].update({"ab": len(document["model"]["vocab"])}),
            "not one id per character",
        ),
        (lambda document: document["added_tokens"][0].update(id=0), "does not give <|endoftext|> the id after"),
        (lambda document: document["model"].update(type="Unigram"), "Unigram, not BPE or WordLevel"),
    ],
    ids=["word-not-character", "end-of-text-id", "other-model"],
)
def test_tokenizer_json_gptlab_cannot_read_is_refused_in_one_line(tmp_path, damage, match):
    export = export_tiny_model(TOKENIZERS["char"](), tmp_path / "hf")
    document = json.loads((export.folder / "tokenizer.json").read_text("utf-8"))
    damage(document)
    (export.folder / "tokenizer.json").write_text(json.dumps(document), "utf-8")
    with pytest.raises(ValueError, match=match) as error:
        load_model(export.folder)
    assert "\n" not in str(error.value) and "remove them" in str(error.value)


def test_cli_convert_of_a_char_model_writes_its_tokenizer_without_a_note(tmp_path, capsys):
    tokenizer = TOKENIZERS["char"]()
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, emb_dim=16, n_heads=2, n_layers=1))
    save_model(tmp_path / "ckpt", model, tokenizer)
    assert main(["convert", "--to-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    captured = capsys.readouterr()
    assert captured.out == (
        f"wrote {tmp_path / 'hf'}: config.json, generation_config.json, model.safetensors, "
        "tokenizer.json, tokenizer_config.json (GPT2LMHeadModel)\n"
    )
    assert captured.err == ""
