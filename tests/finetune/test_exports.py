"""What fine-tuned checkpoints become in every export: a classifier is transformers'
GPT2ForSequenceClassification (the same probabilities as `gptlab classify`, its labels in the pipeline)
and is refused, in one line, wherever a language model is needed; an instruction model keeps its chat
template through merge-lora, the Hugging Face export (apply_chat_template gives chat_prompt_ids' tokens)
and GGUF (tokenizer.chat_template, read back with gguf's reader)."""

import pytest
import torch
from conftest import TOKENIZER, random_model, tiny_config

from gptlab.checkpoint import ClassifierHead, give_classifier_head, save_model
from gptlab.cli import main
from gptlab.finetune.classify import classify_texts
from gptlab.finetune.templates import chat_prompt_ids, jinja_template
from gptlab.loading import load_classifier, load_model

transformers = pytest.importorskip("transformers")
LABELS = ("ham", "spam", "eggs")  # three, so id2label's order matters
TEXTS = ["buy now", "hi there, see you at noon", "a"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    model = give_classifier_head(random_model(tiny_config()), len(LABELS))
    torch.nn.init.normal_(model.out_head.weight, std=0.5)  # probabilities far from uniform
    folder = tmp_path_factory.mktemp("classifier") / "ckpt"
    save_model(folder, model, TOKENIZER, extra={"classifier": ClassifierHead(LABELS).to_dict()})
    return folder


def run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_classifier_exports_as_gpt2_for_sequence_classification(classifier, tmp_path, capsys):
    code, out, err = run(capsys, ["convert", "--to-hf", str(classifier), str(tmp_path / "hf")])
    assert code == 0, err
    assert "GPT2ForSequenceClassification with labels ham, spam, eggs" in out
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "GPT2ForSequenceClassification"
    assert hf.config.id2label == dict(enumerate(LABELS)) and hf.config.label2id == {
        label: i for i, label in enumerate(LABELS)
    }
    assert hf.config.pad_token_id == TOKENIZER.eot_id
    ours = load_classifier(classifier)
    expected = classify_texts(ours, TEXTS)  # [(label, probability)]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text, (label, probability) in zip(TEXTS, expected):
        with torch.no_grad():
            probabilities = hf(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0]
        assert LABELS[int(probabilities.argmax())] == label
        assert float(probabilities.max()) == pytest.approx(probability, abs=1e-5)
    # a padded batch: transformers finds each row's last real token from pad_token_id, as gptlab does
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        batched = hf(**batch).logits.softmax(-1)
    assert [LABELS[int(row.argmax())] for row in batched] == [label for label, _ in expected]
    torch.testing.assert_close(batched.max(-1).values, torch.tensor([p for _, p in expected]), atol=1e-5, rtol=0)
    pipe = transformers.pipeline("text-classification", model=str(tmp_path / "hf"), device="cpu")
    assert [answer["label"] for answer in pipe(TEXTS)] == [label for label, _ in expected]
    # and the export reads back into gptlab as the same classifier
    back = load_classifier(tmp_path / "hf")
    assert back.labels == list(LABELS)
    again = classify_texts(back, TEXTS)
    assert [label for label, _ in again] == [label for label, _ in expected]
    assert [p for _, p in again] == pytest.approx([p for _, p in expected], abs=1e-6)


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--checkpoint", "CKPT", "--prompt", "a", "--max-new-tokens", "2"],
        ["eval", "--checkpoint", "CKPT"],
        ["serve", "--checkpoint", "CKPT", "--port", "0"],
        ["convert", "--to-gguf", "CKPT", "OUT/model.gguf"],
    ],
    ids=["generate", "eval", "serve", "gguf"],
)
def test_a_classifier_is_refused_where_a_language_model_is_needed(classifier, tmp_path, capsys, argv):
    argv = [{"CKPT": str(classifier), "OUT/model.gguf": str(tmp_path / "model.gguf")}.get(item, item) for item in argv]
    code, out, err = run(capsys, argv)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "a classifier (labels: ham, spam, eggs)" in err and "gptlab classify --checkpoint" in err
    assert not (tmp_path / "model.gguf").exists()
    with pytest.raises(ValueError, match="its head scores labels, not next tokens"):
        load_model(classifier)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat") / "ckpt"
    save_model(folder, random_model(tiny_config()), TOKENIZER, extra={"chat_template": "chatml"})
    return folder


def test_an_instruction_models_template_reaches_hugging_face_and_gguf(chat_model, tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    messages = [{"role": "system", "content": "Sort."}, {"role": "user", "content": "b a"}]
    code, out, err = run(capsys, ["convert", "--to-hf", str(chat_model), str(tmp_path / "hf")])
    assert code == 0 and "chat template chatml in tokenizer_config.json" in out, err
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids == chat_prompt_ids(TOKENIZER, messages, "chatml")
    assert run(capsys, ["convert", "--to-gguf", str(chat_model), str(tmp_path / "m.gguf")])[0] == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == jinja_template("chatml")
