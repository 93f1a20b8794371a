"""Instruction tuning: the templates' exact text, prompts tokenized at inference as in training, the loss on
response tokens only (against a hand computation, padded and packed), truncation and dropping, and
learning a held-out task."""

import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LETTERS, TOKENIZER, random_model, read_jsonl, tiny_config, write_jsonl

from gptlab import load_model
from gptlab.data import IGNORE_INDEX
from gptlab.finetune.instruct import (
    Conversation,
    InstructionSource,
    encode_example,
    fit_to_context,
    generate_responses,
    pack,
    to_row,
)
from gptlab.finetune.pipeline import finetune
from gptlab.finetune.rows import pad_rows
from gptlab.finetune.templates import alpaca_messages, chat_prompt_ids, encode_chat, format_chat
from gptlab.training.evaluation import loss_fn

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Sort: c a"},
    {"role": "assistant", "content": "a c"},
]


def test_alpaca_prompts_are_the_published_text():
    # The textbook's format_input (no input) and Alpaca's prompt_input, each followed by the response header.
    assert format_chat(alpaca_messages("Name a colour.", None)) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert format_chat(alpaca_messages("Sort these.", None, input="c a b")) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. Write "
        "a response that appropriately completes the request.\n\n### Instruction:\nSort these.\n\n### Input:\nc a b"
        "\n\n### Response:\n"
    )
    assert format_chat(CHAT[:4], "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello."
        "<|endoftext|><|im_start|>user\nSort: c a<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_the_prompt_for_generation_is_what_training_saw_before_the_response(template):
    ids, trained = encode_chat(TOKENIZER, CHAT, template)
    prompt = chat_prompt_ids(TOKENIZER, CHAT[:-1], template)
    assert ids[: len(prompt)] == prompt and not trained[len(prompt) - 1]
    # after it: the response and the end-of-text token, all trained
    assert TOKENIZER.decode(ids[len(prompt) :]) == "a c<|endoftext|>" and all(trained[len(prompt) :])
    assert TOKENIZER.decode(prompt) == format_chat(CHAT[:-1], template)
    # the first response is trained too, with its end-of-text; no prompt token is
    assert TOKENIZER.decode([i for i, t in zip(ids, trained) if t]) == "Hello.<|endoftext|>a c<|endoftext|>"


EXAMPLES = [
    alpaca_messages("Sort: c a b", "a b c"),
    alpaca_messages("Say hi.", "hi"),
    alpaca_messages("Sort these.", "a b d e", input="e d b a"),
]


def hand_loss(model, windows: list[list[tuple[str, str]]]) -> float:
    """Mean cross-entropy over response tokens, from the model run on each window alone (no padding), the
    responses located by the lengths of the texts: each window is a list of (prompt text, response)."""
    total, count = 0.0, 0
    for window in windows:
        ids, response_positions = [], []
        for prompt, response in window:
            ids += TOKENIZER.encode(prompt, allow_special=True)
            start = len(ids)
            ids += TOKENIZER.encode(response) + [TOKENIZER.eot_id]
            response_positions += range(start, len(ids))
        with torch.no_grad():
            log_probs = F.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
        for position in response_positions:  # token `position` is predicted at position - 1
            total -= log_probs[position - 1, ids[position]].item()
            count += 1
    return total / count


def texts(messages: list[dict]) -> tuple[str, str]:
    return format_chat(messages[:-1]), messages[-1]["content"]


def test_the_loss_of_a_padded_batch_is_taken_on_response_tokens_only():
    model = random_model(tiny_config())
    rows = [to_row(*encode_example(TOKENIZER, Conversation(m, "test"), "alpaca")) for m in EXAMPLES]
    inputs, targets = pad_rows(rows, TOKENIZER.eot_id)
    lengths = [len(row.inputs) for row in rows]
    assert inputs.shape == (3, max(lengths)) and len(set(lengths)) == 3
    for row, length in enumerate(lengths):  # padding: end-of-text ids that no loss is taken on
        assert (inputs[row, length:] == TOKENIZER.eot_id).all() and (targets[row, length:] == IGNORE_INDEX).all()
    with torch.no_grad():
        loss = loss_fn(model, torch.from_numpy(inputs), torch.from_numpy(targets)).item()
    assert loss == pytest.approx(hand_loss(model, [[texts(m)] for m in EXAMPLES]), abs=1e-5)


def test_the_loss_of_a_packed_window_is_taken_on_each_examples_response():
    model = random_model(tiny_config(context_length=1024))
    examples = [encode_example(TOKENIZER, Conversation(m, "test"), "alpaca") for m in EXAMPLES]
    (window,) = pack(examples, 1024)
    assert len(window[0]) == sum(len(ids) for ids, _ in examples)
    inputs, targets = pad_rows([to_row(*window)], TOKENIZER.eot_id)
    with torch.no_grad():
        loss = loss_fn(model, torch.from_numpy(inputs), torch.from_numpy(targets)).item()
    assert loss == pytest.approx(hand_loss(model, [[texts(m) for m in EXAMPLES]]), abs=1e-5)
    # a context that holds two of them: the third starts a window of its own
    assert [len(w[0]) for w in pack(examples, len(examples[0][0]) + len(examples[1][0]))] == [
        len(examples[0][0]) + len(examples[1][0]),
        len(examples[2][0]),
    ]


def test_long_examples_are_truncated_or_dropped_and_counted():
    examples = [encode_example(TOKENIZER, Conversation(m, "test"), "alpaca") for m in EXAMPLES]
    prompt_lengths = [len(chat_prompt_ids(TOKENIZER, m[:-1])) for m in EXAMPLES]
    # room for the first example's prompt and one response token, the whole second one, none of the third
    context = prompt_lengths[0] + 1
    assert len(examples[0][0]) > context + 1 >= len(examples[1][0]) and prompt_lengths[2] > context
    cut = fit_to_context(examples, context, "truncate")
    assert (len(cut.examples), cut.truncated, cut.dropped) == (2, 1, 1)
    assert cut.examples == [(examples[0][0][: context + 1], examples[0][1][: context + 1]), examples[1]]
    assert cut.describe("training") == "training: 2 examples, 1 of them truncated to the context; 1 dropped"
    dropped = fit_to_context(examples, context, "drop")
    assert (dropped.examples, dropped.truncated, dropped.dropped) == ([examples[1]], 0, 2)
    assert fit_to_context(examples, 1000, "drop").examples == examples


def test_batches_cover_every_example_once_per_epoch_and_resume_mid_epoch():
    rows = [to_row([i] * (i % 3 + 2), [True] * (i % 3 + 2)) for i in range(10)]  # distinct, of 3 lengths
    source = InstructionSource(rows, rows, [], TOKENIZER, "alpaca", 8, 4, 0)
    assert source.epoch_tokens == 8 * 8  # two whole batches of 4 per epoch, each a nominal full context
    batches = source.batches(4, 7)
    first_epoch = [next(batches) for _ in range(2)]
    shown = [tuple(row[row != TOKENIZER.eot_id]) for batch in first_epoch for row in batch.inputs]
    assert len(set(shown)) == 8  # distinct rows (each row of `rows` is distinct)
    third = next(batches)
    assert np.array_equal(next(source.batches(4, 7, *first_epoch[0].resume_at)).inputs, first_epoch[1].inputs)
    resumed = next(source.batches(4, 7, *first_epoch[-1].resume_at))
    assert np.array_equal(third.inputs, resumed.inputs) and third.epoch == 1
    two_ranks = [next(source.batches(4, 7, 0, 0, rank, 2)) for rank in range(2)]
    assert np.array_equal(np.concatenate([b.inputs for b in two_ranks]), first_epoch[0].inputs)


def sort_records(triples) -> list[dict]:
    return [{"instruction": f"Sort: {' '.join(t)}", "output": f"Sorted: {' '.join(sorted(t))}"} for t in triples]


@pytest.mark.slow
def test_instruction_tuning_learns_to_sort_letters_it_never_saw_together(pretrained, tmp_path):
    # Sort three of eight letters: 336 prompts. Eight letter sets (48 prompts) are never trained on.
    triples = list(itertools.permutations(LETTERS, 3))
    sets = sorted({tuple(sorted(t)) for t in triples})
    random.Random(0).shuffle(sets)
    held_out = [t for t in triples if tuple(sorted(t)) in sets[:8]][::2]
    data = write_jsonl(tmp_path / "sort.jsonl", sort_records([t for t in triples if tuple(sorted(t)) not in sets[:8]]))
    result = finetune(
        "instruct",
        init=str(pretrained),
        data=str(data),
        out=str(tmp_path / "run"),
        template="chatml",
        max_steps=300,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        eval_interval=150,
        sample_tokens=16,
        progress=False,
        device="cpu",
        log=lambda line: None,
    )
    assert result.run.state.step == 300
    model, tokenizer = load_model(tmp_path / "run" / "last")
    prompts = [alpaca_messages(record["instruction"], None, template="chatml") for record in sort_records(held_out)]
    responses = generate_responses(model, tokenizer, prompts, "chatml", 16)
    accuracy = np.mean([r == e["output"] for r, e in zip(responses, sort_records(held_out))])
    # Measured 0.92 on the project's machine (0.79 and 0.96 with --seed 1 and 7); a model that knew the format
    # but not the task would get 1 in 6 (any order of the right letters), one that knew nothing 1 in 336.
    assert accuracy >= 0.6, list(zip(responses, held_out))
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")  # three validation prompts answered per evaluation
    assert [s["step"] for s in samples] == [150] * 3 + [300] * 3
    last = samples[3:]
    messages = [alpaca_messages(s["prompt"], None, template="chatml") for s in last]
    assert [s["response"] for s in last] == generate_responses(model, tokenizer, messages, "chatml", 16)
