"""Classification: the last real token's logits whatever the padding, the loss against each text run alone,
--train-blocks, a classifier checkpoint that loads back with its labels, `gptlab classify`, and learning a
synthetic rule."""

import csv
import json
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import LETTERS, TOKENIZER, random_model, tiny_config
from safetensors.torch import load_file

from gptlab.checkpoint import give_classifier_head
from gptlab.cli import main
from gptlab.finetune.classify import LabeledText, class_rows, last_token_logits
from gptlab.finetune.pipeline import finetune
from gptlab.finetune.rows import pad_rows
from gptlab.loading import load_classifier
from gptlab.training.evaluation import loss_fn

LABELS = ["ham", "other", "spam"]
TEXTS = [
    LabeledText("buy now", "spam", "t"),
    LabeledText("hi", "ham", "t"),
    LabeledText("see you at noon.", "other", "t"),
]


def test_the_last_real_tokens_logits_classify_each_padded_row_as_if_alone():
    model = give_classifier_head(random_model(tiny_config()), len(LABELS)).eval()
    rows = class_rows(TOKENIZER, TEXTS, LABELS, context_length=256)
    inputs, targets = (torch.from_numpy(a) for a in pad_rows(rows, TOKENIZER.eot_id))
    assert inputs.shape == (3, len("see you at noon."))
    with torch.no_grad():
        logits, classes = last_token_logits(model, inputs, targets)
        alone = torch.stack([model(torch.tensor([TOKENIZER.encode(t.text)]))[0, -1] for t in TEXTS])
        loss = loss_fn(model, inputs, targets).item()
    assert classes.tolist() == [2, 0, 1]
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)
    assert loss == pytest.approx(F.cross_entropy(alone, classes).item(), abs=1e-5)


def test_a_text_longer_than_the_context_is_cut_to_its_first_tokens():
    (row,) = class_rows(TOKENIZER, [LabeledText("abcdefgh", "ham", "t")], LABELS, context_length=5)
    assert TOKENIZER.decode(row.inputs) == "abcde" and row.targets.tolist() == [-100] * 4 + [0]


def write_csv(path, rows) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return str(path)


def rule_texts(count: int, seed: int) -> list[tuple[str, str]]:
    """Six random letters; the label says whether an 'h' is among them (about half the texts)."""
    rng = random.Random(seed)
    texts = ["".join(rng.choice(LETTERS) for _ in range(6)) for _ in range(count)]
    return [(text, "yes" if "h" in text else "no") for text in texts]


def test_train_blocks_trains_only_the_last_blocks_the_final_norm_and_the_head(tiny_base, tmp_path):
    data = write_csv(tmp_path / "rule.csv", rule_texts(60, 0))
    finetune(
        "classify",
        init=str(tiny_base),
        data=data,
        out=str(tmp_path / "run"),
        train_blocks="1",
        max_steps=3,
        batch_size=8,
        lr=1e-2,
        eval_interval=1000,
        progress=False,
        device="cpu",
        log=lambda line: None,
    )
    base, tuned = (
        load_file(str(tiny_base / "model.safetensors")),
        load_file(str(tmp_path / "run/last/model.safetensors")),
    )
    changed = {name for name in base if name != "out_head.weight" and not torch.equal(base[name], tuned[name])}
    trained = {name for name in base if name.startswith(("trf_blocks.1.", "final_norm."))}
    assert changed == trained
    assert tuned["out_head.weight"].shape == (2, 16)


@pytest.mark.slow
def test_classification_learns_a_rule_and_the_classifier_loads_back(pretrained, tmp_path, capsys):
    data = write_csv(tmp_path / "rule.csv", rule_texts(600, 0))
    result = finetune(
        "classify",
        init=str(pretrained),
        data=data,
        out=str(tmp_path / "run"),
        max_steps=150,
        batch_size=16,
        lr=2e-3,
        warmup_steps=5,
        eval_interval=75,
        progress=False,
        device="cpu",
        log=lambda line: None,
    )
    scores = {name: score.accuracy for name, score in result.scores.items()}
    assert [result.scores[name].texts for name in ("train", "validation", "test")] == [420, 60, 120]  # 70 / 10 / 20
    # Measured: 1.00 on every split on the project's machine; half the texts have an 'h', so chance is 0.5.
    assert min(scores.values()) >= 0.9, scores
    assert json.loads((tmp_path / "run/scores.json").read_text())["test"]["accuracy"] == scores["test"]

    classifier = load_classifier(tmp_path / "run/last")
    assert classifier.labels == ["no", "yes"] and classifier.model.out_head.out_features == 2
    assert json.loads((tmp_path / "run/last/config.json").read_text())["classifier"] == {
        "labels": ["no", "yes"],
        "pooling": "last_token",
    }
    texts = ["abcdef", "habcde"]
    capsys.readouterr()
    assert main(["classify", "--checkpoint", str(tmp_path / "run/last"), "--text", texts[0], "--text", texts[1]]) == 0
    printed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    with torch.no_grad():
        for (label, probability, text), expected_text in zip(printed, texts):
            probabilities = classifier.model(torch.tensor([classifier.tokenizer.encode(expected_text)]))[0, -1].softmax(
                -1
            )
            assert (label, text) == (classifier.labels[probabilities.argmax()], expected_text)
            assert float(probability) == pytest.approx(probabilities.max().item(), abs=5e-5)
    assert [label for label, _, _ in printed] == ["no", "yes"]

    labelled = write_csv(tmp_path / "more.csv", rule_texts(50, 1))
    assert main(["classify", "--checkpoint", str(tmp_path / "run/last"), "--file", labelled]) == 0
    lines = capsys.readouterr().out.splitlines()
    correct = sum(line.split("\t")[0] == label for line, (_, label) in zip(lines, rule_texts(50, 1)))
    assert lines[-1] == f"accuracy: {correct / 50:.2%} ({correct} of 50 labelled texts)"
