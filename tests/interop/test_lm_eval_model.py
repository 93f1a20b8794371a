"""gptlab's lm-eval model (`--model gptlab`) against lm-eval's own `--model hf` on the model's Hugging Face
export, on lm-eval's own task definitions (arc_easy, lambada_openai, wikitext; included, with the data
pointed at small files in each published layout) and a generate_until task; and `gptlab eval --task arc`
and `--task lambada` against the same lm-eval figures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.tasks import TaskManager  # noqa: E402

from gptlab.checkpoint import save_model  # noqa: E402
from gptlab.config import GPTConfig  # noqa: E402
from gptlab.inference.benchmarks import arc_items, lambada_items, score  # noqa: E402
from gptlab.interop.hf import export_hf  # noqa: E402
from gptlab.interop.lm_eval import GptlabLM  # noqa: E402
from gptlab.model import GPTModel  # noqa: E402
from gptlab.tokenizer import load_tokenizer  # noqa: E402

TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"
# ARC as Hugging Face's allenai/ai2_arc holds it (what lm-eval's arc_easy reads) and as AI2 publishes it.
ARC_HF = [
    {
        "id": "Q1",
        "question": "Which gas do plants take in from the air?",
        "choices": {"text": ["carbon dioxide", "helium", "neon", "argon"], "label": ["A", "B", "C", "D"]},
        "answerKey": "A",
    },
    {
        "id": "Q2",
        "question": "What melts ice fastest?",
        "choices": {"text": ["salt", "sand", "a long wait in a very cold freezer"], "label": ["1", "2", "3"]},
        "answerKey": "1",
    },
    {
        "id": "Q3",
        "question": "The Sun is a",
        "choices": {"text": ["planet", "star", "moon", "comet"], "label": ["A", "B", "C", "D"]},
        "answerKey": "B",
    },
]
LAMBADA = [
    {"text": "He opened the door and looked at the empty room. Nobody was there, so he closed the door"},
    {"text": "She poured the tea  and handed him the cup"},  # two spaces: the context ends in one
    {"text": "The the the the the the the the the"},
]
PAGES = [
    {"page": " = Valkyria = \n\n The game @-@ play is fast , and the story 's end is good . \n" * 12},
    {"page": "x"},
]
QUESTIONS = [{"question": "Q: 2 + 2 =", "answer": "4"}, {"question": "Q: say hi\nA:", "answer": "hi"}]


def published_arc(record: dict) -> dict:
    choices = [{"text": t, "label": label} for t, label in zip(record["choices"]["text"], record["choices"]["label"])]
    return {
        "id": record["id"],
        "question": {"stem": record["question"], "choices": choices},
        "answerKey": record["answerKey"],
    }


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval")
    tokenizer = load_tokenizer("gpt2")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, emb_dim=32, n_heads=2, n_layers=2))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    model.eval()
    save_model(folder / "model", model, tokenizer)
    export_hf(model, tokenizer, folder / "hf")
    data = {
        "arc": jsonl(folder / "arc_hf.jsonl", ARC_HF),
        "arc_published": jsonl(folder / "ARC-Easy-Test.jsonl", [published_arc(r) for r in ARC_HF]),
        "lambada": jsonl(folder / "lambada_test.jsonl", LAMBADA),
        "wikitext": jsonl(folder / "wikitext.jsonl", PAGES),
        "questions": jsonl(folder / "questions.jsonl", QUESTIONS),
    }
    tasks = folder / "tasks"
    tasks.mkdir()

    def local(name: str, include: str | None, split: str, path: Path, extra: str = "") -> None:
        body = f"include: {TASKS_DIR / include}\n" if include else ""
        body += f"task: {name}\ndataset_path: json\ndataset_name: null\n"
        body += f"dataset_kwargs:\n  data_files:\n    {split}: {path}\n"
        (tasks / f"{name}.yaml").write_text(body + textwrap.dedent(extra))

    local("g_arc", "arc/arc_easy.yaml", "test", data["arc"], "training_split: null\nvalidation_split: null\n")
    local("g_lambada", "lambada/lambada_openai.yaml", "test", data["lambada"])
    local(
        "g_wikitext",
        "wikitext/wikitext.yaml",
        "test",
        data["wikitext"],
        "training_split: null\nvalidation_split: null\n",
    )
    local(
        "g_generate",
        None,
        "test",
        data["questions"],
        """\
        test_split: test
        output_type: generate_until
        doc_to_text: "{{question}}"
        doc_to_target: "{{answer}}"
        generation_kwargs:
          until: ["\\n", "."]
          max_gen_toks: 12
          do_sample: false
        metric_list:
          - metric: exact_match
        """,
    )
    return folder, model, tokenizer, data, tasks


def evaluate(model, model_args, tasks: Path, monkeypatch, tmp_path) -> dict:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["g_arc", "g_lambada", "g_wikitext", "g_generate"],
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
        batch_size=2,
        log_samples=True,
    )


@pytest.mark.slow
def test_the_gptlab_model_gives_what_lm_evals_hf_model_gives(setup, monkeypatch, tmp_path):
    folder, model, tokenizer, data, tasks = setup
    hf = evaluate("hf", f"pretrained={folder / 'hf'},dtype=float32", tasks, monkeypatch, tmp_path)
    ours = evaluate("gptlab", f"checkpoint={folder / 'model'}", tasks, monkeypatch, tmp_path)
    for task in ("g_arc", "g_lambada", "g_wikitext"):
        theirs_samples = sorted(hf["samples"][task], key=lambda sample: sample["doc_id"])
        our_samples = sorted(ours["samples"][task], key=lambda sample: sample["doc_id"])
        for mine, theirs in zip(our_samples, theirs_samples, strict=True):
            for (a,), (b,) in zip(mine["resps"], theirs["resps"], strict=True):  # one response per request
                if task == "g_wikitext":  # the whole text's log-likelihood
                    assert a == pytest.approx(b, abs=1e-3)
                else:  # (log-likelihood, greedy or not)
                    assert a[0] == pytest.approx(b[0], abs=1e-4) and a[1] == b[1]
        for metric, value in hf["results"][task].items():
            if isinstance(value, float) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-4), (task, metric)
    generated = [sample["resps"][0][0] for sample in sorted(ours["samples"]["g_generate"], key=lambda s: s["doc_id"])]
    expected = [sample["resps"][0][0] for sample in sorted(hf["samples"]["g_generate"], key=lambda s: s["doc_id"])]
    assert generated == expected and any(generated)
    # gptlab's own scorer of the published files gives lm-eval's figures
    for path in (data["arc"], data["arc_published"]):
        mine = score(model, tokenizer, arc_items(path), "arc").metrics
        assert (mine["acc"], mine["acc_norm"]) == (
            hf["results"]["g_arc"]["acc,none"],
            hf["results"]["g_arc"]["acc_norm,none"],
        )
    mine = score(model, tokenizer, lambada_items(data["lambada"]), "lambada").metrics
    assert mine["acc"] == hf["results"]["g_lambada"]["acc,none"]
    assert mine["perplexity"] == pytest.approx(hf["results"]["g_lambada"]["perplexity,none"], rel=1e-5)


def test_the_script_is_lm_evals_command_line_with_gptlab_registered(setup):
    folder = setup[0]
    run = subprocess.run(
        [sys.executable, "-m", "gptlab.interop.lm_eval", "--model", "gptlab", "--help"], capture_output=True, text=True
    )
    assert run.returncode == 0 and "--model_args" in run.stdout
    assert lm_eval.api.registry.get_model("gptlab") is GptlabLM
    with pytest.raises(ValueError, match="dtype must be float32 or bfloat16, got 'float16'"):
        GptlabLM(str(folder / "model"), dtype="float16")


def test_gptlab_eval_scores_arc_and_lambada_files(setup, capsys):
    from gptlab.cli import main

    folder, model, tokenizer, data, _ = setup
    for task, path, items in [("arc", data["arc_published"], arc_items), ("lambada", data["lambada"], lambada_items)]:
        argv = ["eval", "--checkpoint", str(folder / "model"), "--task", task, "--data", str(path), "--device", "cpu"]
        assert main(argv) == 0
        expected = score(model, tokenizer, items(path), task).format()
        assert capsys.readouterr().out == f"{folder / 'model'} on {task} ({path}): {expected}\n"
    assert expected.startswith("acc ") and "  perplexity " in expected and expected.endswith("  (3 items)")


def test_published_files_that_are_not_the_task_are_named(tmp_path):
    from gptlab.data import DataError

    with pytest.raises(DataError, match=r"x.jsonl: line 1 is not an ARC record"):
        arc_items(
            jsonl(
                tmp_path / "x.jsonl", [{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "Z"}]
            )
        )
    with pytest.raises(DataError, match=r"y.jsonl: line 2 is not a LAMBADA record"):
        lambada_items(jsonl(tmp_path / "y.jsonl", [{"text": "two words"}, {"text": "one"}]))
