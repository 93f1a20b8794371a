"""Fine-tuning: `gptlab train --init` starts from a Hugging Face GPT-2 folder's weights, config and
tokenizer, lowers the loss, saves a gptlab checkpoint, and that checkpoint exports back to transformers."""

import json

import pytest
import torch

from gptlab import load_model
from gptlab.cli import main

transformers = pytest.importorskip("transformers")

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 4


@pytest.fixture()
def hf_folder(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_head=4, n_layer=2)
    model = transformers.GPT2LMHeadModel(config)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return folder


def test_finetune_from_hf_folder_lowers_loss_and_exports_back(tmp_path, hf_folder, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    args = [
        "train",
        "--init",
        str(hf_folder),
        "--data",
        str(data),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--max-steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "2",
        "--eval-interval",
        "6",
        "--sample-tokens",
        "0",
        "--dtype",
        "float32",
        "--no-progress",
    ]
    assert main(args) == 0

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val_losses = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(val_losses) == 2 and val_losses[-1] < val_losses[0]

    tuned, tokenizer = load_model(out / "last")
    original, _ = load_model(hf_folder)
    assert tuned.cfg == original.cfg  # context length, qkv bias and tied head kept from the HF config
    assert tuned.cfg.qkv_bias and tuned.cfg.tie_embeddings and tuned.cfg.context_length == 64
    assert tokenizer.vocab_size == 50257
    assert not torch.equal(tuned.tok_emb.weight, original.tok_emb.weight)

    exported = tmp_path / "exported"
    assert main(["convert", "--to-hf", str(out / "last"), str(exported)]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    ids = torch.tensor([tokenizer.encode("The quick brown fox")])
    with torch.no_grad():
        assert (hf(ids).logits - tuned(ids)).abs().max().item() <= 1e-4


def test_finetune_run_resumes_and_refuses_shape_options(tmp_path, hf_folder, capsys):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "run"
    base = [
        "train",
        "--init",
        str(hf_folder),
        "--data",
        str(data),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--batch-size",
        "4",
        "--eval-interval",
        "3",
        "--sample-tokens",
        "0",
        "--dtype",
        "float32",
        "--no-progress",
    ]
    assert main([*base, "--max-steps", "3"]) == 0
    assert main([*base, "--max-steps", "5", "--resume"]) == 0
    state = json.loads((out / "last" / "trainer_state.json").read_text())["trainer"]
    assert state["step"] == 5

    capsys.readouterr()
    assert main([*base, "--max-steps", "6", "--resume", "--emb-dim", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--emb-dim is 32 here and 64 in the run; drop it" in err
    assert main([*base, "--max-steps", "6", "--resume", "--emb-dim", "64"]) == 0  # the run's own value is no change

    fresh = [*base, "--out", str(tmp_path / "fresh"), "--max-steps", "1"]
    for option in (["--emb-dim", "32"], ["--tokenizer", "char"], ["--model", "gpt2-mini"]):
        assert main([*fresh, *option]) == 2
        err = capsys.readouterr().err
        assert (
            err.count("\n") == 1
            and f"--init takes the model's shape and tokenizer from {hf_folder}; drop {option[0]}" in err
        )
    assert not (tmp_path / "fresh").exists()
