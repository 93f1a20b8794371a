"""HellaSwag in its published JSONL format: gptlab's scorer against lm-evaluation-harness' own hellaswag task
(its process_docs, acc and acc_norm) run with transformers on the same model exported, item by item."""

import json
import textwrap

import pytest
import torch

from gptlab.checkpoint import save_model
from gptlab.cli import main
from gptlab.config import GPTConfig
from gptlab.data import DataError
from gptlab.inference.benchmarks import clean, hellaswag_items, score
from gptlab.interop.hf import export_hf
from gptlab.model import GPTModel
from gptlab.tokenizer import load_tokenizer

# Records as hellaswag_val.jsonl holds them, with the WikiHow half's [title] and [header] artifacts.
RECORDS = [
    {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        "label": 3,
    },
    {
        "ind": 92,
        "activity_label": "Clean and jerk",
        "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
        "ctx_b": "the lady",
        "endings": [
            "swings and lands in her arms.",
            "pulls the barbell forward.",
            "pulls a rope attached to the barbell.",
            "stands and lifts the weight over her head.",
        ],
        "label": 3,
    },
    {
        "ind": 106,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to grow tomatoes [title] Pick a sunny spot.",
        "ctx_b": "[step] Tomatoes need",
        "endings": [
            "at least six hours of sun a day. [substeps] Shade stunts them.",
            "water.",
            "a lot of love [title] and patience.",
            "to be eaten [header] quickly.",
        ],
        "label": 0,
    },
    {
        "ind": 121,
        "activity_label": "Playing guitar",
        "ctx_a": "A boy holds a guitar.",
        "ctx_b": "he",
        "endings": ["strums the strings slowly.", "eats the guitar.", "throws it into a lake.", "plays a song."],
        "label": 0,
    },
    {
        "ind": 150,
        "activity_label": "Baking cookies",
        "ctx_a": "A woman mixes flour and sugar in a bowl.",
        "ctx_b": "she",
        "endings": [
            "adds eggs and stirs.",
            "drives to work.",
            "paints the bowl blue.",
            "puts the dough on a tray and bakes it.",
        ],
        "label": 3,
    },
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hellaswag")
    tokenizer = load_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPTModel(
        GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, emb_dim=32, n_heads=2, n_layers=2)
    ).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    save_model(folder / "model", model, tokenizer)
    export_hf(model, tokenizer, folder / "hf")
    data = folder / "hellaswag_val.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    return folder, model, tokenizer, data


def test_items_are_read_and_cleaned_as_hellaswag_is(checkpoint):
    items = hellaswag_items(checkpoint[3])
    assert items[0].context == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[2].context == "Home and Garden: How to grow tomatoes. Pick a sunny spot. tomatoes need"  # capitalize()
    assert items[2].choices[0] == "at least six hours of sun a day. Shade stunts them."
    assert [item.gold for item in items] == [record["label"] for record in RECORDS]
    assert clean(" a [title] b [step] c  ") == "a. b c"


@pytest.mark.slow
def test_the_scores_are_lm_evals_on_the_same_items(checkpoint, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder, model, tokenizer, data = checkpoint
    ours = score(model, tokenizer, hellaswag_items(data))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hellaswag_utils.py").write_text("from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n")
    (tasks / "gptlab_hellaswag.yaml").write_text(
        textwrap.dedent(f"""\
        task: gptlab_hellaswag
        dataset_path: json
        dataset_kwargs:
          data_files:
            validation: {data}
        validation_split: validation
        output_type: multiple_choice
        process_docs: !function hellaswag_utils.process_docs
        doc_to_text: "{{{{query}}}}"
        doc_to_target: "{{{{label}}}}"
        doc_to_choice: "choices"
        metric_list:
          - metric: acc
          - metric: acc_norm
        """)
    )
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder / 'hf'},dtype=float32",
        tasks=["gptlab_hellaswag"],
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=1,
        log_samples=True,
    )
    theirs = results["results"]["gptlab_hellaswag"]
    assert (ours.metrics["acc"], ours.metrics["acc_norm"]) == (theirs["acc,none"], theirs["acc_norm,none"])
    samples = sorted(results["samples"]["gptlab_hellaswag"], key=lambda sample: sample["doc_id"])
    for sample, lls in zip(samples, ours.loglikelihoods, strict=True):
        assert [response[0][0] for response in sample["resps"]] == pytest.approx(lls, abs=1e-4)


def test_gptlab_eval_task_prints_the_scores_and_refuses_what_does_not_apply(checkpoint, capsys):
    folder, model, tokenizer, data = checkpoint
    ours = score(model, tokenizer, hellaswag_items(data))
    argv = [
        "eval",
        "--checkpoint",
        str(folder / "model"),
        "--task",
        "hellaswag",
        "--data",
        str(data),
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out == (
        f"{folder / 'model'} on hellaswag ({data}): acc {ours.metrics['acc']:.4f}  acc_norm {ours.metrics['acc_norm']:.4f}  (5 items)\n"
    )
    assert main([*argv, "--include", "*.md"]) == 2
    assert capsys.readouterr().err == "gptlab eval: error: --include does not apply to --task hellaswag; drop it\n"
    assert main(argv[:5] + ["--device", "cpu"]) == 2
    assert "scores one file in the task's published format; give it with --data FILE" in capsys.readouterr().err


def test_a_record_that_is_not_hellaswag_is_named(tmp_path):
    path = tmp_path / "other.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"text": "not an item"}) + "\n")
    with pytest.raises(DataError, match=r"other.jsonl: line 2 is not a HellaSwag record"):
        hellaswag_items(path)
