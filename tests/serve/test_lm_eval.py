"""lm-evaluation-harness against `gptlab serve`: `lm_eval --model local-completions` scores a small local task
(a YAML task over a JSONL file, `dataset_path: json`) through the server, with the server's own tokenizer
(lm-eval's remote tokenizer: /tokenizer_info and /tokenize), and its log-likelihoods must equal the model's
own log-softmax computed here without the server.

The model is made so that end-of-text is its most likely next token after every item: lm-eval asks for one
generated token with the echoed prompt and drops the last log-probability it gets back, so a server that
leaves a generated end-of-text out of `logprobs` makes it drop a continuation token instead.
"""

from __future__ import annotations

import json

import pytest
import torch
from serve_helpers import TINY, noisy_model

from gptlab.checkpoint import save_model
from gptlab.serve.background import BackgroundServer
from gptlab.tokenizer import load_tokenizer

ITEMS = [
    ("The capital of France is", " Paris."),
    ("One, two, three,", " four, five"),
    ("def main():", "\n    return 0"),
    ("Grüße aus", " Köln und Zürich"),
]


def eot_loving_model():
    """The tiny noisy model, with end-of-text pulled up to the most likely next token everywhere."""
    model = noisy_model(TINY)
    tokenizer = load_tokenizer()
    with torch.no_grad():
        direction = torch.randn(TINY.emb_dim, generator=torch.Generator().manual_seed(1))
        model.final_norm.shift.copy_(direction)
        model.out_head.weight[tokenizer.eot_id] = 3 * direction
    return model, tokenizer


def own_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log P(continuation | context) from the model's log-softmax, tokenized as lm-eval does (the whole text,
    less the context's ids), and whether the continuation is the greedy one."""
    whole, context_ids = tokenizer.encode(context + continuation), tokenizer.encode(context)
    with torch.no_grad():
        logprobs = model(torch.tensor([whole])).log_softmax(-1)[0]  # (T, V)
    targets = whole[len(context_ids) :]
    chosen = [logprobs[len(context_ids) - 1 + i, token] for i, token in enumerate(targets)]
    greedy = all(logprobs[len(context_ids) - 1 + i].argmax() == token for i, token in enumerate(targets))
    return float(sum(chosen)), bool(greedy)


@pytest.mark.slow
def test_lm_eval_local_completions_scores_what_the_model_says(tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    model, tokenizer = eot_loving_model()
    for context, continuation in ITEMS:  # the case this test is about: end-of-text comes next
        ids = tokenizer.encode(context + continuation)
        assert model(torch.tensor([ids]))[0, -1].argmax() == tokenizer.eot_id
    save_model(tmp_path / "eot-model", model, tokenizer)
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gptlab_tiny.yaml").write_text(f"""task: gptlab_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{continuation}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
""")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with BackgroundServer(tmp_path / "eot-model") as server:
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={server.url}/v1/completions,model=eot-model,tokenizer_backend=remote,num_concurrent=1,"
            "max_retries=1",
            tasks=["gptlab_tiny"],
            task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
            log_samples=True,
            batch_size=2,
        )
    samples = sorted(results["samples"]["gptlab_tiny"], key=lambda sample: sample["doc_id"])
    assert len(samples) == len(ITEMS)
    for sample, (context, continuation) in zip(samples, ITEMS):
        ((loglikelihood, greedy),) = sample["resps"][0]
        expected, expected_greedy = own_loglikelihood(model, tokenizer, context, continuation)
        assert loglikelihood == pytest.approx(expected, abs=1e-4), (context, continuation)
        assert greedy == expected_greedy
